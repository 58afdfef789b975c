//! The enrichment index every input shares, loaded from a directory of
//! gateway manifests and reloaded when its files change.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tally_model::Manifest;

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

/// Loads every HTTPRoute, Gateway and GatewayClass of `dir`; other kinds
/// are skipped, unreadable files logged.
pub(crate) fn load_resources(dir: &Path) -> (EnrichmentIndex, Stamp) {
    let stamp = manifest_files(dir);
    let mut index = EnrichmentIndex::default();
    let mut loaded = 0;
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
            if !matches!(
                manifest.kind.as_str(),
                "HTTPRoute" | "Gateway" | "GatewayClass"
            ) {
                continue;
            }
            match index.upsert(&manifest) {
                Ok(()) => loaded += 1,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping a resource");
                }
            }
        }
    }
    tracing::info!(dir = %dir.display(), resources = loaded, "gateway resources loaded");
    (index, stamp)
}

pub(crate) async fn watch_resources(
    dir: PathBuf,
    mut stamp: Stamp,
    every: Duration,
    index: Arc<SharedIndex>,
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
            index.replace(loaded);
            stamp = new_stamp;
        }
    }
}
