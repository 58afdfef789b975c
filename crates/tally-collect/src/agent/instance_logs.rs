//! Instance log files (`instanceLogs`): the node's container log files,
//! found by path patterns ([`crate::instance_log`]), tailed through
//! rotation ([`FileTailer`]: rename and copytruncate), joined into records
//! and shipped as OTLP logs to `tally serve`'s `POST /v1/logs` with the
//! attributes serve routes instance logs on (`project`, `instance` on the
//! resource; `log.iostream`, `log.record.uid` on each record).
//!
//! # Durability
//! One thread reads the files in path order. Each read of a file becomes
//! queue items in a `tally-delivery` disk queue (`state_dir/instance-logs`,
//! fsync'd), **written in one atomic batch with that file's mark**: its
//! [`TailCheckpoint`] and its [`Assembler`] (pending partial records). After
//! a kill -9 the marks say exactly which lines are queued, so nothing is
//! read twice or skipped; the queue holds what serve has not acknowledged,
//! and re-sends carry the same `log.record.uid`, which serve dedupes. A
//! queue at its limit refuses the read whole: the file is read again from
//! its mark later (back-pressure reaches the files, never memory).
//!
//! A record's id is XXH3-128 of (file path, the mark it was read from, its
//! index in that read): unique, and fixed once queued.
//!
//! # Order
//! Records of one file keep file order (one reader, one sink sending
//! batches in queue order); an instance's files are read in path order
//! each turn. At most `maxFiles` files are followed (the rest are logged
//! and skipped until others go away). A file that stops matching (its
//! pod's directory was removed) is let go once it has nothing more to read,
//! and a file that cannot be read is let go with a warning: neither stops
//! the agent.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tally_delivery::{
    EncodeError, Encoder, EnqueueError, HttpRequest, Item, Registry, Secret, Sink, SinkConfig,
    Storage,
};

use super::AgentError;
use super::config::{AgentConfig, InstanceLogsConfig};
use crate::instance_log::{Assembler, PathLabels, Record};
use crate::tail::{FileTailer, TailCheckpoint};

/// Most bytes read from one file per turn.
const READ_BYTES: usize = 256 << 10;

/// What is saved with each read, per file (the mark's value, JSON).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct FileMark {
    checkpoint: TailCheckpoint,
    assembler: Assembler,
}

/// One queued record (an item's data, JSON).
#[derive(Debug, Serialize, Deserialize)]
struct QueuedRecord {
    #[serde(rename = "p")]
    project: String,
    #[serde(rename = "i")]
    instance: String,
    #[serde(rename = "s")]
    stream: String,
    #[serde(rename = "t")]
    time_unix_nano: u64,
    id: String,
    #[serde(rename = "b")]
    body: String,
}

/// A file being followed.
struct Followed {
    tailer: FileTailer,
    labels: PathLabels,
    source: usize,
    /// What its last queued read left: where reading resumes after a
    /// refusal.
    saved: FileMark,
}

/// The instance log reader and its sink.
pub(crate) struct InstanceLogs {
    config: InstanceLogsConfig,
    sink: Sink,
    poll: Duration,
    files: HashMap<PathBuf, Followed>,
    runtime: tokio::runtime::Handle,
    /// Files over `maxFiles`, already warned about.
    warned_limit: bool,
}

