//! What a listener counts, for `/metrics`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why the listener closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// Its request headers did not arrive in time.
    HeaderTimeout,
    /// It sat idle too long.
    IdleTimeout,
}

/// Connection counters of one or more listeners; cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct ConnectionStats(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    open: AtomicU64,
    refused: AtomicU64,
    header_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
    body_timeouts: AtomicU64,
}

impl ConnectionStats {
    /// New counters, all zero.
    pub fn new() -> ConnectionStats {
        ConnectionStats::default()
    }

    /// Connections being served now.
    pub fn open(&self) -> u64 {
        self.0.open.load(Ordering::Relaxed)
    }

    /// Connections closed as soon as accepted, over the limit.
    pub fn refused(&self) -> u64 {
        self.0.refused.load(Ordering::Relaxed)
    }

    pub(crate) fn opened(&self) -> OpenGuard {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }

    pub(crate) fn add_refused(&self) {
        self.0.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_closed(&self, why: Closed) {
        let counter = match why {
            Closed::HeaderTimeout => &self.0.header_timeouts,
            Closed::IdleTimeout => &self.0.idle_timeouts,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_body_timeout(&self) {
        self.0.body_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the `tally_http_connections_*` and
    /// `tally_http_request_body_timeouts_total` families in the Prometheus
    /// text format.
    pub fn render(&self, out: &mut String) {
        let c = &self.0;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP tally_http_connections_open HTTP connections being served.\n\
             # TYPE tally_http_connections_open gauge\n\
             tally_http_connections_open {}\n\
             # HELP tally_http_connections_refused_total HTTP connections closed as soon as accepted: the connection limit was reached.\n\
             # TYPE tally_http_connections_refused_total counter\n\
             tally_http_connections_refused_total {}\n\
             # HELP tally_http_connections_timed_out_total HTTP connections closed by a timeout: header (request headers too slow) or idle.\n\
             # TYPE tally_http_connections_timed_out_total counter\n\
             tally_http_connections_timed_out_total{{reason=\"header\"}} {}\n\
             tally_http_connections_timed_out_total{{reason=\"idle\"}} {}\n\
             # HELP tally_http_request_body_timeouts_total HTTP requests answered 408: the body did not arrive in time.\n\
             # TYPE tally_http_request_body_timeouts_total counter\n\
             tally_http_request_body_timeouts_total {}",
            load(&c.open),
            load(&c.refused),
            load(&c.header_timeouts),
            load(&c.idle_timeouts),
            load(&c.body_timeouts),
        );
    }
}

/// Counts a connection open until dropped.
pub(crate) struct OpenGuard(ConnectionStats);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_once() {
        let stats = ConnectionStats::new();
        let open = stats.opened();
        stats.add_refused();
        stats.add_refused();
        stats.add_closed(Closed::IdleTimeout);
        let mut out = String::new();
        stats.render(&mut out);
        assert!(out.contains("\ntally_http_connections_open 1\n"), "{out}");
        assert!(out.contains("\ntally_http_connections_refused_total 2\n"));
        assert!(out.contains("tally_http_connections_timed_out_total{reason=\"idle\"} 1\n"));
        assert!(out.contains("tally_http_connections_timed_out_total{reason=\"header\"} 0\n"));
        assert!(out.ends_with("tally_http_request_body_timeouts_total 0\n"));
        assert_eq!(out.matches("# TYPE").count(), 4);
        drop(open);
        assert_eq!(stats.open(), 0);
    }
}
