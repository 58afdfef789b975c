//! The accept loop: admits connections under the limit, serves each on its
//! own task, and drains them, within a bound, when the server stops.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::connection::{self, Shared};
use crate::service::{BodyTimeoutAnswer, Requests};
use crate::{ConnectionStats, Limits};

/// How often at most a burst of refused connections or failed accepts is
/// logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The longest pause after a failed accept (e.g. out of file descriptors).
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Serves an axum [`Router`] on a listener under [`Limits`].
pub struct Server {
    limits: Limits,
    stats: ConnectionStats,
    answer: BodyTimeoutAnswer,
}

impl Server {
    /// A server enforcing `limits`; a request whose body misses its
    /// deadline is answered by `body_timeout` (the server's `408`).
    pub fn new(limits: Limits, body_timeout: BodyTimeoutAnswer) -> Server {
        Server {
            limits,
            stats: ConnectionStats::new(),
            answer: body_timeout,
        }
    }

    /// Counts into `stats` (e.g. the ones `/metrics` renders).
    pub fn with_stats(mut self, stats: ConnectionStats) -> Server {
        self.stats = stats;
        self
    }

    /// Serves `app` on `listener` until `shutdown` completes; then stops
    /// accepting, lets every connection finish what is in flight, and
    /// returns once they have closed or the drain timeout has passed
    /// (closing the rest).
    pub async fn serve(
        self,
        listener: TcpListener,
        app: Router,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // The watchdog of each connection times request headers, for both
        // protocols; hyper's HTTP/1 timer would also close kept-alive
        // connections at the header timeout instead of the idle one.
        builder.http1().header_read_timeout(None);
        let shared = Arc::new(Shared {
            builder,
            requests: Requests {
                app,
                stats: self.stats.clone(),
                body_read_timeout: self.limits.body_read_timeout,
                answer: self.answer,
                activity: None,
            },
            limits: self.limits,
            stats: self.stats,
        });
        let (stop, stopped) = watch::channel(false);
        let mut connections = JoinSet::new();
        accept(&listener, &shared, &stopped, &mut connections, shutdown).await;
        drop(listener);
        let _ = stop.send(true);
        drain(connections, shared.limits.drain_timeout).await;
    }
}

/// Accepts connections until `shutdown` completes.
async fn accept(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    stopped: &watch::Receiver<bool>,
    connections: &mut JoinSet<()>,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(shared.limits.max_connections));
    let mut refused = Burst::default();
    let mut failed = Burst::default();
    let mut backoff = Duration::ZERO;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return,
            Some(ended) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = ended
                    && error.is_panic()
                {
                    tracing::error!(error = %error, "an HTTP connection's task panicked");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    backoff = Duration::ZERO;
                    match Arc::clone(&permits).try_acquire_owned() {
                        Ok(permit) => {
                            let serving =
                                connection::serve(stream, Arc::clone(shared), stopped.clone(), permit);
                            connections.spawn(serving);
                        }
                        Err(_) => {
                            // Counted before the client can see it closed.
                            shared.stats.add_refused();
                            drop(stream);
                            if let Some(count) = refused.hit(Instant::now()) {
                                tracing::warn!(max_connections = shared.limits.max_connections, refused = count,
                                    "HTTP connection limit reached: closing new connections (http.maxConnections)");
                            }
                        }
                    }
                }
                // The peer gave up before it was accepted.
                Err(error) if is_connection_error(&error) => {}
                Err(error) => {
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), MAX_BACKOFF);
                    if let Some(count) = failed.hit(Instant::now()) {
                        tracing::warn!(error = %error, failures = count, backoff = ?backoff,
                            "accepting HTTP connections failed; pausing");
                    }
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }
}

fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        error.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// Waits for every connection to close, at most `bound`; closes the rest.
async fn drain(mut connections: JoinSet<()>, bound: Duration) {
    let all_closed = tokio::time::timeout(bound, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if all_closed.is_err() {
        tracing::warn!(
            connections = connections.len(),
            drain_timeout = ?bound,
            "closing HTTP connections still busy at the drain timeout"
        );
        connections.shutdown().await;
    }
}

/// Events logged once per burst: the first, then at most one line (with
/// the count since the last) every [`LOG_EVERY`].
#[derive(Default)]
struct Burst {
    logged: Option<Instant>,
    unlogged: u64,
}

impl Burst {
    /// Counts an event at `now`; `Some(count)` when it is time to log
    /// `count` events.
    fn hit(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self.logged.is_some_and(|at| now < at + LOG_EVERY) {
            return None;
        }
        self.logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_once_per_interval() {
        let mut burst = Burst::default();
        let start = Instant::now();
        assert_eq!(burst.hit(start), Some(1));
        for _ in 0..99 {
            assert_eq!(burst.hit(start + Duration::from_secs(1)), None);
        }
        assert_eq!(burst.hit(start + LOG_EVERY), Some(100));
        assert_eq!(burst.hit(start + LOG_EVERY), None);
    }
}
