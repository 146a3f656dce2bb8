//! The file tools' confinement (B-07, B-08) on both resolvers, the confined child that runs
//! the tools as the tool user, and `web_fetch`'s address checks (S-08) against listeners on
//! loopback.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_protocol::{Limits, ToolName};
use sluice_runner::exec::tool::{self as exec, Answer, Call};
use sluice_runner::tools::{self, Policy, ToolError};
use sluice_sandbox::confine::{self, Access, Workspace};
use sluice_sandbox::{Sandbox, ToolUser};

const CANARY: &str = "OUTSIDE-CANARY-7f3a";

/// A temp dir removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "sluice-tools-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `root/outside` holds the canary; `root/ws` is the workspace with links pointing out.
fn layout(root: &Path) -> PathBuf {
    let outside = root.join("outside");
    std::fs::create_dir_all(outside.join("dir")).unwrap();
    std::fs::write(outside.join("secret"), CANARY).unwrap();
    std::fs::write(outside.join("dir/secret"), CANARY).unwrap();
    let ws = root.join("ws");
    std::fs::create_dir_all(ws.join("a/b")).unwrap();
    std::fs::write(ws.join("a/inner.txt"), "inside").unwrap();
    std::fs::write(ws.join("a/b/deep.txt"), "deep").unwrap();
    symlink("../outside", ws.join("out")).unwrap();
    symlink(outside.join("secret"), ws.join("abs_secret")).unwrap();
    symlink("..", ws.join("a/up")).unwrap();
    symlink("../outside/new-file", ws.join("dangling")).unwrap();
    symlink("/proc/self/root", ws.join("procroot")).unwrap();
    symlink("inner.txt", ws.join("a/inner_link")).unwrap();
    ws
}

