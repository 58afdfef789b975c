//! The fuzz suite's harness (dev only, never published): time-bounded
//! proptest runs over structure-aware and mutated inputs, and the replay of
//! the committed corpora in `corpus/<target>/`. Each file of `tests/` drives
//! one parser of outside input with [`fuzz`] and [`replay`]; see README.md
//! for running longer and adding corpus entries.
//!
//! A run stops generating after [`Budget::time`] or [`Budget::cases`],
//! whichever comes first (`TALLY_FUZZ_SECONDS`, `TALLY_FUZZ_CASES`), so the
//! suite's length does not depend on the machine's speed; a slower machine
//! tries fewer inputs. `TALLY_FUZZ_SEED` repeats a run's inputs.
//!
//! **Never:** catch a target's panic and carry on: a panic, like a broken
//! property, fails the test, after proptest has shrunk the input, with the
//! minimal input printed and written to a file ([`Case::input`]); a case
//! that outlives `TALLY_FUZZ_CASE_SECONDS` aborts the test ([`watchdog`]).
//! **Invariant:** a case is wholly described by what it prints (its
//! parameters and its input bytes), so a failure can become a corpus entry.

pub mod json;
pub mod mutate;
pub mod watchdog;

use std::fmt;
use std::hash::{Hash as _, Hasher as _};
use std::io::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use proptest::strategy::{BoxedStrategy, Strategy, ValueTree as _};
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

use crate::watchdog::Watchdog;

/// Input bytes, printed as an escaped byte string.
#[derive(Clone, PartialEq, Eq)]
pub struct Input(pub Vec<u8>);

impl fmt::Debug for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\" ({} bytes)", self.0.escape_ascii(), self.0.len())
    }
}

impl std::ops::Deref for Input {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// One generated case: its bytes, and (for a pair) the parameters it is
/// parsed with.
pub trait Case: fmt::Debug {
    /// The bytes a corpus entry of this case holds.
    fn input(&self) -> &[u8];
}

impl Case for Input {
    fn input(&self) -> &[u8] {
        &self.0
    }
}

impl<P: fmt::Debug> Case for (P, Input) {
    fn input(&self) -> &[u8] {
        &self.1.0
    }
}

/// How long one target generates inputs.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Wall time (`TALLY_FUZZ_SECONDS`, default 10).
    pub time: Duration,
    /// Cases at most (`TALLY_FUZZ_CASES`, default 1 000 000).
    pub cases: u64,
}

/// The budget of one target, from the environment.
pub fn budget() -> Budget {
    let seconds = std::env::var("TALLY_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(10.0);
    let cases = std::env::var("TALLY_FUZZ_CASES")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1_000_000);
    Budget {
        time: Duration::from_secs_f64(seconds),
        cases,
    }
}

/// The seed of a run: `TALLY_FUZZ_SEED`, else new each run.
fn seed(target: &str) -> u64 {
    if let Some(seed) = std::env::var("TALLY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        return seed;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    target.hash(&mut hasher);
    SystemTime::now().hash(&mut hasher);
    hasher.finish()
}

/// The stack cases run on. Frames of a debug build are many times those of
/// a release build (sonic-rs needs about 60 KB a level of nesting), so on
/// the test harness's 2 MiB a depth the product allows could overflow;
/// unbounded recursion still overflows this.
pub const CASE_STACK: usize = 8 << 20;

/// Runs `f` on a thread with a [`CASE_STACK`] stack; its panic is the
/// caller's.
pub fn on_case_stack<T: Send>(target: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name(target.to_owned())
            .stack_size(CASE_STACK)
            .spawn_scoped(scope, f);
        match spawned {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(e) => panic!("{target}: starting a thread: {e}"),
        }
    })
}

/// Generates cases from the strategy `make` builds until the [`budget`] is
/// spent and runs `check` on each, on a [`CASE_STACK`] stack; a panic or an
/// `Err` (a broken property) fails the test with the shrunk, minimal case.
pub fn fuzz<S>(
    target: &str,
    make: impl FnOnce() -> S + Send,
    check: impl Fn(&S::Value) -> Result<(), String> + Sync,
) where
    S: Strategy,
    S::Value: Case,
{
    on_case_stack(target, || fuzz_within(target, budget(), make(), &check));
}

