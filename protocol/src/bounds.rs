//! The documented range of every input a user or a runner hands sluice, and the checks both
//! sides share.
//!
//! A value no later step can handle — a `timeout_ms` whose deadline overflows a timestamp, a NUL
//! byte Postgres cannot store, a script too long for `execve` — is refused where it enters
//! (the HTTP API, the SQL insert trigger, the runner endpoints) with a message naming the
//! field, never discovered later by a background loop. The SQL trigger (`sql/0004_…`) keeps
//! the same numbers; the sidecar clamps to them as well, so a spec that reached it some other
//! way still cannot overflow its clocks.

use serde_json::Value;

/// Longest `timeout_ms` of a job or a spec: 30 days.
pub const MAX_TIMEOUT_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// Longest `delay_ms`, and how far ahead `run_at` may lie: 366 days.
pub const MAX_DELAY_MS: u64 = 366 * 24 * 60 * 60 * 1000;
/// `priority` range (lower runs first); a Postgres `smallint`'s.
pub const MIN_PRIORITY: i32 = -32_768;
pub const MAX_PRIORITY: i32 = 32_767;
/// `max_attempts` range.
pub const MIN_ATTEMPTS: i32 = 1;
pub const MAX_ATTEMPTS: i32 = 1000;
/// Largest spec, as compact JSON (a script up to this size runs: it reaches bash through a
/// descriptor, not argv).
pub const MAX_SPEC_BYTES: usize = 512 * 1024;
/// A bash spec's `env`: entries, and bytes of names and values together.
pub const MAX_ENV_VARS: usize = 1000;
pub const MAX_ENV_BYTES: usize = 256 * 1024;
/// Longest environment variable name.
pub const MAX_ENV_NAME_BYTES: usize = 255;
/// Largest value of any `limits` field (2^53, so the number survives any JSON parser).
pub const MAX_LIMIT: u64 = 1 << 53;
/// Largest request body of the internal (runner) listener: a batch of completions.
pub const MAX_INTERNAL_BODY_BYTES: usize = 8 << 20;
/// Largest chunk of an artifact upload (the body of one `PUT`).
pub const ARTIFACT_CHUNK_BYTES: usize = 1 << 20;
/// Most chunks of one step's artifacts the scheduler stores (1 GiB at full chunks); a
/// runner's own cap (`SLUICE_ARTIFACT_MAX_BYTES`) is lower.
pub const MAX_ARTIFACT_CHUNKS: u32 = 1024;
/// Most paths listed as skipped in a seal.
pub const MAX_ARTIFACT_SKIPPED: usize = 1000;
/// Largest completion (its JSON): a result beyond it is replaced by a `result_too_large`
/// failure by the sidecar.
pub const MAX_COMPLETION_BYTES: usize = 4 << 20;
/// Longest idempotency key, queue name and event kind, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
pub const MAX_QUEUE_NAME_BYTES: usize = 128;
pub const MAX_EVENT_KIND_BYTES: usize = 64;
/// Most turns an agent step may take.
pub const MAX_AGENT_TURNS: u64 = 1000;
/// Largest `max_tokens` of one model response.
pub const MAX_AGENT_RESPONSE_TOKENS: u64 = 1_000_000;
/// Longest model name.
pub const MAX_MODEL_NAME_BYTES: usize = 256;
/// Most bytes of the turns an agent attempt sends for its session (under the internal body
/// limit); the sidecar elides old tool results to fit.
pub const MAX_SESSION_TURNS_BYTES: usize = 6 << 20;
/// Longest agent session name.
pub const MAX_SESSION_NAME_BYTES: usize = 128;

/// A session name: 1-128 bytes of letters, digits and `._:@-` (it appears in paths).
pub fn check_session_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_SESSION_NAME_BYTES {
        return Err(format!("must be 1-{MAX_SESSION_NAME_BYTES} bytes"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
    {
        return Err("may hold only letters, digits and . _ : @ -".into());
    }
    Ok(())
}
/// A retry policy's first wait (`retry.initial_ms`): at most one day.
pub const MAX_RETRY_INITIAL_MS: u64 = 24 * 60 * 60 * 1000;
/// A retry policy's longest wait (`retry.max_ms`): as far as a delay may reach.
pub const MAX_RETRY_MAX_MS: u64 = MAX_DELAY_MS;
/// A retry policy's growth per retry (`retry.factor`).
pub const MIN_RETRY_FACTOR: f64 = 1.0;
pub const MAX_RETRY_FACTOR: f64 = 100.0;

/// Where in a JSON document the first NUL character is (in a string or a key), as a path
/// relative to the document: `env.FOO`, `input.args[2]`, `""` for the document itself.
/// Postgres can store neither in `text` nor in `jsonb`.
pub fn nul_path(value: &Value) -> Option<String> {
    fn walk(value: &Value, path: &mut String) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{index}]"));
                    if walk(item, path) {
                        return true;
                    }
                    path.truncate(len);
                }
                false
            }
            Value::Object(map) => {
                for (key, item) in map {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&key.replace('\0', "\\0"));
                    if key.contains('\0') || walk(item, path) {
                        return true;
                    }
                    path.truncate(len);
                }
                false
            }
            _ => false,
        }
    }
    let mut path = String::new();
    walk(value, &mut path).then_some(path)
}

