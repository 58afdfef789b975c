//! [`ClusterLifecycle`]: instance lifecycle events in ClickHouse, shared by
//! every node of a cluster — the cluster's
//! [`tally_compute::LifecycleEvents`].
//!
//! Why ClickHouse directly and not JetStream + workers as usage events:
//! lifecycle events are few (a handful per instance start or stop), the
//! answer must say which were duplicates, and nothing is evaluated on
//! them; one synchronous insert per request gives "durable before the
//! answer" and "visible to every node at once" without a second
//! materialiser.
//!
//! ## Table `<db>.lifecycle`
//!
//! | column        | type   | meaning                                      |
//! |---------------|--------|----------------------------------------------|
//! | `source`,`id` | String | the dedupe key; the table's sorting key      |
//! | `project`     | String | the instance's project                       |
//! | `instance`    | String | the instance                                 |
//! | `arrival`     | UInt64 | arrival stamp (ns, `stamp.rs`): the order    |
//! | `version`     | UInt64 | `2^64-1 - arrival`: the first copy wins      |
//! | `event`       | String | the [`LifecycleEvent`] as JSON               |
//!
//! Engine `ReplacingMergeTree(version)`, `ORDER BY (source, id)`, one
//! partition, as the ledger's `events`.
//!
//! **Invariants:** an append answers only after ClickHouse accepted the
//! insert. Every read says `FINAL`, so a (source, id) is one event even
//! when two nodes took the same event at the same moment (both answer
//! `accepted`; it is stored and listed once). A (source, id) stored before
//! is answered as a duplicate and not inserted again. Summaries are folded
//! with the embedded store's own [`summarise`] in arrival order.
//!
//! Calls block on the runtime handle they were opened on: call them off the
//! async workers (`spawn_blocking`), as the trait says.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;

use serde::Deserialize;
use tally_compute::LifecycleEvent;
use tally_compute::store::{
    InstanceSummary, LifecycleEvents, MAX_PAGE, Page, StoreError, cursor_key, hex, instance_key,
    summarise,
};

use crate::ch::{Ch, ChError, lit};
use crate::stamp::Stamps;

/// The cluster's lifecycle store.
pub struct ClusterLifecycle {
    ch: Ch,
    runtime: tokio::runtime::Handle,
    stamps: Stamps,
    /// Set once the table exists (ClickHouse may be down at start).
    schema: tokio::sync::OnceCell<()>,
}

