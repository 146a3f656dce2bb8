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
        "tool spawn round trip p50",
        "step-to-step latency p50 (chain)",
        "step-to-step latency p99 (chain)",
        "plain-job pickup p50",
        "fan-out makespan",
        "the same 200 jobs enqueued directly",
        "pool start latency p50, warm runners kept",
        "pool start latency p99, fresh runner per task",
        "event delivery p50, 1 client",
        "event delivery p99, 1000 client",
        "scheduler RSS, 1,000 idle event streams",
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
    // Where the server packages ship pgbench, its references are in the same run.
    if pgbench_installed() {
        for expected in [
            "pgbench: single-row INSERT",
            "pgbench: 1,000-row INSERT",
            "pgbench: claim 100",
        ] {
            let found = results
                .iter()
                .find(|r| r["name"].as_str().unwrap().starts_with(expected))
                .unwrap_or_else(|| panic!("no {expected:?} in {report}"));
            assert!(found["median"].as_f64().unwrap() > 0.0, "{found}");
        }
        let vs = results
            .iter()
            .find(|r| r["name"] == "queue-core drain (complete + claim 500, 2 workers)")
            .unwrap();
        assert!(vs["ratio"].as_f64().unwrap() > 0.0, "{vs}");
    }
}

fn pgbench_installed() -> bool {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("pgbench").is_file()))
        .unwrap_or(false);
    let packaged = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.flatten()
                .any(|d| d.path().join("bin/pgbench").is_file())
        })
        .unwrap_or(false);
    on_path || packaged
}

#[test]
fn sluice_bench_only_runs_the_named_sections_and_refuses_unknown_ones() {
    let output = Command::new(bin("sluice"))
        .args(["bench", "--quick", "--only", "spawn"])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run sluice bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("tool spawn p50"), "{stdout}");
    assert!(!stdout.contains("enqueue"), "{stdout}");

    let output = Command::new(bin("sluice"))
        .args(["bench", "--only", "everything"])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run sluice bench");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("everything") && stderr.contains("e2e"),
        "the error names the bad value and the good ones: {stderr}"
    );
}
