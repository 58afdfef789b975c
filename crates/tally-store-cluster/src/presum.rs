//! Pre-summed rollups (`rollups`, layout in [`crate::ch`]): per meter
//! generation, one row per (stream-sequence slab, unit, subject, time
//! bucket, group values) holding the count, the exact `Decimal128(12)`
//! sum, and the pick of MIN, MAX, LATEST and the distinct values of
//! UNIQUE_COUNT, for each of the minute, hour and day units.
//!
//! - **Slabs.** A slab is an aligned range of stream sequences `[lo, lo +
//!   width)`. Level 0 slabs (`width` = the configured slab) are summed
//!   inside ClickHouse from `samples FINAL` once the sample mark passes
//!   their end; 16 slabs of one level are summed into one of the next
//!   (five levels). Each level has its own mark in `rollup_marks` (keyed by
//!   its width; width 0 is the sample mark), written after its rows.
//! - **Idempotent.** A slab's rows are a function of the deduplicated
//!   `samples` (or lower slabs) of its range, which are complete below the
//!   mark that allowed the slab; so a slab summed twice (a roller killed
//!   before its mark, two nodes at once, a worker that inserted a batch
//!   twice) writes identical rows under the same key, which
//!   `ReplacingMergeTree` keeps once and reads say `FINAL`. No row is ever
//!   added to a slab after its mark: nothing is summed twice.
//! - **Reads** ([`cover`]): from 0, the widest level whose mark lies
//!   further, slab by slab; then `samples` up to the sample mark; then the
//!   raw events. Buckets holding a voided event are read from `samples`
//!   instead (a pre-summed row cannot take one event out).
//!
//! **Invariant:** a level's mark `m` means every slab of that width below
//! `m` is in `rollups`; marks may go down (a stale roller, a deleted
//! generation) but never above the rows. **Never:** a query reads a
//! sequence from two of its three sources (the cover's ranges are
//! disjoint and end where the next begins).

use std::collections::BTreeMap;

use tally_meter::CompiledMeter;
use tally_model::Aggregation;

use crate::ch::{ChError, lit};
use crate::ledger::Inner;

/// How many slabs of one level make one of the next.
pub(crate) const RATIO: u64 = 16;
/// Slab levels (widths `slab × RATIO^k`).
pub(crate) const LEVELS: u32 = 5;
/// The time units of the rollups, in nanoseconds: minute, hour, day.
pub(crate) const UNITS: [i64; 3] = [60_000_000_000, 3_600_000_000_000, 86_400_000_000_000];

/// One generation's marks: width → below (width 0: the sample mark).
pub(crate) type Marks = BTreeMap<u64, u64>;

/// Where a query reads each sequence range from.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Cover {
    /// (width, slab starts) read from `rollups`.
    pub slabs: Vec<(u64, Vec<u64>)>,
    /// `[from, to)` read from `samples`.
    pub samples: (u64, u64),
    /// The raw events read from `events` start here.
    pub events_from: u64,
}

/// Most slabs a cover names per level before it stops (the rest is read
/// from `samples`): bounds the statement when a level fell far behind.
const MAX_SLABS_PER_LEVEL: u64 = 4_096;

/// The cover of a generation with `marks` (see the module docs).
pub(crate) fn cover(marks: &Marks) -> Cover {
    let mut at = 0;
    let mut slabs = Vec::new();
    for (&width, &below) in marks.iter().rev() {
        if width == 0 || below <= at || at % width != 0 {
            continue;
        }
        let end = below - below % width;
        let end = end.min(at + width * MAX_SLABS_PER_LEVEL);
        if end <= at {
            continue;
        }
        slabs.push((
            width,
            (at / width..end / width).map(|k| k * width).collect(),
        ));
        at = end;
    }
    let sampled = marks.get(&0).copied().unwrap_or(0).max(at);
    Cover {
        slabs,
        samples: (at, sampled),
        events_from: sampled,
    }
}

/// The widths of the levels for a level-0 slab of `slab`.
pub(crate) fn widths(slab: u64) -> Vec<u64> {
    (0..LEVELS)
        .filter_map(|k| slab.max(1).checked_mul(RATIO.checked_pow(k)?))
        .collect()
}