/// `field` joined with a path from [`nul_path`].
pub fn field_path(field: &str, path: &str) -> String {
    match (field.is_empty(), path.is_empty()) {
        (_, true) => field.to_string(),
        (true, false) => path.to_string(),
        (false, false) if path.starts_with('[') => format!("{field}{path}"),
        (false, false) => format!("{field}.{path}"),
    }
}

/// Replaces every NUL in the strings and keys of `value` with U+FFFD (the replacement
/// character), so that the document can be stored; `true` if anything was replaced. The
/// sidecar applies it to every result and event it sends: tool output is data, and what
/// Postgres cannot store is shown replaced, never an error.
pub fn scrub_nul(value: &mut Value) -> bool {
    match value {
        Value::String(s) if s.contains('\0') => {
            *s = s.replace('\0', "\u{FFFD}");
            true
        }
        Value::Array(items) => items.iter_mut().fold(false, |any, v| scrub_nul(v) | any),
        Value::Object(map) => {
            let mut any = false;
            if map.keys().any(|k| k.contains('\0')) {
                let old = std::mem::take(map);
                for (key, v) in old {
                    map.insert(key.replace('\0', "\u{FFFD}"), v);
                }
                any = true;
            }
            map.values_mut().fold(any, |any, v| scrub_nul(v) | any)
        }
        _ => false,
    }
}

/// Checks that an optional integer field of a spec lies in `range`; the message names it.
pub(crate) fn check_range(
    field: &str,
    value: Option<u64>,
    range: std::ops::RangeInclusive<u64>,
) -> Result<(), String> {
    match value {
        Some(v) if !range.contains(&v) => Err(format!(
            "{field} must be between {} and {}, got {v}",
            range.start(),
            range.end()
        )),
        _ => Ok(()),
    }
}

/// A bash spec's environment: names non-empty, without `=` or NUL, at most
/// [`MAX_ENV_NAME_BYTES`]; values without NUL; at most [`MAX_ENV_VARS`] entries and
/// [`MAX_ENV_BYTES`] together (each one also becomes a `NAME=value` string for `execve`).
pub(crate) fn check_env(env: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
    if env.len() > MAX_ENV_VARS {
        return Err(format!(
            "env has {} entries; at most {MAX_ENV_VARS} are allowed",
            env.len()
        ));
    }
    let mut bytes = 0usize;
    for (name, value) in env {
        let shown: String = name
            .chars()
            .take(64)
            .collect::<String>()
            .replace('\0', "\\0");
        if name.is_empty() || name.len() > MAX_ENV_NAME_BYTES {
            return Err(format!(
                "env name {shown:?} must be 1-{MAX_ENV_NAME_BYTES} bytes"
            ));
        }
        if name.contains('=') || name.contains('\0') {
            return Err(format!("env name {shown:?} must not contain '=' or NUL"));
        }
        if value.contains('\0') {
            return Err(format!("env.{shown} must not contain NUL"));
        }
        bytes += name.len() + value.len() + 2;
    }
    if bytes > MAX_ENV_BYTES {
        return Err(format!(
            "env holds {bytes} bytes; at most {MAX_ENV_BYTES} are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_nul_is_found_in_strings_and_keys_with_its_path() {
        assert_eq!(
            nul_path(&json!({"a": "ok", "b": [1, "x\u{0}"]})),
            Some("b[1]".into())
        );
        assert_eq!(
            nul_path(&json!({"env": {"K\u{0}": "v"}})),
            Some("env.K\\0".into())
        );
        assert_eq!(nul_path(&json!("\u{0}")), Some(String::new()));
        assert_eq!(nul_path(&json!({"a": {"b": "clean"}})), None);
        assert_eq!(field_path("spec", "env.K"), "spec.env.K");
        assert_eq!(field_path("jobs", "[3]"), "jobs[3]");
        assert_eq!(field_path("queue", ""), "queue");
    }

    #[test]
    fn scrubbing_replaces_every_nul_and_says_so() {
        let mut v = json!({"t\u{0}": ["a\u{0}b", {"c": "\u{0}"}], "ok": "fine"});
        assert!(scrub_nul(&mut v));
        assert_eq!(nul_path(&v), None);
        assert_eq!(v["t\u{FFFD}"][0], "a\u{FFFD}b");
        assert_eq!(v["ok"], "fine");
        assert!(!scrub_nul(&mut v));
    }

    #[test]
    fn env_names_values_and_sizes_are_checked() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert!(check_env(&env(&[("PATH", "/bin"), ("X", "")])).is_ok());
        assert!(check_env(&env(&[("", "v")])).is_err());
        assert!(check_env(&env(&[("A=B", "v")])).is_err());
        assert!(check_env(&env(&[("A", "v\u{0}")]))
            .unwrap_err()
            .contains("env.A"));
        let big = "x".repeat(MAX_ENV_BYTES);
        assert!(check_env(&env(&[("BIG", &big)])).is_err());
        let many: std::collections::BTreeMap<String, String> = (0..=MAX_ENV_VARS)
            .map(|i| (format!("V{i}"), String::new()))
            .collect();
        assert!(check_env(&many).is_err());
    }
}
