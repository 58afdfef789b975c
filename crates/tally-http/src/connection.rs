//! One connection: served by hyper (HTTP/1 or HTTP/2), watched by a clock
//! that closes it when its client is too slow to send a request or sends
//! nothing for too long.
//!
//! **Invariant:** a connection with a request in flight is never closed by
//! the watchdog (a slow body is the body deadline's business, see
//! `service.rs`); one without is closed at the earliest of: its opening +
//! the header-read timeout (no request ever started), the first byte read
//! since it went idle + the header-read timeout (HTTP/1: a request being
//! sent too slowly), the moment it went idle + the idle timeout. HTTP/2
//! connections exchange control frames (pings, window updates) while idle,
//! so bytes read while idle do not start their header timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::time::Instant;

use crate::Limits;
use crate::service::Requests;
use crate::stats::{Closed, ConnectionStats};

/// How long a connection told to close (HTTP/2: `GOAWAY`) may take before
/// it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// `read_while_idle` when nothing was read since the connection went idle.
const NOTHING: u64 = u64::MAX;

/// What the watchdog of a connection knows, updated by its requests and
/// its reads. Times are milliseconds since `opened`.
pub(crate) struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Whether a request has started on this connection.
    served: AtomicBool,
    /// When the last request in flight ended.
    idle_since: AtomicU64,
    /// When the first byte arrived since then, or [`NOTHING`].
    read_while_idle: AtomicU64,
    /// Whether the client opened with the HTTP/2 preface.
    http2: AtomicBool,
}

/// What the watchdog sees.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A request is in flight.
    Busy,
    /// Nothing to do before this instant.
    Until(Instant),
    /// The connection is due to close.
    Expired(Closed),
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            read_while_idle: AtomicU64::new(NOTHING),
            http2: AtomicBool::new(false),
        }
    }

    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.opened).as_millis()).unwrap_or(NOTHING - 1)
    }

    /// A request started; it is in flight until the guard is dropped.
    pub(crate) fn request_started(self: &Arc<Self>) -> InFlight {
        self.started();
        InFlight(Arc::clone(self))
    }

    fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Release);
    }

    fn ended_at(&self, now: Instant) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.read_while_idle.store(NOTHING, Ordering::Release);
            self.idle_since.store(self.millis(now), Ordering::Release);
        }
    }

    fn read_at(&self, now: Instant) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.read_while_idle.load(Ordering::Acquire) == NOTHING
        {
            let _ = self.read_while_idle.compare_exchange(
                NOTHING,
                self.millis(now),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    fn verdict(&self, now: Instant, limits: &Limits) -> Verdict {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Verdict::Busy;
        }
        let (since, timeout, why) = if !self.served.load(Ordering::Acquire) {
            (0, limits.header_read_timeout, Closed::HeaderTimeout)
        } else {
            let http2 = self.http2.load(Ordering::Acquire);
            match self.read_while_idle.load(Ordering::Acquire) {
                first if first != NOTHING && !http2 => {
                    (first, limits.header_read_timeout, Closed::HeaderTimeout)
                }
                _ => (
                    self.idle_since.load(Ordering::Acquire),
                    limits.idle_timeout,
                    Closed::IdleTimeout,
                ),
            }
        };
        let deadline = after(
            self.opened,
            Duration::from_millis(since).saturating_add(timeout),
        );
        if now >= deadline {
            Verdict::Expired(why)
        } else {
            Verdict::Until(deadline)
        }
    }
}

/// A request in flight on a connection; dropped when its response has been
/// sent (or abandoned).
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.ended_at(Instant::now());
    }
}

