//! Agent session histories: Messages API messages, kept under a size cap in a way the API
//! still accepts. Used by the scheduler on what it stores and by the sidecar on what it
//! sends.

use serde_json::{json, Value};

/// What an elided tool result or input says instead.
const ELIDED: &str = "[elided: an older tool result, to keep the session under its size cap]";

/// Keeps `messages` under `max` bytes of JSON: the oldest tool results are elided first,
/// then the oldest tool inputs, then whole exchanges (a user prompt and everything up to the
/// next prompt) are dropped from the front; when even the last exchange is over the cap the
/// history is emptied. What is left is a history the Messages API accepts: it starts with a
/// prompt, and every `tool_use` keeps its `tool_result`. Linear in the history's size.
pub fn cap_history(messages: &mut Vec<Value>, max: usize) {
    let size = |messages: &Vec<Value>| serde_json::to_vec(messages).map_or(0, |v| v.len());
    let mut current = size(messages);
    if current <= max {
        return;
    }
    // Tool results, oldest first; then tool inputs.
    for (kind, field, replacement) in [
        ("tool_result", "content", json!(ELIDED)),
        ("tool_use", "input", json!({ "elided": ELIDED })),
    ] {
        for message in messages.iter_mut() {
            let Some(blocks) = message.get_mut("content").and_then(Value::as_array_mut) else {
                continue;
            };
            for block in blocks.iter_mut() {
                if block.get("type").and_then(Value::as_str) != Some(kind) {
                    continue;
                }
                let Some(slot) = block.get_mut(field) else {
                    continue;
                };
                if *slot == replacement {
                    continue;
                }
                let before = serde_json::to_vec(slot).map_or(0, |v| v.len());
                let after = serde_json::to_vec(&replacement).map_or(0, |v| v.len());
                if before <= after {
                    continue;
                }
                *slot = replacement.clone();
                current -= before - after;
                if current <= max {
                    return;
                }
            }
        }
    }
    // Whole exchanges, oldest first: each message measured once, the cut made once.
    let sizes: Vec<usize> = messages
        .iter()
        .map(|m| serde_json::to_vec(m).map_or(0, |v| v.len()))
        .collect();
    let mut suffix = 2 + sizes.iter().sum::<usize>() + sizes.len().saturating_sub(1);
    for start in 1..messages.len() {
        suffix -= sizes[start - 1] + 1;
        if is_prompt(&messages[start]) && suffix <= max {
            messages.drain(..start);
            return;
        }
    }
    // Even the last exchange is over the cap: a history the model could not take would fail
    // every later job of the session, so it starts over.
    messages.clear();
}

/// A user message that starts an exchange (not one carrying tool results).
fn is_prompt(message: &Value) -> bool {
    if message.get("role").and_then(Value::as_str) != Some("user") {
        return false;
    }
    match message.get("content") {
        Some(Value::Array(blocks)) => !blocks
            .iter()
            .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result")),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(prompt: &str, result: &str) -> Vec<Value> {
        vec![
            json!({"role": "user", "content": prompt}),
            json!({"role": "assistant", "content": [
                {"type": "tool_use", "id": format!("t-{prompt}"), "name": "bash", "input": {"command": "x".repeat(100)}}
            ]}),
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": format!("t-{prompt}"), "content": result}
            ]}),
            json!({"role": "assistant", "content": [{"type": "text", "text": "done"}]}),
        ]
    }

    fn bytes(messages: &Vec<Value>) -> usize {
        serde_json::to_vec(messages).unwrap().len()
    }

    #[test]
    fn a_history_under_the_cap_is_untouched() {
        let mut messages = exchange("a", "small");
        let before = messages.clone();
        cap_history(&mut messages, 1 << 20);
        assert_eq!(messages, before);
    }

    #[test]
    fn the_oldest_tool_results_are_elided_first() {
        let big = "r".repeat(10_000);
        let mut messages = exchange("a", &big);
        messages.extend(exchange("b", &big));
        let max = bytes(&messages) - 5_000;
        cap_history(&mut messages, max);
        assert!(bytes(&messages) <= max);
        assert_eq!(messages.len(), 8, "no exchange dropped");
        assert_eq!(messages[2]["content"][0]["content"], ELIDED);
        assert_eq!(
            messages[6]["content"][0]["content"], big,
            "the newest result is kept"
        );
        // The pairing the API needs is intact.
        assert_eq!(messages[2]["content"][0]["tool_use_id"], "t-a");
    }

    #[test]
    fn whole_exchanges_go_when_elision_is_not_enough() {
        let mut messages = Vec::new();
        for prompt in ["a", "b", "c"] {
            messages.extend(exchange(prompt, "ok"));
        }
        let last = exchange("c", "ok");
        cap_history(&mut messages, bytes(&last) + 10);
        assert_eq!(messages.len(), 4);
        assert_eq!(messages[0]["content"], "c", "starts with a prompt");
        assert!(is_prompt(&messages[0]));
    }

    #[test]
    fn a_last_exchange_over_the_cap_empties_the_history() {
        let mut messages = exchange("only", &"r".repeat(1000));
        cap_history(&mut messages, 10);
        assert!(messages.is_empty());
    }

    #[test]
    fn many_small_exchanges_are_cut_in_linear_time() {
        let mut messages = Vec::new();
        for i in 0..100_000 {
            messages.push(json!({"role": "user", "content": format!("p{i}")}));
            messages
                .push(json!({"role": "assistant", "content": [{"type": "text", "text": "ok"}]}));
        }
        let started = std::time::Instant::now();
        cap_history(&mut messages, 10_000);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(bytes(&messages) <= 10_000, "{}", bytes(&messages));
        assert!(is_prompt(&messages[0]));
        assert_eq!(messages.last().unwrap()["content"][0]["text"], "ok");
    }
}
