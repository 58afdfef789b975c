//! Random usage (late events and voids included), random bindings (moves and
//! retroactive ones), forwarding passes with injected 429/5xx/timeouts: the
//! provider's per-(account, meter) sums must equal a naive model of the
//! ledger, every acknowledged revision must be counted exactly once, no
//! pass sends more than one record per (customer, meter, window, dimension
//! values), and the unattributed usage equals the model's usage of
//! projects no binding covered.

use tally_billing::testing as support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use rust_decimal::Decimal;
use support::{Fault, TestServer, account, at, binding, config, meters, sink};
use tally_billing::{Attribution, BillingAccountBinding, Forwarder, MemoryUsageSource, Provider};
use tally_delivery::Registry;

const METERS: [&str; 2] = ["requests", "bytes"];
const ACCOUNTS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// meter, project, second, region, value
    Use(usize, usize, i64, usize, i64),
    /// project → account from second
    Bind(usize, usize, i64),
    /// advance the clock by seconds and run a pass, with these faults first
    Pass(i64, Vec<Fault>),
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        Just(Fault::Status(429, Some(0))),
        Just(Fault::Status(503, None)),
        Just(Fault::Status(500, None)),
        Just(Fault::SlowAnswer(Duration::from_millis(300))),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..2usize, 0..4usize, 0..600i64, 0..2usize, -3..20i64)
            .prop_map(|(m, p, s, r, v)| Op::Use(m, p, s, r, v)),
        1 => (0..4usize, 0..ACCOUNTS, 0..600i64).prop_map(|(p, a, s)| Op::Bind(p, a, s)),
        2 => (0..200i64, proptest::collection::vec(fault(), 0..3))
            .prop_map(|(s, f)| Op::Pass(s, f)),
    ]
}

/// The naive model: who owns project p at second t. A binding takes effect
/// at the first whole minute at or after it was established.
fn model_owner(bindings: &[BillingAccountBinding], project: &str, t: i64) -> Option<String> {
    let effective = |b: &BillingAccountBinding| {
        b.established_at.map(|e| {
            let s = e.as_second();
            let minute = if s % 60 == 0 { s } else { (s / 60 + 1) * 60 };
            jiff::Timestamp::from_second(minute).unwrap()
        })
    };
    bindings
        .iter()
        .filter(|b| b.project == project && effective(b).is_some_and(|e| e <= at(t)))
        .max_by_key(|b| (effective(b), b.name.clone()))
        .map(|b| format!("uid-{}", b.account))
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let server = TestServer::start(support::API_KEY).await;
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(MemoryUsageSource::new());
        let accounts: Vec<_> = (0..ACCOUNTS).map(|a| account(&format!("a{a}"))).collect();
        let mut bindings: Vec<BillingAccountBinding> = vec![binding("a0", "p0", 0)];
        let mut events: Vec<(usize, String, i64, Decimal)> = Vec::new();
        let mut config = config(
            sink(&server.url, Provider::Amberflo, 30),
            meters(&METERS),
            dir.path(),
        );
        config.retry.request_timeout = Duration::from_millis(150);
        let mut forwarder = Forwarder::start(
            config,
            source.clone(),
            Attribution::new(&accounts, &bindings),
            &Registry::new(),
        )
        .await
        .unwrap();
        let mut now = 0;
        let mut passes = 1u64;
        for op in ops {
            match op {
                Op::Use(m, p, s, r, v) => {
                    let dims = BTreeMap::from([("region".to_string(), format!("r{r}"))]);
                    let project = format!("p{p}");
                    source.add(METERS[m], &project, at(s), dims, Decimal::from(v));
                    events.push((m, project, s, Decimal::from(v)));
                }
                Op::Bind(p, a, s) => {
                    bindings.push(binding(&format!("a{a}"), &format!("p{p}"), s));
                    forwarder
                        .set_attribution(Attribution::new(&accounts, &bindings))
                        .unwrap();
                }
                Op::Pass(advance, faults) => {
                    now += advance;
                    server.push_faults(faults);
                    forwarder.run_once(at(now)).await.unwrap();
                    passes += 1;
                }
            }
        }
        // Everything closes; faults may still be queued at the server.
        forwarder.run_once(at(10_000)).await.unwrap();
        prop_assert!(forwarder.wait_idle(Duration::from_secs(60)).await.unwrap());

        let mut model: BTreeMap<(String, String), Decimal> = BTreeMap::new();
        for (m, project, s, v) in &events {
            if let Some(owner) = model_owner(&bindings, project, *s) {
                *model
                    .entry((owner, format!("api-{}", METERS[*m])))
                    .or_default() += v;
            }
        }
        model.retain(|_, v| !v.is_zero());
        let unattributed: Decimal = events
            .iter()
            .filter(|(_, project, s, _)| model_owner(&bindings, project, *s).is_none())
            .map(|(_, _, _, v)| *v)
            .sum();
        let status = forwarder.status(at(10_000));
        let shown: Decimal = status.meters.iter().map(|m| m.unattributed).sum();
        prop_assert_eq!(shown, unattributed);
        // Coalescing: at most one record per key and pass.
        let mut per_key: BTreeMap<_, u64> = BTreeMap::new();
        for r in &server.state().records {
            *per_key
                .entry((
                    r.customer.clone(),
                    r.meter.clone(),
                    r.time_ms,
                    r.dimensions.clone(),
                ))
                .or_default() += 1;
        }
        prop_assert!(per_key.values().all(|n| *n <= passes), "{:?}", per_key);
        let mut provider = server.sums();
        provider.retain(|_, v| !v.is_zero());
        prop_assert_eq!(&provider, &model);

        let acked: u64 = forwarder
            .status(at(10_000))
            .meters
            .iter()
            .map(|m| m.records_sent)
            .sum();
        prop_assert_eq!(
            acked,
            server.state().accepted_records,
            "each acknowledged revision counted once"
        );
        prop_assert!(
            forwarder
                .reconcile(at(0), at(10_000))
                .await
                .unwrap()
                .is_empty()
        );
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn provider_sums_equal_the_ledger_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops)?;
    }
}
