//! The Messages API's server-sent events, read into one assistant message: a line parser
//! ([`SseParser`]) and the assembly of the message's content blocks ([`Assembler`]) —
//! `message_start`, `content_block_start/delta/stop` (text, `input_json_delta` for a tool's
//! input), `message_delta` (stop reason, output tokens), `message_stop`, `ping`, `error`.
//!
//! Parsing is bounded: a line, a tool input and the whole message have caps, so a model (or
//! something impersonating one) cannot make the sidecar buffer without end. What the model
//! sends is data: nothing in it changes the loop but the block types and the stop reason.

use serde_json::{json, Map, Value};

/// Longest SSE line buffered (one `data:` line holds one event).
pub const MAX_LINE_BYTES: usize = 4 << 20;
/// Largest tool input kept; a larger one is answered with an error instead of run.
pub const MAX_TOOL_INPUT_BYTES: usize = 1 << 20;
/// Most bytes of events one response may take.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Splits a byte stream into events (`event:` and `data:` lines, a blank line ends one).
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: String,
    data: String,
    total: usize,
}

impl SseParser {
    /// Feeds `chunk`; the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, StreamError> {
        self.total += chunk.len();
        if self.total > MAX_RESPONSE_BYTES {
            return Err(StreamError::TooLarge(format!(
                "the response exceeded {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        let mut events = Vec::new();
        for &byte in chunk {
            if byte != b'\n' {
                if self.line.len() >= MAX_LINE_BYTES {
                    return Err(StreamError::TooLarge(format!(
                        "an event line exceeded {MAX_LINE_BYTES} bytes"
                    )));
                }
                self.line.push(byte);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                if !self.data.is_empty() || !self.event.is_empty() {
                    events.push(SseEvent {
                        event: std::mem::take(&mut self.event),
                        data: std::mem::take(&mut self.data),
                    });
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line.as_ref(), ""),
            };
            match field {
                "event" => self.event = value.to_string(),
                "data" => {
                    if !self.data.is_empty() {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                }
                _ => {}
            }
        }
        Ok(events)
    }
}

/// Why a response could not be read as a message.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamError {
    /// The API sent an `error` event (`overloaded_error`, `api_error`, …).
    Api { kind: String, message: String },
    /// Past a cap.
    TooLarge(String),
    /// An event the protocol does not allow.
    Malformed(String),
}

/// Token counts of a response (or summed over a loop).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

impl Usage {
    /// Adds `other` (saturating: counts come from the API and are not trusted).
    pub fn add(&mut self, other: Usage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cache_creation_input_tokens = self
            .cache_creation_input_tokens
            .saturating_add(other.cache_creation_input_tokens);
        self.cache_read_input_tokens = self
            .cache_read_input_tokens
            .saturating_add(other.cache_read_input_tokens);
    }

    /// Every token counted against a budget.
    pub fn total(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.cache_read_input_tokens)
    }

    pub fn to_json(self) -> Value {
        json!({
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
        })
    }

    fn read(usage: &Value, into: &mut Usage) {
        let field = |name: &str| usage.get(name).and_then(Value::as_u64);
        if let Some(n) = field("input_tokens") {
            into.input_tokens = n;
        }
        if let Some(n) = field("output_tokens") {
            into.output_tokens = n;
        }
        if let Some(n) = field("cache_creation_input_tokens") {
            into.cache_creation_input_tokens = n;
        }
        if let Some(n) = field("cache_read_input_tokens") {
            into.cache_read_input_tokens = n;
        }
    }
}

/// A tool call of the message.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    pub id: String,
    pub name: String,
    /// The input, or why it cannot be used (not JSON, not an object, too large).
    pub input: Result<Value, String>,
}

/// One assistant message, read whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// The content blocks as they go back into the conversation (a tool input that could not
    /// be used is `{}` there).
    pub content: Vec<Value>,
    pub tool_uses: Vec<ToolUse>,
    pub stop_reason: Option<String>,
    pub usage: Usage,
    pub model: Option<String>,
}

