//! What every backend checks before it takes a request: event times within
//! the allowed lateness and future bound, and the bounded lengths of the
//! strings that reach its indexes ([`tally_model::limits`]).
//!
//! **Invariant:** every backend calls [`Admission::check`] on each ingest
//! and the `validate` methods here on each void, listing and query, so the
//! same request gets the same refusal whatever stores it.

use jiff::{SignedDuration, Timestamp};
use tally_model::limits::{MAX_ATTRIBUTE_BYTES, MAX_DIMENSION_VALUE_BYTES, check_len};
use tally_model::{CloudEvent, EventError, FieldError, error_code, field_error};

use crate::{EventFilter, LedgerError, MeterQuery, VoidRequest};

/// What an event must satisfy to be taken, beyond its structure: attributes
/// within their lengths (checked again here because a [`CloudEvent`] can be
/// built without [`tally_model::parse_event`]), and a `time` not too far
/// from the receiver's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Events older than this when they arrive are refused (`TOO_LATE`).
    pub max_lateness: SignedDuration,
    /// Events dated further ahead than this are refused (`TIME_IN_FUTURE`).
    pub max_future: SignedDuration,
}

/// Default of [`Admission::max_future`]: a day ahead of the server clock.
pub const DEFAULT_MAX_FUTURE: SignedDuration = SignedDuration::from_hours(24);

impl Admission {
    /// Refuses the whole request, listing every event it may not take.
    pub fn check(&self, events: &[CloudEvent], now: Timestamp) -> Result<(), LedgerError> {
        let oldest = now.checked_sub(self.max_lateness).unwrap_or(Timestamp::MIN);
        let latest = now.checked_add(self.max_future).unwrap_or(Timestamp::MAX);
        let bad: Vec<EventError> = events
            .iter()
            .enumerate()
            .filter_map(|(index, e)| {
                let errors = self.errors_within(e, oldest, latest);
                (!errors.is_empty()).then(|| EventError {
                    index,
                    id: Some(e.id.chars().take(MAX_ATTRIBUTE_BYTES).collect()),
                    errors,
                })
            })
            .collect();
        if bad.is_empty() {
            Ok(())
        } else {
            Err(LedgerError::Rejected(bad))
        }
    }

    /// Every problem of one event that [`Admission::check`] would refuse it
    /// for at `now`.
    pub fn errors(&self, event: &CloudEvent, now: Timestamp) -> Vec<FieldError> {
        let oldest = now.checked_sub(self.max_lateness).unwrap_or(Timestamp::MIN);
        let latest = now.checked_add(self.max_future).unwrap_or(Timestamp::MAX);
        self.errors_within(event, oldest, latest)
    }

    fn errors_within(
        &self,
        e: &CloudEvent,
        oldest: Timestamp,
        latest: Timestamp,
    ) -> Vec<FieldError> {
        let mut errors = length_errors(e);
        errors.extend(self.time_error(e.time, oldest, latest));
        errors
    }

    fn time_error(
        &self,
        time: Timestamp,
        oldest: Timestamp,
        latest: Timestamp,
    ) -> Option<FieldError> {
        let second = |t: Timestamp| t.round(jiff::Unit::Second).unwrap_or(t);
        if time < oldest {
            Some(field_error(
                "time",
                error_code::TOO_LATE,
                format!(
                    "{time} is older than the allowed lateness of {:#} (events before {} are refused)",
                    self.max_lateness,
                    second(oldest)
                ),
            ))
        } else if time > latest {
            Some(field_error(
                "time",
                error_code::TIME_IN_FUTURE,
                format!(
                    "{time} is more than {:#} ahead of the server's clock (events after {} are refused)",
                    self.max_future,
                    second(latest)
                ),
            ))
        } else {
            None
        }
    }
}

/// The attributes of `event` that index keys hold, when over their limit.
fn length_errors(event: &CloudEvent) -> Vec<FieldError> {
    [
        ("id", &event.id),
        ("source", &event.source),
        ("subject", &event.subject),
        ("type", &event.kind),
    ]
    .into_iter()
    .filter_map(|(field, value)| check_len(field, value, MAX_ATTRIBUTE_BYTES).err())
    .collect()
}

/// `Err(Invalid)` naming the first parameter over its limit.
fn check_params<'a>(
    params: impl IntoIterator<Item = (&'a str, Option<&'a str>, usize)>,
) -> Result<(), LedgerError> {
    for (field, value, max) in params {
        if let Some(value) = value {
            check_len(field, value, max).map_err(|e| invalid(&e))?;
        }
    }
    Ok(())
}

fn invalid(e: &FieldError) -> LedgerError {
    LedgerError::Invalid(format!("{} {}", e.field, e.reason))
}

