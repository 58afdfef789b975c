//! The forwarder over real HTTP on loopback against the provider test servers.

use tally_billing::testing as support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use support::{
    Fault, TestServer, account, at, binding, config, meters, one_account_per_project, sink,
};
use tally_billing::{Attribution, Forwarder, MemoryUsageSource, Provider, UsageSource};
use tally_delivery::Registry;

fn dims(region: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("region".to_string(), region.to_string())])
}

fn d(n: i64) -> Decimal {
    Decimal::from(n)
}

fn key(account: &str, meter: &str) -> (String, String) {
    (format!("uid-{account}"), format!("api-{meter}"))
}

async fn start(
    server: &TestServer,
    provider: Provider,
    source: &Arc<MemoryUsageSource>,
    attribution: Attribution,
    dir: &std::path::Path,
) -> Forwarder {
    let config = config(
        sink(&server.url, provider, 0),
        meters(&["requests", "bytes"]),
        dir,
    );
    let source: Arc<dyn UsageSource> = source.clone();
    Forwarder::start(config, source, attribution, &Registry::new())
        .await
        .unwrap()
}

struct Fixture {
    server: TestServer,
    dir: tempfile::TempDir,
    source: Arc<MemoryUsageSource>,
}

impl Fixture {
    async fn start(&self, provider: Provider, attribution: Attribution) -> Forwarder {
        start(
            &self.server,
            provider,
            &self.source,
            attribution,
            self.dir.path(),
        )
        .await
    }
}

async fn fixture(key: &str) -> Fixture {
    Fixture {
        server: TestServer::start(key).await,
        dir: tempfile::tempdir().unwrap(),
        source: Arc::new(MemoryUsageSource::new()),
    }
}

async fn assert_reconciled(forwarder: &Forwarder, to: jiff::Timestamp) {
    let differences = forwarder.reconcile(at(0), to).await.unwrap();
    assert!(differences.is_empty(), "{differences:?}");
}

async fn pass(forwarder: &mut Forwarder, now: jiff::Timestamp) {
    forwarder.run_once(now).await.unwrap();
    settle(forwarder).await;
}

async fn settle(forwarder: &mut Forwarder) {
    assert!(forwarder.wait_idle(Duration::from_secs(20)).await.unwrap());
}

#[tokio::test]
async fn windows_are_forwarded_once_closed_and_late_events_become_corrections() {
    let fx = fixture(support::API_KEY).await;
    let (server, source) = (&fx.server, &fx.source);
    source.add("requests", "p0", at(10), dims("eu"), d(3));
    source.add("requests", "p0", at(20), dims("us"), d(4));
    source.add("requests", "p1", at(70), dims("eu"), d(5));
    source.add("bytes", "p1", at(30), BTreeMap::new(), Decimal::new(15, 1));
    // Still open at the first pass (window [120, 180)).
    source.add("requests", "p0", at(130), dims("eu"), d(100));
    let mut forwarder = fx
        .start(Provider::Amberflo, one_account_per_project(2))
        .await;

    let report = forwarder.run_once(at(125)).await.unwrap();
    assert_eq!(report.windows, 4, "two closed windows per meter");
    assert_eq!(report.records, 4);
    settle(&mut forwarder).await;
    assert_eq!(
        server.sums(),
        BTreeMap::from([
            (key("a0", "requests"), d(7)),
            (key("a1", "requests"), d(5)),
            (key("a1", "bytes"), Decimal::new(15, 1)),
        ])
    );
    // Nothing new: nothing sent.
    assert_eq!(forwarder.run_once(at(126)).await.unwrap().records, 0);

    // A late event in a sent window, and a void (negative) in another.
    source.add("requests", "p0", at(15), dims("eu"), d(2));
    source.add("requests", "p1", at(61), dims("eu"), d(-5));
    let report = forwarder.run_once(at(181)).await.unwrap();
    assert_eq!(report.records, 3, "two corrections and window [120,180)");
    settle(&mut forwarder).await;
    let sums = server.sums();
    assert_eq!(sums[&key("a0", "requests")], d(109));
    assert_eq!(sums[&key("a1", "requests")], d(0));
    assert_eq!(server.state().duplicates, 0);

    let status = forwarder.status(at(200));
    let requests = &status.meters[0];
    assert_eq!(requests.meter, "requests");
    assert_eq!(requests.records_sent, 6);
    assert_eq!(requests.corrections_sent, 2);
    assert_eq!(requests.records_pending, 0);
    assert_eq!(requests.forwarded_until, Some(at(180)));
    assert_eq!(requests.lag, Some(Duration::from_secs(20)));
    assert_reconciled(&forwarder, at(180)).await;
}