impl Message {
    /// The text blocks, joined.
    pub fn text(&self) -> String {
        self.content
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("")
    }
}

/// A content block being read.
#[derive(Debug)]
enum Block {
    Text(String),
    ToolUse {
        id: String,
        name: String,
        json: String,
        too_large: bool,
    },
    /// Any other block type, kept as started (`thinking` and server tools are not asked for).
    Other(Value),
}

/// What an event added that the loop shows as it comes.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    None,
    Text(String),
    /// A content block ended (flush shown text).
    BlockEnd,
}

/// Builds the message from its events.
#[derive(Debug, Default)]
pub struct Assembler {
    started: bool,
    blocks: Vec<Option<Block>>,
    message: Message,
    stopped: bool,
}

impl Assembler {
    /// Whether `message_stop` arrived: the message is whole.
    pub fn is_complete(&self) -> bool {
        self.stopped
    }

    /// Applies one event.
    pub fn apply(&mut self, event: &SseEvent) -> Result<Progress, StreamError> {
        if event.event == "ping" {
            return Ok(Progress::None);
        }
        let data: Value = serde_json::from_str(&event.data).map_err(|e| {
            StreamError::Malformed(format!("a {:?} event is not JSON: {e}", event.event))
        })?;
        // The type inside the data is authoritative; the `event:` line is a hint.
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(&event.event)
            .to_string();
        match kind.as_str() {
            "error" => {
                let error = data.get("error").cloned().unwrap_or(Value::Null);
                Err(StreamError::Api {
                    kind: error
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("error")
                        .to_string(),
                    message: error
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .chars()
                        .take(1000)
                        .collect(),
                })
            }
            "message_start" => {
                self.started = true;
                let message = data.get("message").cloned().unwrap_or(Value::Null);
                self.message.model = message
                    .get("model")
                    .and_then(Value::as_str)
                    .map(|m| m.chars().take(256).collect());
                if let Some(usage) = message.get("usage") {
                    Usage::read(usage, &mut self.message.usage);
                }
                Ok(Progress::None)
            }
            _ if !self.started => Err(StreamError::Malformed(format!(
                "a {kind:?} event before message_start"
            ))),
            "content_block_start" => {
                let index = self.index(&data)?;
                let block = data.get("content_block").cloned().unwrap_or(Value::Null);
                let started = match block.get("type").and_then(Value::as_str) {
                    Some("text") => Block::Text(
                        block
                            .get("text")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    ),
                    Some("tool_use") => Block::ToolUse {
                        id: string_field(&block, "id")?,
                        name: string_field(&block, "name")?,
                        json: String::new(),
                        too_large: false,
                    },
                    Some(_) => Block::Other(block),
                    None => {
                        return Err(StreamError::Malformed(
                            "a content block without a type".into(),
                        ))
                    }
                };
                if self.blocks.len() <= index {
                    self.blocks.resize_with(index + 1, || None);
                }
                self.blocks[index] = Some(started);
                Ok(Progress::None)
            }
            "content_block_delta" => {
                let index = self.index(&data)?;
                let delta = data.get("delta").cloned().unwrap_or(Value::Null);
                let Some(Some(block)) = self.blocks.get_mut(index) else {
                    return Err(StreamError::Malformed(format!(
                        "a delta for block {index}, which was not started"
                    )));
                };
                match (block, delta.get("type").and_then(Value::as_str)) {
                    (Block::Text(text), Some("text_delta")) => {
                        let piece = delta.get("text").and_then(Value::as_str).unwrap_or("");
                        text.push_str(piece);
                        Ok(Progress::Text(piece.to_string()))
                    }
                    (
                        Block::ToolUse {
                            json, too_large, ..
                        },
                        Some("input_json_delta"),
                    ) => {
                        let piece = delta
                            .get("partial_json")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        if json.len() + piece.len() > MAX_TOOL_INPUT_BYTES {
                            *too_large = true;
                            json.clear();
                        } else if !*too_large {
                            json.push_str(piece);
                        }
                        Ok(Progress::None)
                    }
                    // Deltas of other blocks (thinking, citations) are not kept.
                    _ => Ok(Progress::None),
                }
            }
            "content_block_stop" => {
                let index = self.index(&data)?;
                let Some(block) = self.blocks.get_mut(index).and_then(Option::take) else {
                    return Err(StreamError::Malformed(format!(
                        "block {index} stopped without a start"
                    )));
                };
                self.finish_block(block);
                Ok(Progress::BlockEnd)
            }
            "message_delta" => {
                if let Some(reason) = data
                    .get("delta")
                    .and_then(|d| d.get("stop_reason"))
                    .and_then(Value::as_str)
                {
                    self.message.stop_reason = Some(reason.chars().take(64).collect());
                }
                if let Some(usage) = data.get("usage") {
                    Usage::read(usage, &mut self.message.usage);
                }
                Ok(Progress::None)
            }
            "message_stop" => {
                // Blocks never stopped are finished as they are.
                for block in std::mem::take(&mut self.blocks).into_iter().flatten() {
                    self.finish_block(block);
                }
                self.stopped = true;
                Ok(Progress::BlockEnd)
            }
            // Event types added later are ignored, as the API asks of clients.
            _ => Ok(Progress::None),
        }
    }

