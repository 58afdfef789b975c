//! The largest subjects of a meter query, and the rest merged as one
//! "other" series, for every backend: what a chart of usage by subject
//! shows when there are far more subjects than a reader can tell apart
//! (100k customers).
//!
//! [`query`] asks the backend three questions over the same range and
//! filters, none of whose answers grows with the number of subjects beyond
//! one page: each subject's total over the whole range (paged, ranked into
//! a bounded heap), the windows of the `n` largest subjects only, and the
//! windows of all subjects together. "Other" is the latter minus the
//! former, state by state ([`AggState::retract`]), which is exact for SUM,
//! COUNT and AVG; for MIN, MAX, UNIQUE_COUNT and LATEST it cannot be
//! derived and is absent.
//!
//! **Invariant:** for an invertible aggregation, each window's top rows and
//! its "other" row together hold exactly that window's events, and the top
//! subjects are those with the largest totals (ties: the smaller name).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use rust_decimal::Decimal;
use tally_meter::{AggState, StateError};

use crate::{Ledger, LedgerError, MeterQuery, QueryRow, exact};

/// The most subjects [`query`] ranks first.
pub const MAX_TOP: usize = 100;

/// Subjects' totals read from the backend per page.
const TOTALS_PAGE: usize = 50_000;

/// The answer of [`query`].
#[derive(Debug, Clone, PartialEq)]
pub struct TopResult {
    /// The top subjects' rows, ordered by window, then by rank.
    pub rows: Vec<QueryRow>,
    /// Per window, every other subject's usage merged (`subject` is
    /// `None`); `None` when the aggregation cannot be split so.
    pub other: Option<Vec<QueryRow>>,
    /// The top subjects, largest total first.
    pub ranked: Vec<String>,
    /// How many subjects have usage in the range.
    pub subjects: u64,
}

/// Answers `q` (grouped by `subject` alone, on whole minutes) for its `n`
/// largest subjects, with the rest merged (see the module docs).
pub async fn query(
    ledger: &dyn Ledger,
    meter: String,
    q: MeterQuery,
    n: usize,
) -> Result<TopResult, LedgerError> {
    check(&q, n)?;
    let (ranked, subjects) = rank(ledger, &meter, &q, n).await?;
    let base = MeterQuery {
        limit: None,
        cursor: None,
        ..q
    };
    if ranked.is_empty() {
        return Ok(TopResult {
            rows: Vec::new(),
            other: Some(Vec::new()),
            ranked,
            subjects,
        });
    }
    let top = ledger
        .query_states(
            meter.clone(),
            MeterQuery {
                subjects: ranked.clone(),
                ..base.clone()
            },
        )
        .await?;
    let all = ledger
        .query_states(
            meter,
            MeterQuery {
                group_by: Vec::new(),
                ..base
            },
        )
        .await?;
    let top: Vec<(QueryRow, AggState)> = top.rows.into_iter().zip(top.states).collect();
    let other = other(&top, all.rows.into_iter().zip(all.states).collect())?;
    Ok(TopResult {
        rows: by_rank(top, &ranked),
        other,
        ranked,
        subjects,
    })
}

fn check(q: &MeterQuery, n: usize) -> Result<(), LedgerError> {
    if q.group_by != ["subject"] {
        return Err(LedgerError::Invalid(
            "top subjects need `groupBy=subject` and no other grouping".into(),
        ));
    }
    if !(1..=MAX_TOP).contains(&n) {
        return Err(LedgerError::Invalid(format!(
            "top takes 1 to {MAX_TOP} subjects, not {n}"
        )));
    }
    if !exact::on_minute(q.from) || !exact::on_minute(q.to) {
        return Err(LedgerError::Invalid(
            "top subjects are answered for whole minutes only; give `from` and `to` on whole minutes".into(),
        ));
    }
    if q.cursor.is_some() {
        return Err(LedgerError::Invalid(
            "top subjects come in one answer; it takes no `cursor`".into(),
        ));
    }
    Ok(())
}