/// A socket that tells its [`Activity`] when bytes arrive, and which
/// protocol they are.
struct WatchedIo {
    io: TcpStream,
    activity: Arc<Activity>,
    /// Whether the first bytes have been looked at.
    sniffed: bool,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            if !this.sniffed {
                this.sniffed = true;
                // The HTTP/2 connection preface starts `PRI * HTTP/2.0`.
                let http2 = read.starts_with(b"PRI ");
                this.activity.http2.store(http2, Ordering::Release);
            }
            this.activity.read_at(Instant::now());
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What every connection of a listener shares.
pub(crate) struct Shared {
    pub(crate) builder: auto::Builder<TokioExecutor>,
    pub(crate) requests: Requests,
    pub(crate) limits: Limits,
    pub(crate) stats: ConnectionStats,
}

/// Serves `stream` until it closes, the watchdog closes it, or the server
/// stops (`stop` turns true: finish what is in flight, then close).
/// `permit` is its place under the connection limit.
pub(crate) async fn serve(
    stream: TcpStream,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) {
    let _permit = permit;
    let _open = shared.stats.opened();
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(WatchedIo {
        io: stream,
        activity: Arc::clone(&activity),
        sniffed: false,
    });
    let service = shared.requests.on(Arc::clone(&activity));
    let connection = shared.builder.serve_connection(io, service);
    tokio::pin!(connection);
    let check = tokio::time::sleep(shared.limits.header_read_timeout);
    tokio::pin!(check);
    let mut closing: Option<Instant> = None;
    let mut stopping = false;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(error = %error, "HTTP connection ended with an error");
                }
                return;
            }
            () = check.as_mut() => {
                let now = Instant::now();
                match step(&activity, now, &shared, &mut closing) {
                    Step::Wait(until) => check.as_mut().reset(until),
                    Step::Close(until) => {
                        connection.as_mut().graceful_shutdown();
                        check.as_mut().reset(until);
                    }
                    Step::Drop => return,
                }
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// `at` + `duration`, or a year from `at` if that is past what an
/// `Instant` holds ([`Limits`] built by hand may say anything).
fn after(at: Instant, duration: Duration) -> Instant {
    at.checked_add(duration)
        .unwrap_or_else(|| at + Duration::from_secs(365 * 86_400))
}

/// What the watchdog does next.
enum Step {
    /// Look again then.
    Wait(Instant),
    /// Ask the connection to close (HTTP/1: now if idle; HTTP/2: `GOAWAY`)
    /// and look again then.
    Close(Instant),
    /// Drop it: it was asked to close and did not.
    Drop,
}

fn step(activity: &Activity, now: Instant, shared: &Shared, closing: &mut Option<Instant>) -> Step {
    let limits = &shared.limits;
    match activity.verdict(now, limits) {
        Verdict::Busy => Step::Wait(after(
            now,
            limits.header_read_timeout.min(limits.idle_timeout),
        )),
        Verdict::Until(deadline) => Step::Wait(deadline),
        Verdict::Expired(why) => match *closing {
            None => {
                shared.stats.add_closed(why);
                tracing::debug!(reason = ?why, "closing an HTTP connection");
                *closing = Some(now);
                Step::Close(now + CLOSE_GRACE)
            }
            Some(since) if now >= since + CLOSE_GRACE => Step::Drop,
            Some(since) => Step::Wait(since + CLOSE_GRACE),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..Limits::default()
        }
    }

    #[test]
    fn the_deadline_follows_what_the_connection_did() {
        let limits = limits();
        let activity = Activity::new();
        let opened = activity.opened;
        let at = |secs: u64| opened + Duration::from_secs(secs);
        // Nothing yet: the header timeout from the opening, bytes or not.
        activity.read_at(at(1));
        assert_eq!(activity.verdict(at(1), &limits), Verdict::Until(at(10)));
        assert_eq!(
            activity.verdict(at(10), &limits),
            Verdict::Expired(Closed::HeaderTimeout)
        );
        // In flight: never due.
        activity.started();
        assert_eq!(activity.verdict(at(100), &limits), Verdict::Busy);
        // Idle: the idle timeout from the end of the request...
        activity.ended_at(at(100));
        assert_eq!(activity.verdict(at(100), &limits), Verdict::Until(at(160)));
        // ...until a byte arrives: then the header timeout from that byte.
        activity.read_at(at(105));
        activity.read_at(at(106));
        assert_eq!(activity.verdict(at(105), &limits), Verdict::Until(at(115)));
        assert_eq!(
            activity.verdict(at(115), &limits),
            Verdict::Expired(Closed::HeaderTimeout)
        );
        // Two requests in flight (HTTP/2): idle when both have ended.
        activity.started();
        activity.started();
        activity.ended_at(at(200));
        assert_eq!(activity.verdict(at(300), &limits), Verdict::Busy);
        activity.ended_at(at(300));
        assert_eq!(
            activity.verdict(at(360), &limits),
            Verdict::Expired(Closed::IdleTimeout)
        );
        // HTTP/2: frames while idle leave the idle timeout in force.
        activity.http2.store(true, Ordering::Release);
        activity.read_at(at(301));
        assert_eq!(activity.verdict(at(301), &limits), Verdict::Until(at(360)));
    }
}
