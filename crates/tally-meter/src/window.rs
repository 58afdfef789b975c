//! Query windows in IANA time zones.
//!
//! MINUTE and HOUR windows are fixed lengths of absolute time aligned to the
//! zone's local clock; DAY and MONTH windows follow the calendar, so a DST
//! day has 23 or 25 hours.

use std::fmt;
use std::str::FromStr;

use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};
use serde::{Deserialize, Serialize};

/// The most windows one query may produce.
pub const MAX_WINDOWS: usize = 100_000;

/// OpenMeter's window sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum WindowSize {
    Minute,
    Hour,
    Day,
    Month,
}

impl FromStr for WindowSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "MINUTE" => Ok(WindowSize::Minute),
            "HOUR" => Ok(WindowSize::Hour),
            "DAY" => Ok(WindowSize::Day),
            "MONTH" => Ok(WindowSize::Month),
            _ => Err(format!(
                "unknown window size {s:?}; use MINUTE, HOUR, DAY or MONTH"
            )),
        }
    }
}

impl fmt::Display for WindowSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WindowSize::Minute => "MINUTE",
            WindowSize::Hour => "HOUR",
            WindowSize::Day => "DAY",
            WindowSize::Month => "MONTH",
        })
    }
}

/// One window: `start` inclusive, `end` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Window {
    pub start: Timestamp,
    pub end: Timestamp,
}

/// Why a time range cannot be cut into windows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("`from` ({from}) must be before `to` ({to})")]
    EmptyRange { from: Timestamp, to: Timestamp },
    #[error("{what} ({at}) must fall on a whole minute: usage is kept per minute")]
    NotMinuteAligned { what: &'static str, at: Timestamp },
    #[error(
        "the query would produce more than {MAX_WINDOWS} windows; use a larger window size or a shorter range"
    )]
    TooMany,
    #[error("time zone arithmetic failed: {0}")]
    TimeZone(String),
}

fn tz_error(e: jiff::Error) -> WindowError {
    WindowError::TimeZone(e.to_string())
}

/// The start of the window of size `size` in `tz` that contains `t`.
pub fn window_start(
    t: Timestamp,
    size: WindowSize,
    tz: &TimeZone,
) -> Result<Timestamp, WindowError> {
    let zoned = t.to_zoned(tz.clone());
    let local_into = |unit: i64| {
        let local = t.as_second() + i64::from(zoned.offset().seconds());
        let into = local.rem_euclid(unit);
        Timestamp::new(t.as_second() - into, 0).map_err(tz_error)
    };
    match size {
        WindowSize::Minute => local_into(60),
        WindowSize::Hour => local_into(3600),
        WindowSize::Day => Ok(zoned.start_of_day().map_err(tz_error)?.timestamp()),
        WindowSize::Month => Ok(zoned
            .first_of_month()
            .and_then(|z| z.start_of_day())
            .map_err(tz_error)?
            .timestamp()),
    }
}

/// The start of the window after the one that starts at `start`.
fn next_start(start: Timestamp, size: WindowSize, tz: &TimeZone) -> Result<Timestamp, WindowError> {
    let zoned: Zoned = start.to_zoned(tz.clone());
    let next = match size {
        WindowSize::Minute => start.checked_add(1.minute()).map_err(tz_error)?,
        WindowSize::Hour => {
            let naive = start.checked_add(1.hour()).map_err(tz_error)?;
            // Where the zone's offset changes by a non-whole hour, re-align.
            let aligned = window_start(naive, size, tz)?;
            if aligned > start { aligned } else { naive }
        }
        WindowSize::Day => zoned
            .tomorrow()
            .and_then(|z| z.start_of_day())
            .map_err(tz_error)?
            .timestamp(),
        WindowSize::Month => zoned
            .checked_add(1.month())
            .and_then(|z| z.first_of_month())
            .and_then(|z| z.start_of_day())
            .map_err(tz_error)?
            .timestamp(),
    };
    Ok(next)
}

fn check_minute(what: &'static str, at: Timestamp) -> Result<(), WindowError> {
    if at.as_second().rem_euclid(60) != 0 || at.subsec_nanosecond() != 0 {
        return Err(WindowError::NotMinuteAligned { what, at });
    }
    Ok(())
}

