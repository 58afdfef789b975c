//! Pull sources: every source of every running exporter read from
//! VictoriaMetrics' `/api/v1/export` in moving windows
//! ([`crate::victoria`]), for that exporter's sinks only.
//!
//! - One task per (exporter, source). A changed selection restarts it, a
//!   removed source or exporter stops it; the successor waits for its
//!   predecessor to end, so two tasks never hand on the same window.
//! - `match[]`: each alternative of the source's MetricsQL selector with
//!   the exporter's namespace added (`namespace="<ns>"`); a source with
//!   resource selectors (or no selector) pulls the namespaces it may see
//!   (its own, and those of its project a `namespaceSelector` matches) and
//!   leaves kinds and labels to the router. What comes back goes through
//!   the same [`Router`] as in-stream data, with this exporter alone: a
//!   series is handed on only if its namespace is known, belongs to the
//!   exporter's project and any `project` label agrees.
//! - Each sink keeps its own checkpoint per source (the first millisecond
//!   not yet taken), written by its queue in the same atomic write as the
//!   pulled points ([`tally_delivery::Sink::try_enqueue_marked`]); so after
//!   a crash a window is neither skipped nor queued twice. A sink that
//!   refuses a window (full, secret missing) keeps its checkpoint and gets
//!   the window again later; the others go on. A source first seen starts
//!   at `now - lag - backfill`.
//! - Samples become gauge points (the export API does not say what a series
//!   is), so delta conversion does not apply to them.
//!
//! Counters are the `source` component `victoriametrics/<ns>/<name>/<source>`:
//! `received_total` (samples read), `sent_total` (handed to the sinks),
//! `dropped_total{reason}` (`unattributed`, `not_selected`),
//! `errors_total{stage}` (`pull`, `handoff`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use serde::Serialize;
use tally_delivery::{ComponentKind, ComponentMetrics, Registry};
use tokio::task::JoinHandle;

use crate::exporter::{Condition, Exporter, ExporterKey, Selection, Source};
use crate::index::ResourceIndex;
use crate::options::PullOptions;
use crate::route::Router;
use crate::routing::{SharedRouting, current};
use crate::sink::{Refusal, SinkRuntime};
use crate::sync::lock;
use crate::victoria::{PullError, VictoriaMetricsSource, series_to_request, window_end};

/// The pull part of an exporter's status.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    pub name: String,
    /// Samples read from VictoriaMetrics (again when a window is read again).
    pub points_pulled: u64,
    /// Samples handed to the exporter's sinks.
    pub points_selected: u64,
    /// Every sink has taken everything before this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pulled_until: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<Timestamp>,
    /// The last failure (no credentials).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// (exporter, source name).
pub(crate) type PullKey = (ExporterKey, String);

#[derive(Default)]
struct Health {
    failing: bool,
    last_error: Option<String>,
    last_success: Option<Timestamp>,
    pulled_until_ms: Option<i64>,
}

/// What outlives a source's task: counters and health.
struct PullShared {
    metrics: Arc<ComponentMetrics>,
    health: Mutex<Health>,
}

impl PullShared {
    fn fail(&self, key: &PullKey, message: String) {
        tracing::warn!(exporter = %key.0, source = %key.1, error = %message, "pull failed");
        let mut health = lock(&self.health);
        health.failing = true;
        health.last_error = Some(message);
    }

    fn succeed(&self, pulled_until_ms: Option<i64>) {
        let mut health = lock(&self.health);
        health.failing = false;
        health.last_success = Some(Timestamp::now());
        if pulled_until_ms.is_some() {
            health.pulled_until_ms = pulled_until_ms;
        }
    }
}

struct Task {
    /// What the task pulls; a change restarts it.
    fingerprint: String,
    handle: JoinHandle<()>,
}

/// Runs the pull tasks of a pipeline.
pub(crate) struct Puller {
    options: PullOptions,
    victoria: VictoriaMetricsSource,
    routing: SharedRouting,
    registry: Registry,
    tasks: Mutex<BTreeMap<PullKey, Task>>,
    /// Tasks being stopped, awaited by the next task of the same key.
    stopping: Mutex<HashMap<PullKey, JoinHandle<()>>>,
    shared: Mutex<HashMap<PullKey, Arc<PullShared>>>,
}

impl Puller {
    pub(crate) fn new(
        options: PullOptions,
        routing: SharedRouting,
        registry: Registry,
    ) -> Result<Puller, PullError> {
        let victoria = VictoriaMetricsSource::new(&options.url)?;
        Ok(Puller {
            options,
            victoria,
            routing,
            registry,
            tasks: Mutex::default(),
            stopping: Mutex::default(),
            shared: Mutex::default(),
        })
    }