/// The value columns of a slab summed from `samples` (`from_samples`) or
/// from slabs of the level below.
fn slab_columns(aggregation: Aggregation, from_samples: bool) -> (&'static str, &'static str) {
    use Aggregation::*;
    match (aggregation, from_samples) {
        (Count, _) => ("", ""),
        (Sum | Avg, true) => (", rs, rsc, rmx", ", sum(num), max(scale), max(abs(num))"),
        (Sum | Avg, false) => (", rs, rsc, rmx", ", sum(rs), max(rsc), max(rmx)"),
        (Min, true) => (", rvn, rvt", ", min(num), argMin(text, num)"),
        (Min, false) => (", rvn, rvt", ", min(rvn), argMin(rvt, rvn)"),
        (Max, true) => (", rvn, rvt", ", max(num), argMax(text, num)"),
        (Max, false) => (", rvn, rvt", ", max(rvn), argMax(rvt, rvn)"),
        (Latest, true) => (
            ", rvt, rlt, rls",
            ", argMax(text, (time_ns, seq)), max(time_ns), argMax(seq, (time_ns, seq))",
        ),
        (Latest, false) => (
            ", rvt, rlt, rls",
            ", argMax(rvt, (rlt, rls)), max(rlt), argMax(rls, (rlt, rls))",
        ),
        (UniqueCount, true) => (", ru", ", groupUniqArray(text)"),
        (UniqueCount, false) => (", ru", ", groupUniqArrayArray(ru)"),
    }
}

/// The statement that sums the slabs of `width` in `[from, to)` from the
/// level of `lower` (0: from `samples`).
fn slab_sql(
    db: &str,
    meter: &CompiledMeter,
    generation_id: &str,
    lower: u64,
    width: u64,
    (from, to): (u64, u64),
) -> String {
    let (names, values) = slab_columns(meter.aggregation(), lower == 0);
    let who = format!(
        "meter = {} AND gen = {}",
        lit(&meter.key),
        lit(generation_id)
    );
    let head = format!(
        "INSERT INTO {db}.rollups (meter, gen, width, lo, unit, subject, bucket, gkey, groups, rn, rok{names}) \
         SELECT {}, {}, {width}, intDiv(",
        lit(&meter.key),
        lit(generation_id),
    );
    if lower == 0 {
        let units: Vec<String> = UNITS.iter().map(|u| u.to_string()).collect();
        format!(
            "{head}seq, {width}) * {width} AS l, arrayJoin([{}]) AS un, subject, intDiv(time_ns, un) AS b, \
             gkey, any(groups), count(), min(exact){values} FROM {db}.samples FINAL \
             WHERE {who} AND seq >= {from} AND seq < {to} AND time_ns >= 0 \
             GROUP BY l, un, subject, b, gkey",
            units.join(",")
        )
    } else {
        format!(
            "{head}lo, {width}) * {width} AS l, unit, subject, bucket, gkey, any(groups), sum(rn), min(rok){values} \
             FROM {db}.rollups FINAL WHERE {who} AND width = {lower} AND lo >= {from} AND lo < {to} \
             GROUP BY l, unit, subject, bucket, gkey"
        )
    }
}

/// Writes one mark row of a generation (`at`: now, the latest wins).
pub(crate) async fn write_marks(
    inner: &Inner,
    rows: &[(&str, &str, u64, u64)],
) -> Result<(), ChError> {
    if rows.is_empty() {
        return Ok(());
    }
    let at = i64::try_from(jiff::Timestamp::now().as_nanosecond()).unwrap_or(i64::MAX);
    let json = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let body: String = rows
        .iter()
        .map(|(meter, generation_id, width, below)| {
            format!(
                "{{\"meter\":{},\"gen\":{},\"width\":{width},\"below\":{below},\"at\":{at}}}\n",
                json(meter),
                json(generation_id)
            )
        })
        .collect();
    inner
        .ch
        .insert("rollup_marks", body.into_bytes())
        .await
        .inspect_err(|e| inner.stats.insert_error("rollup_marks", e))
}

/// Sums every slab the sample mark allows, level by level, and raises the
/// levels' marks in `marks`.
pub(crate) async fn advance(
    inner: &Inner,
    meter: &CompiledMeter,
    generation_id: &str,
    slab: u64,
    marks: &mut Marks,
) -> Result<(), ChError> {
    let mut lower = 0;
    for width in widths(slab) {
        let below_lower = marks.get(&lower).copied().unwrap_or(0);
        let done = marks.get(&width).copied().unwrap_or(0);
        let mut from = done - done % width;
        let end = below_lower - below_lower % width;
        // At most RATIO slabs a statement: bounds ClickHouse's memory on a
        // backfill of millions of events.
        while from < end {
            let to = end.min(from + width * RATIO);
            let sql = slab_sql(
                &inner.ch.database,
                meter,
                generation_id,
                lower,
                width,
                (from, to),
            );
            inner
                .ch
                .execute(&sql)
                .await
                .inspect_err(|e| inner.stats.insert_error("rollups", e))?;
            write_marks(inner, &[(&meter.key, generation_id, width, to)]).await?;
            marks.insert(width, to);
            from = to;
        }
        lower = width;
    }
    Ok(())
}