impl InstanceLogs {
    /// Opens the queue and starts its sink (inside the agent's runtime).
    pub(crate) fn start(
        config: &AgentConfig,
        logs: &InstanceLogsConfig,
        registry: &Registry,
    ) -> Result<InstanceLogs, AgentError> {
        let mut sink_config = SinkConfig::new("instance-logs");
        sink_config.batch.max_items = 2000;
        sink_config.batch.max_bytes = 4 << 20;
        sink_config.batch.timeout = config.batch_timeout;
        sink_config.retry.max_attempts = u32::MAX;
        sink_config.retry.max_elapsed = None;
        sink_config.retry.max_backoff = config.max_backoff;
        sink_config.retry.max_retry_after = config.max_backoff.max(Duration::from_secs(1));
        sink_config.retry.request_timeout = config.request_timeout;
        sink_config.retry = sink_config.retry.retry_all_5xx();
        sink_config.queue.max_items = u64::MAX;
        sink_config.queue.max_bytes = logs.max_queued_bytes;
        sink_config.queue.storage = Storage::Disk {
            path: config.state_dir.join("instance-logs"),
            sync: true,
        };
        let url = logs
            .url
            .join("/v1/logs")
            .map_err(|e| AgentError::Config(format!("building the OTLP logs URL: {e}")))?;
        let encoder = OtlpEncoder {
            url,
            token: config.token.clone(),
        };
        let sink = Sink::builder(sink_config, encoder)
            .registry(registry)
            .start()
            .map_err(|e| AgentError::Sink(format!("starting the instance log sink: {e}")))?;
        Ok(InstanceLogs {
            config: logs.clone(),
            sink,
            poll: config.poll_interval,
            files: HashMap::new(),
            runtime: tokio::runtime::Handle::current(),
            warned_limit: false,
        })
    }

    /// Reads until `stop`, then stops the sink (what is queued stays on
    /// disk).
    pub(crate) fn run(mut self, stop: Arc<AtomicBool>) -> Result<(), AgentError> {
        while !stop.load(Ordering::SeqCst) {
            let busy = self.turn()?;
            if !busy {
                std::thread::sleep(self.poll);
            }
        }
        let report = self
            .runtime
            .block_on(self.sink.shutdown(Duration::from_secs(5)));
        tracing::info!(
            left_in_queue = report.left_in_queue,
            "instance log reader stopped; unsent records stay queued on disk"
        );
        Ok(())
    }

    /// One look at every file; whether any had something to read. A file
    /// that no longer matches (its pod's directory went away) is let go
    /// once a look finds nothing more in it, or it cannot be read.
    fn turn(&mut self) -> Result<bool, AgentError> {
        let matched = self.discover()?;
        let mut paths: Vec<PathBuf> = self.files.keys().cloned().collect();
        paths.sort();
        let mut busy = false;
        for path in paths {
            let read = match self.read_file(&path) {
                Ok(read) => read,
                Err(ReadError::Agent(e)) => return Err(e),
                Err(ReadError::File(e)) => {
                    tracing::warn!(path = %path.display(), error = %e,
                        "an instance log file cannot be read; it is let go");
                    self.files.remove(&path);
                    continue;
                }
            };
            if !read && !matched.contains(&path) {
                self.files.remove(&path);
            }
            busy |= read;
        }
        Ok(busy)
    }