    fn shared(&self, key: &PullKey) -> Arc<PullShared> {
        lock(&self.shared)
            .entry(key.clone())
            .or_insert_with(|| {
                let id = format!(
                    "victoriametrics/{}/{}/{}",
                    key.0.namespace, key.0.name, key.1
                );
                Arc::new(PullShared {
                    metrics: self.registry.component(ComponentKind::Source, &id),
                    health: Mutex::default(),
                })
            })
            .clone()
    }

    /// Makes the running tasks those of `exporters`' sources. Must be called
    /// inside a Tokio runtime.
    pub(crate) fn update<'a>(&self, exporters: impl Iterator<Item = &'a Exporter>) {
        let mut wanted: BTreeMap<PullKey, (String, &Exporter, &Source)> = BTreeMap::new();
        for exporter in exporters {
            for source in &exporter.sources {
                let fingerprint = format!("{:?}", source.selection);
                wanted.insert(
                    (exporter.key.clone(), source.name.clone()),
                    (fingerprint, exporter, source),
                );
            }
        }
        let mut tasks = lock(&self.tasks);
        let mut stopping = lock(&self.stopping);
        stopping.retain(|_, handle| !handle.is_finished());
        let running: Vec<PullKey> = tasks.keys().cloned().collect();
        for key in running {
            let keep = wanted.get(&key).is_some_and(|(fingerprint, _, _)| {
                tasks
                    .get(&key)
                    .is_some_and(|t| t.fingerprint == *fingerprint)
            });
            if !keep && let Some(task) = tasks.remove(&key) {
                tracing::info!(exporter = %key.0, source = %key.1, "pull stopped");
                task.handle.abort();
                stopping.insert(key, task.handle);
            }
        }
        for (key, (fingerprint, exporter, source)) in wanted {
            if tasks.contains_key(&key) {
                continue;
            }
            let only_this_source = Exporter {
                sources: vec![source.clone()],
                ..exporter.clone()
            };
            let run = PullRun {
                key: key.clone(),
                exporter: Arc::new(only_this_source.clone()),
                router: Router::new([only_this_source]),
                routing: Arc::clone(&self.routing),
                victoria: self.victoria.clone(),
                options: self.options.clone(),
                window: self.options.window,
                shared: self.shared(&key),
            };
            tracing::info!(exporter = %key.0, source = %key.1, "pull started");
            let handle = tokio::spawn(run.run(stopping.remove(&key)));
            tasks.insert(
                key,
                Task {
                    fingerprint,
                    handle,
                },
            );
        }
    }

    /// Stops every task and waits until each has ended.
    pub(crate) async fn stop_all(&self) {
        let handles: Vec<JoinHandle<()>> = {
            let mut tasks = lock(&self.tasks);
            let mut stopping = lock(&self.stopping);
            let mut handles: Vec<_> = std::mem::take(&mut *tasks)
                .into_values()
                .map(|t| t.handle)
                .collect();
            handles.extend(std::mem::take(&mut *stopping).into_values());
            handles
        };
        for handle in handles {
            handle.abort();
            let _ = handle.await;
        }
    }

    /// The pull status and `SourceHealthy` condition of each pulled source
    /// of `exporter`.
    pub(crate) fn status(
        &self,
        exporter: &ExporterKey,
        generation: Option<u64>,
    ) -> Vec<(SourceStatus, Condition)> {
        let keys: Vec<PullKey> = lock(&self.tasks)
            .keys()
            .filter(|(e, _)| e == exporter)
            .cloned()
            .collect();
        keys.into_iter()
            .map(|key| {
                let shared = self.shared(&key);
                let health = lock(&shared.health);
                let pulled_until = health
                    .pulled_until_ms
                    .and_then(|ms| Timestamp::from_millisecond(ms).ok());
                let (status, reason, message) = if health.failing {
                    (
                        "False",
                        "PullFailing",
                        format!(
                            "last error: {}",
                            health.last_error.as_deref().unwrap_or("unknown")
                        ),
                    )
                } else if let Some(until) = pulled_until {
                    ("True", "Pulling", format!("pulled up to {until}"))
                } else {
                    ("Unknown", "Starting", "nothing pulled yet".to_owned())
                };
                let condition = Condition {
                    kind: "SourceHealthy".into(),
                    status: status.into(),
                    reason: reason.into(),
                    message,
                    observed_generation: generation,
                    sink: None,
                    source: Some(key.1.clone()),
                };
                let source = SourceStatus {
                    name: key.1.clone(),
                    points_pulled: shared.metrics.received(),
                    points_selected: shared.metrics.sent(),
                    pulled_until,
                    last_success_time: health.last_success,
                    last_error: health.last_error.clone(),
                };
                (source, condition)
            })
            .collect()
    }
}

