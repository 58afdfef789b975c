//! The one way Tally's servers serve HTTP (`tally serve`, `tally export`,
//! `tally collect`): [`Server`] serves an axum `Router` on a bound
//! listener, HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) on one port,
//! under [`Limits`] read from a config file's `http:` section
//! ([`HttpConfig`]):
//!
//! - **header-read timeout:** a connection that has not sent a whole
//!   request head in time — from its opening, or from the first byte of
//!   its next request — is closed (slowloris, sockets opened and left);
//! - **idle timeout:** a connection with no request in flight that sends
//!   nothing is closed (HTTP/2: `GOAWAY`);
//! - **body-read timeout:** a request body that has not arrived whole in
//!   time, counted from the end of its headers, is answered `408` with
//!   `Connection: close`, in the server's error format;
//! - **connection limit:** past `maxConnections` a new connection is closed
//!   as soon as it is accepted, counted, and logged once per burst, so
//!   connections already open (a health check, `/metrics`) and the process's
//!   other files are unaffected; it is served again once others close;
//! - **accept failures** (out of file descriptors) pause the loop with a
//!   growing backoff, up to 1 s, and never end it;
//! - **graceful shutdown:** on the given signal the listener closes, every
//!   connection finishes what is in flight and closes, and whatever is
//!   still busy after the drain timeout is closed.
//!
//! There is no whole-request timeout: responses may stream as long as they
//! need. [`ConnectionStats`] renders what the listener counted for
//! `/metrics`.
//!
//! **Never:** know a route or a handler, or answer a request itself other
//! than with the server's `408`. **Invariant:** a connection with a request
//! in flight is never closed by a timeout; one without is never kept past
//! its deadline plus one second.

mod config;
mod connection;
mod serve;
mod service;
mod stats;

pub use config::{DEFAULT_MAX_CONNECTIONS, HttpConfig, Limits, LimitsError};
pub use serve::Server;
pub use service::BodyTimeoutAnswer;
pub use stats::ConnectionStats;
