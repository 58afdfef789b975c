//! Per-project ingest limits: a token bucket of bytes per project, refilled
//! at `bytes_per_second` up to `burst_bytes`. A request that would take a
//! project past its bucket is refused whole, with the time after which it
//! fits (the receivers answer 429 + `Retry-After`). The clock is passed in.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limits of one project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestLimit {
    pub bytes_per_second: u64,
    pub burst_bytes: u64,
}

impl Default for IngestLimit {
    fn default() -> IngestLimit {
        IngestLimit {
            bytes_per_second: 16 << 20,
            burst_bytes: 64 << 20,
        }
    }
}

/// Token buckets of every project that sent lately.
#[derive(Debug, Default)]
pub struct ProjectLimiter {
    default: IngestLimit,
    per_project: HashMap<String, IngestLimit>,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

/// Most projects a limiter tracks; beyond it, full buckets are forgotten
/// (a forgotten bucket is full, so forgetting one never refuses more).
const MAX_TRACKED: usize = 100_000;

impl ProjectLimiter {
    pub fn new(default: IngestLimit, per_project: HashMap<String, IngestLimit>) -> ProjectLimiter {
        ProjectLimiter {
            default,
            per_project,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn limit(&self, project: &str) -> IngestLimit {
        self.per_project
            .get(project)
            .copied()
            .unwrap_or(self.default)
    }

    /// Takes `bytes` per project from the buckets, all or nothing; on
    /// refusal, how long until the largest refused amount fits.
    pub fn take(&self, wanted: &HashMap<&str, u64>, now: Instant) -> Result<(), Duration> {
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let mut wait = Duration::ZERO;
        let mut levels = Vec::with_capacity(wanted.len());
        for (project, bytes) in wanted {
            let limit = self.limit(project);
            let (level, at) = buckets
                .get(*project)
                .copied()
                .unwrap_or((limit.burst_bytes as f64, now));
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            let level =
                (level + elapsed * limit.bytes_per_second as f64).min(limit.burst_bytes as f64);
            let need = (*bytes).min(limit.burst_bytes) as f64;
            if level < need {
                let rate = limit.bytes_per_second.max(1) as f64;
                wait = wait.max(Duration::from_secs_f64((need - level) / rate));
            }
            levels.push((*project, level, *bytes as f64));
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        if buckets.len() > MAX_TRACKED {
            buckets.clear();
        }
        for (project, level, bytes) in levels {
            buckets.insert(project.to_owned(), ((level - bytes).max(0.0), now));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_project_past_its_bucket_waits_others_do_not() {
        let limit = IngestLimit {
            bytes_per_second: 100,
            burst_bytes: 200,
        };
        let limiter = ProjectLimiter::new(limit, HashMap::new());
        let t0 = Instant::now();
        let noisy = HashMap::from([("noisy", 150u64)]);
        assert!(limiter.take(&noisy, t0).is_ok());
        let wait = limiter.take(&noisy, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert!(
            limiter
                .take(&HashMap::from([("quiet", 150u64)]), t0)
                .is_ok()
        );
        // Refilled after the wait.
        assert!(limiter.take(&noisy, t0 + wait).is_ok());
        // A request bigger than the burst fits once the bucket is full.
        let huge = HashMap::from([("big", 10_000u64)]);
        assert!(limiter.take(&huge, t0).is_ok());
        assert!(limiter.take(&huge, t0).is_err());
    }
}
