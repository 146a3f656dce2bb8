//! The `sluice-runner` binary: reads its configuration and runs the sidecar until SIGTERM or
//! SIGINT, then drains.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    // A confined tool call (see tools::child): no logging, no configuration, no runtime.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == sluice_runner::tools::child::CHILD_ARG)
    {
        return sluice_runner::tools::child::child_main();
    }
    // `RUST_LOG` picks what is logged; `SLUICE_LOG_FORMAT=json`, one JSON object per line
    // (with the attempt span's `job_id`, `attempt`, `runner_id`).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.init();
    }
    raise_descriptor_limit();
    let args = <sluice_runner::config::Args as clap::Parser>::parse();
    if let Some(count) = args.bench_spawn {
        return bench_spawn(count, args);
    }
    let config = match sluice_runner::Config::from_args(args, sluice_runner::Config::plue_api_url())
    {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let (Ok(mut terminate), Ok(mut interrupt)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return Err(anyhow::anyhow!("cannot install signal handlers"));
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            tracing::info!("shutting down: draining running tasks");
            let _ = tx.send(true);
        });
        sluice_runner::run(config, rx)
            .await
            .map_err(anyhow::Error::from)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--bench-spawn N`: the spawn path's overhead and this process's idle RSS, as JSON.
fn bench_spawn(count: usize, args: sluice_runner::config::Args) -> ExitCode {
    let user = match sluice_sandbox::ToolUser::resolve(&args.tool_user) {
        Ok(user) => user,
        Err(err) => {
            eprintln!("error: SLUICE_RUNNER_TOOL_USER: {err}");
            return ExitCode::FAILURE;
        }
    };
    let idle_rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let workspace = std::env::temp_dir().join(format!("sluice-spawn-bench-{}", std::process::id()));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let limits = sluice_protocol::Limits::default();
    let measured = runtime.block_on(async {
        let sandbox = sluice_sandbox::Sandbox::start();
        sluice_runner::bench::measure_spawn(&sandbox, count, &workspace, &limits, user).await
    });
    let _ = std::fs::remove_dir_all(&workspace);
    match measured {
        Ok(t) => {
            println!(
                "{}",
                serde_json::json!({
                    "exec_p50_us": t.exec_p50,
                    "exec_p99_us": t.exec_p99,
                    "spawn_p50_us": t.exit_p50,
                    "spawn_p99_us": t.exit_p99,
                    "idle_rss_kib": idle_rss_kib,
                    "runs": count,
                })
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Lifts the soft descriptor limit to the hard one: streams, pipes and connections of many
/// slots at once. Tools get their own (lower) limit.
fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
