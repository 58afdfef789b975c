//! Arrival stamps: nanoseconds since the Unix epoch on this node's clock,
//! strictly increasing within the process (a stamp is never repeated even
//! when the clock stands still or steps back). Lifecycle events and log
//! lines are ordered by them across nodes; two nodes' stamps compare as
//! well as their clocks agree.

use std::sync::Mutex;

#[derive(Default)]
pub struct Stamps {
    last: Mutex<u64>,
}

impl Stamps {
    /// `n` consecutive stamps; the first is returned.
    pub fn take(&self, n: u64) -> u64 {
        let now = now_nanos();
        let mut last = match self.last.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let first = now.max(last.saturating_add(1));
        *last = first.saturating_add(n.saturating_sub(1));
        first
    }
}

/// This node's clock, in nanoseconds since the Unix epoch.
pub fn now_nanos() -> u64 {
    u64::try_from(jiff::Timestamp::now().as_nanosecond()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn stamps_only_grow() {
        let stamps = super::Stamps::default();
        let mut last = 0;
        for n in [1, 5, 1, 1000, 1] {
            let first = stamps.take(n);
            assert!(first > last);
            last = first + n - 1;
        }
    }
}