impl VoidRequest {
    /// Bounds `source`, `id` and `reason`.
    pub fn validate(&self) -> Result<(), LedgerError> {
        check_params([
            ("source", Some(self.source.as_str()), MAX_ATTRIBUTE_BYTES),
            ("id", Some(self.id.as_str()), MAX_ATTRIBUTE_BYTES),
            (
                "reason",
                Some(self.reason.as_str()),
                MAX_DIMENSION_VALUE_BYTES,
            ),
        ])
    }
}

impl EventFilter {
    /// Bounds the string filters.
    pub fn validate(&self) -> Result<(), LedgerError> {
        check_params([
            ("type", self.event_type.as_deref(), MAX_ATTRIBUTE_BYTES),
            ("subject", self.subject.as_deref(), MAX_ATTRIBUTE_BYTES),
            ("source", self.source.as_deref(), MAX_ATTRIBUTE_BYTES),
            ("id", self.id.as_deref(), MAX_ATTRIBUTE_BYTES),
        ])
    }
}

impl MeterQuery {
    /// Bounds the subjects, group-by names and filter values.
    pub fn validate(&self) -> Result<(), LedgerError> {
        let subjects = self
            .subjects
            .iter()
            .map(|s| ("subject", Some(s.as_str()), MAX_ATTRIBUTE_BYTES));
        let group_by = self
            .group_by
            .iter()
            .map(|g| ("groupBy", Some(g.as_str()), MAX_ATTRIBUTE_BYTES));
        let filters = self.filter_group_by.iter().flat_map(|(name, value)| {
            [
                ("filterGroupBy", Some(name.as_str()), MAX_ATTRIBUTE_BYTES),
                (
                    "filterGroupBy",
                    Some(value.as_str()),
                    MAX_DIMENSION_VALUE_BYTES,
                ),
            ]
        });
        check_params(subjects.chain(group_by).chain(filters))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(id: &str, time: Timestamp) -> CloudEvent {
        tally_model::parse_event(
            json!({"specversion":"1.0","id":id,"source":"s","type":"t","subject":"c","time":time.to_string()}),
            time,
        )
        .unwrap()
    }

    #[test]
    fn lists_every_event_outside_the_bounds() {
        let now: Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
        let bounds = Admission {
            max_lateness: SignedDuration::from_hours(48),
            max_future: DEFAULT_MAX_FUTURE,
        };
        let events = [
            event("ok", now),
            event("late", now - SignedDuration::from_hours(49)),
            event("edge", now + DEFAULT_MAX_FUTURE),
            event("future", now + SignedDuration::from_hours(25)),
            event("far", "9000-01-01T00:00:00Z".parse().unwrap()),
        ];
        let Err(LedgerError::Rejected(bad)) = bounds.check(&events, now) else {
            panic!("expected a rejection");
        };
        let got: Vec<_> = bad
            .iter()
            .map(|e| (e.index, e.errors[0].code.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (1, "TOO_LATE"),
                (3, "TIME_IN_FUTURE"),
                (4, "TIME_IN_FUTURE")
            ]
        );
        assert!(
            bad[1].errors[0].reason.contains("24h"),
            "{}",
            bad[1].errors[0].reason
        );
    }

    #[test]
    fn rechecks_lengths_of_events_built_without_parsing() {
        let now = Timestamp::now();
        let mut e = event("ok", now);
        e.source = "s".repeat(70_000);
        let bounds = Admission {
            max_lateness: SignedDuration::from_hours(1),
            max_future: DEFAULT_MAX_FUTURE,
        };
        let Err(LedgerError::Rejected(bad)) = bounds.check(&[e], now) else {
            panic!("expected a rejection");
        };
        assert_eq!(bad[0].errors[0].field, "source");
        assert_eq!(bad[0].errors[0].code, "VALUE_TOO_LONG");
    }

    #[test]
    fn bounds_never_overflow() {
        let bounds = Admission {
            max_lateness: SignedDuration::MAX,
            max_future: SignedDuration::MAX,
        };
        let far = [event("far", "9000-01-01T00:00:00Z".parse().unwrap())];
        assert!(bounds.check(&far, Timestamp::now()).is_ok());
    }

    #[test]
    fn refuses_oversized_parameters() {
        let long = "x".repeat(70_000);
        let void = VoidRequest {
            source: long.clone(),
            id: "1".into(),
            reason: "r".into(),
            voided_by: String::new(),
        };
        let Err(LedgerError::Invalid(m)) = void.validate() else {
            panic!("expected Invalid");
        };
        assert!(m.starts_with("source ") && m.contains("1024"), "{m}");
        let filter = EventFilter {
            id: Some(long),
            ..EventFilter::default()
        };
        assert!(filter.validate().is_err());
        assert!(EventFilter::default().validate().is_ok());
    }
}
