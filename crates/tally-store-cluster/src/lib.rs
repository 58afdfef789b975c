//! Tally's cluster backend: the same `Ledger` and `ResourceStore` traits as
//! the embedded store, on NATS JetStream (the log, and a key-value bucket of
//! resources) and ClickHouse (what queries read).
//!
//! [`resources`]: the [`KvResources`] store, on a JetStream key-value bucket
//! every node watches. [`testing`] (feature `testing`, dev only): a real
//! `nats-server -js` started for a test.

pub mod resources;
#[cfg(feature = "testing")]
pub mod testing;

pub use resources::{KvResources, KvResourcesConfig, KvResourcesError};
