//! `FleetMetrics`: the operator's view of instance lifecycles, fed with
//! each *newly stored* lifecycle event (duplicates are not counted) and
//! rendered as Prometheus text for `/metrics`.
//!
//! | family | type | labels |
//! |---|---|---|
//! | `tally_compute_lifecycle_transitions_total` | counter | `kind`, `reason` (`""` when none) |
//! | `tally_compute_instance_crashes_total` | counter | — (`crashed` transitions) |
//! | `tally_compute_instance_oom_kills_total` | counter | — (`oom_killed` transitions) |
//! | `tally_compute_lifecycle_errors_total` | counter | — (transitions whose reason is an error) |
//! | `tally_compute_scheduling_latency_seconds` | histogram | — (`scheduled` → next `started` of the same instance) |
//! | `tally_compute_scheduling_pending` | gauge | — (scheduled, not yet started, remembered) |
//! | `tally_compute_crashlooping_instances` | gauge | — (instances with [`CRASHLOOP_CRASHES`] crashes or OOM kills within [`CRASHLOOP_WINDOW`] before the time rendered) |
//!
//! Labels come only from the closed vocabularies of `LifecycleKind` and
//! `Reason`, never from a tenant's names, so the series count is bounded.
//! At most [`MAX_PENDING`] scheduled-not-started instances, and as many
//! instances' recent crash times, are remembered;
//! beyond it a `scheduled` is not timed (counted in
//! `tally_compute_scheduling_untimed_total`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;

use jiff::Timestamp;

use crate::lifecycle::{LifecycleEvent, LifecycleKind, Reason};

/// Upper bounds of the scheduling latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Most scheduled-not-started instances remembered for timing.
pub const MAX_PENDING: usize = 100_000;
/// Crashes within [`CRASHLOOP_WINDOW`] that make an instance crash-looping.
pub const CRASHLOOP_CRASHES: usize = 3;
/// The window of [`CRASHLOOP_CRASHES`].
pub const CRASHLOOP_WINDOW: jiff::SignedDuration = jiff::SignedDuration::from_mins(10);

#[derive(Default)]
struct State {
    transitions: BTreeMap<(LifecycleKind, Option<Reason>), u64>,
    errors: u64,
    buckets: [u64; LATENCY_BUCKETS.len()],
    latency_count: u64,
    latency_sum: f64,
    pending: HashMap<(String, String), Timestamp>,
    untimed: u64,
    /// The latest crash times (at most `CRASHLOOP_CRASHES`) per instance.
    crashes: HashMap<(String, String), VecDeque<Timestamp>>,
}

#[derive(Default)]
pub struct FleetMetrics {
    state: Mutex<State>,
}

impl FleetMetrics {
    pub fn new() -> FleetMetrics {
        FleetMetrics::default()
    }

    /// Counts one newly stored event.
    pub fn observe(&self, event: &LifecycleEvent) {
        let Ok(mut s) = self.state.lock() else { return };
        *s.transitions.entry((event.kind, event.reason)).or_default() += 1;
        if event.reason.is_some_and(Reason::is_error) {
            s.errors += 1;
        }
        let key = (event.project.clone(), event.instance.clone());
        match event.kind {
            LifecycleKind::Scheduled => {
                if s.pending.len() < MAX_PENDING || s.pending.contains_key(&key) {
                    s.pending.insert(key, event.time);
                } else {
                    s.untimed += 1;
                }
            }
            LifecycleKind::Started => {
                if let Some(at) = s.pending.remove(&key) {
                    let seconds = event.time.duration_since(at).as_secs_f64().max(0.0);
                    s.latency_count += 1;
                    s.latency_sum += seconds;
                    for (bound, count) in LATENCY_BUCKETS.iter().zip(s.buckets.iter_mut()) {
                        if seconds <= *bound {
                            *count += 1;
                        }
                    }
                }
            }
            LifecycleKind::Crashed | LifecycleKind::OomKilled
                if s.crashes.len() < MAX_PENDING || s.crashes.contains_key(&key) =>
            {
                let times = s.crashes.entry(key).or_default();
                times.push_back(event.time);
                times.make_contiguous().sort();
                if times.len() > CRASHLOOP_CRASHES {
                    times.pop_front();
                }
            }
            LifecycleKind::Terminated => {
                s.pending.remove(&key);
                s.crashes.remove(&key);
            }
            _ => {}
        }
    }

