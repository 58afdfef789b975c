//! What `Pipeline::ingest` and the pull tasks route with: the router and the
//! running sinks of each of its exporters, swapped whole on every update.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::exporter::ExporterKey;
use crate::index::ResourceIndex;
use crate::route::Router;
use crate::sink::SinkRuntime;
use crate::sync::read;

/// What `ingest` routes with.
#[derive(Default)]
pub(crate) struct Routing {
    pub(crate) router: Router,
    pub(crate) index: Option<Arc<dyn ResourceIndex>>,
    /// Sinks of each of the router's exporters.
    pub(crate) sinks: Vec<Vec<Arc<SinkRuntime>>>,
    /// The router's position of each exporter.
    pub(crate) positions: HashMap<ExporterKey, usize>,
}

impl Routing {
    /// The running sinks of an exporter, if it is running.
    pub(crate) fn sinks_of(&self, key: &ExporterKey) -> Option<&[Arc<SinkRuntime>]> {
        self.positions.get(key).map(|&i| &self.sinks[i][..])
    }
}

/// The routing in use, shared with the pull tasks.
pub(crate) type SharedRouting = Arc<RwLock<Arc<Routing>>>;

pub(crate) fn current(routing: &SharedRouting) -> Arc<Routing> {
    read(routing).clone()
}
