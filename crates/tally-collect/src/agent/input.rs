//! One input of the agent — an access-log file, the OTLP spool, Envoy's
//! admin gauges, or the connection lifecycle spool — on its own thread: a
//! [`Collector`] whose outbox events are handed to the ledger sink at most
//! `max_in_flight` at a time, and removed when the sink's outcome says the
//! ledger took them.
//!
//! The lifecycle input also moves time on by the agent's clock: each turn
//! it reads the clock, then the spool, and when the spool had nothing new
//! it advances to the time read ([`Collector::advance_to`]). Reading the
//! clock first means every event answered before that instant has been
//! applied when time moves past it. Windows then close `graceSecs` after
//! their end, with open connections billed up to it, without new events.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tally_delivery::{ComponentKind, ComponentMetrics, Item, Registry, Sink};
use tally_telemetry::Pipeline;

use super::AgentError;
use super::config::AgentConfig;
use super::envoy_admin::AdminSampler;
use super::ledger::Ack;
use super::policies::PolicyFeed;
use super::resources::SharedIndex;
use super::spool::Spool;
use crate::collector::{CollectError, Collector, CollectorConfig, PollReport};
use crate::event::AgentIdentity;
use crate::record::LineProblem;

/// What an input reads.
pub(crate) enum InputKind {
    /// An access-log file (and its rotated siblings).
    File(PathBuf),
    /// The spool the OTLP receivers write.
    Otlp(Arc<Spool>),
    /// Envoy's admin `/stats` gauges.
    EnvoyAdmin(AdminSampler),
    /// The spool the connection lifecycle receiver writes.
    Connections(Arc<Spool>),
}

impl InputKind {
    /// The spool a receiver writes for this input, if any.
    fn spool(&self) -> Option<&Arc<Spool>> {
        match self {
            InputKind::Otlp(spool) | InputKind::Connections(spool) => Some(spool),
            InputKind::File(_) | InputKind::EnvoyAdmin(_) => None,
        }
    }
}

/// One input: a name, what it reads and where its state lives.
pub(crate) struct InputSpec {
    pub(crate) name: String,
    pub(crate) kind: InputKind,
    pub(crate) state_dir: PathBuf,
    /// Part of the event ids: keep stable for an input.
    pub(crate) agent_key: String,
}

/// The state directory of the input reading `path`: a readable, stable name.
pub(crate) fn input_dir(state_dir: &Path, path: &Path) -> PathBuf {
    let name: String = path
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    state_dir.join("inputs").join(name.trim_matches('_'))
}

/// Runs one input on its own thread.
pub(crate) struct InputRunner {
    pub(crate) number: usize,
    pub(crate) spec: InputSpec,
    pub(crate) config: Arc<AgentConfig>,
    pub(crate) registry: Registry,
    pub(crate) index: Arc<SharedIndex>,
    pub(crate) sink: Arc<Sink>,
    /// The telemetry pipeline access-log lines go through, if any.
    pub(crate) pipeline: Option<Arc<Pipeline>>,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) acks: mpsc::Receiver<Ack>,
    pub(crate) stop: Arc<AtomicBool>,
}

/// Counters already reported to the metrics registry.
#[derive(Default)]
struct Reported {
    lines: u64,
    events: u64,
    problems: HashMap<LineProblem, u64>,
    /// Counts per cause at the last summary.
    summarised: HashMap<LineProblem, u64>,
}

/// When the admin input samples next.
struct Sampling {
    next: Instant,
    failing: bool,
}