/// The columns a query takes of the rolled-up rows of a bucket.
pub(crate) fn read_columns(aggregation: Aggregation) -> &'static str {
    match aggregation {
        Aggregation::Count => "",
        Aggregation::Sum | Aggregation::Avg => {
            ", toString(sum(rs)) AS s, max(rsc) AS sc, toString(max(rmx)) AS mx"
        }
        Aggregation::Min => ", argMin(rvt, rvn) AS v",
        Aggregation::Max => ", argMax(rvt, rvn) AS v",
        Aggregation::Latest => {
            ", argMax(rvt, (rlt, rls)) AS v, max(rlt) AS lt, argMax(rls, (rlt, rls)) AS ls"
        }
        Aggregation::UniqueCount => ", groupUniqArrayArray(ru) AS u",
    }
}

/// The `rollups` condition naming the cover's slabs.
pub(crate) fn slab_clause(cover: &Cover) -> Option<String> {
    let parts: Vec<String> = cover
        .slabs
        .iter()
        .filter(|(_, los)| !los.is_empty())
        .map(|(width, los)| {
            let list: Vec<String> = los.iter().map(u64::to_string).collect();
            format!("(width = {width} AND lo IN ({}))", list.join(","))
        })
        .collect();
    (!parts.is_empty()).then(|| format!("({})", parts.join(" OR ")))
}

/// Deletes a superseded generation: its marks go to 0 first (so nothing
/// reads or extends it), then `ALTER … DELETE` (a mutation, applied in the
/// background) removes its samples and rollups.
pub(crate) async fn drop_generation(
    inner: &Inner,
    meter: &str,
    generation_id: &str,
    marks: &Marks,
) -> Result<(), ChError> {
    let zeros: Vec<(&str, &str, u64, u64)> = marks
        .keys()
        .map(|w| (meter, generation_id, *w, 0))
        .collect();
    write_marks(inner, &zeros).await?;
    for table in ["samples", "rollups"] {
        inner
            .ch
            .execute(&format!(
                "ALTER TABLE {}.{table} DELETE WHERE meter = {} AND gen = {}",
                inner.ch.database,
                lit(meter),
                lit(generation_id)
            ))
            .await?;
    }
    tracing::info!(
        meter,
        generation = generation_id,
        "deleting the rows of a superseded meter generation"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(pairs: &[(u64, u64)]) -> Marks {
        pairs.iter().copied().collect()
    }

    #[test]
    fn the_cover_takes_the_widest_slabs_first_and_ends_where_the_next_begins() {
        let c = cover(&marks(&[(0, 70), (4, 68), (64, 64)]));
        assert_eq!(c.slabs, vec![(64, vec![0]), (4, vec![64])]);
        assert_eq!((c.samples, c.events_from), ((68, 70), 70));
        // No marks: everything from the events.
        let c = cover(&Marks::new());
        assert_eq!((c.slabs.len(), c.samples, c.events_from), (0, (0, 0), 0));
        // A level behind its lower level is still used; a level whose
        // mark went down (a stale roller) is skipped.
        let c = cover(&marks(&[(0, 9), (4, 8), (64, 0)]));
        assert_eq!(c.slabs, vec![(4, vec![0, 4])]);
        // A sample mark below the slabs (a stale roller): events follow
        // the slabs, nothing is read twice.
        let c = cover(&marks(&[(0, 3), (4, 8)]));
        assert_eq!((c.samples, c.events_from), ((8, 8), 8));
    }

    #[test]
    fn a_cover_never_reads_a_sequence_twice_nor_skips_one() {
        use proptest::prelude::*;
        proptest!(|(m0 in 0u64..5_000, m1 in 0u64..5_000, m2 in 0u64..5_000, m3 in 0u64..5_000)| {
            let c = cover(&marks(&[(0, m0), (4, m1), (64, m2), (1024, m3)]));
            let mut covered = vec![0u32; 5_001];
            for (width, los) in &c.slabs {
                for lo in los {
                    let mark = match width { 4 => m1, 64 => m2, _ => m3 };
                    prop_assert!(lo + width <= mark, "slab {lo}+{width} above its mark");
                    for s in *lo..lo + width { covered[s as usize] += 1; }
                }
            }
            prop_assert!(c.samples.0 <= c.samples.1 && c.samples.1 <= m0.max(c.samples.0));
            for s in c.samples.0..c.samples.1 { covered[s as usize] += 1; }
            for s in c.events_from..5_001 { covered[s as usize] += 1; }
            prop_assert!(covered.iter().all(|n| *n == 1));
        });
    }

    #[test]
    fn widths_grow_by_the_ratio() {
        assert_eq!(widths(4), vec![4, 64, 1024, 16_384, 262_144]);
    }
}