#[tokio::test]
async fn usage_becomes_attributed_when_a_covering_binding_appears() {
    let fx = fixture(support::API_KEY).await;
    let (server, source) = (&fx.server, &fx.source);
    source.add("requests", "web", at(10), dims("eu"), d(3));
    source.add("requests", "web", at(70), dims("eu"), d(4));
    source.add("requests", "web", at(95), dims("eu"), d(6));
    source.add("requests", "web", at(130), dims("eu"), d(5));
    let accounts = [account("acme"), account("globex")];
    let mut forwarder = fx
        .start(Provider::Amberflo, Attribution::new(&accounts, &[]))
        .await;
    pass(&mut forwarder, at(200)).await;
    assert!(server.sums().is_empty());
    assert_eq!(forwarder.status(at(200)).meters[0].unattributed, d(18));

    // acme from 0:00; globex established at 1:30 takes effect at the next
    // whole minute, 2:00, so the usage at 1:35 stays acme's.
    let bindings = [binding("acme", "web", 0), binding("globex", "web", 90)];
    forwarder
        .set_attribution(Attribution::new(&accounts, &bindings))
        .unwrap();
    pass(&mut forwarder, at(201)).await;
    assert_eq!(
        server.sums(),
        BTreeMap::from([
            (key("acme", "requests"), d(13)),
            (key("globex", "requests"), d(5))
        ])
    );
    assert_eq!(forwarder.status(at(201)).meters[0].unattributed, d(0));
}

#[tokio::test]
async fn attribution_changes_while_stopped_are_caught_up_after_restart() {
    let fx = fixture(support::API_KEY).await;
    let (server, source) = (&fx.server, &fx.source);
    source.add("requests", "web", at(10), dims("eu"), d(3));
    let accounts = [account("acme")];
    let mut forwarder = fx
        .start(Provider::Amberflo, Attribution::new(&accounts, &[]))
        .await;
    forwarder.run_once(at(200)).await.unwrap();
    forwarder.shutdown(Duration::from_secs(5)).await.unwrap();
    let bound = Attribution::new(&accounts, &[binding("acme", "web", 0)]);
    let mut forwarder = fx.start(Provider::Amberflo, bound).await;
    pass(&mut forwarder, at(201)).await;
    assert_eq!(
        server.sums(),
        BTreeMap::from([(key("acme", "requests"), d(3))])
    );
}

