//! Where usage comes from: the [`UsageSource`] trait the ledger implements,
//! and [`MemoryUsageSource`], an in-memory implementation for tests and
//! benchmarks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use jiff::Timestamp;
use rust_decimal::Decimal;
pub use tally_ledger::ChangeCursor;

/// One project's total of one meter over a range, for one set of group values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageTotal {
    /// The project (the event's subject without `projects/`).
    pub project: String,
    /// The meter's group values.
    pub dimensions: BTreeMap<String, String>,
    /// The total.
    pub value: Decimal,
}

impl UsageTotal {
    /// A meter query row grouped by `subject` and the meter's dimensions, as
    /// usage of a project: `None` for a subject that is not `projects/<p>`.
    /// Absent group values are left out of `dimensions`.
    pub fn from_query_row(
        subject: Option<&str>,
        group_by: impl IntoIterator<Item = (String, Option<String>)>,
        value: Decimal,
    ) -> Option<UsageTotal> {
        let project = subject?.strip_prefix("projects/")?.to_owned();
        let dimensions = group_by
            .into_iter()
            .filter(|(k, _)| k != "subject")
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        Some(UsageTotal {
            project,
            dimensions,
            value,
        })
    }
}

/// Usage that arrived since a cursor: the event times it touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Event times of what arrived (or was voided) after the cursor; repeats allowed.
    pub times: Vec<Timestamp>,
    /// The cursor to ask from next time.
    pub cursor: ChangeCursor,
}

/// What [`UsageSource::totals`] is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// The MeterDefinition's name.
    pub meter: String,
    /// The meter's dimensions (the group values of each total).
    pub dimensions: Arc<[String]>,
    /// Inclusive.
    pub from: Timestamp,
    /// Exclusive.
    pub to: Timestamp,
}

/// Why a source could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("usage source: {0}")]
pub struct SourceError(pub String);

/// The ledger's side of forwarding. Implementations must be consistent in
/// one direction: anything reported by `changes_since` is already included
/// in a `totals` asked afterwards.
pub trait UsageSource: Send + Sync + 'static {
    /// Per (project, group values), the meter's total over `[from, to)`, for
    /// every project with usage (bound to an account or not: usage no binding
    /// covers is counted as unattributed).
    fn totals(&self, query: UsageQuery) -> BoxFuture<'_, Result<Vec<UsageTotal>, SourceError>>;

    /// The times of the meter's usage that arrived (or was voided) after
    /// `cursor` (the default cursor is the beginning), and the cursor to
    /// continue from. The forwarder uses it to find late events in windows
    /// it already sent.
    fn changes_since(
        &self,
        meter: &str,
        cursor: ChangeCursor,
    ) -> BoxFuture<'_, Result<Changes, SourceError>>;
}

/// Follows a change feed from `cursor`, page by page (`fetch` reads one
/// page), for at most `pages` pages: the rest is read next time.
pub async fn follow_changes<F, Fut>(
    cursor: ChangeCursor,
    pages: usize,
    mut fetch: F,
) -> Result<Changes, SourceError>
where
    F: FnMut(ChangeCursor) -> Fut,
    Fut: std::future::Future<Output = Result<tally_ledger::ChangePage, SourceError>>,
{
    let mut changes = Changes {
        times: Vec::new(),
        cursor,
    };
    for _ in 0..pages.max(1) {
        let page = fetch(changes.cursor).await?;
        changes.times.extend(page.times);
        changes.cursor = page.next;
        if !page.more {
            break;
        }
    }
    Ok(changes)
}

/// Group values of a meter.
type Dimensions = BTreeMap<String, String>;

#[derive(Debug, Default)]
struct MeterUsage {
    /// event time (ms) → (project, dims, value).
    by_time: BTreeMap<i64, Vec<(String, Dimensions, Decimal)>>,
    /// arrival seq → event time.
    arrivals: Vec<(u64, Timestamp)>,
}

