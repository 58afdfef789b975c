//! A Python virtual environment with some packages, made once and reused
//! by later runs. Shared by the tests that drive real peers' official
//! Python clients and SDKs (billing) and a real browser (the console).

use std::path::Path;
use std::process::Command;

/// The venv `name` in the temporary directory: see [`python_in`].
pub fn python_with(name: &str, packages: &[&str], import: &str) -> Result<String, String> {
    python_in(&std::env::temp_dir(), name, packages, import)
}

/// The python of the venv `root/name` once `import` works in it, after
/// installing `packages` with pip if needed; or why it cannot be had.
pub fn python_in(
    root: &Path,
    name: &str,
    packages: &[&str],
    import: &str,
) -> Result<String, String> {
    let venv = root.join(name);
    let python = venv.join("bin/python3");
    let importable = |python: &Path| {
        Command::new(python)
            .args(["-c", import])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !importable(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .map_err(|e| format!("python3 -m venv: {e}"))?;
        if !made.success() {
            return Err("python3 -m venv failed (is python3-venv installed?)".into());
        }
        let installed = Command::new(&python)
            .args(["-m", "pip", "install", "-q"])
            .args(packages)
            .status()
            .map_err(|e| format!("pip: {e}"))?;
        if !installed.success() || !importable(&python) {
            return Err(format!("pip install {} failed", packages.join(" ")));
        }
    }
    Ok(python.to_string_lossy().into_owned())
}

/// The python of `found`, or `None` after saying why the test is skipped.
/// Where `TALLY_REQUIRE_PEERS` is set (CI's `.ci/run`) the real peer must be
/// used, so a missing one fails the test instead.
pub fn or_skip(found: Result<String, String>, what: &str) -> Option<String> {
    match found {
        Ok(python) => Some(python),
        Err(why) => {
            assert!(
                std::env::var_os("TALLY_REQUIRE_PEERS").is_none(),
                "{what} is not installable: {why}"
            );
            eprintln!("SKIPPED: {what} is not installable here: {why}");
            None
        }
    }
}
