//! Aggregation and supplementary events against a naive reference model,
//! for any interleaving of late lines, any flush points and any restart
//! point.

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;
use serde_json::Value;
use tally_collect::{
    Aggregator, CorpusConfig, CorpusGenerator, ExpectedTotals, Meter, RouteKey, WindowConfig,
    WindowUsage, event_id, parse_route_name,
};

/// The naive model: every line parsed into a generic JSON value, requests
/// and bytes summed per (route, window); a stream's records add what their
/// cumulative counters gained, in the window of `start_time + duration`.
fn naive_windows(lines: &[String], window: i64) -> BTreeMap<(RouteKey, i64, Meter), u128> {
    let mut sums = BTreeMap::new();
    let mut streams: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    for line in lines {
        let Ok(Value::Object(o)) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let number = |k: &str| match o.get(k) {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.parse::<u64>().ok(),
            _ => None,
        };
        let numbers = [
            "bytes_received",
            "bytes_sent",
            "duration",
            "response_code",
            "downstream_wire_bytes_received",
            "downstream_wire_bytes_sent",
        ];
        if numbers
            .iter()
            .any(|k| matches!(o.get(*k), Some(Value::String(s)) if s != "-" && s.parse::<u64>().is_err()))
        {
            continue; // a malformed line
        }
        let Some(Ok(at)) = o
            .get("start_time")
            .and_then(Value::as_str)
            .map(str::parse::<jiff::Timestamp>)
        else {
            continue;
        };
        let route_name = o.get("route_name").and_then(Value::as_str).unwrap_or("-");
        let Some(route) = parse_route_name(route_name) else {
            continue;
        };
        let project = o.get("project_name").and_then(Value::as_str);
        let Some(key) = RouteKey::new(&route, project) else {
            continue;
        };
        let mut at = at.as_millisecond();
        let mut ingress = number("downstream_wire_bytes_received").or(number("bytes_received"));
        let mut egress = number("downstream_wire_bytes_sent").or(number("bytes_sent"));
        let mut requests = 1;
        match o.get("access_log_type").and_then(Value::as_str) {
            None => {}
            Some("DownstreamStart") => continue,
            Some(kind) => {
                let id = o["x-request-id"].as_str().unwrap().to_owned();
                let now = [
                    number("duration").unwrap_or(0),
                    ingress.unwrap_or(0),
                    egress.unwrap_or(0),
                ];
                let before = streams.insert(id.clone(), now).unwrap_or_default();
                if kind == "DownstreamEnd" {
                    streams.remove(&id);
                } else {
                    requests = 0;
                }
                at += now[0] as i64;
                ingress = Some(now[1] - before[1]);
                egress = Some(now[2] - before[2]);
            }
        }
        let w = at.div_euclid(window) * window;
        for (meter, v) in [
            (Meter::Requests, Some(requests)),
            (Meter::IngressBytes, ingress),
            (Meter::EgressBytes, egress),
        ] {
            *sums.entry((key.clone(), w, meter)).or_default() += u128::from(v.unwrap_or(0));
        }
    }
    sums.retain(|_, v| *v > 0);
    sums
}

fn per_window(out: &[WindowUsage]) -> BTreeMap<(RouteKey, i64, Meter), u128> {
    let mut sums = BTreeMap::new();
    for u in out.iter().filter(|u| u.meter != Meter::ConnectionSeconds) {
        *sums
            .entry((u.route.clone(), u.window_start_millis, u.meter))
            .or_default() += u.value;
    }
    sums
}

fn check_route_totals(out: &[WindowUsage], expected: &ExpectedTotals) {
    let mut got: BTreeMap<RouteKey, [u128; 4]> = BTreeMap::new();
    for u in out {
        got.entry(u.route.clone()).or_default()[u.meter as usize] += u.value;
    }
    for (route, t) in &expected.per_route {
        let g = got.remove(route).unwrap_or_default();
        assert_eq!(
            g[Meter::Requests as usize],
            u128::from(t.requests),
            "{route}"
        );
        assert_eq!(g[Meter::IngressBytes as usize], t.ingress_bytes, "{route}");
        assert_eq!(g[Meter::EgressBytes as usize], t.egress_bytes, "{route}");
        assert_eq!(
            g[Meter::ConnectionSeconds as usize],
            t.connection_millis,
            "{route}"
        );
    }
    assert!(
        got.is_empty(),
        "usage for routes not in the corpus: {got:?}"
    );
}

/// Runs the lines through an aggregator, flushing after the lines in
/// `flush_after` and restarting from a serialised state after those in
/// `restart_after`.
fn run(
    lines: &[String],
    config: WindowConfig,
    flush_after: &HashSet<usize>,
    restart_after: &HashSet<usize>,
) -> Vec<WindowUsage> {
    let mut agg = Aggregator::new(config);
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        agg.push_line(line.as_bytes(), &mut out);
        if flush_after.contains(&i) {
            agg.flush(&mut out);
        }
        if restart_after.contains(&i) {
            let json = serde_json::to_vec(&agg.state()).unwrap();
            agg = Aggregator::from_state(config, serde_json::from_slice(&json).unwrap());
        }
    }
    agg.flush(&mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn emitted_events_add_up_to_the_corpus(
        seed in any::<u64>(),
        lines in 1u64..400,
        routes in 1u32..8,
        late_per_mille in 0u32..600,
        max_delay_millis in 0i64..900_000,
        window_secs in prop::sample::select(vec![10i64, 60, 300]),
        lateness_secs in 0i64..180,
        step_mins in 1i64..90,
        swaps in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..50),
        flushes in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        restarts in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let corpus = CorpusConfig {
            seed, lines, routes, projects: 3, late_per_mille, max_delay_millis,
            step_millis: 700, huge_per_mille: 50, streams_per_mille: 30, stream_flush_every: 15,
            ..CorpusConfig::default()
        };
        let mut generator = CorpusGenerator::new(corpus);
        let mut lines: Vec<String> = generator.by_ref().collect();
        // Any interleaving of request lines; a stream's records keep their
        // order, as one proxy writes them.
        let requests: Vec<usize> = (0..lines.len())
            .filter(|i| !lines[*i].contains("access_log_type"))
            .collect();
        for (a, b) in swaps.iter().filter(|_| !requests.is_empty()) {
            let (a, b) = (a.index(requests.len()), b.index(requests.len()));
            lines.swap(requests[a], requests[b]);
        }
        let config = WindowConfig {
            window_millis: window_secs * 1000,
            allowed_lateness_millis: lateness_secs * 1000,
            max_watermark_step_millis: step_mins * 60_000,
        };
        let flush_after: HashSet<usize> = flushes.iter().map(|i| i.index(lines.len())).collect();
        let restart_after: HashSet<usize> = restarts.iter().map(|i| i.index(lines.len())).collect();
        let out = run(&lines, config, &flush_after, &HashSet::new());

        check_route_totals(&out, generator.expected());
        prop_assert_eq!(per_window(&out), naive_windows(&lines, config.window_millis));
        let ids: HashSet<_> = out.iter().map(|u| event_id("agent", u)).collect();
        prop_assert_eq!(ids.len(), out.len(), "event ids are unique");
        prop_assert!(out.iter().all(|u| u.value > 0));

        // Restarting from a checkpointed state changes nothing.
        let restarted = run(&lines, config, &flush_after, &restart_after);
        prop_assert_eq!(&restarted, &out);
    }
}
