//! What the agent's receivers share: the spool file a receiver appends
//! lines to and fsyncs before it answers (its input tails the spool like an
//! access-log file, so every input shares one exactly-once path), the
//! back-pressure rule, and request body decoding.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, header};
use bytes::Bytes;

use super::AgentError;
use crate::collector::Collector;

/// Largest accepted request body (HTTP, decoded) or message (gRPC).
pub(crate) const MAX_BODY_BYTES: u64 = 16 << 20;
/// The spool is rotated once it is this large and fully read.
const ROTATE_BYTES: u64 = 64 << 20;

/// The append-only file a receiver writes its lines to, and how far
/// behind the input reading it is.
pub(crate) struct Spool {
    /// Which receiver, for messages (`OTLP`, `connection lifecycle`).
    what: &'static str,
    path: PathBuf,
    file: Mutex<File>,
    limits: Limits,
    /// Events in the input's outbox, as of its last look.
    outbox_depth: AtomicU64,
    /// Bytes of the spool not yet read into a checkpoint.
    unread_bytes: AtomicU64,
}

/// When new requests are refused.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_outbox_events: u64,
    pub(crate) max_unread_bytes: u64,
}

/// Why a request was not stored: the client should retry later.
pub(crate) struct Unavailable(pub(crate) String);

impl Spool {
    /// Opens (creating) `dir/file_name`.
    pub(crate) fn open(
        what: &'static str,
        dir: &Path,
        file_name: &str,
        limits: Limits,
    ) -> Result<Spool, AgentError> {
        std::fs::create_dir_all(dir).map_err(|error| AgentError::Io {
            context: format!("creating the {what} spool directory {}", dir.display()),
            error,
        })?;
        let path = dir.join(file_name);
        let file = open_append(&path)?;
        Ok(Spool {
            what,
            path,
            file: Mutex::new(file),
            limits,
            outbox_depth: AtomicU64::new(0),
            unread_bytes: AtomicU64::new(0),
        })
    }

    /// Records how far behind the input is (called by its thread).
    pub(crate) fn observe(&self, collector: &Collector) {
        let depth = collector.stats().outbox_depth as u64;
        self.outbox_depth.store(depth, Ordering::SeqCst);
        let length = self
            .file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .metadata()
            .map_or(0, |m| m.len());
        let read = collector.positions().last().map_or(0, |p| p.offset);
        self.unread_bytes
            .store(length.saturating_sub(read), Ordering::SeqCst);
    }

    /// As [`Spool::observe`] would record an outbox this deep.
    #[cfg(test)]
    pub(crate) fn set_outbox_depth(&self, depth: u64) {
        self.outbox_depth.store(depth, Ordering::SeqCst);
    }

    /// Why a new request cannot be taken now, if it cannot.
    fn refusal(&self) -> Option<String> {
        let depth = self.outbox_depth.load(Ordering::SeqCst);
        if depth > self.limits.max_outbox_events {
            return Some(format!(
                "the outbox holds {depth} undelivered events (limit {}); retry later",
                self.limits.max_outbox_events
            ));
        }
        let unread = self.unread_bytes.load(Ordering::SeqCst);
        if unread > self.limits.max_unread_bytes {
            return Some(format!(
                "{unread} received bytes are not yet aggregated (limit {}); retry later",
                self.limits.max_unread_bytes
            ));
        }
        None
    }

    /// The spool file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends lines and makes them durable.
    fn append(&self, text: &[u8]) -> std::io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(text)?;
        file.sync_data()
    }

    /// The one way a receiver stores what it took: refused while the input
    /// is over a limit, else `text` (whole lines) appended and fsync'd
    /// before this returns.
    pub(crate) async fn store(self: &Arc<Self>, text: Vec<u8>) -> Result<(), Unavailable> {
        if let Some(reason) = self.refusal() {
            tracing::debug!(receiver = self.what, reason = %reason, "request refused");
            return Err(Unavailable(reason));
        }
        if text.is_empty() {
            return Ok(());
        }
        let writer = self.clone();
        let written = tokio::task::spawn_blocking(move || writer.append(&text)).await;
        let failure = match written {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        match failure {
            None => Ok(()),
            Some(error) => {
                tracing::error!(receiver = self.what, spool = %self.path.display(), error = %error,
                    "writing the spool failed");
                Err(Unavailable(
                    "what was sent could not be stored; retry later".to_owned(),
                ))
            }
        }
    }

    /// Rotates the spool (rename to `<name>.1`, replacing the previous one)
    /// once it is large and the collector has read and checkpointed all of it.
    pub(crate) fn rotate_if_read(&self, collector: &Collector) -> Result<(), AgentError> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let length = file
            .metadata()
            .map_err(|error| AgentError::Io {
                context: format!("reading {}", self.path.display()),
                error,
            })?
            .len();
        let positions = collector.positions();
        let read_all = positions.len() == 1 && positions[0].offset == length;
        if length < ROTATE_BYTES || !read_all {
            return Ok(());
        }
        let mut rotated = self.path.clone().into_os_string();
        rotated.push(".1");
        std::fs::rename(&self.path, &rotated).map_err(|error| AgentError::Io {
            context: format!("rotating {}", self.path.display()),
            error,
        })?;
        *file = open_append(&self.path)?;
        tracing::debug!(spool = %self.path.display(), "spool rotated");
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File, AgentError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| AgentError::Io {
            context: format!("opening {}", path.display()),
            error,
        })
}

/// The body of a request, gunzipped if it says so, at most `limit` bytes.
pub(crate) fn decode_body(headers: &HeaderMap, body: Bytes, limit: u64) -> Result<Vec<u8>, String> {
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
    if !gzip {
        return Ok(body.to_vec());
    }
    let mut out = Vec::new();
    let decoder = flate2::read::GzDecoder::new(&body[..]);
    let read = std::io::Read::read_to_end(&mut std::io::Read::take(decoder, limit + 1), &mut out)
        .map_err(|e| format!("the gzip body cannot be decoded: {e}"))?;
    if read as u64 > limit {
        return Err(format!("the body is larger than {limit} bytes decoded"));
    }
    Ok(out)
}

/// The media type of a request, lower case, without parameters.
pub(crate) fn media_type(headers: &HeaderMap) -> String {
    tally_model::media_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    )
}