fn outside_state(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.join("outside")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// ≥ 500 hostile paths built from escape forms and targets.
fn corpus() -> Vec<String> {
    let prefixes = [
        "",
        "../",
        "../../",
        "/",
        "//",
        "./../",
        "a/../../",
        "a/b/../../../",
        concat!("/proc/self/", "root/"),
        concat!("proc/self/", "root/"),
        "procroot/",
        "out/",
        "a/up/",
        "a/up/out/",
        "%2e%2e/",
        "..%2f",
        "%2e%2e%2f",
        "....//",
        "..../",
        ".../",
        "a/./../",
        "a//..//..//",
        "abs_secret/",
        "dangling/",
        "a/inner_link/",
        "\u{0}",
        "x\u{0}/",
        "a\n/../",
        "..\\",
        "a/b/./../../../",
    ];
    let targets = [
        "secret",
        "outside/secret",
        "outside/dir/secret",
        "etc/passwd",
        "etc/shadow",
        "abs_secret",
        "dangling",
        "out/secret",
        "out/dir/secret",
        "a/inner_link",
        "proc/self/environ",
        "procroot/etc/passwd",
        "..",
        ".",
        "a/up",
        "outside/new-file",
        "a/b/../../../outside/secret",
        "out",
        "procroot",
    ];
    let mut out = Vec::new();
    for prefix in prefixes {
        for target in targets {
            out.push(format!("{prefix}{target}"));
        }
    }
    out.push("x".repeat(256));
    out.push(format!("a/{}", "y".repeat(300)));
    out.push("a/".repeat(3000));
    out
}

fn both(ws: &Path) -> [Workspace; 2] {
    [
        Workspace::open(ws, false).unwrap(),
        Workspace::open(ws, true).unwrap(),
    ]
}

#[test]
fn b07_traversal_corpus_never_reads_or_writes_outside_on_either_resolver() {
    let scratch = Scratch::new("b07");
    let ws = layout(&scratch.0);
    let before = outside_state(&scratch.0);
    let corpus = corpus();
    assert!(corpus.len() >= 500, "corpus has {} cases", corpus.len());
    let [native, walk] = both(&ws);
    assert_eq!(walk.resolver(), confine::Resolver::Walk);
    let mut mismatched = Vec::new();
    for path in &corpus {
        let mut codes = Vec::new();
        for resolver in [&native, &walk] {
            match resolver.open_file(path, Access::Read) {
                Ok(mut file) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    assert!(!text.contains(CANARY), "{path:?} read the outside file");
                    codes.push("ok".to_string());
                }
                Err(err) => codes.push(err.code.to_string()),
            }
        }
        // Writes after both reads, so both resolvers saw the same tree.
        for resolver in [&native, &walk] {
            let write = resolver.open_file(
                path,
                Access::Write {
                    append: false,
                    create_dirs: true,
                },
            );
            if let Ok(mut file) = write {
                file.write_all(b"PWNED").unwrap();
            }
        }
        if codes[0] != codes[1] {
            mismatched.push((path.clone(), codes));
        }
    }
    assert_eq!(
        outside_state(&scratch.0),
        before,
        "something outside changed"
    );
    assert!(!scratch.0.join("outside/new-file").exists());
    assert!(mismatched.is_empty(), "resolvers disagree: {mismatched:?}");

    // Random paths from escape-prone pieces (a property test without the framework).
    let pieces = [
        "..",
        ".",
        "a",
        "b",
        "out",
        "up",
        "procroot",
        "secret",
        "/",
        "//",
        "%2e",
        "abs_secret",
        "dangling",
        "inner_link",
    ];
    for _ in 0..5_000 {
        let n = fastrand::usize(1..8);
        let path: String = (0..n)
            .map(|_| pieces[fastrand::usize(..pieces.len())])
            .collect::<Vec<_>>()
            .join(if fastrand::bool() { "/" } else { "" });
        for resolver in [&native, &walk] {
            if let Ok(mut file) = resolver.open_file(&path, Access::Read) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                assert!(!text.contains(CANARY), "{path:?} read the outside file");
            }
        }
    }
    // What must work still works.
    for resolver in [&native, &walk] {
        let mut text = String::new();
        resolver
            .open_file("a/b/deep.txt", Access::Read)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "deep");
        assert_eq!(
            resolver
                .open_file("a/inner_link", Access::Read)
                .unwrap_err()
                .code,
            "symlink_refused"
        );
        assert_eq!(
            resolver
                .open_file("out/secret", Access::Read)
                .unwrap_err()
                .code,
            "symlink_refused"
        );
        assert_eq!(
            resolver.open_file("../x", Access::Read).unwrap_err().code,
            "path_outside_workspace"
        );
    }
}

#[test]
fn b08_links_fifos_and_devices_are_refused_quickly() {
    let scratch = Scratch::new("b08");
    let ws = layout(&scratch.0);
    nix::unistd::mkfifo(
        &ws.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o666),
    )
    .unwrap();
    std::fs::hard_link(scratch.0.join("outside/secret"), ws.join("hardlink")).unwrap();
    std::fs::write(ws.join("twice"), "x").unwrap();
    std::fs::hard_link(ws.join("twice"), ws.join("twice2")).unwrap();
    let device = nix::sys::stat::mknod(
        &ws.join("zero"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 5),
    )
    .is_ok();
    let write = Access::Write {
        append: false,
        create_dirs: false,
    };
    for resolver in both(&ws) {
        let started = Instant::now();
        assert_eq!(
            resolver.open_file("fifo", Access::Read).unwrap_err().code,
            "not_a_regular_file"
        );
        assert_eq!(
            resolver.open_file("fifo", write).unwrap_err().code,
            "not_a_regular_file"
        );
        if device {
            assert_eq!(
                resolver.open_file("zero", Access::Read).unwrap_err().code,
                "not_a_regular_file"
            );
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "took {:?}",
            started.elapsed()
        );
        // A dangling link as a write target: never followed, nothing created outside.
        assert_eq!(
            resolver.open_file("dangling", write).unwrap_err().code,
            "symlink_refused"
        );
        assert!(!scratch.0.join("outside/new-file").exists());
        // Hard links: refused both ways, and the outside file keeps its content.
        assert_eq!(
            resolver.open_file("hardlink", write).unwrap_err().code,
            "hard_link_refused"
        );
        assert_eq!(
            resolver
                .open_file("hardlink", Access::Read)
                .unwrap_err()
                .code,
            "hard_link_refused"
        );
        assert_eq!(
            resolver.open_file("twice2", write).unwrap_err().code,
            "hard_link_refused"
        );
        assert_eq!(
            std::fs::read_to_string(scratch.0.join("outside/secret")).unwrap(),
            CANARY
        );
        // A directory is not a file.
        assert_eq!(
            resolver.open_file("a", Access::Read).unwrap_err().code,
            "not_a_regular_file"
        );
    }
}

