//! `deploy/alerts/compute.yaml` is valid Prometheus rule YAML
//! (`promtool check rules`) and each alert fires on the synthetic series of
//! `deploy/alerts/compute_test.yaml` (`promtool test rules`). promtool comes
//! with Debian's `prometheus` package; without it the test skips, unless
//! `TALLY_REQUIRE_PEERS` is set (CI), where it fails. The same file also
//! loads in `vmalert` (Debian's `victoria-metrics`), which evaluates it
//! against the VictoriaMetrics `tally serve` pushes the fleet metrics to.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `name` on the PATH; `None` (and a SKIPPED line) when it is absent and
/// `TALLY_REQUIRE_PEERS` is unset.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("TALLY_REQUIRE_PEERS").is_none(),
            "{name} is not installed (apt-get install -y {package})"
        );
        eprintln!("SKIPPED: {name} is not installed (apt-get install -y {package})");
    }
    found
}

fn promtool() -> Option<PathBuf> {
    tool("promtool", "prometheus")
}

fn alerts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/alerts")
}

fn run(promtool: &Path, args: &[&str]) -> String {
    let output = Command::new(promtool)
        .args(args)
        .current_dir(alerts_dir())
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn compute_alert_rules_are_valid_and_each_fires_in_its_unit_test() {
    let Some(promtool) = promtool() else { return };
    let checked = run(&promtool, &["check", "rules", "compute.yaml"]);
    assert!(checked.contains("4 rules found"), "{checked}");
    run(&promtool, &["test", "rules", "compute_test.yaml"]);
    // Every alert of the rules file has a unit test that expects it to fire.
    let rules = std::fs::read_to_string(alerts_dir().join("compute.yaml")).unwrap();
    let tests = std::fs::read_to_string(alerts_dir().join("compute_test.yaml")).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        let fired = tests
            .split("alertname: ")
            .skip(1)
            .any(|t| t.starts_with(alert) && t.contains("exp_labels"));
        assert!(fired, "no promtool unit test fires {alert}");
    }
}

#[test]
fn compute_alert_rules_load_in_vmalert() {
    let Some(vmalert) = tool("vmalert", "victoria-metrics") else {
        return;
    };
    let dry_run = |rules: &Path| {
        Command::new(&vmalert)
            .arg("-dryRun")
            .arg(format!("-rule={}", rules.display()))
            .output()
            .expect("run vmalert")
    };
    let output = dry_run(&alerts_dir().join("compute.yaml"));
    assert!(
        output.status.success(),
        "vmalert -dryRun: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The check can fail: a broken expression is refused.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "groups:\n- name: x\n  rules:\n  - alert: A\n    expr: rate(foo[5m]\n",
    )
    .unwrap();
    assert!(!dry_run(&broken).status.success());
}