/// An in-memory ledger: usage added with [`MemoryUsageSource::add`] is
/// summed exactly.
#[derive(Debug, Default)]
pub struct MemoryUsageSource {
    inner: Mutex<(u64, BTreeMap<String, MeterUsage>)>,
}

impl MemoryUsageSource {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, (u64, BTreeMap<String, MeterUsage>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `value` of `meter` used by `project` at `time` with `dimensions`
    /// (a negative value voids earlier usage).
    pub fn add(
        &self,
        meter: &str,
        project: &str,
        time: Timestamp,
        dimensions: BTreeMap<String, String>,
        value: Decimal,
    ) {
        let mut guard = self.lock();
        let (seq, meters) = &mut *guard;
        *seq += 1;
        let usage = meters.entry(meter.to_owned()).or_default();
        usage
            .by_time
            .entry(time.as_millisecond())
            .or_default()
            .push((project.to_owned(), dimensions, value));
        usage.arrivals.push((*seq, time));
    }
}

impl UsageSource for MemoryUsageSource {
    fn totals(&self, query: UsageQuery) -> BoxFuture<'_, Result<Vec<UsageTotal>, SourceError>> {
        let UsageQuery {
            meter, from, to, ..
        } = query;
        let mut sums: BTreeMap<(String, BTreeMap<String, String>), Decimal> = BTreeMap::new();
        if let Some(usage) = self.lock().1.get(&meter) {
            for (project, dims, value) in usage
                .by_time
                .range(from.as_millisecond()..to.as_millisecond())
                .flat_map(|(_, events)| events)
            {
                *sums.entry((project.clone(), dims.clone())).or_default() += value;
            }
        }
        let totals = sums
            .into_iter()
            .map(|((project, dimensions), value)| UsageTotal {
                project,
                dimensions,
                value,
            })
            .collect();
        Box::pin(async move { Ok(totals) })
    }

    fn changes_since(
        &self,
        meter: &str,
        cursor: ChangeCursor,
    ) -> BoxFuture<'_, Result<Changes, SourceError>> {
        let guard = self.lock();
        let next = ChangeCursor {
            log: guard.0,
            voids: 0,
        };
        let changes = match guard.1.get(meter) {
            None => Changes {
                times: Vec::new(),
                cursor: next,
            },
            Some(usage) => {
                let start = usage
                    .arrivals
                    .partition_point(|(seq, _)| *seq <= cursor.log);
                Changes {
                    times: usage.arrivals[start..].iter().map(|(_, t)| *t).collect(),
                    cursor: next,
                }
            }
        };
        Box::pin(async move { Ok(changes) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn totals_are_half_open_and_changes_follow_the_cursor() {
        let source = MemoryUsageSource::new();
        let t = |s: i64| Timestamp::from_second(s).unwrap();
        let dims = BTreeMap::from([("r".to_string(), "eu".to_string())]);
        source.add("m", "p", t(0), dims.clone(), Decimal::from(2));
        source.add("m", "p", t(59), dims.clone(), Decimal::from(3));
        source.add("m", "p", t(60), dims.clone(), Decimal::from(100));
        source.add("m", "q", t(10), BTreeMap::new(), Decimal::new(15, 1));
        let query = UsageQuery {
            meter: "m".into(),
            dimensions: Arc::from(vec!["r".to_string()]),
            from: t(0),
            to: t(60),
        };
        let totals = source.totals(query).await.unwrap();
        assert_eq!(totals.len(), 2);
        assert_eq!(totals[0].value, Decimal::from(5));
        assert_eq!(totals[1].value, Decimal::new(15, 1));
        let all = source
            .changes_since("m", ChangeCursor::default())
            .await
            .unwrap();
        assert_eq!(all.times.len(), 4);
        source.add("m", "p", t(5), dims, Decimal::ONE);
        let late = source.changes_since("m", all.cursor).await.unwrap();
        assert_eq!(late.times, vec![t(5)]);
        assert!(
            source
                .changes_since("other", ChangeCursor::default())
                .await
                .unwrap()
                .times
                .is_empty()
        );
    }
}
