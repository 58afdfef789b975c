//! `InstanceUsage`: per-instance vCPU and memory use, from the node metrics
//! the platform exposes (`datum_compute_instance_cpu_usage_seconds_total`,
//! `datum_compute_instance_memory_working_set_bytes`), rendered as gauges
//! for `/metrics`. `tally serve`'s metrics receivers (OTLP and remote-write,
//! present when a telemetry pipeline is configured) feed it.
//!
//! | family | type | labels |
//! |---|---|---|
//! | `tally_compute_instance_cpu_usage_seconds_total` | counter | `project`, `instance` |
//! | `tally_compute_instance_memory_working_set_bytes` | gauge | `project`, `instance` |
//! | `tally_compute_instance_usage_evicted_total` | counter | — |
//! | `tally_compute_instance_usage_rejected_total` | counter | — (samples whose names are not Kubernetes names) |
//!
//! **Invariant (bounded cardinality):** at most [`MAX_INSTANCES`] instances
//! are kept; a new one beyond it evicts the least recently updated (counted).
//! Label values are Kubernetes names ([`crate::lifecycle::is_name`], at most
//! 253 bytes of `[a-z0-9.-]`), so they need no escaping; other names are
//! rejected and counted. Only finite, non-negative values are kept.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;

use crate::lifecycle::is_name;

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

#[derive(Default, Clone, Copy)]
struct Usage {
    cpu_seconds: Option<f64>,
    memory_bytes: Option<f64>,
    /// The update sequence number, key in `State::by_age`.
    updated: u64,
}

#[derive(Default)]
struct State {
    usage: HashMap<(String, String), Usage>,
    /// Update sequence → instance, oldest first.
    by_age: BTreeMap<u64, (String, String)>,
    next: u64,
    evicted: u64,
    rejected: u64,
}

/// The latest vCPU and memory use per instance, capped (see the module docs).
pub struct InstanceUsage {
    cap: usize,
    state: Mutex<State>,
}

impl Default for InstanceUsage {
    fn default() -> Self {
        InstanceUsage::with_cap(MAX_INSTANCES)
    }
}

impl InstanceUsage {
    /// Keeps at most `cap` instances (at least 1).
    pub fn with_cap(cap: usize) -> InstanceUsage {
        InstanceUsage {
            cap: cap.max(1),
            state: Mutex::new(State::default()),
        }
    }

    /// Records the latest value of one sample.
    pub fn observe(&self, project: &str, instance: &str, kind: UsageKind, value: f64) {
        let Ok(mut s) = self.state.lock() else { return };
        if !is_name(project) || !is_name(instance) || !value.is_finite() || value < 0.0 {
            s.rejected += 1;
            return;
        }
        let key = (project.to_owned(), instance.to_owned());
        let seq = s.next;
        s.next += 1;
        let previous = s.usage.get(&key).map(|u| u.updated);
        match previous {
            Some(old) => {
                s.by_age.remove(&old);
            }
            None if s.usage.len() >= self.cap => {
                if let Some((_, oldest)) = s.by_age.pop_first() {
                    s.usage.remove(&oldest);
                    s.evicted += 1;
                }
            }
            None => {}
        }
        s.by_age.insert(seq, key.clone());
        let usage = s.usage.entry(key).or_default();
        usage.updated = seq;
        match kind {
            UsageKind::CpuSeconds => usage.cpu_seconds = Some(value),
            UsageKind::MemoryBytes => usage.memory_bytes = Some(value),
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
        let families = [
            (
                "tally_compute_instance_cpu_usage_seconds_total",
                "counter",
                "CPU time used by an instance (from datum_compute_instance_cpu_usage_seconds_total).",
                UsageKind::CpuSeconds,
            ),
            (
                "tally_compute_instance_memory_working_set_bytes",
                "gauge",
                "Memory working set of an instance (from datum_compute_instance_memory_working_set_bytes).",
                UsageKind::MemoryBytes,
            ),
        ];
        for (name, kind, help, usage_kind) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for ((project, instance), usage) in &keys {
                let value = match usage_kind {
                    UsageKind::CpuSeconds => usage.cpu_seconds,
                    UsageKind::MemoryBytes => usage.memory_bytes,
                };
                if let Some(value) = value {
                    let _ = writeln!(
                        out,
                        "{name}{{project=\"{project}\",instance=\"{instance}\"}} {value}"
                    );
                }
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
        usage.observe("p1", "vm-a", UsageKind::CpuSeconds, 1.5);
        usage.observe("p1", "vm-a", UsageKind::CpuSeconds, 2.5);
        usage.observe("p1", "vm-a", UsageKind::MemoryBytes, 1024.0);
        usage.observe("p1", "Bad\"Name", UsageKind::MemoryBytes, 1.0);
        usage.observe("p1", "vm-b", UsageKind::MemoryBytes, f64::NAN);
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
        usage.observe("p", "a", UsageKind::CpuSeconds, 1.0);
        usage.observe("p", "b", UsageKind::CpuSeconds, 1.0);
        usage.observe("p", "a", UsageKind::MemoryBytes, 1.0); // a is now newer
        usage.observe("p", "c", UsageKind::CpuSeconds, 1.0); // evicts b
        let mut out = String::new();
        usage.render(&mut out);
        assert!(out.contains("instance=\"a\""));
        assert!(!out.contains("instance=\"b\""));
        assert!(out.contains("instance=\"c\""));
        assert!(out.contains("tally_compute_instance_usage_evicted_total 1\n"));
    }

    proptest! {
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
                usage.observe("p", &name, UsageKind::MemoryBytes, value);
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
