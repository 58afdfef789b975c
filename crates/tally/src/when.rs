//! Times and time zones given on the command line.

use anyhow::{Context, bail};
use jiff::Timestamp;
use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;

/// An IANA time zone such as `Europe/Berlin` or `UTC`.
pub fn parse_zone(name: &str) -> anyhow::Result<TimeZone> {
    TimeZone::get(name).with_context(|| {
        format!("unknown time zone {name:?}; use an IANA name such as UTC or Europe/Berlin")
    })
}

/// An instant: RFC 3339 (`2026-01-31T10:00:00Z`, `2026-01-31T10:00:00+01:00`),
/// a local date-time without offset (`2026-01-31T10:00`, taken in `tz`), or a
/// plain date (`2026-01-31`, meaning the start of that day in `tz`).
pub fn parse_instant(text: &str, tz: &TimeZone) -> anyhow::Result<Timestamp> {
    let text = text.trim();
    if let Ok(t) = text.parse::<Timestamp>() {
        return Ok(t);
    }
    let in_zone = |zoned: Result<jiff::Zoned, jiff::Error>| {
        zoned
            .map(|z| z.timestamp())
            .with_context(|| format!("{text:?} does not exist in that time zone"))
    };
    if text.len() == 10
        && let Ok(date) = text.parse::<Date>()
    {
        return in_zone(date.to_zoned(tz.clone()).and_then(|z| z.start_of_day()));
    }
    if let Ok(local) = text.parse::<DateTime>() {
        return in_zone(local.to_zoned(tz.clone()));
    }
    bail!("invalid time {text:?}: use RFC 3339 (2026-01-31T00:00:00Z) or a date (2026-01-31)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_mean_midnight_in_the_zone() {
        let berlin = parse_zone("Europe/Berlin").unwrap();
        assert_eq!(
            parse_instant("2026-01-31", &berlin).unwrap().to_string(),
            "2026-01-30T23:00:00Z"
        );
        assert_eq!(
            parse_instant("2026-07-01", &berlin).unwrap().to_string(),
            "2026-06-30T22:00:00Z"
        );
        assert_eq!(
            parse_instant("2026-01-31", &TimeZone::UTC)
                .unwrap()
                .to_string(),
            "2026-01-31T00:00:00Z"
        );
        assert_eq!(
            parse_instant("2026-01-31T10:30", &berlin)
                .unwrap()
                .to_string(),
            "2026-01-31T09:30:00Z"
        );
    }

    #[test]
    fn rfc3339_keeps_its_own_offset() {
        let berlin = parse_zone("Europe/Berlin").unwrap();
        assert_eq!(
            parse_instant("2026-01-31T10:00:00+05:00", &berlin)
                .unwrap()
                .to_string(),
            "2026-01-31T05:00:00Z"
        );
        assert_eq!(
            parse_instant(" 2026-01-31T10:00:00Z ", &berlin)
                .unwrap()
                .to_string(),
            "2026-01-31T10:00:00Z"
        );
    }

    #[test]
    fn nonsense_is_explained() {
        let err = parse_instant("yesterday", &TimeZone::UTC).unwrap_err();
        assert!(err.to_string().contains("RFC 3339"), "{err}");
        assert!(parse_instant("2026-02-30", &TimeZone::UTC).is_err());
        let err = parse_zone("Mars/Olympus").unwrap_err();
        assert!(err.to_string().contains("Mars/Olympus"), "{err}");
    }
}
