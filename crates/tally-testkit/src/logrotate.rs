//! Debian's `logrotate`, which the tailing tests drive for real.

use std::path::PathBuf;

/// The `logrotate` binary, or `None` (with a SKIPPED line) when it is not
/// installed; under `TALLY_REQUIRE_PEERS` its absence fails the test.
pub fn binary() -> Option<PathBuf> {
    let found = [
        "/usr/sbin/logrotate",
        "/sbin/logrotate",
        "/usr/bin/logrotate",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("TALLY_REQUIRE_PEERS").is_none(),
            "logrotate is not installed (apt-get install -y logrotate)"
        );
        eprintln!("SKIPPED: logrotate is not installed (apt-get install -y logrotate)");
    }
    found
}