fn unavailable(e: ChError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// `source`/`id` as one string no other pair gives (length-prefixed).
fn pair_key(source: &str, id: &str) -> String {
    format!("{}:{source}{id}", source.len())
}

const PAIR_KEY_SQL: &str = "concat(toString(length(source)), ':', source, id)";

#[derive(Deserialize)]
struct Pair {
    source: String,
    id: String,
}

#[derive(Deserialize)]
struct Row {
    project: String,
    instance: String,
    arrival: u64,
    event: String,
}

impl ClusterLifecycle {
    /// The store on `ch`, its calls run on the current runtime. The table
    /// is created when missing (now, or at the first call that finds
    /// ClickHouse up, so a node starts while ClickHouse is down).
    pub async fn open(ch: Ch) -> ClusterLifecycle {
        let store = ClusterLifecycle {
            ch,
            runtime: tokio::runtime::Handle::current(),
            stamps: Stamps::default(),
            schema: tokio::sync::OnceCell::new(),
        };
        if let Err(e) = store.ready().await {
            tracing::warn!(error = %e, "lifecycle table not created yet; retried at the first call");
        }
        store
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let db = &self.ch.database;
        let create = || async {
            self.ch
                .execute(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
                .await?;
            self.ch
                .execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {db}.lifecycle (\
                     source String, id String, project String, instance String, \
                     arrival UInt64, version UInt64, event String) \
                     ENGINE = ReplacingMergeTree(version) PARTITION BY tuple() \
                     ORDER BY (source, id)"
                ))
                .await
        };
        self.schema
            .get_or_try_init(create)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    fn block<T>(&self, f: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        self.runtime.block_on(async {
            self.ready().await?;
            f.await
        })
    }

    fn db(&self) -> &str {
        &self.ch.database
    }

    async fn stored_pairs(&self, events: &[LifecycleEvent]) -> Result<HashSet<String>, ChError> {
        let keys: Vec<String> = events
            .iter()
            .map(|e| lit(&pair_key(&e.source, &e.id)))
            .collect();
        let sources: HashSet<String> = events.iter().map(|e| lit(&e.source)).collect();
        let sources: Vec<String> = sources.into_iter().collect();
        // `source` leads the sorting key: ClickHouse reads only those ranges.
        let sql = format!(
            "SELECT source, id FROM {}.lifecycle WHERE source IN ({}) AND {PAIR_KEY_SQL} IN ({})",
            self.db(),
            sources.join(","),
            keys.join(",")
        );
        let rows: Vec<Pair> = self.ch.select(&sql).await?;
        Ok(rows.iter().map(|p| pair_key(&p.source, &p.id)).collect())
    }

    async fn append_async(&self, events: &[LifecycleEvent]) -> Result<Vec<bool>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut known = self.stored_pairs(events).await.map_err(unavailable)?;
        let fresh: Vec<bool> = events
            .iter()
            .map(|e| known.insert(pair_key(&e.source, &e.id)))
            .collect();
        let count = fresh.iter().filter(|f| **f).count() as u64;
        if count == 0 {
            return Ok(fresh);
        }
        let first = self.stamps.take(count);
        let mut rows = Vec::new();
        let new = events.iter().zip(&fresh).filter(|(_, f)| **f);
        for (arrival, (event, _)) in (first..).zip(new) {
            let json = serde_json::to_string(event)
                .map_err(|e| StoreError::Unavailable(format!("encoding an event: {e}")))?;
            let row = serde_json::json!({
                "source": event.source, "id": event.id, "project": event.project,
                "instance": event.instance, "arrival": arrival,
                "version": u64::MAX - arrival, "event": json,
            });
            serde_json::to_writer(&mut rows, &row)
                .map_err(|e| StoreError::Unavailable(format!("encoding a row: {e}")))?;
            rows.push(b'\n');
        }
        self.ch
            .insert("lifecycle", rows)
            .await
            .map_err(unavailable)?;
        Ok(fresh)
    }

    async fn instances_async(
        &self,
        project: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<InstanceSummary>, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let mut filter = String::from("1");
        if let Some(p) = project {
            filter.push_str(&format!(" AND project = {}", lit(p)));
        }
        if let Some(c) = cursor {
            let key = cursor_key(c)?;
            let bad = || StoreError::BadCursor(c.to_owned());
            let at = key.iter().position(|b| *b == 0).ok_or_else(bad)?;
            let cp = std::str::from_utf8(&key[..at]).map_err(|_| bad())?;
            let ci = std::str::from_utf8(&key[at + 1..]).map_err(|_| bad())?;
            filter.push_str(&format!(
                " AND (project > {p} OR (project = {p} AND instance > {i}))",
                p = lit(cp),
                i = lit(ci)
            ));
        }
        let sql = format!(
            "SELECT project, instance, arrival, event FROM {db}.lifecycle FINAL \
             WHERE (project, instance) IN (SELECT DISTINCT project, instance \
             FROM {db}.lifecycle WHERE {filter} ORDER BY project, instance LIMIT {n}) \
             ORDER BY project, instance, arrival",
            db = self.db(),
            n = limit + 1
        );
        let mut summaries: BTreeMap<(String, String), Option<InstanceSummary>> = BTreeMap::new();
        let mut failed = None;
        self.ch
            .select_each(&sql, |row: Row| {
                match serde_json::from_str::<LifecycleEvent>(&row.event) {
                    Ok(event) => {
                        let slot = summaries.entry((row.project, row.instance)).or_default();
                        *slot = Some(summarise(slot.take(), &event));
                    }
                    Err(e) => failed = Some(e.to_string()),
                }
                Ok(())
            })
            .await
            .map_err(unavailable)?;
        if let Some(e) = failed {
            return Err(StoreError::Unavailable(format!("a stored event: {e}")));
        }
        let mut items: Vec<InstanceSummary> = summaries.into_values().flatten().collect();
        let next_cursor = (items.len() > limit).then(|| {
            items.truncate(limit);
            items
                .last()
                .map(|s| hex(&instance_key(&s.project, &s.instance)))
                .unwrap_or_default()
        });
        Ok(Page { items, next_cursor })
    }

    async fn events_async(
        &self,
        project: &str,
        instance: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Option<Page<LifecycleEvent>>, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let after = match cursor {
            Some(c) => c
                .parse::<u64>()
                .map_err(|_| StoreError::BadCursor(c.to_owned()))?,
            None => 0,
        };
        let scope = format!(
            "project = {} AND instance = {}",
            lit(project),
            lit(instance)
        );
        let exists: Vec<serde_json::Value> = self
            .ch
            .select(&format!(
                "SELECT 1 AS x FROM {}.lifecycle WHERE {scope} LIMIT 1",
                self.db()
            ))
            .await
            .map_err(unavailable)?;
        if exists.is_empty() {
            return Ok(None);
        }
        let sql = format!(
            "SELECT project, instance, arrival, event FROM {}.lifecycle FINAL \
             WHERE {scope} AND arrival > {after} ORDER BY arrival LIMIT {}",
            self.db(),
            limit + 1
        );
        let rows: Vec<Row> = self.ch.select(&sql).await.map_err(unavailable)?;
        let more = rows.len() > limit;
        let mut items = Vec::with_capacity(limit);
        let mut last = after;
        for row in rows.into_iter().take(limit) {
            let event = serde_json::from_str(&row.event)
                .map_err(|e| StoreError::Unavailable(format!("a stored event: {e}")))?;
            items.push(event);
            last = row.arrival;
        }
        Ok(Some(Page {
            items,
            next_cursor: more.then(|| last.to_string()),
        }))
    }
}

impl LifecycleEvents for ClusterLifecycle {
    fn append(&self, events: &[LifecycleEvent]) -> Result<Vec<bool>, StoreError> {
        self.block(self.append_async(events))
    }

    fn instances(
        &self,
        project: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<InstanceSummary>, StoreError> {
        self.block(self.instances_async(project, limit, cursor))
    }

    fn events(
        &self,
        project: &str,
        instance: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Option<Page<LifecycleEvent>>, StoreError> {
        self.block(self.events_async(project, instance, limit, cursor))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pair_keys_do_not_collide() {
        assert_ne!(super::pair_key("ab", "c"), super::pair_key("a", "bc"));
    }
}
