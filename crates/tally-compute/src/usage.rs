//! `InstanceUsage`: per-instance vCPU and memory *use* (from the node
//! metrics the platform exposes, `datum_compute_instance_cpu_usage_seconds_total`
//! and `datum_compute_instance_memory_working_set_bytes`), *allocation*
//! (`tally_model::instance::Allocation`, from `Instance` resources) and
//! start time (from `started` lifecycle events, so uptime is
//! `time() - tally_compute_instance_start_time_seconds`), rendered as
//! Prometheus text for `/metrics` and the VictoriaMetrics push. `tally
//! serve`'s metrics receivers (OTLP and remote-write) feed the use, with or
//! without an exporters' pipeline; its `Instance` watch feeds the
//! allocation; its lifecycle ingest feeds the start time.
//!
//! | family | type | labels |
//! |---|---|---|
//! | `tally_compute_instance_cpu_usage_seconds_total` | counter | `project`, `instance`, `namespace` (when known) |
//! | `tally_compute_instance_memory_working_set_bytes` | gauge | same |
//! | `tally_compute_instance_cpu_allocated_vcpus` | gauge | same |
//! | `tally_compute_instance_memory_allocated_bytes` | gauge | same |
//! | `tally_compute_instance_start_time_seconds` | gauge | same (only while started) |
//! | `tally_compute_instance_usage_evicted_total` | counter | — |
//! | `tally_compute_instance_usage_rejected_total` | counter | — (samples whose names are not Kubernetes names) |
//!
//! The `namespace` label is what the project-scoped PromQL endpoint filters
//! on, so a series without one is seen by operators only. It comes from the
//! `Instance` resource, a lifecycle event, or the sample's `namespace`
//! attribute, the latest given winning.
//!
//! **Invariant (bounded cardinality):** at most [`MAX_INSTANCES`] instances
//! are kept; a new one beyond it evicts the least recently updated (counted).
//! Label values are Kubernetes names ([`crate::lifecycle::is_name`], at most
//! 253 bytes of `[a-z0-9.-]`), so they need no escaping; other names are
//! rejected and counted. Only finite, non-negative values are kept. A
//! lifecycle event older than the latest one applied to an instance does
//! not change its start time, so arrival order does not matter.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;

use jiff::Timestamp;
use tally_model::instance::Allocation;

use crate::lifecycle::{LifecycleEvent, LifecycleKind, is_name};

/// Most instances whose usage is kept.
pub const MAX_INSTANCES: usize = 10_000;
/// The platform's per-instance CPU counter, in seconds.
pub const CPU_METRIC: &str = "datum_compute_instance_cpu_usage_seconds_total";
/// The platform's per-instance memory gauge, in bytes.
pub const MEMORY_METRIC: &str = "datum_compute_instance_memory_working_set_bytes";

/// Which usage a sample carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageKind {
    CpuSeconds,
    MemoryBytes,
}

impl UsageKind {
    /// The kind of a platform metric name, if it is one of ours.
    pub fn of_metric(name: &str) -> Option<UsageKind> {
        match name {
            CPU_METRIC => Some(UsageKind::CpuSeconds),
            MEMORY_METRIC => Some(UsageKind::MemoryBytes),
            _ => None,
        }
    }
}

#[derive(Default, Clone)]
struct Usage {
    namespace: Option<String>,
    cpu_seconds: Option<f64>,
    memory_bytes: Option<f64>,
    allocation: Allocation,
    /// When the instance last started, while it runs.
    started: Option<Timestamp>,
    /// The time of the latest lifecycle event applied.
    last_event: Option<Timestamp>,
    /// The update sequence number, key in `State::by_age`.
    updated: u64,
}

type Key = (String, String);

#[derive(Default)]
struct State {
    usage: HashMap<Key, Usage>,
    /// Update sequence → instance, oldest first.
    by_age: BTreeMap<u64, Key>,
    next: u64,
    evicted: u64,
    rejected: u64,
}

impl State {
    /// The instance's entry, made the most recently updated (evicting the
    /// least recently updated one if a new entry passes `cap`).
    fn touch(&mut self, cap: usize, key: Key) -> &mut Usage {
        let seq = self.next;
        self.next += 1;
        match self.usage.get(&key).map(|u| u.updated) {
            Some(old) => {
                self.by_age.remove(&old);
            }
            None if self.usage.len() >= cap => {
                if let Some((_, oldest)) = self.by_age.pop_first() {
                    self.usage.remove(&oldest);
                    self.evicted += 1;
                }
            }
            None => {}
        }
        self.by_age.insert(seq, key.clone());
        let usage = self.usage.entry(key).or_default();
        usage.updated = seq;
        usage
    }

