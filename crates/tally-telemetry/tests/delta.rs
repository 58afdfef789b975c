//! Cumulative → delta conversion against a naive per-series model.

use std::collections::HashMap;

use proptest::prelude::*;
use tally_telemetry::DeltaConverter;
use tally_telemetry::proto::metrics::v1::{metric::Data, number_data_point};
use tally_testkit::otlp_metrics::*;

const STARTED_AT: u64 = 50;

const ONE_RESOURCE: Who<'static> = Who {
    project: None,
    namespace: "ns-a",
    group: "g",
    kind: "K",
    name: "n",
    service: "s",
};

/// One cumulative observation of series `series`.
#[derive(Debug, Clone)]
struct Obs {
    series: usize,
    start: u64,
    time: u64,
    value: i64,
}

/// The naive model: the whole accepted history of every series.
fn naive(observations: &[Obs]) -> Vec<(usize, u64, u64, i64)> {
    let mut history: HashMap<usize, Vec<&Obs>> = HashMap::new();
    let mut out = Vec::new();
    for o in observations {
        let accepted = history.entry(o.series).or_default();
        match accepted.last() {
            None => {
                if o.start != 0 && o.start >= STARTED_AT {
                    out.push((o.series, o.start, o.time, o.value));
                }
            }
            Some(last) if o.time <= last.time => continue,
            Some(last) => {
                let restarted = o.start != 0 && last.start != 0 && o.start != last.start;
                if restarted || o.value < last.value {
                    let start = if o.start != 0 { o.start } else { last.time };
                    out.push((o.series, start, o.time, o.value));
                } else {
                    out.push((o.series, last.time, o.time, o.value - last.value));
                }
            }
        }
        accepted.push(o);
    }
    out
}

fn observations() -> impl Strategy<Value = Vec<Obs>> {
    prop::collection::vec(
        (
            0..4usize,
            0..3u64,
            prop::bool::weighted(0.1),
            0..100i64,
            prop::sample::select(vec![0u64, 10, 60]),
        ),
        1..120,
    )
    .prop_map(|steps| {
        let mut state: HashMap<usize, (u64, u64, i64)> = HashMap::new();
        steps
            .into_iter()
            .map(|(series, dt, reset, dv, first_start)| {
                let (start, time, value) = state.entry(series).or_insert((first_start, 0, 0));
                *time += dt;
                if reset {
                    if *start != 0 {
                        *start = *time;
                    }
                    *value = dv / 10;
                } else {
                    *value += dv;
                }
                Obs {
                    series,
                    start: *start,
                    time: *time,
                    value: *value,
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]
    #[test]
    fn matches_the_naive_model(obs in observations(), batch in 1..10usize) {
        let mut converter = DeltaConverter::new(STARTED_AT);
        let mut got = Vec::new();
        for chunk in obs.chunks(batch) {
            // Series are told apart by a point attribute; one counter, one resource.
            let points = chunk
                .iter()
                .map(|o| number_point(attrs(&[("series", &o.series.to_string())]), o.start, o.time, o.value))
                .collect();
            let who = ONE_RESOURCE;
            let mut req = request(vec![resource_metrics(&who, vec![counter("c", points)])]);
            converter.convert(&mut req);
            for rm in &req.resource_metrics {
                for m in &rm.scope_metrics[0].metrics {
                    let Some(Data::Sum(sum)) = &m.data else { panic!("a sum stays a sum") };
                    prop_assert_eq!(sum.aggregation_temporality, 1, "delta");
                    for p in &sum.data_points {
                        let Some(number_data_point::Value::AsInt(v)) = p.value else { panic!() };
                        let series = match &p.attributes[0].value.as_ref().unwrap().value {
                            Some(tally_telemetry::proto::common::v1::any_value::Value::StringValue(s)) => s.parse().unwrap(),
                            _ => panic!(),
                        };
                        got.push((series, p.start_time_unix_nano, p.time_unix_nano, v));
                    }
                }
            }
        }
        // Within a request, points of different series may be reordered; compare per series.
        let per_series = |v: &[(usize, u64, u64, i64)]| {
            let mut m: HashMap<usize, Vec<(u64, u64, i64)>> = HashMap::new();
            for (s, a, b, c) in v { m.entry(*s).or_default().push((*a, *b, *c)); }
            m
        };
        prop_assert_eq!(per_series(&got), per_series(&naive(&obs)));
        prop_assert!(converter.series_count() <= 4);
    }
}

#[test]
fn histograms_subtract_counts_and_buckets_and_drop_min_max() {
    let who = ONE_RESOURCE;
    let mut converter = DeltaConverter::new(0);
    let mut step = |time: u64, buckets: Vec<u64>| {
        let mut req = request(vec![resource_metrics(
            &who,
            vec![histogram("h", vec![], time, buckets)],
        )]);
        converter.convert(&mut req);
        match req.resource_metrics[0].scope_metrics[0].metrics[0]
            .data
            .clone()
        {
            Some(Data::Histogram(h)) => h,
            other => panic!("a histogram stays a histogram: {other:?}"),
        }
    };
    // start time 1 >= started_at 0: the first point is a whole delta.
    assert_eq!(step(10, vec![1, 2, 3]).data_points[0].count, 6);
    let h = step(20, vec![2, 4, 3]);
    let p = &h.data_points[0];
    assert_eq!(h.aggregation_temporality, 1);
    assert_eq!(
        (p.start_time_unix_nano, p.time_unix_nano, p.count),
        (10, 20, 3)
    );
    assert_eq!(p.bucket_counts, [1, 2, 0]);
    assert_eq!(p.sum, Some(1.5));
    assert_eq!((p.min, p.max), (None, None));
    // A bucket going down is a reset: the whole point is sent.
    let p = step(30, vec![0, 1, 0]).data_points[0].clone();
    assert_eq!((p.count, p.start_time_unix_nano), (1, 1));
}

#[test]
fn gauges_pass_unchanged_and_emptied_structure_is_removed() {
    let who = ONE_RESOURCE;
    let mut converter = DeltaConverter::new(u64::MAX);
    let original = request(vec![resource_metrics(
        &who,
        vec![
            gauge("g", vec![number_point(vec![], 0, 5, 7)]),
            counter("c", vec![number_point(vec![], 1, 5, 7)]),
        ],
    )]);
    let mut req = original.clone();
    converter.convert(&mut req);
    // The counter's first point is a baseline (started before the converter).
    assert_eq!(
        req.resource_metrics[0].scope_metrics[0].metrics,
        original.resource_metrics[0].scope_metrics[0].metrics[..1]
    );
    let mut only_counter = request(vec![resource_metrics(
        &who,
        vec![counter("c2", vec![number_point(vec![], 1, 5, 7)])],
    )]);
    converter.convert(&mut only_counter);
    assert!(only_counter.resource_metrics.is_empty());
    converter.forget_older_than(6);
    assert_eq!(converter.series_count(), 0);
}
