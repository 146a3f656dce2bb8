//! The `sluice` command line refuses bad input with a message naming what to fix and a
//! non-zero exit. (Its presence also makes `cargo test --workspace` build the `sluice` binary
//! that the testkit suites start.)

use std::process::Command;

fn sluice(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("SLUICE_API_URL")
        .env_remove("SLUICE_API_TOKEN")
        .env_remove("SLUICE_RUNNER_SECRET")
        .current_dir(std::env::temp_dir());
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("run sluice");
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn serve_without_a_database_url_names_the_variable() {
    let (code, text) = sluice(&["serve"], &[]);
    assert_ne!(code, 0);
    assert!(
        text.contains("DATABASE_URL") || text.contains("--database-url"),
        "{text}"
    );
}

#[test]
fn serve_refuses_a_lease_shorter_than_two_heartbeats() {
    let (code, text) = sluice(
        &["serve"],
        &[
            ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x"),
            ("SLUICE_API_TOKEN", "t"),
            ("SLUICE_RUNNER_SECRET", "s"),
            ("SLUICE_HEARTBEAT_MS", "5000"),
            ("SLUICE_LEASE_MS", "6000"),
        ],
    );
    assert_ne!(code, 0);
    assert!(text.contains("SLUICE_LEASE_MS"), "{text}");
}

#[test]
fn enqueue_without_an_api_url_says_how_to_get_one() {
    let (code, text) = sluice(&["enqueue", r#"{"kind":"noop"}"#], &[]);
    assert_ne!(code, 0);
    assert!(text.contains("SLUICE_API_URL"), "{text}");
}

#[test]
fn enqueue_refuses_input_that_is_not_a_json_object() {
    for bad in ["not json", "[1,2]", "\"bash\""] {
        let (code, text) = sluice(
            &["enqueue", bad],
            &[
                ("SLUICE_API_URL", "http://127.0.0.1:1"),
                ("SLUICE_API_TOKEN", "t"),
            ],
        );
        assert_ne!(code, 0, "{bad}");
        assert!(text.starts_with("error: "), "{bad}: {text}");
    }
}

#[test]
fn enqueue_to_an_unreachable_scheduler_fails_clearly() {
    let (code, text) = sluice(
        &["enqueue", r#"{"kind":"noop"}"#],
        &[
            ("SLUICE_API_URL", "http://127.0.0.1:1"),
            ("SLUICE_API_TOKEN", "t"),
        ],
    );
    assert_ne!(code, 0);
    assert!(text.contains("cannot reach the scheduler"), "{text}");
}