    fn remove(&mut self, key: &Key) {
        if let Some(old) = self.usage.remove(key) {
            self.by_age.remove(&old.updated);
        }
    }
}

/// Per-instance use, allocation and start time, capped (see the module docs).
pub struct InstanceUsage {
    cap: usize,
    state: Mutex<State>,
}

impl Default for InstanceUsage {
    fn default() -> Self {
        InstanceUsage::with_cap(MAX_INSTANCES)
    }
}

/// A family of the per-instance table: name, type, help, value.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Usage) -> Option<f64>,
);

const FAMILIES: [Family; 5] = [
    (
        "tally_compute_instance_cpu_usage_seconds_total",
        "counter",
        "CPU time used by an instance (from datum_compute_instance_cpu_usage_seconds_total).",
        |u| u.cpu_seconds,
    ),
    (
        "tally_compute_instance_memory_working_set_bytes",
        "gauge",
        "Memory working set of an instance (from datum_compute_instance_memory_working_set_bytes).",
        |u| u.memory_bytes,
    ),
    (
        "tally_compute_instance_cpu_allocated_vcpus",
        "gauge",
        "vCPUs an instance requests (spec.runtime.resources.requests.cpu).",
        |u| u.allocation.vcpus,
    ),
    (
        "tally_compute_instance_memory_allocated_bytes",
        "gauge",
        "Memory an instance requests (spec.runtime.resources.requests.memory).",
        |u| u.allocation.memory_bytes.map(|b| b as f64),
    ),
    (
        "tally_compute_instance_start_time_seconds",
        "gauge",
        "When a running instance last started (Unix seconds); uptime is time() minus this.",
        |u| u.started.map(|t| t.as_millisecond() as f64 / 1000.0),
    ),
];

impl InstanceUsage {
    /// Keeps at most `cap` instances (at least 1).
    pub fn with_cap(cap: usize) -> InstanceUsage {
        InstanceUsage {
            cap: cap.max(1),
            state: Mutex::new(State::default()),
        }
    }

    /// Records the latest value of one sample; `namespace`, when given and
    /// a Kubernetes name, becomes the instance's.
    pub fn observe(
        &self,
        project: &str,
        instance: &str,
        namespace: Option<&str>,
        kind: UsageKind,
        value: f64,
    ) {
        let Ok(mut s) = self.state.lock() else { return };
        if !is_name(project) || !is_name(instance) || !value.is_finite() || value < 0.0 {
            s.rejected += 1;
            return;
        }
        let usage = s.touch(self.cap, (project.to_owned(), instance.to_owned()));
        if let Some(ns) = namespace.filter(|n| is_name(n)) {
            usage.namespace = Some(ns.to_owned());
        }
        match kind {
            UsageKind::CpuSeconds => usage.cpu_seconds = Some(value),
            UsageKind::MemoryBytes => usage.memory_bytes = Some(value),
        }
    }

    /// Sets what an `Instance` resource requests (`None`: nothing).
    pub fn allocate(
        &self,
        project: &str,
        namespace: &str,
        instance: &str,
        allocation: Option<Allocation>,
    ) {
        let Ok(mut s) = self.state.lock() else { return };
        if !is_name(project) || !is_name(instance) || !is_name(namespace) {
            s.rejected += 1;
            return;
        }
        let usage = s.touch(self.cap, (project.to_owned(), instance.to_owned()));
        usage.namespace = Some(namespace.to_owned());
        usage.allocation = allocation.unwrap_or_default();
    }