/// The `n` subjects with the largest totals over `q`'s range, largest
/// first, and how many subjects have usage; reads the totals page by page.
async fn rank(
    ledger: &dyn Ledger,
    meter: &str,
    q: &MeterQuery,
    n: usize,
) -> Result<(Vec<String>, u64), LedgerError> {
    let mut ranking = Ranking::new(n);
    let mut subjects = 0u64;
    let mut cursor = None;
    loop {
        let page = ledger
            .query(
                meter.to_owned(),
                MeterQuery {
                    window_size: None,
                    limit: Some(TOTALS_PAGE),
                    cursor,
                    ..q.clone()
                },
            )
            .await?;
        for row in page.rows {
            subjects += 1;
            if let Some(subject) = row.subject {
                ranking.offer(row.value, subject);
            }
        }
        cursor = page.next_cursor;
        if cursor.is_none() {
            return Ok((ranking.into_ranked(), subjects));
        }
    }
}

/// The `n` largest (value, subject) offered, in a heap whose top is the
/// smallest kept: memory O(n) whatever the number of subjects.
pub(crate) struct Ranking {
    n: usize,
    /// Ordered so the heap's top is the one to drop first: the smaller
    /// value, then the larger name.
    kept: BinaryHeap<Reverse<(Decimal, Reverse<String>)>>,
}

impl Ranking {
    pub(crate) fn new(n: usize) -> Ranking {
        Ranking {
            n,
            kept: BinaryHeap::with_capacity(n + 1),
        }
    }

    pub(crate) fn offer(&mut self, value: Decimal, subject: String) {
        self.kept.push(Reverse((value, Reverse(subject))));
        if self.kept.len() > self.n {
            self.kept.pop();
        }
    }

    /// Largest first; equal values by name.
    pub(crate) fn into_ranked(self) -> Vec<String> {
        // Ascending order of `Reverse(..)` is descending (value, -name).
        self.kept
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse((_, Reverse(subject)))| subject)
            .collect()
    }
}

/// Per window, `all` minus the `top` rows of that window; `None` when the
/// aggregation is not invertible. Windows left with no event are dropped.
pub(crate) fn other(
    top: &[(QueryRow, AggState)],
    all: Vec<(QueryRow, AggState)>,
) -> Result<Option<Vec<QueryRow>>, LedgerError> {
    let mut windows: BTreeMap<jiff::Timestamp, (QueryRow, AggState, bool)> = all
        .into_iter()
        .map(|(row, state)| (row.window_start, (row, state, false)))
        .collect();
    for (row, state) in top {
        let Some((_, rest, empty)) = windows.get_mut(&row.window_start) else {
            return Err(LedgerError::Storage(format!(
                "a top subject has usage in the window at {} that the total lacks",
                row.window_start
            )));
        };
        match rest.retract(state) {
            Ok(now_empty) => *empty = now_empty,
            Err(StateError::NotInvertible(_)) => return Ok(None),
            Err(e) => return Err(LedgerError::Storage(format!("splitting off the top: {e}"))),
        }
    }
    Ok(Some(
        windows
            .into_values()
            .filter(|(_, _, empty)| !empty)
            .map(|(mut row, state, _)| {
                row.subject = None;
                row.group_by.clear();
                row.value = state.result();
                row
            })
            .collect(),
    ))
}