    /// The message, once [`Assembler::is_complete`].
    pub fn finish(self) -> Message {
        self.message
    }

    fn index(&self, data: &Value) -> Result<usize, StreamError> {
        data.get("index")
            .and_then(Value::as_u64)
            .filter(|&i| i < 4096)
            .map(|i| i as usize)
            .ok_or_else(|| {
                StreamError::Malformed("a content block event without a valid index".into())
            })
    }

    fn finish_block(&mut self, block: Block) {
        match block {
            Block::Text(text) => self
                .message
                .content
                .push(json!({"type": "text", "text": text})),
            Block::ToolUse {
                id,
                name,
                json,
                too_large,
            } => {
                let input = if too_large {
                    Err(format!(
                        "the tool input exceeded {MAX_TOOL_INPUT_BYTES} bytes and was not run"
                    ))
                } else if json.trim().is_empty() {
                    Ok(Value::Object(Map::new()))
                } else {
                    match serde_json::from_str::<Value>(&json) {
                        Ok(value @ Value::Object(_)) => Ok(value),
                        Ok(_) => Err("the tool input must be a JSON object".into()),
                        Err(e) => Err(format!("the tool input is not valid JSON: {e}")),
                    }
                };
                let kept = input.clone().unwrap_or_else(|_| Value::Object(Map::new()));
                self.message
                    .content
                    .push(json!({"type": "tool_use", "id": id, "name": name, "input": kept}));
                self.message.tool_uses.push(ToolUse { id, name, input });
            }
            Block::Other(block) => self.message.content.push(block),
        }
    }
}