    /// Appends the families to a Prometheus text exposition; `now` is the
    /// end of the crash-loop window.
    pub fn render(&self, out: &mut String, now: Timestamp) {
        let Ok(s) = self.state.lock() else { return };
        let since = now - CRASHLOOP_WINDOW;
        let looping = s
            .crashes
            .values()
            .filter(|t| {
                t.len() == CRASHLOOP_CRASHES && t.front().is_some_and(|first| *first >= since)
            })
            .count() as u64;
        let _ = writeln!(
            out,
            "# HELP tally_compute_lifecycle_transitions_total Instance lifecycle events stored, by kind and reason.\n# TYPE tally_compute_lifecycle_transitions_total counter"
        );
        for ((kind, reason), n) in &s.transitions {
            let reason = reason.map_or("", Reason::as_str);
            let _ = writeln!(
                out,
                "tally_compute_lifecycle_transitions_total{{kind=\"{kind}\",reason=\"{reason}\"}} {n}"
            );
        }
        let count = |k| {
            s.transitions
                .iter()
                .filter(|((kind, _), _)| *kind == k)
                .map(|(_, n)| n)
                .sum::<u64>()
        };
        let mut counter = |name: &str, help: &str, kind: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        counter(
            "tally_compute_instance_crashes_total",
            "Instances that crashed.",
            "counter",
            count(LifecycleKind::Crashed),
        );
        counter(
            "tally_compute_instance_oom_kills_total",
            "Instances killed for running out of memory.",
            "counter",
            count(LifecycleKind::OomKilled),
        );
        counter(
            "tally_compute_lifecycle_errors_total",
            "Lifecycle events whose reason is a failure (ImageUnavailable, ConfigurationError, InstanceCrashing, Failed).",
            "counter",
            s.errors,
        );
        counter(
            "tally_compute_scheduling_pending",
            "Instances scheduled and not yet started.",
            "gauge",
            s.pending.len() as u64,
        );
        counter(
            "tally_compute_crashlooping_instances",
            "Instances that crashed (or were OOM-killed) 3 times within the last 10 minutes.",
            "gauge",
            looping,
        );
        counter(
            "tally_compute_scheduling_untimed_total",
            "Scheduled instances not timed because too many were pending.",
            "counter",
            s.untimed,
        );
        let name = "tally_compute_scheduling_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from an instance's scheduled event to its started event.\n# TYPE {name} histogram"
        );
        for (bound, n) in LATENCY_BUCKETS.iter().zip(s.buckets.iter()) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.latency_count);
        let _ = writeln!(out, "{name}_sum {}", s.latency_sum);
        let _ = writeln!(out, "{name}_count {}", s.latency_count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(
        kind: LifecycleKind,
        reason: Option<Reason>,
        instance: &str,
        at: &str,
    ) -> LifecycleEvent {
        LifecycleEvent {
            source: "c".into(),
            id: format!("{instance}-{kind}-{at}"),
            kind,
            reason,
            time: at.parse().unwrap(),
            project: "acme".into(),
            instance: instance.into(),
            namespace: None,
            workload: None,
            uid: None,
            node: None,
            message: None,
        }
    }

    #[test]
    fn transitions_and_scheduling_latency_are_counted() {
        let m = FleetMetrics::new();
        m.observe(&event(
            LifecycleKind::Scheduled,
            None,
            "a",
            "2026-01-01T00:00:00Z",
        ));
        m.observe(&event(
            LifecycleKind::Scheduled,
            None,
            "b",
            "2026-01-01T00:00:00Z",
        ));
        m.observe(&event(
            LifecycleKind::Started,
            Some(Reason::Available),
            "a",
            "2026-01-01T00:00:03Z",
        ));
        m.observe(&event(
            LifecycleKind::Crashed,
            Some(Reason::InstanceCrashing),
            "a",
            "2026-01-01T00:01:00Z",
        ));
        m.observe(&event(
            LifecycleKind::OomKilled,
            Some(Reason::InstanceCrashing),
            "a",
            "2026-01-01T00:02:00Z",
        ));
        let mut out = String::new();
        m.render(&mut out, "2026-01-01T00:05:00Z".parse().unwrap());
        for line in [
            "tally_compute_lifecycle_transitions_total{kind=\"started\",reason=\"Available\"} 1",
            "tally_compute_lifecycle_transitions_total{kind=\"scheduled\",reason=\"\"} 2",
            "tally_compute_instance_crashes_total 1",
            "tally_compute_instance_oom_kills_total 1",
            "tally_compute_lifecycle_errors_total 2",
            "tally_compute_scheduling_pending 1",
            "tally_compute_scheduling_latency_seconds_bucket{le=\"2.5\"} 0",
            "tally_compute_scheduling_latency_seconds_bucket{le=\"5\"} 1",
            "tally_compute_scheduling_latency_seconds_bucket{le=\"+Inf\"} 1",
            "tally_compute_scheduling_latency_seconds_sum 3",
            "tally_compute_scheduling_latency_seconds_count 1",
            "tally_compute_crashlooping_instances 0",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
    }

    #[test]
    fn three_crashes_in_ten_minutes_is_a_crash_loop_until_it_ages_out() {
        let m = FleetMetrics::new();
        let looping = |at: &str| {
            let mut out = String::new();
            m.render(&mut out, at.parse().unwrap());
            out.lines()
                .any(|l| l == "tally_compute_crashlooping_instances 1")
        };
        for at in ["2026-01-01T00:00:00Z", "2026-01-01T00:04:00Z"] {
            m.observe(&event(
                LifecycleKind::Crashed,
                Some(Reason::InstanceCrashing),
                "a",
                at,
            ));
        }
        assert!(!looping("2026-01-01T00:05:00Z"));
        m.observe(&event(
            LifecycleKind::OomKilled,
            Some(Reason::InstanceCrashing),
            "a",
            "2026-01-01T00:08:00Z",
        ));
        assert!(looping("2026-01-01T00:09:00Z"));
        assert!(!looping("2026-01-01T00:10:01Z"));
    }
}
