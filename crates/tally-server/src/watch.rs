//! Manifests from watched directories (`manifestDirs` in the serve config):
//! every `*.yaml`, `*.yml` and `*.json` file is applied at start and again
//! whenever its content changes, through the same path as `POST /apis/apply`
//! (so the same validation and the same status). Removing a file does not
//! delete its resources: deletion stays an explicit act. `tally export`
//! watches the same way, applying to its in-memory resource store
//! ([`Watcher`] with its own [`Apply`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tally_ledger::ApplyMode;
use tally_model::{Kind, Manifest};

use crate::AppState;
use crate::resources::apply_one;

/// Applies one manifest of a watched file; the error says why not.
pub(crate) type Apply =
    Arc<dyn Fn(Manifest, Kind) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Applies through the API's own path (`POST /apis/apply`).
pub(crate) fn through_api(state: AppState) -> Apply {
    Arc::new(move |manifest, kind| {
        let state = state.clone();
        Box::pin(async move {
            apply_one(&state, manifest, kind, ApplyMode::Upsert)
                .await
                .map(drop)
                .map_err(|problem| problem.detail)
        })
    })
}

/// How often the directories are read again.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// The manifest files of a directory, sorted by name (not recursive).
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.is_file()
                && path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Applies one file's manifests in order; returns how many were applied.
async fn apply_file(apply: &Apply, path: &Path, text: &str) -> Result<usize, String> {
    let manifests = Manifest::parse_documents(text).map_err(|e| e.to_string())?;
    let mut applied = 0;
    for manifest in manifests {
        let kind = manifest.typed_kind().map_err(|e| e.to_string())?;
        let name = manifest.metadata.name.clone();
        apply(manifest, kind)
            .await
            .map_err(|detail| format!("{kind} {name:?}: {detail}"))?;
        tracing::debug!(file = %path.display(), %kind, %name, "applied");
        applied += 1;
    }
    Ok(applied)
}

/// Reads `dirs` now and every `interval` through the API's apply path,
/// applying what changed. Runs until the task is dropped.
pub async fn watch(state: AppState, dirs: Vec<PathBuf>, interval: Duration) {
    Watcher::new(through_api(state), dirs).run(interval).await
}

/// Watched directories and what was last read of each file.
pub(crate) struct Watcher {
    apply: Apply,
    dirs: Vec<PathBuf>,
    /// path → the content last read, and whether it was applied. A refused
    /// file is tried again every round (it may depend on one applied later),
    /// but reported only once per content.
    seen: HashMap<PathBuf, (String, bool)>,
}

impl Watcher {
    pub(crate) fn new(apply: Apply, dirs: Vec<PathBuf>) -> Watcher {
        Watcher {
            apply,
            dirs,
            seen: HashMap::new(),
        }
    }

    /// Rounds every `interval`, until the task is dropped.
    pub(crate) async fn run(mut self, interval: Duration) {
        loop {
            self.round().await;
            tokio::time::sleep(interval).await;
        }
    }

    /// Reads every directory once, applying the files that changed (or were
    /// refused before).
    pub(crate) async fn round(&mut self) {
        let Watcher { apply, dirs, seen } = self;
        for dir in dirs.iter() {
            let files = match manifest_files(dir) {
                Ok(files) => files,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read manifest directory");
                    continue;
                }
            };
            for path in files {
                let text = match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "cannot read manifest file");
                        continue;
                    }
                };
                let known = seen.get(&path).filter(|(old, _)| *old == text);
                if known.is_some_and(|(_, applied)| *applied) {
                    continue;
                }
                let applied = match apply_file(apply, &path, &text).await {
                    Ok(count) => {
                        tracing::info!(file = %path.display(), resources = count, "manifests applied");
                        true
                    }
                    Err(e) if known.is_none() => {
                        tracing::warn!(file = %path.display(), error = %e, "manifests refused");
                        false
                    }
                    Err(e) => {
                        tracing::debug!(file = %path.display(), error = %e, "manifests still refused");
                        false
                    }
                };
                seen.insert(path, (text, applied));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tally_ledger::{Ledger, ResourceKey, ResourceStore};
    use tally_model::Kind;
    use tally_store_embedded::{EmbeddedLedger, StoreConfig};

    use super::*;

    const METER: &str = "apiVersion: billing.miloapis.com/v1alpha1\nkind: MeterDefinition\n\
        metadata: {name: m}\nspec: {meterName: m, measurement: {aggregation: Sum, unit: UNIT}, \
        event: {type: t, valueProperty: $.v}}\n";

    async fn eventually(mut check: impl AsyncFnMut() -> bool) {
        for _ in 0..400 {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the watched directory was not applied");
    }

    #[tokio::test]
    async fn files_are_applied_when_they_appear_and_change() {
        let store = tempfile::tempdir().unwrap();
        let manifests = tempfile::tempdir().unwrap();
        let ledger = EmbeddedLedger::open(StoreConfig::new(store.path())).unwrap();
        let resources: Arc<dyn ResourceStore> = Arc::new(ledger.resources());
        let ledger: Arc<dyn Ledger> = Arc::new(ledger);
        let state = AppState::new(Arc::clone(&ledger), 1 << 20, None)
            .with_resources(Arc::clone(&resources));
        std::fs::write(
            manifests.path().join("a-meter.yaml"),
            METER.replace("UNIT", "By"),
        )
        .unwrap();
        // Refused (no namespace) but it does not stop the other files.
        std::fs::write(
            manifests.path().join("b-bad.yaml"),
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {k: v}\n",
        )
        .unwrap();
        std::fs::write(
            manifests.path().join("c-ns.json"),
            r#"{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}}"#,
        )
        .unwrap();
        std::fs::write(manifests.path().join("ignored.txt"), "not a manifest").unwrap();
        let task = tokio::spawn(watch(
            state,
            vec![manifests.path().to_owned()],
            Duration::from_millis(20),
        ));
        let namespace = ResourceKey::new(Kind::Namespace, None, "web");
        eventually(async || resources.snapshot().get(&namespace).is_some()).await;
        let unit = async || {
            ledger
                .get(Kind::MeterDefinition, "m".into())
                .await
                .ok()
                .and_then(|m| m.spec["measurement"]["unit"].as_str().map(str::to_owned))
        };
        assert_eq!(unit().await.as_deref(), Some("By"));
        assert_eq!(resources.snapshot().count(Kind::Secret), 0);
        // A changed file is applied again; a fixed one too.
        std::fs::write(
            manifests.path().join("a-meter.yaml"),
            METER.replace("UNIT", "s"),
        )
        .unwrap();
        std::fs::write(
            manifests.path().join("b-bad.yaml"),
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: web}\nstringData: {k: v}\n",
        )
        .unwrap();
        eventually(async || unit().await.as_deref() == Some("s")).await;
        eventually(async || resources.snapshot().count(Kind::Secret) == 1).await;
        task.abort();
    }
}