fn string_field(block: &Value, name: &str) -> Result<String, StreamError> {
    block
        .get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= 256)
        .map(str::to_string)
        .ok_or_else(|| StreamError::Malformed(format!("a tool_use block without a valid {name}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(events: &[(&str, Value)]) -> String {
        events
            .iter()
            .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
            .collect()
    }

    fn read(body: &str, split: usize) -> Result<Message, StreamError> {
        let mut parser = SseParser::default();
        let mut assembler = Assembler::default();
        for chunk in body.as_bytes().chunks(split) {
            for event in parser.push(chunk)? {
                assembler.apply(&event)?;
            }
        }
        assert!(assembler.is_complete());
        Ok(assembler.finish())
    }

    fn conversation() -> String {
        sse(&[
            (
                "message_start",
                json!({"type": "message_start", "message": {"model": "m", "usage": {"input_tokens": 10, "output_tokens": 1}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            ("ping", json!({"type": "ping"})),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "tu_1", "name": "bash", "input": {}}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"comm"}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "and\": \"ls\"}"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 42}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ])
    }

    #[test]
    fn a_streamed_message_is_assembled_however_the_bytes_are_split() {
        for split in [1, 7, 64, 100_000] {
            let message = read(&conversation(), split).unwrap();
            assert_eq!(message.text(), "Hello");
            assert_eq!(message.stop_reason.as_deref(), Some("tool_use"));
            assert_eq!(message.usage.input_tokens, 10);
            assert_eq!(message.usage.output_tokens, 42);
            assert_eq!(message.tool_uses.len(), 1);
            assert_eq!(message.tool_uses[0].id, "tu_1");
            assert_eq!(message.tool_uses[0].input, Ok(json!({"command": "ls"})));
            assert_eq!(message.content[1]["input"], json!({"command": "ls"}));
        }
    }

    #[test]
    fn crlf_lines_and_comments_are_understood() {
        let body = conversation().replace('\n', "\r\n");
        let body = format!(": keep-alive\r\n\r\n{body}");
        assert_eq!(read(&body, 5).unwrap().text(), "Hello");
    }

    #[test]
    fn a_malformed_tool_input_is_kept_as_an_error_not_a_failure() {
        let body = conversation().replace("and\\\": \\\"ls\\\"}", "and\\\": ");
        let message = read(&body, 100_000).unwrap();
        let err = message.tool_uses[0].input.clone().unwrap_err();
        assert!(err.contains("not valid JSON"), "{err}");
        assert_eq!(message.content[1]["input"], json!({}));
    }

    #[test]
    fn a_giant_tool_input_is_bounded() {
        let mut parser = SseParser::default();
        let mut assembler = Assembler::default();
        let head = sse(&[
            (
                "message_start",
                json!({"type": "message_start", "message": {"usage": {}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "write_file", "input": {}}}),
            ),
        ]);
        for event in parser.push(head.as_bytes()).unwrap() {
            assembler.apply(&event).unwrap();
        }
        let piece = "x".repeat(64 * 1024);
        for _ in 0..40 {
            let delta = sse(&[(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}}),
            )]);
            for event in parser.push(delta.as_bytes()).unwrap() {
                assembler.apply(&event).unwrap();
            }
        }
        let tail = sse(&[
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ]);
        for event in parser.push(tail.as_bytes()).unwrap() {
            assembler.apply(&event).unwrap();
        }
        let message = assembler.finish();
        assert!(message.tool_uses[0]
            .input
            .clone()
            .unwrap_err()
            .contains("exceeded"));
        assert_eq!(message.content[0]["input"], json!({}));
    }

    #[test]
    fn an_error_event_and_garbage_are_errors_not_panics() {
        let mut parser = SseParser::default();
        let events = parser
            .push(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n")
            .unwrap();
        let err = Assembler::default().apply(&events[0]).unwrap_err();
        assert_eq!(
            err,
            StreamError::Api {
                kind: "overloaded_error".into(),
                message: "Overloaded".into()
            }
        );
        for garbage in [
            "data: not json\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0}\n\n",
            "data: {\"type\":\"message_start\",\"message\":{}}\n\ndata: {\"type\":\"content_block_stop\",\"index\":99999999999}\n\n",
            "data: {\"type\":\"message_start\",\"message\":{}}\n\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\"}}\n\n",
        ] {
            let mut parser = SseParser::default();
            let mut assembler = Assembler::default();
            let result: Result<(), StreamError> = parser
                .push(garbage.as_bytes())
                .and_then(|events| events.iter().try_for_each(|e| assembler.apply(e).map(|_| ())));
            assert!(matches!(result, Err(StreamError::Malformed(_))), "{garbage}: {result:?}");
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 7u64;
        for _ in 0..200 {
            let mut parser = SseParser::default();
            let mut assembler = Assembler::default();
            let mut bytes = conversation().into_bytes();
            for _ in 0..20 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let at = (seed >> 33) as usize % bytes.len();
                bytes[at] = (seed >> 17) as u8;
            }
            if let Ok(events) = parser.push(&bytes) {
                for event in events {
                    let _ = assembler.apply(&event);
                }
            }
        }
    }
}
