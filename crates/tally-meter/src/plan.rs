//! Which rollup buckets answer which window.
//!
//! Rollups are kept at three levels aligned to UTC: minute, hour and day. A
//! query window (clipped to `[from, to)`) is covered greedily by the largest
//! aligned buckets that fit, up to the coarsest level the query may use: a
//! 30-day hourly query reads 720 hour buckets per series, a UTC day one day
//! bucket, and a Berlin day (never UTC-aligned) its 23 to 25 hour buckets.
//! Only ranges not on whole hours touch minute buckets. A store may keep a
//! level with less detail (the embedded store keeps day buckets without
//! groups), so the caller says which levels can answer its query.

use jiff::Timestamp;

use crate::window::{Window, WindowError};

/// A rollup level. Buckets of a level start at multiples of its length
/// since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Minute = 0,
    Hour = 1,
    Day = 2,
}

impl Level {
    /// From the largest to the smallest.
    pub const ALL: [Level; 3] = [Level::Day, Level::Hour, Level::Minute];

    pub fn seconds(self) -> i64 {
        match self {
            Level::Minute => 60,
            Level::Hour => 3_600,
            Level::Day => 86_400,
        }
    }

    /// The start of the bucket of this level containing second `t`.
    pub fn bucket(self, t: i64) -> i64 {
        t - t.rem_euclid(self.seconds())
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// Covers `[start, end)` (seconds, whole minutes) with the fewest aligned
/// buckets no coarser than `coarsest`, largest first where they fit.
pub fn decompose(start: i64, end: i64, coarsest: Level) -> Vec<(Level, i64)> {
    let mut out = Vec::new();
    let mut t = start;
    while t < end {
        let level = Level::ALL
            .into_iter()
            .filter(|l| *l <= coarsest)
            .find(|l| t.rem_euclid(l.seconds()) == 0 && t + l.seconds() <= end)
            .unwrap_or(Level::Minute);
        out.push((level, t));
        t += level.seconds();
    }
    out
}

/// A query's windows and, per level, the buckets that feed each window.
#[derive(Debug, Clone)]
pub struct QueryPlan {
    pub windows: Vec<Window>,
    /// Per level (indexed by `Level as usize`): sorted (bucket start, window index).
    buckets: [Vec<(i64, u32)>; 3],
}

impl QueryPlan {
    /// Plans `windows`, counting only usage inside `[from, to)`, from
    /// buckets no coarser than `coarsest`.
    pub fn new(
        windows: Vec<Window>,
        from: Timestamp,
        to: Timestamp,
        coarsest: Level,
    ) -> Result<QueryPlan, WindowError> {
        let mut buckets: [Vec<(i64, u32)>; 3] = Default::default();
        for (index, w) in windows.iter().enumerate() {
            let start = w.start.max(from).as_second();
            let end = w.end.min(to).as_second();
            let index = u32::try_from(index).map_err(|_| WindowError::TooMany)?;
            for (level, bucket) in decompose(start, end, coarsest) {
                buckets[level as usize].push((bucket, index));
            }
        }
        for level in &mut buckets {
            level.sort_unstable();
        }
        Ok(QueryPlan { windows, buckets })
    }

    /// The runs of consecutive buckets this plan reads at `level`, as
    /// (first bucket start, last bucket start), in order: a 30-day daily
    /// query from and to mid-day reads one run of day buckets and two short
    /// runs of hour buckets, not every hour between them.
    pub fn spans(&self, level: Level) -> Vec<(i64, i64)> {
        let mut spans: Vec<(i64, i64)> = Vec::new();
        for (bucket, _) in &self.buckets[level as usize] {
            match spans.last_mut() {
                Some((_, last)) if *bucket <= *last + level.seconds() => *last = *bucket,
                _ => spans.push((*bucket, *bucket)),
            }
        }
        spans
    }

    /// The window a bucket of `level` starting at `bucket` feeds, if any.
    pub fn window_of(&self, level: Level, bucket: i64) -> Option<usize> {
        let b = &self.buckets[level as usize];
        b.binary_search_by_key(&bucket, |(start, _)| *start)
            .ok()
            .map(|i| b[i].1 as usize)
    }

    /// How many buckets the plan reads, per series.
    pub fn bucket_count(&self) -> usize {
        self.buckets.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_berlin_day_uses_hours() {
        // 2026-01-01 in Berlin: 2025-12-31T23:00Z .. 2026-01-01T23:00Z
        let start = 1_767_222_000;
        let pieces = decompose(start, start + 86_400, Level::Day);
        assert_eq!(pieces.len(), 24);
        assert!(pieces.iter().all(|(l, _)| *l == Level::Hour));
    }

    #[test]
    fn utc_days_use_day_buckets() {
        let pieces = decompose(0, 3 * 86_400 + 120, Level::Day);
        assert_eq!(
            pieces,
            vec![
                (Level::Day, 0),
                (Level::Day, 86_400),
                (Level::Day, 172_800),
                (Level::Minute, 259_200),
                (Level::Minute, 259_260)
            ]
        );
    }

    #[test]
    fn hours_stand_in_for_days_when_days_may_not_be_read() {
        let pieces = decompose(0, 86_400 + 60, Level::Hour);
        assert_eq!(pieces.len(), 25);
        assert!(pieces[..24].iter().all(|(l, _)| *l == Level::Hour));
        assert_eq!(pieces[24], (Level::Minute, 86_400));
    }

    #[test]
    fn spans_join_consecutive_buckets_only() {
        let day = 86_400;
        // Three days from 06:00 to 06:00: two runs of hours, one of days.
        let from = Timestamp::from_second(6 * 3_600).unwrap();
        let to = Timestamp::from_second(3 * day + 6 * 3_600).unwrap();
        let windows = crate::window::windows(
            from,
            to,
            Some(crate::window::WindowSize::Day),
            &jiff::tz::TimeZone::UTC,
        )
        .unwrap();
        let plan = QueryPlan::new(windows, from, to, Level::Day).unwrap();
        assert_eq!(plan.spans(Level::Day), vec![(day, 2 * day)]);
        assert_eq!(
            plan.spans(Level::Hour),
            vec![(6 * 3_600, 23 * 3_600), (3 * day, 3 * day + 5 * 3_600)]
        );
        assert!(plan.spans(Level::Minute).is_empty());
    }

    proptest! {
        #[test]
        fn decomposition_covers_exactly(a in 0i64..100_000, len in 1i64..20_000, days in any::<bool>()) {
            let (start, end) = (a * 60, (a + len) * 60);
            let coarsest = if days { Level::Day } else { Level::Hour };
            let pieces = decompose(start, end, coarsest);
            let mut t = start;
            for (level, bucket) in pieces {
                prop_assert_eq!(bucket, t);
                prop_assert_eq!(level.bucket(bucket), bucket);
                prop_assert!(level <= coarsest);
                t += level.seconds();
            }
            prop_assert_eq!(t, end);
        }
    }
}