impl InputRunner {
    fn open(&self) -> Result<Collector, AgentError> {
        let config = &self.config;
        let agent = AgentIdentity {
            agent_id: format!("{}/{}", config.agent_id, self.spec.agent_key),
            source: format!("tally-collect/{}", config.agent_id),
        };
        let log_path = match &self.spec.kind {
            InputKind::File(path) => path.clone(),
            InputKind::Otlp(spool) | InputKind::Connections(spool) => spool.path().to_owned(),
            InputKind::EnvoyAdmin(_) => PathBuf::new(),
        };
        let mut collector_config =
            CollectorConfig::new(log_path, self.spec.state_dir.clone(), agent);
        collector_config.window = config.window;
        let lifecycle = match (&self.spec.kind, &config.connections) {
            (InputKind::Connections(_), Some(connections)) => {
                collector_config.window = connections.window;
                // Every read is committed: the applied (source, id) pairs
                // and open connections are durable soon after the answer.
                collector_config.checkpoint_every_lines = 1;
                Some(connections.dedupe_horizon_millis)
            }
            _ => None,
        };
        std::fs::create_dir_all(&self.spec.state_dir).map_err(|error| AgentError::Io {
            context: format!(
                "creating the state directory {}",
                self.spec.state_dir.display()
            ),
            error,
        })?;
        let opened = match (&self.spec.kind, lifecycle) {
            (InputKind::EnvoyAdmin(_), _) => Collector::open_gauges(collector_config),
            (_, Some(horizon)) => Collector::open_lifecycle(collector_config, horizon),
            _ => Collector::open(collector_config),
        };
        opened.map_err(|error| AgentError::Collect {
            context: format!("opening the collector of {}", self.spec.name),
            error,
        })
    }