    /// Forgets an instance (its `Instance` resource was deleted).
    pub fn forget(&self, project: &str, instance: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.remove(&(project.to_owned(), instance.to_owned()));
        }
    }

    /// Applies a newly stored lifecycle event: `started` sets the start
    /// time, `stopped`/`crashed`/`oom_killed` clear it, `terminated`
    /// forgets the instance. Events older than the latest applied are
    /// ignored.
    pub fn lifecycle(&self, event: &LifecycleEvent) {
        let Ok(mut s) = self.state.lock() else { return };
        let key = (event.project.clone(), event.instance.clone());
        let known = s.usage.get(&key).map(|u| u.last_event);
        if known.flatten().is_some_and(|t| t > event.time) {
            return;
        }
        match event.kind {
            LifecycleKind::Terminated => s.remove(&key),
            LifecycleKind::Started => {
                let usage = s.touch(self.cap, key);
                usage.started = Some(event.time);
                usage.last_event = Some(event.time);
                if let Some(ns) = &event.namespace {
                    usage.namespace = Some(ns.clone());
                }
            }
            LifecycleKind::Stopped | LifecycleKind::Crashed | LifecycleKind::OomKilled
                if known.is_some() =>
            {
                let usage = s.touch(self.cap, key);
                usage.started = None;
                usage.last_event = Some(event.time);
            }
            _ => {}
        }
    }

    /// How many instances are kept.
    pub fn len(&self) -> usize {
        self.state.lock().map_or(0, |s| s.usage.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the families to a Prometheus text exposition, instances in
    /// name order.
    pub fn render(&self, out: &mut String) {
        let Ok(s) = self.state.lock() else { return };
        let mut keys: Vec<_> = s.usage.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        for (name, kind, help, value_of) in FAMILIES {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for ((project, instance), usage) in &keys {
                let Some(value) = value_of(usage) else {
                    continue;
                };
                let _ = write!(out, "{name}{{project=\"{project}\",instance=\"{instance}\"");
                if let Some(ns) = &usage.namespace {
                    let _ = write!(out, ",namespace=\"{ns}\"");
                }
                let _ = writeln!(out, "}} {value}");
            }
        }
        for (name, help, value) in [
            (
                "tally_compute_instance_usage_evicted_total",
                "Instances whose usage was dropped to keep at most 10,000 (least recently updated first).",
                s.evicted,
            ),
            (
                "tally_compute_instance_usage_rejected_total",
                "Usage samples rejected: a project or instance that is not a Kubernetes name, or a negative or non-finite value.",
                s.rejected,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn renders_the_latest_values_and_rejects_bad_names() {
        let usage = InstanceUsage::default();
        usage.observe("p1", "vm-a", None, UsageKind::CpuSeconds, 1.5);
        usage.observe("p1", "vm-a", None, UsageKind::CpuSeconds, 2.5);
        usage.observe("p1", "vm-a", None, UsageKind::MemoryBytes, 1024.0);
        usage.observe("p1", "Bad\"Name", None, UsageKind::MemoryBytes, 1.0);
        usage.observe("p1", "vm-b", None, UsageKind::MemoryBytes, f64::NAN);
        let mut out = String::new();
        usage.render(&mut out);
        assert!(out.contains(
            "tally_compute_instance_cpu_usage_seconds_total{project=\"p1\",instance=\"vm-a\"} 2.5\n"
        ));
        assert!(out.contains(
            "tally_compute_instance_memory_working_set_bytes{project=\"p1\",instance=\"vm-a\"} 1024\n"
        ));
        assert!(out.contains("tally_compute_instance_usage_rejected_total 2\n"));
        assert!(!out.contains("Bad"));
        assert_eq!(usage.len(), 1);
    }

    #[test]
    fn the_cap_evicts_the_least_recently_updated() {
        let usage = InstanceUsage::with_cap(2);
        usage.observe("p", "a", None, UsageKind::CpuSeconds, 1.0);
        usage.observe("p", "b", None, UsageKind::CpuSeconds, 1.0);
        usage.observe("p", "a", None, UsageKind::MemoryBytes, 1.0); // a is now newer
        usage.observe("p", "c", None, UsageKind::CpuSeconds, 1.0); // evicts b
        let mut out = String::new();
        usage.render(&mut out);
        assert!(out.contains("instance=\"a\""));
        assert!(!out.contains("instance=\"b\""));
        assert!(out.contains("instance=\"c\""));
        assert!(out.contains("tally_compute_instance_usage_evicted_total 1\n"));
    }

    fn event(kind: LifecycleKind, at: i64) -> LifecycleEvent {
        LifecycleEvent {
            source: "c".into(),
            id: format!("{kind}-{at}"),
            kind,
            reason: None,
            time: Timestamp::from_second(at).unwrap(),
            project: "acme".into(),
            instance: "web-0".into(),
            namespace: Some("acme-prod".into()),
            workload: None,
            uid: None,
            node: None,
            message: None,
        }
    }

    fn lines(usage: &InstanceUsage, family: &str) -> Vec<String> {
        let mut out = String::new();
        usage.render(&mut out);
        out.lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn allocation_and_start_time_are_gauges_with_the_namespace() {
        let usage = InstanceUsage::default();
        let alloc = Allocation {
            vcpus: Some(1.5),
            memory_bytes: Some(2 << 30),
        };
        usage.allocate("acme", "acme-prod", "web-0", Some(alloc));
        usage.observe("acme", "web-0", None, UsageKind::CpuSeconds, 7.0);
        usage.lifecycle(&event(LifecycleKind::Started, 1_000));
        let labels = "{project=\"acme\",instance=\"web-0\",namespace=\"acme-prod\"}";
        assert_eq!(
            lines(&usage, "tally_compute_instance_cpu_allocated_vcpus"),
            [format!(
                "tally_compute_instance_cpu_allocated_vcpus{labels} 1.5"
            )]
        );
        assert_eq!(
            lines(&usage, "tally_compute_instance_memory_allocated_bytes"),
            [format!(
                "tally_compute_instance_memory_allocated_bytes{labels} 2147483648"
            )]
        );
        assert_eq!(
            lines(&usage, "tally_compute_instance_cpu_usage_seconds_total"),
            [format!(
                "tally_compute_instance_cpu_usage_seconds_total{labels} 7"
            )]
        );
        assert_eq!(
            lines(&usage, "tally_compute_instance_start_time_seconds"),
            [format!(
                "tally_compute_instance_start_time_seconds{labels} 1000"
            )]
        );
        // A late `started` from before a crash does not restart the clock.
        usage.lifecycle(&event(LifecycleKind::Crashed, 2_000));
        usage.lifecycle(&event(LifecycleKind::Started, 1_500));
        assert!(lines(&usage, "tally_compute_instance_start_time_seconds").is_empty());
        usage.allocate("acme", "acme-prod", "web-0", None);
        assert!(lines(&usage, "tally_compute_instance_cpu_allocated_vcpus").is_empty());
        usage.lifecycle(&event(LifecycleKind::Terminated, 3_000));
        assert!(usage.is_empty());
        usage.allocate("acme", "acme-prod", "web-1", Some(alloc));
        usage.forget("acme", "web-1");
        assert!(usage.is_empty());
        usage.allocate("acme", "Not A Name", "web-1", Some(alloc));
        assert!(usage.is_empty());
    }

    proptest! {
        /// Against a naive model: the start time is the latest event's, if
        /// that event (by time; ties: the later arrival) is a `started`.
        #[test]
        fn the_start_time_follows_the_latest_event_in_any_order(
            events in proptest::collection::vec((0u8..3, 0i64..20), 1..30),
        ) {
            let usage = InstanceUsage::default();
            let mut latest: Option<(i64, u8)> = None;
            for (kind, at) in events {
                let k = [LifecycleKind::Started, LifecycleKind::Stopped, LifecycleKind::Crashed][kind as usize];
                usage.lifecycle(&event(k, at));
                // A stop of an unknown instance is not remembered.
                let known = latest.is_some();
                if latest.is_none_or(|(t, _)| at >= t) && (kind == 0 || known) {
                    latest = Some((at, kind));
                }
            }
            let want: Vec<String> = match latest {
                Some((at, 0)) => vec![format!(
                    "tally_compute_instance_start_time_seconds{{project=\"acme\",instance=\"web-0\",namespace=\"acme-prod\"}} {at}"
                )],
                _ => vec![],
            };
            prop_assert_eq!(lines(&usage, "tally_compute_instance_start_time_seconds"), want);
        }


        /// Against a naive model: a list of instances, most recent last.
        #[test]
        fn the_cap_matches_a_naive_lru(
            cap in 1usize..5,
            updates in proptest::collection::vec((0u8..8, 0u32..100), 0..60),
        ) {
            let usage = InstanceUsage::with_cap(cap);
            let mut model: Vec<(String, f64)> = Vec::new();
            let mut evicted = 0u64;
            for (instance, value) in updates {
                let name = format!("i{instance}");
                let value = f64::from(value);
                usage.observe("p", &name, None, UsageKind::MemoryBytes, value);
                if let Some(at) = model.iter().position(|(n, _)| *n == name) {
                    model.remove(at);
                } else if model.len() >= cap {
                    model.remove(0);
                    evicted += 1;
                }
                model.push((name, value));
            }
            model.sort_by(|a, b| a.0.cmp(&b.0));
            let mut expected = String::new();
            for (name, value) in &model {
                let _ = writeln!(expected, "tally_compute_instance_memory_working_set_bytes{{project=\"p\",instance=\"{name}\"}} {value}");
            }
            let mut out = String::new();
            usage.render(&mut out);
            let got: String = out
                .lines()
                .filter(|l| l.starts_with("tally_compute_instance_memory_working_set_bytes{"))
                .map(|l| format!("{l}\n"))
                .collect();
            prop_assert_eq!(got, expected);
            let evicted_line = format!("tally_compute_instance_usage_evicted_total {evicted}\n");
            prop_assert!(out.contains(&evicted_line));
        }
    }
}
