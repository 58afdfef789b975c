//! Waiting on something slow but moving (a forwarder through injected
//! faults, a pipeline under load): a wait fails when what it watches has
//! not changed for a stall bound, not because a loaded host made the whole
//! run longer. A ceiling far above any healthy run stops a livelock.
//!
//! ```no_run
//! # fn requests() -> u64 { 0 } fn done() -> bool { true }
//! let mut progress = tally_testkit::progress::Progress::new("the dead letter", std::time::Duration::from_secs(60));
//! while !done() {
//!     progress.observe(requests());
//!     std::thread::sleep(std::time::Duration::from_millis(200));
//! }
//! ```

use std::fmt::Debug;
use std::time::{Duration, Instant};

/// How many stall bounds a wait may last in all, however much it moves.
const CEILING_STALLS: u32 = 10;

/// One wait: what it waits for, and when what it watches last changed.
pub struct Progress<T> {
    what: String,
    stall: Duration,
    started: Instant,
    changed: Instant,
    last: Option<T>,
}

impl<T: PartialEq + Debug> Progress<T> {
    /// A wait for `what` that fails after `stall` without a change.
    pub fn new(what: impl Into<String>, stall: Duration) -> Progress<T> {
        let now = Instant::now();
        Progress {
            what: what.into(),
            stall,
            started: now,
            changed: now,
            last: None,
        }
    }

    /// Records what is watched now. Panics, naming the wait and the last
    /// value seen, when it has been the same for the stall bound, or when
    /// the wait has lasted ten stall bounds in all.
    pub fn observe(&mut self, seen: T) {
        if let Err(why) = self.check(seen) {
            panic!("{why} (last seen: {:?})", self.last);
        }
    }

    /// [`Progress::observe`] that answers why it would fail instead of
    /// panicking, for a caller that shows the failure its own way.
    pub fn check(&mut self, seen: T) -> Result<(), String> {
        if self.last.as_ref() != Some(&seen) {
            self.last = Some(seen);
            self.changed = Instant::now();
        }
        let (what, stall) = (&self.what, self.stall);
        if self.changed.elapsed() >= stall {
            return Err(format!("waiting for {what}: no progress for {stall:?}"));
        }
        let ceiling = stall * CEILING_STALLS;
        if self.started.elapsed() >= ceiling {
            return Err(format!(
                "waiting for {what}: still moving after {ceiling:?}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_restarts_the_stall_bound() {
        let mut progress = Progress::new("a test", Duration::from_millis(150));
        for i in 0..4 {
            std::thread::sleep(Duration::from_millis(60));
            progress.observe(i);
        }
    }

    #[test]
    #[should_panic(expected = "no progress")]
    fn the_same_value_past_the_stall_bound_fails() {
        let mut progress = Progress::new("a test", Duration::from_millis(50));
        progress.observe(1);
        std::thread::sleep(Duration::from_millis(80));
        progress.observe(1);
    }

    #[test]
    #[should_panic(expected = "still moving")]
    fn moving_past_the_ceiling_fails() {
        let mut progress = Progress::new("a test", Duration::from_millis(10));
        for i in 0.. {
            progress.observe(i);
            std::thread::sleep(Duration::from_millis(3));
        }
    }
}
