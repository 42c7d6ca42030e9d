//! The shipped Prometheus rules (`deploy/prometheus/dialguard-rules.yaml`)
//! against their unit tests (`deploy/prometheus/tests/*.yaml`), run by
//! Debian's `promtool` (package `prometheus`; `.ci/run` installs it): every
//! rule fires when it should and stays quiet when it should not, the first
//! burst of a brand-new misroute series included.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::repo_file;
use serde_yaml_ng::Value;

fn promtool() -> String {
    let binary = std::env::var("DIALGUARD_PROMTOOL").unwrap_or("/usr/bin/promtool".into());
    assert!(
        Path::new(&binary).exists(),
        "{binary} not found: install Debian's `prometheus` (.ci/run does) or set DIALGUARD_PROMTOOL"
    );
    binary
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn test_files() -> Vec<PathBuf> {
    let dir = repo_file("deploy/prometheus/tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no rule tests in {}", dir.display());
    files
}

/// Every alert of every rule file under deploy/.
fn shipped_alerts() -> BTreeSet<String> {
    let rules = yaml(&repo_file("deploy/prometheus/dialguard-rules.yaml"));
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            if let Some(alert) = rule["alert"].as_str() {
                alerts.insert(alert.to_owned());
            }
        }
    }
    alerts
}

#[test]
fn every_shipped_rule_passes_its_promtool_tests() {
    let files = test_files();
    let out = Command::new(promtool())
        .arg("test")
        .arg("rules")
        .args(&files)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_shipped_rule_is_tested_firing_and_not_firing() {
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for file in test_files() {
        let tests = yaml(&file);
        for test in tests["tests"].as_sequence().expect("tests") {
            for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
                let alert = case["alertname"].as_str().expect("alertname").to_owned();
                let expected = case["exp_alerts"].as_sequence().map_or(0, Vec::len);
                if expected > 0 {
                    firing.insert(alert);
                } else {
                    quiet.insert(alert);
                }
            }
        }
    }
    let shipped = shipped_alerts();
    assert!(shipped.len() >= 5, "rules: {shipped:?}");
    let never_fired: Vec<_> = shipped.difference(&firing).collect();
    let never_quiet: Vec<_> = shipped.difference(&quiet).collect();
    assert!(
        never_fired.is_empty() && never_quiet.is_empty(),
        "untested: never expected to fire {never_fired:?}, never expected quiet {never_quiet:?}"
    );
}
