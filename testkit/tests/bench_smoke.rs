//! `sluice bench --quick` keeps working (its speeds are reported, not asserted here).

use std::process::Command;

use serde_json::Value;
use sluice_testkit::{bin, TempDir};

#[test]
fn sluice_bench_quick_reports_every_measurement_as_json() {
    let dir = TempDir::new("bench");
    let json_path = dir.path().join("bench.json");
    let output = Command::new(bin("sluice"))
        .args(["bench", "--quick", "--json"])
        .arg(&json_path)
        .env_remove("DATABASE_URL")
        .env_remove("CARGO")
        .output()
        .expect("run sluice bench");
    assert!(
        output.status.success(),
        "sluice bench failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["quick"], true);
    let results = report["results"].as_array().unwrap();
    for expected in [
        "reference: bare single-row INSERT",
        "enqueue one by one (SQL INSERT)",
        "enqueue one by one (HTTP POST /api/jobs)",
        "bulk enqueue (SQL, 1,000 per INSERT)",
        "bulk enqueue (HTTP batch, 1,000 per call)",
        "queue-core drain",
        "end-to-end drain",
        "pickup latency p50",
        "pickup latency p99",
        "claim 10 with 1000 finished jobs",
        "sidecar idle RSS",
        "tool spawn p50",
        "tool spawn p99",
    ] {
        let found = results
            .iter()
            .find(|r| r["name"].as_str().unwrap().starts_with(expected))
            .unwrap_or_else(|| panic!("no {expected:?} in {report}"));
        let median = found["median"].as_f64().unwrap();
        assert!(median.is_finite() && median >= 0.0, "{found}");
        assert!(found["runs"].as_u64().unwrap() >= 1, "{found}");
    }
    // The table for people went to stdout.
    assert!(String::from_utf8_lossy(&output.stdout).contains("measurement"));
}