#[tokio::test]
async fn retries_429_5xx_and_timeouts_without_double_counting() {
    let fx = fixture(support::API_KEY).await;
    let (server, dir, source) = (&fx.server, &fx.dir, &fx.source);
    for i in 0..120 {
        source.add(
            "requests",
            &format!("p{}", i % 3),
            at(i),
            dims("eu"),
            d(i + 1),
        );
    }
    server.push_faults([
        Fault::Status(429, Some(1)),
        Fault::Status(503, None),
        Fault::Status(500, None),
        Fault::SlowAnswer(Duration::from_secs(3)),
    ]);
    let mut config = config(
        sink(&server.url, Provider::Amberflo, 0),
        meters(&["requests"]),
        dir.path(),
    );
    config.retry.request_timeout = Duration::from_millis(500);
    let mut forwarder = Forwarder::start(
        config,
        source.clone(),
        one_account_per_project(3),
        &Registry::new(),
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    pass(&mut forwarder, at(180)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    let expected: Decimal = (1..=120).map(Decimal::from).sum();
    assert_eq!(server.sums().values().copied().sum::<Decimal>(), expected);
    assert!(
        server.state().duplicates > 0,
        "the timed-out batch was sent again"
    );
    let status = forwarder.status(at(180));
    assert!(status.retries >= 4, "{status:?}");
    assert_eq!(status.dead_letters, 0);
    assert_reconciled(&forwarder, at(180)).await;
}

#[tokio::test]
async fn a_refused_batch_is_dead_lettered_and_the_forwarder_goes_on() {
    let fx = fixture(support::API_KEY).await;
    let (server, source) = (&fx.server, &fx.source);
    source.add("requests", "p0", at(10), dims("eu"), d(3));
    server.push_faults([Fault::Status(400, None)]);
    let mut forwarder = fx
        .start(Provider::Amberflo, one_account_per_project(1))
        .await;
    pass(&mut forwarder, at(60)).await;
    source.add("requests", "p0", at(70), dims("eu"), d(4));
    pass(&mut forwarder, at(120)).await;
    assert_eq!(
        server.sums(),
        BTreeMap::from([(key("a0", "requests"), d(4))])
    );
    let status = forwarder.status(at(120));
    assert_eq!(status.meters[0].records_dead_lettered, 1);
    assert_eq!(status.dead_letters, 1);
    let letters = forwarder.dead_letters().unwrap();
    assert_eq!(letters[0].status, Some(400));
    assert!(letters[0].answer.contains("injected fault"));
    assert_eq!(letters[0].records.len(), 1);
    let diffs = forwarder.reconcile(at(0), at(120)).await.unwrap();
    assert_eq!(diffs.len(), 1);
    assert_eq!((diffs[0].ledger, diffs[0].acknowledged), (d(7), d(4)));

    // The dead letter is durable: it is still there after a restart.
    forwarder.shutdown(Duration::from_secs(1)).await.unwrap();
    let mut forwarder = fx
        .start(Provider::Amberflo, one_account_per_project(1))
        .await;
    let again = forwarder.dead_letters().unwrap();
    assert_eq!(again, letters);
    assert_eq!(forwarder.status(at(120)).dead_letters, 1);

    // An operator retries it: the same uniqueId is sent, acknowledged and
    // checkpointed, and the letter is gone.
    assert!(forwarder.retry_dead_letter(letters[0].id).await.unwrap());
    assert!(!forwarder.retry_dead_letter(letters[0].id).await.unwrap());
    settle(&mut forwarder).await;
    assert_reconciled(&forwarder, at(120)).await;
    assert!(forwarder.dead_letters().unwrap().is_empty());
    assert_eq!(forwarder.status(at(120)).dead_letters, 0);
    assert_eq!(
        server.sums(),
        BTreeMap::from([(key("a0", "requests"), d(7))])
    );
    assert!(
        server
            .state()
            .seen
            .contains(&letters[0].records[0].unique_id)
    );
}

#[tokio::test]
async fn unanswered_records_are_resent_with_the_same_ids_after_a_restart() {
    let fx = fixture(support::API_KEY).await;
    let (server, source) = (&fx.server, &fx.source);
    source.add("requests", "p0", at(10), dims("eu"), d(3));
    // Stored, but the answer never arrives in time.
    server.push_faults([Fault::SlowAnswer(Duration::from_secs(30))]);
    let mut forwarder = fx
        .start(Provider::Amberflo, one_account_per_project(1))
        .await;
    forwarder.run_once(at(60)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    forwarder.shutdown(Duration::from_millis(10)).await.unwrap();
    assert_eq!(server.state().accepted_records, 1);
    let mut forwarder = fx
        .start(Provider::Amberflo, one_account_per_project(1))
        .await;
    assert_eq!(forwarder.pending_records(), 1);
    assert_eq!(forwarder.run_once(at(61)).await.unwrap().records, 0);
    settle(&mut forwarder).await;
    assert_eq!(server.state().duplicates, 1);
    assert_eq!(
        server.sums(),
        BTreeMap::from([(key("a0", "requests"), d(3))])
    );
}

#[tokio::test]
async fn openmeter_adapter_forwards_the_same_totals() {
    let fx = fixture(support::API_KEY).await;
    let (server, source) = (&fx.server, &fx.source);
    source.add("requests", "p0", at(10), dims("eu"), d(3));
    source.add("requests", "p0", at(11), dims("us"), d(4));
    source.add("bytes", "p1", at(12), BTreeMap::new(), d(1 << 40));
    let mut forwarder = fx
        .start(Provider::Openmeter, one_account_per_project(2))
        .await;
    pass(&mut forwarder, at(60)).await;
    source.add("requests", "p0", at(12), dims("us"), d(1));
    pass(&mut forwarder, at(61)).await;
    assert_eq!(
        server.sums(),
        BTreeMap::from([
            (key("a0", "requests"), d(8)),
            (key("a1", "bytes"), d(1 << 40))
        ])
    );
    assert!(server.state().refused.is_empty());
}

#[tokio::test]
async fn a_refused_destination_dead_letters_at_once_until_the_operator_allows_it() {
    let fx = fixture(support::API_KEY).await;
    let (server, source) = (&fx.server, &fx.source);
    source.add("requests", "p0", at(10), dims("eu"), d(3));
    let mut strict = config(
        sink(&server.url, Provider::Amberflo, 0),
        meters(&["requests", "bytes"]),
        fx.dir.path(),
    );
    strict.egress = tally_delivery::EgressPolicy::default();
    let mut forwarder = Forwarder::start(
        strict,
        fx.source.clone(),
        one_account_per_project(1),
        &Registry::new(),
    )
    .await
    .unwrap();
    pass(&mut forwarder, at(60)).await;
    let letters = forwarder.dead_letters().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, tally_delivery::DESTINATION_REFUSED);
    assert_eq!(letters[0].status, None);
    assert_eq!(letters[0].attempts, 1, "a refusal is not retried");
    assert_eq!(
        letters[0].answer,
        "destination 127.0.0.1 is a loopback address; refused (operators may allow it with \
         egress.allow in the server config)"
    );
    assert_eq!(server.state().requests, 0, "nothing reached the provider");

    // The operator allows it; a retry of the dead letter gets through.
    forwarder.shutdown(Duration::from_secs(1)).await.unwrap();
    let mut forwarder = fx
        .start(Provider::Amberflo, one_account_per_project(1))
        .await;
    assert!(forwarder.retry_dead_letter(letters[0].id).await.unwrap());
    settle(&mut forwarder).await;
    assert_reconciled(&forwarder, at(60)).await;
    assert_eq!(
        server.sums(),
        BTreeMap::from([(key("a0", "requests"), d(3))])
    );
}

#[tokio::test]
async fn a_wrong_api_key_dead_letters_without_showing_the_key() {
    let fx = fixture("the-right-key").await;
    let source = &fx.source;
    source.add("requests", "p0", at(10), dims("eu"), d(3));
    let mut forwarder = fx
        .start(Provider::Amberflo, one_account_per_project(1))
        .await;
    pass(&mut forwarder, at(60)).await;
    let letters = forwarder.dead_letters().unwrap();
    assert_eq!(letters[0].status, Some(401));
    let shown = format!(
        "{letters:?} {} {forwarder:?} {:?}",
        serde_json::to_string(&letters).unwrap(),
        forwarder.status(at(60))
    );
    assert!(!shown.contains(support::API_KEY), "{shown}");
}

#[tokio::test]
async fn a_pass_coalesces_every_change_of_a_window_into_one_correction() {
    let fx = fixture(support::API_KEY).await;
    let (server, source) = (&fx.server, &fx.source);
    source.add("requests", "p0", at(10), dims("eu"), d(1));
    let mut forwarder = fx
        .start(Provider::Amberflo, one_account_per_project(1))
        .await;
    pass(&mut forwarder, at(60)).await;
    // Fifty late events and two voids in the same window, one pass later.
    for i in 0..50 {
        source.add("requests", "p0", at(i), dims("eu"), d(2));
    }
    source.add("requests", "p0", at(20), dims("eu"), d(-2));
    source.add("requests", "p0", at(30), dims("eu"), d(-2));
    let report = forwarder.run_once(at(61)).await.unwrap();
    assert_eq!(
        report.records, 1,
        "one correction per (customer, meter, window, dims)"
    );
    settle(&mut forwarder).await;
    assert_eq!(server.sums()[&key("a0", "requests")], d(97));
    assert_eq!(server.state().accepted_records, 2);
    let status = forwarder.status(at(61));
    let requests = &status.meters[0];
    assert_eq!((requests.records_sent, requests.corrections_sent), (2, 1));
    assert_eq!(requests.events_read, 53);
}

#[tokio::test]
async fn one_stalled_request_does_not_hold_the_sink() {
    let fx = fixture(support::API_KEY).await;
    let (server, source) = (&fx.server, &fx.source);
    for p in 0..40 {
        source.add("requests", &format!("p{p}"), at(10), dims("eu"), d(1));
    }
    // The first request is stored but answered only after 20 s.
    server.push_faults([Fault::SlowAnswer(Duration::from_secs(20))]);
    let mut sink = sink(&server.url, Provider::Amberflo, 0);
    sink.batch_size = 5;
    sink.request_timeout = Duration::from_secs(30);
    let config = config(sink, meters(&["requests"]), fx.dir.path());
    let mut forwarder = Forwarder::start(
        config,
        source.clone(),
        one_account_per_project(40),
        &Registry::new(),
    )
    .await
    .unwrap();
    forwarder.run_once(at(60)).await.unwrap();
    // Everything but the stalled batch is acknowledged well before 20 s.
    assert!(!forwarder.wait_idle(Duration::from_secs(3)).await.unwrap());
    let status = forwarder.status(at(60));
    assert_eq!(status.meters[0].records_sent, 35, "{status:?}");
    assert_eq!(status.meters[0].records_pending, 5);
    forwarder.shutdown(Duration::from_millis(10)).await.unwrap();
}

#[tokio::test]
async fn counters_and_unattributed_usage_survive_restarts() {
    let fx = fixture(support::API_KEY).await;
    let source = &fx.source;
    source.add("requests", "p0", at(10), dims("eu"), d(3));
    source.add("requests", "p0", at(70), dims("eu"), d(4));
    // p7 and p8 have usage but no binding.
    source.add("requests", "p7", at(11), dims("eu"), d(5));
    source.add("requests", "p8", at(71), dims("us"), d(6));
    let mut forwarder = fx
        .start(Provider::Amberflo, one_account_per_project(1))
        .await;
    pass(&mut forwarder, at(120)).await;
    source.add("requests", "p0", at(20), dims("eu"), d(1));
    pass(&mut forwarder, at(121)).await;
    let before = forwarder.status(at(121)).meters[0].clone();
    assert_eq!((before.records_sent, before.corrections_sent), (3, 1));
    assert_eq!(before.unattributed, d(11));
    assert_eq!(before.unattributed_projects, 2);
    assert_eq!(before.events_read, 5);
    forwarder.shutdown(Duration::from_secs(1)).await.unwrap();

    let forwarder = fx
        .start(Provider::Amberflo, one_account_per_project(1))
        .await;
    let after = forwarder.status(at(121)).meters[0].clone();
    assert_eq!(after, before, "the same counters after a restart");
}

/// The provider's own totals, not Tally's acknowledgements: records lost
/// or added at the provider show as drift in either direction.
async fn reconcile_reads_the_providers_own_totals(provider: Provider) {
    let fx = fixture(support::API_KEY).await;
    let (server, source) = (&fx.server, &fx.source);
    source.add("requests", "p0", at(10), dims("eu"), d(3));
    source.add("requests", "p1", at(70), dims("eu"), d(4));
    let mut forwarder = fx.start(provider, one_account_per_project(2)).await;
    pass(&mut forwarder, at(180)).await;
    assert_reconciled(&forwarder, at(180)).await;

    // The provider loses a0's record and someone else adds usage to a1.
    {
        let mut state = server.state();
        state.records.retain(|r| r.customer != "uid-a0");
        let mut extra = state.records[0].clone();
        extra.value = d(10);
        state.records.push(extra);
    }
    let drift = forwarder.reconcile(at(0), at(180)).await.unwrap();
    let shown: Vec<(String, Decimal, Decimal, Decimal, Decimal)> = drift
        .into_iter()
        .map(|d| (d.customer_id, d.ledger, d.acknowledged, d.provider, d.drift))
        .collect();
    assert_eq!(
        shown,
        vec![
            ("uid-a0".into(), d(3), d(3), d(0), d(-3)),
            ("uid-a1".into(), d(4), d(4), d(14), d(10)),
        ]
    );
    // Both readings ask about whole hours: a range inside the hour reads
    // the same totals; so does a whole day (Amberflo is asked in DAY
    // buckets then).
    assert_eq!(forwarder.reconcile(at(30), at(90)).await.unwrap().len(), 2);
    assert_eq!(
        forwarder.reconcile(at(0), at(86_400)).await.unwrap().len(),
        2
    );
}

#[tokio::test]
async fn reconcile_reads_amberflos_usage_api() {
    reconcile_reads_the_providers_own_totals(Provider::Amberflo).await;
}

#[tokio::test]
async fn reconcile_reads_openmeters_query_api() {
    reconcile_reads_the_providers_own_totals(Provider::Openmeter).await;
}

#[tokio::test]
async fn reconcile_fails_with_the_status_and_tallys_words_when_the_provider_is_down() {
    let fx = fixture(support::API_KEY).await;
    fx.source.add("requests", "p0", at(10), dims("eu"), d(3));
    let forwarder = fx
        .start(Provider::Amberflo, one_account_per_project(1))
        .await;
    fx.server.state().down = true;
    let error = forwarder.reconcile(at(0), at(60)).await.unwrap_err();
    let shown = error.to_string();
    assert!(
        shown.contains("HTTP 503") && shown.contains("the provider failed"),
        "{shown}"
    );
    assert!(
        !shown.contains("maintenance"),
        "not the provider's words: {shown}"
    );
}

#[tokio::test]
async fn a_sink_refuses_to_restart_with_another_window_size() {
    let fx = fixture(support::API_KEY).await;
    fx.source.add("requests", "p0", at(10), dims("eu"), d(3));
    let mut forwarder = fx
        .start(Provider::Amberflo, one_account_per_project(1))
        .await;
    pass(&mut forwarder, at(120)).await;
    forwarder.shutdown(Duration::from_secs(1)).await.unwrap();
    let mut hourly = sink(&fx.server.url, Provider::Amberflo, 0);
    hourly.window = Duration::from_secs(3600);
    let config = config(hourly, meters(&["requests", "bytes"]), fx.dir.path());
    let source: Arc<dyn UsageSource> = fx.source.clone();
    let refused = Forwarder::start(config, source, one_account_per_project(1), &Registry::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("made with 60s windows"), "{refused}");
    assert_eq!(
        fx.server.sums()[&key("a0", "requests")],
        d(3),
        "nothing sent twice"
    );
}