/// What a round of a pull task did.
enum Round {
    /// Every sink has everything up to `now - lag`: wait for the interval.
    CaughtUp,
    /// Some window ended before `now - lag`: go on at once.
    Behind,
}

/// The task of one (exporter, source).
struct PullRun {
    key: PullKey,
    /// The exporter with this source only.
    exporter: Arc<Exporter>,
    router: Router,
    routing: SharedRouting,
    victoria: VictoriaMetricsSource,
    options: PullOptions,
    /// The window now in use: halved while a window is too large for a
    /// sink's queue, grown back after each good round.
    window: Duration,
    shared: Arc<PullShared>,
}

fn now_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl PullRun {
    async fn run(mut self, predecessor: Option<JoinHandle<()>>) {
        if let Some(previous) = predecessor {
            let _ = previous.await;
        }
        loop {
            let delay = match self.round().await {
                Ok(Round::Behind) => Duration::ZERO,
                Ok(Round::CaughtUp) => self.options.interval,
                Err(message) => {
                    self.shared.fail(&self.key, message);
                    self.options.interval
                }
            };
            if delay.is_zero() {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// Pulls the next window of every sink's checkpoint and hands it on.
    async fn round(&mut self) -> Result<Round, String> {
        let routing = current(&self.routing);
        let (Some(sinks), Some(index)) = (routing.sinks_of(&self.key.0), routing.index.clone())
        else {
            return Ok(Round::CaughtUp);
        };
        let sinks: Vec<Arc<SinkRuntime>> = sinks.to_vec();
        drop(routing);
        let metrics = Arc::clone(&self.shared.metrics);
        let source = self.key.1.clone();
        let now = now_ms();
        let ready_until = now.saturating_sub(millis(self.options.lag));
        let mut errors = Vec::new();
        // Sinks by checkpoint: in steady state all share one, so one request serves them all.
        let mut groups: BTreeMap<i64, Vec<Arc<SinkRuntime>>> = BTreeMap::new();
        for sink in sinks {
            let cursor = match sink.pull_cursor(&source).await {
                Ok(Some(cursor)) => cursor,
                Ok(None) => {
                    let start = ready_until.saturating_sub(millis(self.options.backfill));
                    if let Err(e) = sink.hand_pulled(&source, Bytes::new(), 0, start).await {
                        errors.push(e.to_string());
                        continue;
                    }
                    start
                }
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            groups.entry(cursor).or_default().push(sink);
        }
        let matchers = export_matchers(&self.exporter, index.as_ref());
        let mut round = Round::CaughtUp;
        let mut pulled_until = None::<i64>;
        for (cursor, group) in groups {
            let Some(end) = window_end(cursor, now, self.window, self.options.lag) else {
                pulled_until = Some(pulled_until.map_or(cursor, |u| u.min(cursor)));
                continue;
            };
            let series = match self.victoria.export(&matchers, cursor, end).await {
                Ok(series) => series,
                Err(e) => {
                    metrics.add_error("pull");
                    return Err(e.to_string());
                }
            };
            let request = series_to_request(&series);
            let pulled = crate::otlp::data_point_count(&request) as u64;
            let (routes, stats) = self.router.route_encoded(&request, index.as_ref());
            let (bytes, selected) = routes
                .into_iter()
                .next()
                .map_or((Bytes::new(), 0), |r| (Bytes::from(r.bytes), r.points));
            metrics.add_received(pulled);
            metrics.add_sent(selected);
            let unattributed = stats.unattributed_points.min(pulled - selected);
            for (reason, n) in [
                ("unattributed", unattributed),
                ("not_selected", pulled - selected - unattributed),
            ] {
                if n > 0 {
                    metrics.add_dropped(reason, n);
                }
            }
            let mut taken_until = end + 1;
            for sink in group {
                match sink
                    .hand_pulled(&source, bytes.clone(), selected, end + 1)
                    .await
                {
                    Ok(()) => {}
                    Err(refusal) => {
                        metrics.add_error("handoff");
                        taken_until = cursor;
                        if matches!(refusal, Refusal::TooLarge(_)) {
                            self.window = (self.window / 2).max(Duration::from_millis(1));
                            round = Round::Behind;
                        }
                        errors.push(refusal.to_string());
                    }
                }
            }
            pulled_until = Some(pulled_until.map_or(taken_until, |u| u.min(taken_until)));
            if end < ready_until {
                round = Round::Behind;
            }
        }
        if !errors.is_empty() {
            errors.dedup();
            return Err(errors.join("; "));
        }
        self.window = (self.window * 2).min(self.options.window);
        self.shared.succeed(pulled_until);
        Ok(round)
    }
}

/// The `match[]` selectors that pull what `exporter`'s (only) sources may
/// select: never a series outside the namespaces the exporter may see.
pub fn export_matchers(exporter: &Exporter, index: &dyn ResourceIndex) -> Vec<String> {
    let own = exporter.key.namespace.as_str();
    let own_matcher = label_matcher("namespace", own);
    let mut out = BTreeSet::new();
    for source in &exporter.sources {
        match &source.selection {
            Selection::All => {
                out.insert(format!("{{{own_matcher}}}"));
            }
            Selection::Series(selector) => {
                for set in &selector.alternatives {
                    let mut parts = vec![own_matcher.clone()];
                    parts.extend(
                        set.identity
                            .iter()
                            .chain(&set.metric_name)
                            .chain(&set.attribute)
                            .map(|m| m.matcher.to_string()),
                    );
                    out.insert(format!("{{{}}}", parts.join(", ")));
                }
            }
            Selection::Resources(selectors) => {
                let mut namespaces = BTreeSet::from([own.to_owned()]);
                let widening: Vec<_> = selectors
                    .iter()
                    .filter_map(|s| s.namespaces.as_ref())
                    .collect();
                if !widening.is_empty()
                    && let Some(project) = index.namespace(own).map(|n| n.project)
                {
                    for (name, info) in index.namespaces() {
                        if info.project == project
                            && widening.iter().any(|w| w.matches(&info.labels))
                        {
                            namespaces.insert(name);
                        }
                    }
                }
                out.insert(if namespaces.len() == 1 {
                    format!("{{{own_matcher}}}")
                } else {
                    let alternatives: Vec<String> =
                        namespaces.iter().map(|n| regex_escape(n)).collect();
                    format!("{{namespace=~{}}}", quote(&alternatives.join("|")))
                });
            }
        }
    }
    out.into_iter().collect()
}

/// `text` as a regular expression matching only itself (RE2 syntax, as
/// VictoriaMetrics reads it).
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn label_matcher(name: &str, value: &str) -> String {
    format!("{name}={}", quote(value))
}

/// A MetricsQL double-quoted string.
fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::InMemoryResourceIndex;
    use tally_model::Manifest;

    fn exporter(namespace: &str, metrics: &str) -> Exporter {
        let text = format!(
            "apiVersion: telemetry.datumapis.com/v1alpha1\nkind: Exporter\n\
             metadata: {{name: e, namespace: {namespace}}}\nspec:\n  sources:\n\
             \x20   - name: s\n      metrics: {metrics}\n\
             \x20 sinks:\n    - name: k\n      otlp_http: {{endpoint: \"http://127.0.0.1:1\"}}\n"
        );
        let manifest: Manifest = serde_norway::from_str(&text).unwrap();
        Exporter::from_manifest(&manifest).unwrap()
    }

    #[test]
    fn every_alternative_is_narrowed_to_the_exporters_namespace() {
        let index = InMemoryResourceIndex::new();
        let e = exporter(
            "team-a",
            r#"{metricsql: '{__name__=~"hits.*", code!="500" or namespace="team-b"}'}"#,
        );
        assert_eq!(
            export_matchers(&e, &index),
            vec![
                r#"{namespace="team-a", __name__=~"hits.*", code!="500"}"#.to_owned(),
                r#"{namespace="team-a", namespace="team-b"}"#.to_owned(),
            ]
        );
        let all = exporter("team-a", "{}");
        assert_eq!(
            export_matchers(&all, &index),
            vec![r#"{namespace="team-a"}"#.to_owned()]
        );
        let named = exporter("team-a", "{metricsql: 'up'}");
        assert_eq!(
            export_matchers(&named, &index),
            vec![r#"{namespace="team-a", __name__="up"}"#.to_owned()]
        );
    }

    #[test]
    fn resource_selectors_pull_the_namespaces_of_their_project_they_select() {
        let mut index = InMemoryResourceIndex::new();
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        index.set_namespace("team-a", "acme", labels(&[]));
        index.set_namespace("team-a.dev", "acme", labels(&[("env", "dev")]));
        index.set_namespace("team-a-prod", "acme", labels(&[("env", "prod")]));
        index.set_namespace("other", "globex", labels(&[("env", "dev")]));
        let own = exporter(
            "team-a",
            "{resourceSelectors: [{kinds: [{resources: [gateways]}]}]}",
        );
        assert_eq!(
            export_matchers(&own, &index),
            vec![r#"{namespace="team-a"}"#.to_owned()]
        );
        let widened = exporter(
            "team-a",
            "{resourceSelectors: [{namespaceSelector: {matchLabels: {env: dev}}}]}",
        );
        assert_eq!(
            export_matchers(&widened, &index),
            vec![r#"{namespace=~"team-a|team-a\\.dev"}"#.to_owned()]
        );
    }
}
