//! `http:` in a server's config file, and the [`Limits`] it resolves to.

use std::time::Duration;

use jiff::SignedDuration;
use serde::{Deserialize, Serialize};

/// The longest any of the timeouts may be.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The most connections served at once by default, whatever the open-file
/// limit allows.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// `http:` in the config of `tally serve`, `tally export` and `tally
/// collect`: how long a client may take and how many may be connected.
/// Durations are written like `10s`, `1m30s`, `500ms` (or ISO 8601,
/// `PT10S`). Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct HttpConfig {
    /// How long a connection may take to send a request's headers: from
    /// its opening for the first request, from the first byte of the next
    /// one on a kept-alive connection (default `10s`).
    pub header_read_timeout: SignedDuration,
    /// How long a connection may stay open with no request in flight and
    /// nothing sent (default `60s`).
    pub idle_timeout: SignedDuration,
    /// How long a request's body may take to arrive whole, from the end of
    /// its headers; a late body answers `408` (default `30s`).
    pub body_read_timeout: SignedDuration,
    /// How long a stopping server waits for requests in flight before it
    /// closes their connections (default `10s`).
    pub drain_timeout: SignedDuration,
    /// Most connections served at once; more are closed as soon as they
    /// are accepted (counted in `tally_http_connections_refused_total`).
    /// Default: half the process's open-file limit (`ulimit -n`), at most
    /// 4096; it must stay below that limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout: SignedDuration::from_secs(10),
            idle_timeout: SignedDuration::from_secs(60),
            body_read_timeout: SignedDuration::from_secs(30),
            drain_timeout: SignedDuration::from_secs(10),
            max_connections: None,
        }
    }
}

/// Why an `http:` section cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitsError {
    /// A timeout is zero, negative or longer than a day.
    #[error("http.{field} must be more than 0s and at most 24h, not {value:#}")]
    Timeout {
        /// The field's name in the config file.
        field: &'static str,
        /// What it says.
        value: SignedDuration,
    },
    /// `maxConnections: 0`.
    #[error("http.maxConnections must be at least 1")]
    NoConnections,
    /// More connections than the process may open files.
    #[error(
        "http.maxConnections ({max}) must be below the open-file limit ({limit}), which the store and queues share; raise `ulimit -n` or lower it"
    )]
    AboveFileLimit {
        /// What the config says.
        max: usize,
        /// The soft `RLIMIT_NOFILE`.
        limit: u64,
    },
}

/// What a listener enforces: [`HttpConfig`] checked and resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// See [`HttpConfig::header_read_timeout`].
    pub header_read_timeout: Duration,
    /// See [`HttpConfig::idle_timeout`].
    pub idle_timeout: Duration,
    /// See [`HttpConfig::body_read_timeout`].
    pub body_read_timeout: Duration,
    /// See [`HttpConfig::drain_timeout`].
    pub drain_timeout: Duration,
    /// See [`HttpConfig::max_connections`]; at least 1.
    pub max_connections: usize,
}

impl Default for Limits {
    /// The defaults of [`HttpConfig`].
    fn default() -> Self {
        let config = HttpConfig::default();
        let timeout = |d: SignedDuration| Duration::try_from(d).unwrap_or(MAX_TIMEOUT);
        Limits {
            header_read_timeout: timeout(config.header_read_timeout),
            idle_timeout: timeout(config.idle_timeout),
            body_read_timeout: timeout(config.body_read_timeout),
            drain_timeout: timeout(config.drain_timeout),
            max_connections: default_max_connections(open_file_limit()),
        }
    }
}

impl HttpConfig {
    /// The limits this section sets, or why they cannot be used.
    pub fn limits(&self) -> Result<Limits, LimitsError> {
        self.limits_within(open_file_limit())
    }