    /// Follows files that newly match a pattern, from their marks; returns
    /// every path matching now.
    fn discover(&mut self) -> Result<HashSet<PathBuf>, AgentError> {
        let mut seen = Vec::new();
        for (source, log_source) in self.config.sources.iter().enumerate() {
            for (path, labels) in log_source.pattern.files(self.config.max_files) {
                seen.push((path, labels, source));
            }
        }
        let matched = seen.iter().map(|(path, _, _)| path.clone()).collect();
        for (path, labels, source) in seen {
            if self.files.contains_key(&path) {
                continue;
            }
            if self.files.len() >= self.config.max_files {
                if !self.warned_limit {
                    tracing::warn!(max_files = self.config.max_files, path = %path.display(),
                        "more instance log files than maxFiles; the rest are not read");
                    self.warned_limit = true;
                }
                continue;
            }
            let saved = self.load_mark(&path)?;
            let tailer = match FileTailer::open(&path, &saved.checkpoint) {
                Ok(tailer) => tailer,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e,
                        "an instance log file cannot be opened; trying again later");
                    continue;
                }
            };
            self.files.insert(
                path,
                Followed {
                    tailer,
                    labels,
                    source,
                    saved,
                },
            );
        }
        Ok(matched)
    }

    fn load_mark(&self, path: &std::path::Path) -> Result<FileMark, AgentError> {
        let key = mark_key(path);
        let value = self
            .runtime
            .block_on(self.sink.mark(key))
            .map_err(|e| AgentError::Sink(format!("reading a file's mark: {e}")))?;
        Ok(value
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default())
    }

    /// Reads one file on and queues what it read with its mark; whether
    /// it read anything.
    fn read_file(&mut self, path: &PathBuf) -> Result<bool, ReadError> {
        let Some(file) = self.files.get_mut(path) else {
            return Ok(false);
        };
        let source = &self.config.sources[file.source];
        let plain_stream = file.labels.stream.as_deref().unwrap_or("stdout");
        let mut assembler = file.saved.assembler.clone();
        let mut records = Vec::new();
        let lines = file
            .tailer
            .read_lines(READ_BYTES, |line| {
                assembler.push(source.format, plain_stream, line, &mut records)
            })
            .map_err(ReadError::File)?;
        if lines == 0 {
            return Ok(false);
        }
        let mark = FileMark {
            checkpoint: file.tailer.checkpoint(),
            assembler,
        };
        let Some(project) = file.labels.project.clone().or(source.project.clone()) else {
            return Ok(true);
        };
        let items = items(path, &file.saved, &project, &file.labels.instance, records)?;
        let value = serde_json::to_vec(&mark).map_err(AgentError::Encode)?;
        let mark_value = vec![(mark_key(path), Bytes::from(value))];
        let queued = self
            .runtime
            .block_on(self.sink.try_enqueue_marked(items, mark_value));
        match queued {
            Ok(()) => {
                file.saved = mark;
                Ok(true)
            }
            Err(EnqueueError::Full { .. }) => {
                // Read again from the last mark once the queue drains.
                file.tailer =
                    FileTailer::open(path, &file.saved.checkpoint).map_err(ReadError::File)?;
                Ok(false)
            }
            Err(e) => Err(ReadError::Agent(AgentError::Sink(format!(
                "queueing the records of {}: {e}",
                path.display()
            )))),
        }
    }
}

/// Why a file's read failed: the file (it is let go) or the agent (it
/// stops).
enum ReadError {
    File(crate::tail::TailError),
    Agent(AgentError),
}

impl From<AgentError> for ReadError {
    fn from(e: AgentError) -> ReadError {
        ReadError::Agent(e)
    }
}

fn mark_key(path: &std::path::Path) -> Bytes {
    Bytes::from(format!("file:{}", path.display()))
}

/// The records of one read as queue items, ids derived from where the read
/// began.
fn items(
    path: &std::path::Path,
    from: &FileMark,
    project: &str,
    instance: &str,
    records: Vec<Record>,
) -> Result<Vec<Item>, AgentError> {
    let origin = serde_json::to_vec(&from.checkpoint).map_err(AgentError::Encode)?;
    let now = u64::try_from(jiff::Timestamp::now().as_nanosecond()).unwrap_or(0);
    let mut items = Vec::with_capacity(records.len());
    for (index, record) in records.into_iter().enumerate() {
        let mut seed = path.as_os_str().as_encoded_bytes().to_vec();
        seed.push(0);
        seed.extend_from_slice(&origin);
        seed.extend_from_slice(&(index as u64).to_be_bytes());
        let id = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&seed));
        let queued = QueuedRecord {
            project: project.to_owned(),
            instance: instance.to_owned(),
            stream: record.stream,
            time_unix_nano: record.time_unix_nano.unwrap_or(now),
            body: String::from_utf8_lossy(&record.text).into_owned(),
            id: id.clone(),
        };
        let data = serde_json::to_vec(&queued).map_err(AgentError::Encode)?;
        items.push(Item::new(id, data));
    }
    Ok(items)
}