/// [`fuzz`] with a given budget.
pub fn fuzz_within<S>(
    target: &str,
    budget: Budget,
    strategy: S,
    check: impl Fn(&S::Value) -> Result<(), String>,
) where
    S: Strategy,
    S::Value: Case,
{
    let seed = seed(target);
    let config = Config {
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_time: 60_000,
        max_shrink_iters: 100_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let watchdog = Watchdog::start(target);
    let trace = std::env::var_os("TALLY_FUZZ_TRACE").is_some();
    // Straight to stderr, so that it outlives an abort (a stack overflow).
    let _ = writeln!(std::io::stderr(), "{target}: TALLY_FUZZ_SEED={seed}");
    let started = Instant::now();
    let mut slowest = (Duration::ZERO, 0usize);
    let mut cases = 0u64;
    while cases < budget.cases && started.elapsed() < budget.time {
        let tree = match strategy.new_tree(&mut runner) {
            Ok(tree) => tree,
            Err(reason) => panic!("{target}: the strategy gave no case: {reason}"),
        };
        let len = tree.current().input().len();
        let case_started = Instant::now();
        let outcome = runner.run_one(tree, |case| {
            if trace {
                watchdog::save(&format!("{target}-{seed}-last.bin"), case.input());
            }
            watchdog.begin(case.input(), "a generated case");
            let result = check(&case).map_err(TestCaseError::fail);
            watchdog.end();
            result
        });
        if case_started.elapsed() > slowest.0 {
            slowest = (case_started.elapsed(), len);
        }
        cases += 1;
        match outcome {
            Ok(_) => {}
            Err(TestError::Fail(reason, case)) => fail(target, seed, cases, &reason, &case),
            Err(TestError::Abort(reason)) => panic!("{target}: aborted: {reason}"),
        }
    }
    let (took, len) = slowest;
    eprintln!(
        "{target}: {cases} cases in {:.1?} (seed {seed}); slowest {took:.1?} on {len} bytes",
        started.elapsed()
    );
}

fn fail(target: &str, seed: u64, cases: u64, reason: &dyn fmt::Display, case: &dyn Case) -> ! {
    let saved = watchdog::save(&format!("{target}-{seed}.bin"), case.input());
    panic!(
        "{target}: case {cases} (TALLY_FUZZ_SEED={seed}) failed: {reason}\n\
         minimal case: {case:?}\n{saved}; copy it into crates/tally-fuzz/corpus/{target}/ once fixed"
    );
}

/// A committed corpus entry.
#[derive(Debug, Clone)]
pub struct Seed {
    /// The file name.
    pub name: String,
    pub bytes: Vec<u8>,
}

/// `corpus/<target>/`.
pub fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// Every file of a target's corpus, by name. A missing or empty corpus is
/// a failure: each target has one.
pub fn corpus(target: &str) -> Vec<Seed> {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading the corpus {}: {e}", dir.display()));
    let mut seeds: Vec<Seed> = entries
        .map(|entry| {
            let path = entry
                .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
                .path();
            let bytes =
                std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Seed { name, bytes }
        })
        .collect();
    assert!(!seeds.is_empty(), "the corpus {} is empty", dir.display());
    seeds.sort_by(|a, b| a.name.cmp(&b.name));
    seeds
}

/// Runs `check` on every corpus entry of `target`, on a [`CASE_STACK`]
/// stack; fails listing every entry that panicked or broke a property.
pub fn replay(target: &str, check: impl Fn(&[u8]) -> Result<(), String> + Sync) {
    on_case_stack(target, || replay_here(target, &check));
}

fn replay_here(target: &str, check: &(dyn Fn(&[u8]) -> Result<(), String> + Sync)) {
    let seeds = corpus(target);
    let watchdog = Watchdog::start(target);
    let mut slowest = (Duration::ZERO, "");
    let failures: Vec<String> = seeds
        .iter()
        .filter_map(|seed| {
            let started = Instant::now();
            watchdog.begin(&seed.bytes, &seed.name);
            let outcome = catch_unwind(AssertUnwindSafe(|| check(&seed.bytes)));
            watchdog.end();
            if started.elapsed() > slowest.0 {
                slowest = (started.elapsed(), &seed.name);
            }
            let message = match outcome {
                Ok(Ok(())) => return None,
                Ok(Err(broken)) => broken,
                Err(panic) => panic_message(panic.as_ref()),
            };
            Some(format!("{}: {message}", seed.name))
        })
        .collect();
    eprintln!(
        "{target}: {} corpus entries; slowest {:.1?} ({})",
        seeds.len(),
        slowest.0,
        slowest.1
    );
    assert!(
        failures.is_empty(),
        "{target}: {} of {} corpus entries failed:\n{}",
        failures.len(),
        seeds.len(),
        failures.join("\n")
    );
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    format!("panicked: {text}")
}

/// The inputs of a target: its corpus mutated, raw bytes, and `shaped`
/// (a structure-aware generator) mutated a little.
pub fn inputs(target: &str, shaped: BoxedStrategy<Input>) -> BoxedStrategy<Input> {
    let seeds: Vec<Vec<u8>> = corpus(target).into_iter().map(|s| s.bytes).collect();
    let donors = std::sync::Arc::new(seeds.clone());
    proptest::prop_oneof![
        4 => mutate::mutated(seeds),
        1 => mutate::raw_bytes(512),
        4 => mutate::mutate(shaped, donors, 3),
    ]
    .boxed()
}

/// An upper estimate of how deep a YAML, JSON or expression text nests:
/// the deepest count of unclosed `[`, `{` and `(` (quoted or not), or of
/// block levels on one line (each two columns of leading space, or a `- `,
/// `? ` or `: ` marker, counts one).
pub fn nesting_depth(text: &[u8]) -> usize {
    let mut deepest = 0;
    let mut flow = 0usize;
    for &b in text {
        match b {
            b'[' | b'{' | b'(' => {
                flow += 1;
                deepest = deepest.max(flow);
            }
            b']' | b'}' | b')' => flow = flow.saturating_sub(1),
            _ => {}
        }
    }
    for line in text.split(|&b| b == b'\n') {
        let mut level = 0;
        let mut rest = line;
        loop {
            match rest {
                [b' ', b' ', tail @ ..] => rest = tail,
                [b'-' | b'?' | b':', b' ', tail @ ..] => rest = tail,
                [b' ' | b'\t', tail @ ..] => rest = tail,
                _ => break,
            }
            level += 1;
        }
        deepest = deepest.max(level);
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_depth_counts_flow_and_block_levels() {
        assert_eq!(nesting_depth(b"a: 1"), 0);
        assert_eq!(nesting_depth(b"[[{\"a\": [1]}]]"), 4);
        assert_eq!(nesting_depth(b"\"[[[[\" ]"), 4);
        assert_eq!(nesting_depth(b"a:\n  b:\n    - - c"), 4);
        assert_eq!(nesting_depth(&b"[".repeat(100)), 100);
    }

    #[test]
    #[should_panic(expected = "minimal case: b\"x\" (1 bytes)")]
    fn fuzz_fails_on_a_panic_with_the_shrunk_input() {
        let budget = Budget {
            time: Duration::from_secs(600),
            cases: 100_000,
        };
        fuzz_within("self-test", budget, mutate::raw_bytes(64), |input| {
            assert!(!input.contains(&b'x'), "found an x");
            Ok(())
        });
    }

    #[test]
    #[should_panic(expected = "cloudevents: 1 of")]
    fn replay_fails_on_a_broken_property() {
        let seeds = corpus("cloudevents").len();
        replay("cloudevents", |bytes| {
            if bytes == corpus("cloudevents")[seeds - 1].bytes {
                return Err("broken".into());
            }
            Ok(())
        });
    }

    #[test]
    fn inputs_print_as_escaped_bytes() {
        assert_eq!(
            format!("{:?}", Input(b"a\n\xff\"".to_vec())),
            "b\"a\\n\\xff\\\"\" (4 bytes)"
        );
    }
}