    /// [`HttpConfig::limits`] for a process that may open `file_limit`
    /// files (`None`: unlimited).
    fn limits_within(&self, file_limit: Option<u64>) -> Result<Limits, LimitsError> {
        let max_connections = match self.max_connections {
            None => default_max_connections(file_limit),
            Some(0) => return Err(LimitsError::NoConnections),
            Some(max) => match file_limit {
                Some(limit) if max as u64 >= limit => {
                    return Err(LimitsError::AboveFileLimit { max, limit });
                }
                _ => max,
            },
        };
        Ok(Limits {
            header_read_timeout: timeout("headerReadTimeout", self.header_read_timeout)?,
            idle_timeout: timeout("idleTimeout", self.idle_timeout)?,
            body_read_timeout: timeout("bodyReadTimeout", self.body_read_timeout)?,
            drain_timeout: timeout("drainTimeout", self.drain_timeout)?,
            max_connections,
        })
    }
}

fn timeout(field: &'static str, value: SignedDuration) -> Result<Duration, LimitsError> {
    Duration::try_from(value)
        .ok()
        .filter(|d| !d.is_zero() && *d <= MAX_TIMEOUT)
        .ok_or(LimitsError::Timeout { field, value })
}

/// Half of `file_limit`, at most [`DEFAULT_MAX_CONNECTIONS`], at least 1:
/// the other half is left to the store, the queues and the log.
fn default_max_connections(file_limit: Option<u64>) -> usize {
    let half = file_limit.map_or(u64::MAX, |limit| limit / 2);
    usize::try_from(half)
        .unwrap_or(usize::MAX)
        .clamp(1, DEFAULT_MAX_CONNECTIONS)
}

/// The soft `RLIMIT_NOFILE` of this process; `None`: unlimited.
fn open_file_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_fields_take_their_defaults() {
        let config: HttpConfig =
            serde_norway::from_str("headerReadTimeout: 2s\nmaxConnections: 8\n").unwrap();
        let limits = config.limits_within(Some(1024)).unwrap();
        assert_eq!(limits.header_read_timeout, Duration::from_secs(2));
        assert_eq!(limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(limits.body_read_timeout, Duration::from_secs(30));
        assert_eq!(limits.drain_timeout, Duration::from_secs(10));
        assert_eq!(limits.max_connections, 8);
        let iso: HttpConfig = serde_norway::from_str("idleTimeout: PT1M30S\n").unwrap();
        assert_eq!(
            iso.limits_within(None).unwrap().idle_timeout,
            Duration::from_secs(90)
        );
        assert!(serde_norway::from_str::<HttpConfig>("idleTimeout: soon\n").is_err());
        assert!(serde_norway::from_str::<HttpConfig>("headerTimeout: 1s\n").is_err());
    }

    #[test]
    fn the_connection_limit_follows_the_open_file_limit() {
        let default = HttpConfig::default();
        assert_eq!(
            default.limits_within(Some(1024)).unwrap().max_connections,
            512
        );
        assert_eq!(
            default
                .limits_within(Some(1 << 20))
                .unwrap()
                .max_connections,
            DEFAULT_MAX_CONNECTIONS
        );
        assert_eq!(
            default.limits_within(None).unwrap().max_connections,
            DEFAULT_MAX_CONNECTIONS
        );
        assert_eq!(default.limits_within(Some(1)).unwrap().max_connections, 1);
        let too_many = HttpConfig {
            max_connections: Some(1024),
            ..HttpConfig::default()
        };
        assert_eq!(
            too_many.limits_within(Some(1024)),
            Err(LimitsError::AboveFileLimit {
                max: 1024,
                limit: 1024
            })
        );
        assert!(too_many.limits_within(Some(4096)).is_ok());
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let cases = [
            ("headerReadTimeout: 0s\n", "http.headerReadTimeout"),
            ("idleTimeout: -5s\n", "http.idleTimeout"),
            ("bodyReadTimeout: 25h\n", "http.bodyReadTimeout"),
            ("drainTimeout: 0ms\n", "http.drainTimeout"),
            ("maxConnections: 0\n", "http.maxConnections"),
        ];
        for (text, field) in cases {
            let config: HttpConfig = serde_norway::from_str(text).unwrap();
            let error = config.limits_within(None).unwrap_err().to_string();
            assert!(error.contains(field), "{text}: {error}");
        }
    }
}
