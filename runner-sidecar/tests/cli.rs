//! `sluice-runner` refuses an unusable configuration with a message naming the variable.
//! (Its presence also makes `cargo test --workspace` build the binary the testkit starts.)

use std::process::Command;

fn runner(env: &[(&str, &str)]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice-runner"));
    command
        .env_remove("SLUICE_API_URL")
        .env_remove("PLUE_API_URL")
        .env_remove("SLUICE_RUNNER_SECRET");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("run sluice-runner");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_missing_api_url_is_named() {
    let (code, text) = runner(&[("SLUICE_RUNNER_SECRET", "s")]);
    assert_ne!(code, 0);
    assert!(text.contains("SLUICE_API_URL"), "{text}");
}

#[test]
fn a_missing_secret_is_named() {
    let (code, text) = runner(&[("SLUICE_API_URL", "http://127.0.0.1:1")]);
    assert_ne!(code, 0);
    assert!(text.contains("SLUICE_RUNNER_SECRET"), "{text}");
}

#[test]
fn bad_values_are_refused() {
    let base = [
        ("SLUICE_API_URL", "http://127.0.0.1:1"),
        ("SLUICE_RUNNER_SECRET", "s"),
    ];
    let (code, text) = runner(&[base[0], base[1], ("SLUICE_RUNNER_SLOTS", "0")]);
    assert_ne!(code, 0);
    assert!(text.contains("SLUICE_RUNNER_SLOTS"), "{text}");
    let (code, text) = runner(&[base[0], base[1], ("SLUICE_RUNNER_LABELS", "novalue")]);
    assert_ne!(code, 0);
    assert!(text.contains("SLUICE_RUNNER_LABELS"), "{text}");
    let (code, text) = runner(&[("SLUICE_API_URL", "ftp://x"), base[1]]);
    assert_ne!(code, 0);
    assert!(text.contains("http://"), "{text}");
}

#[test]
fn the_legacy_plue_api_url_is_accepted() {
    use std::io::BufRead;
    // With PLUE_API_URL set the configuration passes and the runner keeps trying to register
    // (nothing listens there); SIGTERM then ends it cleanly.
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-runner"))
        .env_remove("SLUICE_API_URL")
        .env("PLUE_API_URL", "http://127.0.0.1:1")
        .env("SLUICE_RUNNER_SECRET", "s")
        .env(
            "SLUICE_RUNNER_WORKDIR",
            std::env::temp_dir().join("sluice-runner-plue-test"),
        )
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let first = lines.next().unwrap_or_default();
    assert!(first.contains("registration failed"), "{first}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // Keep reading until it exits, as a log collector would.
    let rest: Vec<String> = lines.collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("sluice-runner stopped")),
        "{rest:?}"
    );
}