    pub(crate) fn run(self) -> Result<(), AgentError> {
        let config = &self.config;
        let mut collector = self.open()?;
        let source = self
            .registry
            .component(ComponentKind::Source, &self.spec.name);
        let aggregate = self.registry.component(
            ComponentKind::Processor,
            &format!("aggregate:{}", self.spec.name),
        );
        let collect_error = |context: &str| {
            let context = format!("{}: {context}", self.spec.name);
            move |error| AgentError::Collect { context, error }
        };
        let mut reported = Reported::default();
        let mut in_flight: HashSet<String> = HashSet::new();
        let mut generation = u64::MAX;
        let mut last_line = Instant::now();
        let mut flushed = false;
        let mut dirty = true;
        let mut paused_until: Option<Instant> = None;
        let mut last_summary = Instant::now();
        let mut sampling = Sampling {
            next: Instant::now(),
            failing: false,
        };
        let ticks = matches!(self.spec.kind, InputKind::Connections(_));
        let mut feed = match (&self.pipeline, &self.spec.kind) {
            (Some(pipeline), InputKind::File(_) | InputKind::Otlp(_)) => {
                Some(PolicyFeed::new(pipeline.clone(), &self.spec.name))
            }
            _ => None,
        };
        let mut clock_failing = false;
        while !self.stop.load(Ordering::SeqCst) {
            while let Ok(ack) = self.acks.try_recv() {
                self.handle_ack(ack, &mut collector, &mut in_flight, &mut paused_until)?;
                dirty = true;
            }
            let (current, index) = self.index.current();
            if current != generation {
                *collector.enrichment_mut() = (*index).clone();
                generation = current;
            }
            // Read before the spool: see the module documentation.
            let now = ticks.then(|| self.read_clock(&mut clock_failing)).flatten();
            let mut report = match &self.spec.kind {
                InputKind::EnvoyAdmin(sampler) => {
                    self.sample(sampler, &mut collector, &mut sampling, &source)?
                }
                _ => match collector.poll_observed(|line| {
                    if let Some(feed) = feed.as_mut() {
                        feed.push(line);
                    }
                }) {
                    Ok(report) => {
                        if let Some(feed) = feed.as_mut() {
                            feed.flush();
                        }
                        report
                    }
                    Err(CollectError::Tail(e)) => {
                        tracing::warn!(input = %self.spec.name, error = %e, "reading the log failed; trying again");
                        std::thread::sleep(config.poll_interval);
                        continue;
                    }
                    Err(e) => return Err(collect_error("collecting")(e)),
                },
            };
            if let Some(now) = now
                && report.lines == 0
            {
                let tick = collector
                    .advance_to(now)
                    .map_err(collect_error("moving time on"))?;
                report.events += tick.events;
            }
            if report.lines > 0 {
                last_line = Instant::now();
                flushed = false;
            } else if !ticks && !flushed && last_line.elapsed() >= config.idle_flush {
                let flush = collector
                    .flush()
                    .map_err(collect_error("closing idle windows"))?;
                flushed = true;
                dirty |= flush.events > 0;
                if flush.events > 0 {
                    tracing::debug!(input = %self.spec.name, events = flush.events, "idle: closed every open window");
                }
            }
            dirty |= report.events > 0;
            if let Some(spool) = self.spec.kind.spool() {
                spool.rotate_if_read(&collector)?;
                spool.observe(&collector);
            }
            let paused = paused_until.is_some_and(|until| Instant::now() < until);
            if dirty && !paused && in_flight.len() < config.max_in_flight {
                dirty = self.ship(&collector, &mut in_flight)?;
            }
            self.report(&collector, &source, &aggregate, &mut reported);
            if last_summary.elapsed() >= config.diagnostics_every {
                last_summary = Instant::now();
                self.summarise(&collector, &mut reported);
            }
            if report.lines == 0 {
                match self.acks.recv_timeout(config.poll_interval) {
                    Ok(ack) => {
                        self.handle_ack(ack, &mut collector, &mut in_flight, &mut paused_until)?;
                        dirty = true;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        Ok(())
    }

    /// The lifecycle input's "now"; a clock that cannot be read is logged
    /// (once until it can) and time does not move.
    fn read_clock(&self, failing: &mut bool) -> Option<i64> {
        match self.config.clock.now_millis() {
            Ok(now) => {
                if *failing {
                    tracing::info!(input = %self.spec.name, "the clock can be read again");
                    *failing = false;
                }
                Some(now)
            }
            Err(error) => {
                if !*failing {
                    tracing::warn!(input = %self.spec.name, error = %error,
                        "the clock cannot be read; time stands still until it can");
                    *failing = true;
                }
                None
            }
        }
    }

    /// Samples Envoy's admin gauges when it is time; a failed sample is
    /// logged (once until one succeeds) and counted, and the time it
    /// covered is billed only if the next sample comes soon enough.
    fn sample(
        &self,
        sampler: &AdminSampler,
        collector: &mut Collector,
        sampling: &mut Sampling,
        source: &ComponentMetrics,
    ) -> Result<PollReport, AgentError> {
        let Some(interval) = self.config.envoy_admin.as_ref().map(|a| a.interval) else {
            return Ok(PollReport::default());
        };
        let now = Instant::now();
        if now < sampling.next {
            return Ok(PollReport::default());
        }
        sampling.next = now + interval;
        let sampled = match self.runtime.block_on(sampler.sample()) {
            Ok(sampled) => sampled,
            Err(error) => {
                if !sampling.failing {
                    tracing::warn!(input = %self.spec.name, error = %error,
                        "sampling Envoy's admin stats failed; trying again every interval");
                }
                sampling.failing = true;
                source.add_error("sample");
                return Ok(PollReport::default());
            }
        };
        if sampling.failing {
            tracing::info!(input = %self.spec.name, "sampling Envoy's admin stats works again");
            sampling.failing = false;
        }
        if !sampled.unmapped.is_empty() {
            tracing::debug!(input = %self.spec.name, unmapped = ?sampled.unmapped,
                "open connections on listeners no mapping names; not billed");
        }
        let max_gap = i64::try_from(interval.saturating_mul(3).as_millis()).unwrap_or(i64::MAX);
        collector
            .push_gauges(sampled.sample, max_gap)
            .map_err(|error| AgentError::Collect {
                context: format!("{}: recording a sample", self.spec.name),
                error,
            })
    }

    fn handle_ack(
        &self,
        ack: Ack,
        collector: &mut Collector,
        in_flight: &mut HashSet<String>,
        paused_until: &mut Option<Instant>,
    ) -> Result<(), AgentError> {
        match ack {
            Ack::Delivered(ids) => {
                collector
                    .acknowledge(ids.iter().map(String::as_str))
                    .map_err(|error| AgentError::Collect {
                        context: "removing acknowledged events from the outbox".to_owned(),
                        error,
                    })?;
                for id in &ids {
                    in_flight.remove(id);
                }
            }
            Ack::Failed { ids, dead_letter } => {
                tracing::error!(input = %self.spec.name, events = ids.len(),
                    "the ledger refused a batch for good (see the sink's log); the events stay in the outbox and are sent again in 30 s");
                for id in &ids {
                    in_flight.remove(id);
                }
                let sink = self.sink.clone();
                let _ = self
                    .runtime
                    .block_on(async move { sink.delete_dead_letter(dead_letter).await });
                *paused_until = Some(Instant::now() + Duration::from_secs(30));
            }
        }
        Ok(())
    }

    /// Hands outbox events not yet in flight to the sink. Returns whether
    /// the outbox may hold more.
    fn ship(
        &self,
        collector: &Collector,
        in_flight: &mut HashSet<String>,
    ) -> Result<bool, AgentError> {
        let room = self.config.max_in_flight - in_flight.len();
        let limit = in_flight.len() + room;
        let events = collector
            .pending(limit)
            .map_err(|error| AgentError::Collect {
                context: "reading the outbox".to_owned(),
                error,
            })?;
        let more = events.len() >= limit;
        let mut items = Vec::new();
        for event in events {
            if in_flight.contains(&event.id) {
                continue;
            }
            let data = serde_json::to_vec(&event).map_err(AgentError::Encode)?;
            items.push(Item::new(format!("{}:{}", self.number, event.id), data));
            in_flight.insert(event.id);
        }
        if items.is_empty() {
            return Ok(more);
        }
        let sink = self.sink.clone();
        let result = self
            .runtime
            .block_on(async move { sink.enqueue_all(items).await });
        if let Err(e) = result {
            // Only when the sink is stopping; the outbox keeps the events.
            tracing::debug!(input = %self.spec.name, error = %e, "the sink took no more events");
            self.stop.store(true, Ordering::SeqCst);
        }
        Ok(more)
    }

    fn report(
        &self,
        collector: &Collector,
        source: &ComponentMetrics,
        aggregate: &ComponentMetrics,
        reported: &mut Reported,
    ) {
        let stats = collector.stats();
        source.add_received(stats.received_lines.saturating_sub(reported.lines));
        aggregate.add_received(stats.received_lines.saturating_sub(reported.lines));
        reported.lines = stats.received_lines;
        aggregate.add_sent(stats.emitted_events.saturating_sub(reported.events));
        reported.events = stats.emitted_events;
        aggregate.set_queue_depth(stats.outbox_depth as u64);
        for (problem, count) in &collector.diagnostics().counts {
            let before = reported.problems.entry(*problem).or_default();
            if *count > *before {
                source.add_dropped(problem.as_str(), count - *before);
                *before = *count;
            }
        }
    }

    /// The periodic log lines about lines that could not be used: one
    /// warning per cause seen since the last summary (never one per line),
    /// with how many, the total, and for unattributable ones an example. Every line is also counted in
    /// `tally_component_dropped_total{reason}` as it is read.
    fn summarise(&self, collector: &Collector, reported: &mut Reported) {
        let diagnostics = collector.diagnostics();
        for (problem, total) in &diagnostics.counts {
            let before = reported.summarised.insert(*problem, *total).unwrap_or(0);
            if *total <= before {
                continue;
            }
            let example = diagnostics
                .examples
                .get(problem)
                .filter(|_| problem.is_unattributable())
                .and_then(|lines| lines.first())
                .map(String::as_str);
            tracing::warn!(
                input = %self.spec.name,
                reason = problem.as_str(),
                lines = total - before,
                total,
                example = example.unwrap_or("-"),
                "input lines that could not be used"
            );
        }
    }
}
