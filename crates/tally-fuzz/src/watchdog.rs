//! Turns a case that never ends (a freeze) into a failure: a thread
//! watches the case in progress and, past its time limit, writes its input
//! where failures go and aborts the test process with a message.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long one case may run (`TALLY_FUZZ_CASE_SECONDS`, default 60).
pub fn case_limit() -> Duration {
    let seconds = std::env::var("TALLY_FUZZ_CASE_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(60.0);
    Duration::from_secs_f64(seconds)
}

/// Where failing inputs are written (`TALLY_FUZZ_FAILURES`, default a
/// `tally-fuzz` directory in the temporary directory).
pub fn failures_dir() -> PathBuf {
    std::env::var_os("TALLY_FUZZ_FAILURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tally-fuzz"))
}

/// Writes a failing input; says where, or why not.
pub fn save(name: &str, input: &[u8]) -> String {
    let dir = failures_dir();
    let path = dir.join(name);
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, input))
        .map(|()| format!("input written to {}", path.display()))
        .unwrap_or_else(|e| format!("input not written to {}: {e}", path.display()))
}

type Current = Option<(Instant, Vec<u8>, String)>;

/// The watcher of one test's cases; stops when dropped.
pub struct Watchdog {
    current: Arc<Mutex<Current>>,
    stop: Arc<AtomicBool>,
}

impl Watchdog {
    /// Starts watching the cases of `target`.
    pub fn start(target: &str) -> Watchdog {
        let current: Arc<Mutex<Current>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (watched, stopped, target) = (current.clone(), stop.clone(), target.to_owned());
        let limit = case_limit();
        let spawned = std::thread::Builder::new()
            .name(format!("{target}-watchdog"))
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::park_timeout(Duration::from_millis(500));
                    let guard = watched.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some((started, input, what)) = guard.as_ref()
                        && started.elapsed() > limit
                    {
                        let saved = save(&format!("{target}-hang.bin"), input);
                        // Straight to stderr: the test harness's capture
                        // would be lost with the process.
                        let _ = writeln!(
                            std::io::stderr(),
                            "{target}: {what} still runs after {limit:?} (TALLY_FUZZ_CASE_SECONDS): \
                             a freeze; {saved}; aborting"
                        );
                        std::process::abort();
                    }
                }
            });
        if let Err(e) = spawned {
            panic!("starting the watchdog thread: {e}");
        }
        Watchdog { current, stop }
    }

    /// A case starts; `what` names it in the message.
    pub fn begin(&self, input: &[u8], what: &str) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), input.to_vec(), what.to_owned()));
    }

    /// The case ended.
    pub fn end(&self) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
