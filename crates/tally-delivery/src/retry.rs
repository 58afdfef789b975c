//! Backoff with full jitter and `Retry-After` parsing.

use std::time::{Duration, SystemTime};

use crate::RetryConfig;

/// The upper bound of the backoff before attempt `attempt + 1`, after
/// `attempt` (≥ 1) failed attempts: `min(max, initial · 2^(attempt-1))`.
pub(crate) fn backoff_ceiling(config: &RetryConfig, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(32);
    config
        .initial_backoff
        .saturating_mul(1u32 << doublings.min(31))
        .min(config.max_backoff)
}

/// Full jitter: uniform in `[0, ceiling]`.
pub(crate) fn full_jitter(ceiling: Duration) -> Duration {
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// The wait a `Retry-After` value asks for: delta-seconds or an HTTP-date
/// (a date in the past means now). `None` if it is neither.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn ceiling_doubles_up_to_the_max() {
        let config = RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            ..RetryConfig::default()
        };
        let ceilings: Vec<u128> = (1..=6)
            .map(|a| backoff_ceiling(&config, a).as_millis())
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff_ceiling(&config, u32::MAX).as_millis(), 1000);
    }

    proptest! {
        #[test]
        fn jitter_stays_within_its_ceiling(ms in 0u64..100_000) {
            let ceiling = Duration::from_millis(ms);
            prop_assert!(full_jitter(ceiling) <= ceiling);
        }
    }
}