/// B-08's race: a thread swaps a real directory and a symbolic link to the outside (atomic
/// `RENAME_EXCHANGE`, as fast as it can) while `read_file` resolves a path through it.
#[test]
fn b08_symlink_swap_race_never_escapes_on_either_resolver() {
    let iterations: usize = std::env::var("SLUICE_RACE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    for force_walk in [false, true] {
        let scratch = Scratch::new("race");
        let ws = layout(&scratch.0);
        std::fs::create_dir(ws.join("d")).unwrap();
        std::fs::write(ws.join("d/secret"), "inside").unwrap();
        symlink(scratch.0.join("outside"), ws.join("swap")).unwrap();
        let resolver = Workspace::open(&ws, force_walk).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicUsize::new(0));
        let swapper = {
            let (stop, swaps, ws) = (stop.clone(), swaps.clone(), ws.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    nix::fcntl::renameat2(
                        nix::fcntl::AT_FDCWD,
                        &ws.join("d"),
                        nix::fcntl::AT_FDCWD,
                        &ws.join("swap"),
                        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                    )
                    .unwrap();
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let (mut inside, mut refused) = (0, 0);
        for _ in 0..iterations {
            match resolver.open_file("d/secret", Access::Read) {
                Ok(mut file) => {
                    let mut text = String::new();
                    file.read_to_string(&mut text).unwrap();
                    assert_ne!(
                        text, CANARY,
                        "escaped through the swapped link (walk: {force_walk})"
                    );
                    inside += 1;
                }
                Err(err) => {
                    assert!(
                        ["symlink_refused", "not_found", "not_a_directory"].contains(&err.code),
                        "{err}"
                    );
                    refused += 1;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
        // The race really happened: both outcomes were seen while the swapper ran.
        assert!(swaps.load(Ordering::Relaxed) > 100, "swapper barely ran");
        assert!(
            inside > 0 && refused > 0,
            "inside {inside}, refused {refused} (walk: {force_walk})"
        );
        assert_eq!(
            std::fs::read_to_string(scratch.0.join("outside/secret")).unwrap(),
            CANARY
        );
    }
}

// ---- the confined child ----------------------------------------------------------------

fn tool_user() -> Option<ToolUser> {
    ToolUser::resolve("nobody").unwrap()
}

/// Runs one tool call through the real child (`sluice-runner __tool`) in `ws`.
async fn call(
    ws: &Path,
    tool: ToolName,
    input: Value,
    policy: &Policy,
    limits: Limits,
) -> Result<Value, ToolError> {
    exec::use_binary(Path::new(env!("CARGO_BIN_EXE_sluice-runner"))).unwrap();
    let (_tx, mut rx) = tokio::sync::watch::channel(None);
    let ended = exec::call(
        &Sandbox::start(),
        Call {
            tool,
            input: &input,
            policy,
            workspace: ws,
            env: sluice_runner::exec::policy::tool_env(
                ws,
                sluice_protocol::JobId(1),
                sluice_protocol::Attempt(1),
                &Default::default(),
            ),
            limits,
            user: tool_user(),
            network: sluice_protocol::Network::Full,
            timeout: Duration::from_secs(20),
            kill_grace: Duration::from_millis(200),
        },
        &mut rx,
    )
    .await;
    match ended {
        Answer::Answered(answer) => answer,
        Answer::Stopped(reason) => panic!("stopped: {reason:?}"),
    }
}

fn workspace_for_tool(scratch: &Scratch) -> PathBuf {
    let ws = layout(&scratch.0);
    if let Some(user) = tool_user() {
        for entry in walk(&ws) {
            let _ = std::os::unix::fs::lchown(&entry, Some(user.uid), Some(user.gid));
        }
    }
    ws
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn file_tools_run_confined_as_the_tool_user() {
    let scratch = Scratch::new("child");
    let ws = workspace_for_tool(&scratch);
    for force_walk in [false, true] {
        let policy = Policy {
            force_path_walk: force_walk,
            ..Policy::default()
        };
        let none = Limits::default;
        let wrote = call(
            &ws,
            ToolName::WriteFile,
            json!({"path": "src/x/main.rs", "content": "fn main() {}\n// TODO one\n"}),
            &policy,
            none(),
        )
        .await
        .unwrap();
        assert_eq!(wrote["bytes_written"], 25);
        let read = call(
            &ws,
            ToolName::ReadFile,
            json!({"path": "src/x/main.rs"}),
            &policy,
            none(),
        )
        .await
        .unwrap();
        assert_eq!(read["content"], "fn main() {}\n// TODO one\n");
        assert_eq!(read["encoding"], "utf8");
        let part = call(
            &ws,
            ToolName::ReadFile,
            json!({"path": "src/x/main.rs", "offset": 3, "max_bytes": 4}),
            &policy,
            none(),
        )
        .await
        .unwrap();
        assert_eq!(
            (part["content"].as_str(), part["truncated"].as_bool()),
            (Some("main"), Some(true))
        );
        call(
            &ws,
            ToolName::WriteFile,
            json!({"path": "bin.dat", "content": "AAEC/w==", "encoding": "base64"}),
            &policy,
            none(),
        )
        .await
        .unwrap();
        let binary = call(
            &ws,
            ToolName::ReadFile,
            json!({"path": "bin.dat"}),
            &policy,
            none(),
        )
        .await
        .unwrap();
        assert_eq!(
            (binary["content"].as_str(), binary["encoding"].as_str()),
            (Some("AAEC/w=="), Some("base64"))
        );
        // Valid UTF-8 holding a NUL is not text either (no stored JSON string may hold it).
        call(
            &ws,
            ToolName::WriteFile,
            json!({"path": "nul.txt", "content": "YQBi", "encoding": "base64"}),
            &policy,
            none(),
        )
        .await
        .unwrap();
        let nul = call(
            &ws,
            ToolName::ReadFile,
            json!({"path": "nul.txt"}),
            &policy,
            none(),
        )
        .await
        .unwrap();
        assert_eq!(
            (nul["content"].as_str(), nul["encoding"].as_str()),
            (Some("YQBi"), Some("base64"))
        );
        call(
            &ws,
            ToolName::WriteFile,
            json!({"path": "src/x/main.rs", "content": "// TODO two\n", "append": true}),
            &policy,
            none(),
        )
        .await
        .unwrap();

        let found = call(
            &ws,
            ToolName::Grep,
            json!({"pattern": "todo \\w+", "ignore_case": true}),
            &policy,
            none(),
        )
        .await
        .unwrap();
        let lines: Vec<(String, u64)> = found["matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["path"].as_str().unwrap().to_string(),
                    m["line"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            lines,
            vec![
                ("src/x/main.rs".to_string(), 2),
                ("src/x/main.rs".to_string(), 3)
            ]
        );
        let globbed = call(
            &ws,
            ToolName::Grep,
            json!({"pattern": "e", "glob": "*.txt"}),
            &policy,
            none(),
        )
        .await
        .unwrap();
        let paths: Vec<&str> = globbed["matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            vec!["a/b/deep.txt", "a/inner.txt"],
            "links are skipped, the glob filters"
        );
        let capped = call(
            &ws,
            ToolName::Grep,
            json!({"pattern": ".", "max_matches": 1}),
            &policy,
            none(),
        )
        .await
        .unwrap();
        assert_eq!(
            (
                capped["matches"].as_array().unwrap().len(),
                capped["truncated"].as_bool()
            ),
            (1, Some(true))
        );
        let bad = call(
            &ws,
            ToolName::Grep,
            json!({"pattern": "("}),
            &policy,
            none(),
        )
        .await
        .unwrap_err();
        assert_eq!(bad.code, "invalid_pattern");

        // Refusals come back as answers with their codes.
        for (tool, input, code) in [
            (
                ToolName::ReadFile,
                json!({"path": "../outside/secret"}),
                "path_outside_workspace",
            ),
            (
                ToolName::ReadFile,
                json!({"path": "out/secret"}),
                "symlink_refused",
            ),
            (ToolName::ReadFile, json!({"path": "missing"}), "not_found"),
            (
                ToolName::WriteFile,
                json!({"path": "dangling", "content": "x"}),
                "symlink_refused",
            ),
            (
                ToolName::WriteFile,
                json!({"path": "/tmp/x", "content": "x"}),
                "path_outside_workspace",
            ),
            (
                ToolName::ReadFile,
                json!({"path": "a", "bogus": true}),
                "invalid_input",
            ),
            (
                ToolName::Grep,
                json!({"pattern": "x", "path": "out"}),
                "symlink_refused",
            ),
        ] {
            let err = call(&ws, tool, input.clone(), &policy, none())
                .await
                .unwrap_err();
            assert_eq!(err.code, code, "{input}: {}", err.message);
        }
    }
    // The child writes as the tool user, not as the sidecar.
    if let Some(user) = tool_user() {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(ws.join("src/x/main.rs")).unwrap().uid(),
            user.uid
        );
    }
    // RLIMIT_FSIZE holds for write_file too, as an answer (not a crash).
    let policy = Policy::default();
    let limits = Limits {
        file_size_bytes: Some(10),
        ..Limits::default()
    };
    let err = call(
        &ws,
        ToolName::WriteFile,
        json!({"path": "big", "content": "x".repeat(100)}),
        &policy,
        limits,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, "file_too_large", "{}", err.message);
    assert_eq!(
        outside_state(&scratch.0).len(),
        2,
        "nothing was created outside"
    );
}

#[tokio::test]
async fn the_runner_policy_caps_what_a_call_may_ask_for() {
    let scratch = Scratch::new("cap");
    let ws = workspace_for_tool(&scratch);
    let policy = Policy {
        max_read_bytes: 3,
        ..Policy::default()
    };
    let read = call(
        &ws,
        ToolName::ReadFile,
        json!({"path": "a/inner.txt", "max_bytes": 1000}),
        &policy,
        Limits::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        (read["content"].as_str(), read["truncated"].as_bool()),
        (Some("ins"), Some(true))
    );
}

// ---- web_fetch (S-08) -------------------------------------------------------------------

/// A loopback HTTP server answering every request with `response`, counting connections.
struct Listener {
    port: u16,
    connections: Arc<AtomicUsize>,
}

fn listen(ip: &str, response: String) -> Option<Listener> {
    let listener = TcpListener::bind((ip, 0)).ok()?;
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counted.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(response.as_bytes());
        }
    });
    Some(Listener { port, connections })
}

fn http_response(status: &str, headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn s08_web_fetch_refuses_every_deny_set_form_and_reaches_only_what_is_allowed() {
    let page = "<html><head><title>Hi</title><script>x()</script></head><body><p>Hello &amp; welcome</p></body></html>";
    let server = listen(
        "127.0.0.1",
        http_response("200 OK", "Content-Type: text/html\r\n", page),
    )
    .unwrap();
    let port = server.port;
    let scratch = Scratch::new("fetch");
    let ws = workspace_for_tool(&scratch);
    let closed = Policy::default();

    let mut variants = Vec::new();
    let hosts = [
        "127.0.0.1".to_string(),
        "localhost".into(),
        "127.1".into(),
        "2130706433".into(),
        "0x7f000001".into(),
        "0x7f.0.0.1".into(),
        "0177.0.0.1".into(),
        "017700000001".into(),
        "127.000.000.001".into(),
        "[::ffff:127.0.0.1]".into(),
        "[::ffff:7f00:1]".into(),
        "[::1]".into(),
        "[0:0:0:0:0:0:0:1]".into(),
        "0.0.0.0".into(),
        "0".into(),
        "[::]".into(),
        "127.0.0.2".into(),
        "127.255.255.254".into(),
        "LOCALHOST".into(),
        "localhost.".into(),
    ];
    for host in &hosts {
        for path in ["/", "/x?y=1", "/%2e%2e/", "/#frag", "/redirect"] {
            for scheme in ["http", "https"] {
                variants.push(format!("{scheme}://{host}:{port}{path}"));
            }
        }
    }
    for target in [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/",
        "http://10.0.0.1/",
        "http://192.168.0.1/",
        "http://172.16.0.1/",
        "http://100.64.0.1/",
        "http://[fe80::1]/",
        "http://224.0.0.1/",
        "file:///etc/passwd",
        "ftp://127.0.0.1/",
        "gopher://127.0.0.1/",
        "http://user:pass@example.com/",
        "data:text/plain,hi",
        "javascript:alert(1)",
    ] {
        variants.push(target.to_string());
    }
    assert!(variants.len() >= 200, "{} variants", variants.len());
    for url in &variants {
        let err = call(
            &ws,
            ToolName::WebFetch,
            json!({"url": url, "timeout_ms": 2000}),
            &closed,
            Limits::default(),
        )
        .await
        .unwrap_err();
        assert!(
            [
                "address_refused",
                "unsupported_scheme",
                "invalid_url",
                "dns_failed"
            ]
            .contains(&err.code.as_str()),
            "{url}: {} {}",
            err.code,
            err.message
        );
    }
    assert_eq!(
        server.connections.load(Ordering::SeqCst),
        0,
        "a denied address was connected to"
    );

    // The allow-list opens exactly what it names.
    let open = Policy {
        fetch_allow: vec!["127.0.0.1/32".into()],
        ..Policy::default()
    };
    let fetched = call(
        &ws,
        ToolName::WebFetch,
        json!({"url": format!("http://127.0.0.1:{port}/")}),
        &open,
        Limits::default(),
    )
    .await
    .unwrap();
    assert_eq!(fetched["status"], 200);
    assert_eq!(fetched["text"], "Hi\n\nHello & welcome");
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
    let capped = call(
        &ws,
        ToolName::WebFetch,
        json!({"url": format!("http://127.0.0.1:{port}/"), "max_bytes": 10}),
        &open,
        Limits::default(),
    )
    .await
    .unwrap();
    assert_eq!(capped["truncated"], true);

    // A redirect from an allowed address to a denied one is refused before connecting.
    if let Some(target) = listen("127.0.0.2", http_response("200 OK", "", "private")) {
        let redirect = listen(
            "127.0.0.1",
            http_response(
                "302 Found",
                &format!("Location: http://127.0.0.2:{}/\r\n", target.port),
                "",
            ),
        )
        .unwrap();
        let err = call(
            &ws,
            ToolName::WebFetch,
            json!({"url": format!("http://127.0.0.1:{}/", redirect.port)}),
            &open,
            Limits::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code, "address_refused", "{}", err.message);
        assert_eq!(redirect.connections.load(Ordering::SeqCst), 1);
        assert_eq!(target.connections.load(Ordering::SeqCst), 0);
        // The same redirect is followed when the target is allowed too.
        let wide = Policy {
            fetch_allow: vec!["127.0.0.0/8".into()],
            ..Policy::default()
        };
        let followed = call(
            &ws,
            ToolName::WebFetch,
            json!({"url": format!("http://127.0.0.1:{}/", redirect.port)}),
            &wide,
            Limits::default(),
        )
        .await
        .unwrap();
        assert_eq!(
            (
                followed["text"].as_str(),
                followed["redirects"].as_array().map(Vec::len)
            ),
            (Some("private"), Some(1))
        );
    }
    let _ = tools::all();
}
