//! One metrics vocabulary for every component (source, processor, sink).
//!
//! A [`Registry`] is shared (clone it) by every crate that runs components;
//! each component takes a [`ComponentMetrics`] handle from it once and bumps
//! atomics on its hot path. [`Registry::render`] writes the Prometheus text
//! exposition format, ready to append to a `/metrics` answer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// What role a component plays in a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ComponentKind {
    /// Takes data in (a receiver, a file tailer, a puller).
    Source,
    /// Shapes data (policy, enrichment, aggregation).
    Processor,
    /// Sends data out.
    Sink,
}

impl ComponentKind {
    /// The label value: `source`, `processor` or `sink`.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Source => "source",
            ComponentKind::Processor => "processor",
            ComponentKind::Sink => "sink",
        }
    }
}

/// The counters and gauges of one component. Cheap to update from any thread.
#[derive(Debug)]
pub struct ComponentMetrics {
    kind: ComponentKind,
    id: String,
    received: AtomicU64,
    sent: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    queue_depth: AtomicI64,
    dropped: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ComponentMetrics {
    fn new(kind: ComponentKind, id: &str) -> Self {
        ComponentMetrics {
            kind,
            id: id.to_owned(),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            queue_depth: AtomicI64::new(0),
            dropped: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// The component's kind.
    pub fn kind(&self) -> ComponentKind {
        self.kind
    }

    /// The component's id (the `component_id` label).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Counts items accepted by the component.
    pub fn add_received(&self, items: u64) {
        self.received.fetch_add(items, Ordering::Relaxed);
    }

    /// Counts items the component passed on (for a sink: acknowledged by the
    /// receiver).
    pub fn add_sent(&self, items: u64) {
        self.sent.fetch_add(items, Ordering::Relaxed);
    }

    /// Counts items lost for good, with a short snake_case reason.
    pub fn add_dropped(&self, reason: &str, items: u64) {
        *lock(&self.dropped).entry(reason.to_owned()).or_insert(0) += items;
    }

    /// Counts one error at a stage (`encode`, `send`, `response`, `queue`...).
    pub fn add_error(&self, stage: &str) {
        *lock(&self.errors).entry(stage.to_owned()).or_insert(0) += 1;
    }

    /// Counts one retried request.
    pub fn add_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts items moved to the dead-letter list.
    pub fn add_dead_lettered(&self, items: u64) {
        self.dead_lettered.fetch_add(items, Ordering::Relaxed);
    }

    /// Sets the number of items waiting in the component's queue.
    pub fn set_queue_depth(&self, items: u64) {
        self.queue_depth
            .store(i64::try_from(items).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// Items received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Items sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Items dropped so far for `reason`.
    pub fn dropped(&self, reason: &str) -> u64 {
        lock(&self.dropped).get(reason).copied().unwrap_or(0)
    }

    /// Errors counted so far at `stage`.
    pub fn errors(&self, stage: &str) -> u64 {
        lock(&self.errors).get(stage).copied().unwrap_or(0)
    }

    /// Requests retried so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Items dead-lettered so far.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered.load(Ordering::Relaxed)
    }

    /// The last queue depth set.
    pub fn queue_depth(&self) -> u64 {
        u64::try_from(self.queue_depth.load(Ordering::Relaxed)).unwrap_or(0)
    }
}

/// A shareable set of components' metrics. Clones share the same set.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    components: Arc<Mutex<Components>>,
}

/// Components by kind and id.
type Components = BTreeMap<(ComponentKind, String), Arc<ComponentMetrics>>;

/// One sample of a family: its extra label, if any, and its value.
type Sample = (Option<(&'static str, String)>, i128);

/// One metric family: name after `tally_component_`, type, help, and how to
/// read a component's samples.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ComponentMetrics) -> Vec<Sample>,
);

/// The one sample of an unlabelled family.
fn one(value: impl Into<i128>) -> Vec<Sample> {
    vec![(None, value.into())]
}

/// The samples of a counter split by one label.
fn labelled(counts: &Mutex<BTreeMap<String, u64>>, label: &'static str) -> Vec<Sample> {
    lock(counts)
        .iter()
        .map(|(value, n)| (Some((label, value.clone())), i128::from(*n)))
        .collect()
}

#[rustfmt::skip]
const FAMILIES: &[Family] = &[
    ("received_total", "counter", "Items accepted.", |m| one(m.received())),
    ("sent_total", "counter", "Items passed on or acknowledged.", |m| one(m.sent())),
    ("dropped_total", "counter", "Items lost, by reason.", |m| labelled(&m.dropped, "reason")),
    ("errors_total", "counter", "Errors, by stage.", |m| labelled(&m.errors, "stage")),
    ("queue_depth", "gauge", "Items queued.", |m| one(m.queue_depth.load(Ordering::Relaxed))),
    ("retries_total", "counter", "Requests retried.", |m| one(m.retries())),
    ("dead_lettered_total", "counter", "Items dead-lettered.", |m| one(m.dead_lettered())),
];

/// Escapes a label value for the text exposition format.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

impl Registry {
    /// A new, empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The metrics of component `id` of `kind`, created on first use; the
    /// same handle is returned for the same kind and id.
    pub fn component(&self, kind: ComponentKind, id: &str) -> Arc<ComponentMetrics> {
        lock(&self.components)
            .entry((kind, id.to_owned()))
            .or_insert_with(|| Arc::new(ComponentMetrics::new(kind, id)))
            .clone()
    }

    /// Every component's metrics in the Prometheus text exposition format
    /// (version 0.0.4), one `# HELP`/`# TYPE` per family.
    pub fn render(&self) -> String {
        let components: Vec<Arc<ComponentMetrics>> =
            lock(&self.components).values().cloned().collect();
        let mut out = String::new();
        for (suffix, kind, help, samples) in FAMILIES {
            let name = format!("tally_component_{suffix}");
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for component in &components {
                for (extra, value) in samples(component) {
                    let _ = write!(
                        out,
                        "{name}{{component_kind=\"{}\",component_id=\"{}\"",
                        component.kind.as_str(),
                        escape_label(&component.id)
                    );
                    if let Some((label, label_value)) = extra {
                        let _ = write!(out, ",{label}=\"{}\"", escape_label(&label_value));
                    }
                    let _ = writeln!(out, "}} {value}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_component_shares_one_handle() {
        let registry = Registry::new();
        registry
            .component(ComponentKind::Sink, "amberflo")
            .add_sent(3);
        registry
            .component(ComponentKind::Sink, "amberflo")
            .add_sent(4);
        assert_eq!(
            registry.component(ComponentKind::Sink, "amberflo").sent(),
            7
        );
        assert_eq!(
            registry.component(ComponentKind::Source, "amberflo").sent(),
            0
        );
    }

    #[test]
    fn renders_every_family_with_labels() {
        let registry = Registry::new();
        let sink = registry.component(ComponentKind::Sink, "otlp \"a\"\\b");
        sink.add_received(10);
        sink.add_sent(8);
        sink.add_dropped("queue_full", 2);
        sink.add_error("send");
        sink.add_error("send");
        sink.set_queue_depth(5);
        let text = registry.render();
        let id = r#"component_kind="sink",component_id="otlp \"a\"\\b""#;
        for line in [
            format!("tally_component_received_total{{{id}}} 10"),
            format!("tally_component_sent_total{{{id}}} 8"),
            format!("tally_component_dropped_total{{{id},reason=\"queue_full\"}} 2"),
            format!("tally_component_errors_total{{{id},stage=\"send\"}} 2"),
            format!("tally_component_queue_depth{{{id}}} 5"),
            format!("tally_component_retries_total{{{id}}} 0"),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert_eq!(
            text.matches("# TYPE tally_component_queue_depth gauge")
                .count(),
            1
        );
    }
}