/// The rows ordered by window, then by the subject's rank.
pub(crate) fn by_rank(top: Vec<(QueryRow, AggState)>, ranked: &[String]) -> Vec<QueryRow> {
    let rank: BTreeMap<&str, usize> = ranked
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_str(), i))
        .collect();
    let mut rows: Vec<QueryRow> = top.into_iter().map(|(row, _)| row).collect();
    rows.sort_by_key(|row| {
        let at = row
            .subject
            .as_deref()
            .and_then(|s| rank.get(s))
            .copied()
            .unwrap_or(usize::MAX);
        (row.window_start, at)
    });
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;
    use proptest::prelude::*;

    fn row(window: i64, subject: Option<&str>, state: &AggState) -> QueryRow {
        QueryRow {
            window_start: Timestamp::from_second(window * 3600).unwrap(),
            window_end: Timestamp::from_second(window * 3600 + 3600).unwrap(),
            subject: subject.map(str::to_owned),
            group_by: BTreeMap::new(),
            value: state.result(),
        }
    }

    /// What a backend answers, from `events` (subject, window, value)
    /// folded naively: (totals per subject, the top subjects' windows, all
    /// subjects' windows).
    type Answers = (
        Vec<(String, Decimal)>,
        Vec<(QueryRow, AggState)>,
        Vec<(QueryRow, AggState)>,
    );

    fn backend(events: &[(u8, u8, i64)], ranked: &[String]) -> Answers {
        let mut per_subject: BTreeMap<String, Decimal> = BTreeMap::new();
        let mut cells: BTreeMap<(i64, String), AggState> = BTreeMap::new();
        let mut windows: BTreeMap<i64, AggState> = BTreeMap::new();
        for &(subject, window, value) in events {
            let (subject, window) = (format!("s{subject}"), i64::from(window));
            let state = AggState::Sum {
                sum: Decimal::from(value),
                count: 1,
            };
            *per_subject.entry(subject.clone()).or_default() += Decimal::from(value);
            let merge = |s: &mut AggState| s.merge(&state).unwrap();
            cells
                .entry((window, subject))
                .and_modify(merge)
                .or_insert_with(|| state.clone());
            windows
                .entry(window)
                .and_modify(merge)
                .or_insert_with(|| state.clone());
        }
        let top = cells
            .iter()
            .filter(|((_, s), _)| ranked.contains(s))
            .map(|((w, s), st)| (row(*w, Some(s), st), st.clone()))
            .collect();
        let all = windows
            .iter()
            .map(|(w, st)| (row(*w, None, st), st.clone()))
            .collect();
        (per_subject.into_iter().collect(), top, all)
    }

    proptest! {
        /// Against a naive model: rank every subject by its total, keep
        /// `n`, and sum the rest per window.
        #[test]
        fn top_and_other_match_a_naive_split(
            events in prop::collection::vec((0u8..30, 0u8..6, -5i64..50), 0..200),
            n in 1usize..8,
        ) {
            let (totals, _, _) = backend(&events, &[]);
            let mut ranking = Ranking::new(n);
            for (subject, total) in &totals {
                ranking.offer(*total, subject.clone());
            }
            let ranked = ranking.into_ranked();

            let mut naive: Vec<(String, Decimal)> = totals.clone();
            naive.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            naive.truncate(n);
            let expected: Vec<String> = naive.iter().map(|(s, _)| s.clone()).collect();
            prop_assert_eq!(&ranked, &expected);

            let (_, top, all) = backend(&events, &ranked);
            let other = other(&top, all).unwrap().unwrap();
            let mut rest: BTreeMap<i64, (Decimal, u64)> = BTreeMap::new();
            for &(subject, window, value) in &events {
                if !expected.contains(&format!("s{subject}")) {
                    let cell = rest.entry(i64::from(window)).or_default();
                    cell.0 += Decimal::from(value);
                    cell.1 += 1;
                }
            }
            let got: Vec<(i64, Decimal)> = other
                .iter()
                .map(|r| (r.window_start.as_second() / 3600, r.value))
                .collect();
            let want: Vec<(i64, Decimal)> = rest.into_iter().map(|(w, (v, _))| (w, v)).collect();
            prop_assert_eq!(got, want);

            let rows = by_rank(top, &ranked);
            for pair in rows.windows(2) {
                let rank = |r: &QueryRow| ranked.iter().position(|s| Some(s) == r.subject.as_ref());
                prop_assert!((pair[0].window_start, rank(&pair[0])) < (pair[1].window_start, rank(&pair[1])));
            }
        }
    }

    #[test]
    fn other_is_absent_for_an_aggregation_that_cannot_be_split() {
        let max = AggState::Max(Decimal::from(9));
        let top = vec![(row(0, Some("a"), &max), max.clone())];
        let all = vec![(row(0, None, &max), max.clone())];
        assert_eq!(other(&top, all).unwrap(), None);
    }

    #[test]
    fn only_whole_minutes_and_grouping_by_subject_alone() {
        let at = |s| Timestamp::from_second(s).unwrap();
        let q = MeterQuery {
            from: at(0),
            to: at(3600),
            window_size: None,
            time_zone: jiff::tz::TimeZone::UTC,
            subjects: Vec::new(),
            group_by: vec!["subject".into()],
            filter_group_by: BTreeMap::new(),
            limit: None,
            cursor: None,
        };
        check(&q, 5).unwrap();
        assert!(check(&q, 0).is_err() && check(&q, MAX_TOP + 1).is_err());
        let region = MeterQuery {
            group_by: vec!["subject".into(), "region".into()],
            ..q.clone()
        };
        assert!(check(&region, 5).is_err());
        let partial = MeterQuery { to: at(3601), ..q };
        assert!(check(&partial, 5).is_err());
    }
}