/// Batches of queued records as one OTLP/HTTP protobuf export.
struct OtlpEncoder {
    url: reqwest::Url,
    token: Option<Secret>,
}

fn text(value: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(value.to_owned())),
    }
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(text(value)),
        ..KeyValue::default()
    }
}

/// Records grouped by instance (in first-seen order, each in queue order).
fn export_request(items: &[Item]) -> ExportLogsServiceRequest {
    let mut resources: Vec<ResourceLogs> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    for item in items {
        let Ok(record) = serde_json::from_slice::<QueuedRecord>(&item.data) else {
            tracing::warn!("an unreadable queued instance log record was dropped");
            continue;
        };
        let key = (record.project.clone(), record.instance.clone());
        let at = *index.entry(key).or_insert_with(|| {
            resources.push(ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![
                        kv("project", &record.project),
                        kv("instance", &record.instance),
                    ],
                    ..Resource::default()
                }),
                scope_logs: vec![ScopeLogs::default()],
                ..ResourceLogs::default()
            });
            resources.len() - 1
        });
        resources[at].scope_logs[0].log_records.push(LogRecord {
            time_unix_nano: record.time_unix_nano,
            observed_time_unix_nano: record.time_unix_nano,
            body: Some(text(&record.body)),
            attributes: vec![
                kv("log.iostream", &record.stream),
                kv("log.record.uid", &record.id),
            ],
            ..LogRecord::default()
        });
    }
    ExportLogsServiceRequest {
        resource_logs: resources,
    }
}

impl Encoder for OtlpEncoder {
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
        let body = export_request(items).encode_to_vec();
        super::ledger::post_to_serve(
            &self.url,
            "application/x-protobuf",
            body,
            self.token.as_ref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(project: &str, instance: &str, body: &str, id: &str) -> Item {
        let record = QueuedRecord {
            project: project.into(),
            instance: instance.into(),
            stream: "stderr".into(),
            time_unix_nano: 7,
            id: id.into(),
            body: body.into(),
        };
        Item::new(id.to_owned(), serde_json::to_vec(&record).unwrap())
    }

    #[test]
    fn a_batch_becomes_one_resource_per_instance_in_queue_order() {
        let request = export_request(&[
            item("acme", "web-0", "a", "1"),
            item("acme", "web-1", "b", "2"),
            item("acme", "web-0", "c", "3"),
        ]);
        let got: Vec<(String, Vec<String>)> = request
            .resource_logs
            .iter()
            .map(|r| {
                let attributes = &r.resource.as_ref().unwrap().attributes;
                let instance = attributes
                    .iter()
                    .find(|kv| kv.key == "instance")
                    .and_then(|kv| kv.value.clone())
                    .and_then(|v| v.value);
                let Some(any_value::Value::StringValue(instance)) = instance else {
                    panic!("no instance attribute");
                };
                let bodies = r.scope_logs[0]
                    .log_records
                    .iter()
                    .map(|l| match l.body.clone().and_then(|b| b.value) {
                        Some(any_value::Value::StringValue(s)) => s,
                        other => panic!("{other:?}"),
                    })
                    .collect();
                (instance, bodies)
            })
            .collect();
        assert_eq!(
            got,
            [
                ("web-0".to_owned(), vec!["a".to_owned(), "c".to_owned()]),
                ("web-1".to_owned(), vec!["b".to_owned()]),
            ]
        );
        let record = &request.resource_logs[0].scope_logs[0].log_records[1];
        let keys: Vec<(&str, String)> = record
            .attributes
            .iter()
            .map(|kv| (kv.key.as_str(), format!("{:?}", kv.value)))
            .collect();
        assert_eq!(keys[0].0, "log.iostream");
        assert!(keys[1].0 == "log.record.uid" && keys[1].1.contains("\"3\""));
        assert_eq!(record.time_unix_nano, 7);
    }
}