/// Cuts `[from, to)` into windows. Without a size the whole range is one
/// window. Windows are aligned to the zone's clock, so the first may start
/// before `from` and the last end after `to`; only usage inside `[from, to)`
/// counts.
pub fn windows(
    from: Timestamp,
    to: Timestamp,
    size: Option<WindowSize>,
    tz: &TimeZone,
) -> Result<Vec<Window>, WindowError> {
    if from >= to {
        return Err(WindowError::EmptyRange { from, to });
    }
    check_minute("`from`", from)?;
    check_minute("`to`", to)?;
    let Some(size) = size else {
        return Ok(vec![Window {
            start: from,
            end: to,
        }]);
    };
    let mut out = Vec::new();
    let mut start = window_start(from, size, tz)?;
    while start < to {
        if out.len() == MAX_WINDOWS {
            return Err(WindowError::TooMany);
        }
        let end = next_start(start, size, tz)?;
        check_minute("a window boundary of this time zone", start)?;
        out.push(Window { start, end });
        start = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn hours(w: &Window) -> i64 {
        (w.end.as_second() - w.start.as_second()) / 3600
    }

    #[test]
    fn dst_days_have_23_and_25_hours() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        let spring = windows(
            ts("2026-03-28T23:00:00Z"),
            ts("2026-03-30T22:00:00Z"),
            Some(WindowSize::Day),
            &berlin,
        )
        .unwrap();
        assert_eq!(spring.iter().map(hours).collect::<Vec<_>>(), vec![23, 24]);
        let autumn = windows(
            ts("2026-10-24T22:00:00Z"),
            ts("2026-10-26T23:00:00Z"),
            Some(WindowSize::Day),
            &berlin,
        )
        .unwrap();
        assert_eq!(autumn.iter().map(hours).collect::<Vec<_>>(), vec![25, 24]);
        assert_eq!(autumn[0].start, ts("2026-10-24T22:00:00Z"));
    }

    #[test]
    fn hours_in_half_hour_zones_and_repeated_hours() {
        let kolkata = TimeZone::get("Asia/Kolkata").unwrap();
        let w = windows(
            ts("2026-01-01T00:00:00Z"),
            ts("2026-01-01T02:00:00Z"),
            Some(WindowSize::Hour),
            &kolkata,
        )
        .unwrap();
        assert_eq!(w[0].start, ts("2025-12-31T23:30:00Z"));
        assert_eq!(w.len(), 3);
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        // 02:00-03:00 local happens twice on 2026-10-25: two distinct windows.
        let w = windows(
            ts("2026-10-25T00:00:00Z"),
            ts("2026-10-25T02:00:00Z"),
            Some(WindowSize::Hour),
            &berlin,
        )
        .unwrap();
        assert_eq!(w.len(), 2);
        assert!(w.iter().all(|w| hours(w) == 1));
    }

    #[test]
    fn months_follow_the_calendar() {
        let w = windows(
            ts("2026-01-15T00:00:00Z"),
            ts("2026-03-01T00:00:00Z"),
            Some(WindowSize::Month),
            &TimeZone::UTC,
        )
        .unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].start, ts("2026-01-01T00:00:00Z"));
        assert_eq!(w[1].end, ts("2026-03-01T00:00:00Z"));
    }

    #[test]
    fn refuses_bad_ranges() {
        let utc = TimeZone::UTC;
        assert!(matches!(
            windows(
                ts("2026-01-01T00:00:00Z"),
                ts("2026-01-01T00:00:00Z"),
                None,
                &utc
            ),
            Err(WindowError::EmptyRange { .. })
        ));
        assert!(matches!(
            windows(
                ts("2026-01-01T00:00:30Z"),
                ts("2026-01-02T00:00:00Z"),
                None,
                &utc
            ),
            Err(WindowError::NotMinuteAligned { .. })
        ));
        assert!(matches!(
            windows(
                ts("2000-01-01T00:00:00Z"),
                ts("2026-01-01T00:00:00Z"),
                Some(WindowSize::Minute),
                &utc
            ),
            Err(WindowError::TooMany)
        ));
    }
}
