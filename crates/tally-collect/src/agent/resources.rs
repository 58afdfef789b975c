//! The enrichment index every input shares, loaded from a directory of
//! gateway manifests and reloaded when its files change. The same files
//! feed the telemetry pipeline: Namespaces, Gateways, HTTPRoutes,
//! `TelemetryPolicy`s, `Exporter`s and their `Secret`s are read into a
//! [`ResourceSet`] with the rules `tally serve` applies them by, and the
//! pipeline is handed its [`Snapshot::of`] at start and at every change.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tally_ledger::{ApplyMode, ResourceSet};
use tally_model::{KindClass, Manifest};
use tally_telemetry::{Pipeline, Snapshot};

use crate::enrich::EnrichmentIndex;

/// The enrichment index every input uses, with a generation bumped on reload.
#[derive(Default)]
pub(crate) struct SharedIndex {
    generation: AtomicU64,
    index: RwLock<Arc<EnrichmentIndex>>,
}

impl SharedIndex {
    pub(crate) fn replace(&self, index: EnrichmentIndex) {
        *self
            .index
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(index);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn current(&self) -> (u64, Arc<EnrichmentIndex>) {
        let generation = self.generation.load(Ordering::SeqCst);
        let index = self
            .index
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        (generation, index)
    }
}

/// `(path, modified, length)` of every manifest file: reload when it changes.
pub(crate) type Stamp = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn manifest_files(dir: &Path) -> Stamp {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Stamp = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .filter_map(|p| {
            let meta = std::fs::metadata(&p).ok()?;
            meta.is_file()
                .then(|| (p, meta.modified().ok(), meta.len()))
        })
        .collect();
    files.sort();
    files
}

/// What a resource directory holds.
pub(crate) struct Loaded {
    /// Its HTTPRoutes, Gateways and GatewayClasses, for enrichment.
    pub(crate) index: EnrichmentIndex,
    /// Every manifest a ledger-less process keeps (not catalog kinds), for
    /// the telemetry pipeline.
    pub(crate) set: ResourceSet,
}

/// Loads every manifest of `dir`: HTTPRoutes, Gateways and GatewayClasses
/// into the enrichment index, every non-catalog kind into the resource
/// set; unreadable files and refused manifests are logged.
pub(crate) fn load_resources(dir: &Path) -> (Loaded, Stamp) {
    let stamp = manifest_files(dir);
    let mut loaded = Loaded {
        index: EnrichmentIndex::default(),
        set: ResourceSet::default(),
    };
    let mut gateways = 0;
    for (path, _, _) in &stamp {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read a resource file");
                continue;
            }
        };
        let manifests = match Manifest::parse_documents(&text) {
            Ok(manifests) => manifests,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot parse a resource file");
                continue;
            }
        };
        for manifest in manifests {
            keep(&mut loaded.set, &manifest, path);
            if !matches!(
                manifest.kind.as_str(),
                "HTTPRoute" | "Gateway" | "GatewayClass"
            ) {
                continue;
            }
            match loaded.index.upsert(&manifest) {
                Ok(()) => gateways += 1,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping a resource");
                }
            }
        }
    }
    tracing::info!(dir = %dir.display(), resources = gateways, "gateway resources loaded");
    (loaded, stamp)
}

/// Applies `manifest` to `set` as `tally export` applies a watched one.
fn keep(set: &mut ResourceSet, manifest: &Manifest, path: &Path) {
    match manifest.typed_kind() {
        Ok(kind) if kind.class() != KindClass::Catalog => {}
        _ => return,
    }
    let applied = set
        .plan_apply(manifest.clone(), ApplyMode::Upsert, jiff::Timestamp::now())
        .and_then(|(stored, _)| set.insert(stored));
    if let Err(e) = applied {
        tracing::warn!(file = %path.display(), kind = %manifest.kind,
            name = %manifest.metadata.name, error = %e, "a resource was refused");
    }
}

/// Hands `pipeline` what `set` holds.
pub(crate) fn update_pipeline(pipeline: &Pipeline, set: &ResourceSet) {
    let previous = pipeline.policies().unwrap_or_default();
    let report = pipeline.update(Snapshot::of(set, &previous));
    tracing::debug!(?report, "exporters updated");
}

pub(crate) async fn watch_resources(
    dir: PathBuf,
    mut stamp: Stamp,
    every: Duration,
    index: Arc<SharedIndex>,
    pipeline: Option<Arc<Pipeline>>,
) {
    let every = every.max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let dir_for_scan = dir.clone();
        let Ok(current) = tokio::task::spawn_blocking(move || manifest_files(&dir_for_scan)).await
        else {
            continue;
        };
        if current == stamp {
            continue;
        }
        let dir_for_load = dir.clone();
        if let Ok((loaded, new_stamp)) =
            tokio::task::spawn_blocking(move || load_resources(&dir_for_load)).await
        {
            index.replace(loaded.index);
            if let Some(pipeline) = &pipeline {
                update_pipeline(pipeline, &loaded.set);
            }
            stamp = new_stamp;
        }
    }
}
