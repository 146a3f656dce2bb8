//! Bounded handling of a tool's output: a per-attempt byte cap and the tails kept for the
//! result, so a tool printing forever cannot grow the sidecar's memory; and bytes as event
//! data.
//!
//! Output is bytes. A chunk that is UTF-8 without NUL goes as `{"text"}`; anything else (NUL,
//! invalid UTF-8, binary) as `{"text", "base64", "binary": true}`, where `base64` holds the
//! exact bytes and `text` a display form with U+FFFD for what is not text. Decoding `base64`
//! where present and taking `text` elsewhere gives back the output byte for byte.

use base64::Engine;
use serde_json::{json, Value};

/// The last `capacity` bytes written.
#[derive(Debug, Clone)]
pub struct Tail {
    capacity: usize,
    bytes: Vec<u8>,
}

impl Tail {
    /// An empty tail keeping at most `capacity` bytes.
    pub fn new(capacity: usize) -> Tail {
        Tail {
            capacity,
            bytes: Vec::with_capacity(capacity.min(4096)),
        }
    }

    /// Appends `chunk`, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, chunk: &[u8]) {
        if chunk.len() >= self.capacity {
            self.bytes.clear();
            self.bytes
                .extend_from_slice(&chunk[chunk.len() - self.capacity..]);
            return;
        }
        let overflow = (self.bytes.len() + chunk.len()).saturating_sub(self.capacity);
        self.bytes.drain(..overflow);
        self.bytes.extend_from_slice(chunk);
    }

    /// The tail as text; a character cut at the front is dropped, invalid UTF-8 and NUL
    /// replaced by U+FFFD (the events carry the exact bytes).
    pub fn text(&self) -> String {
        let start = self
            .bytes
            .iter()
            .position(|b| (b & 0xC0) != 0x80)
            .unwrap_or(self.bytes.len());
        String::from_utf8_lossy(&self.bytes[start..]).replace('\0', "\u{FFFD}")
    }
}

/// Counts output against the per-attempt cap.
#[derive(Debug, Clone)]
pub struct Budget {
    limit: u64,
    used: u64,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Budget {
        Budget { limit, used: 0 }
    }

    /// Takes up to `len` bytes from the budget; returns how many may be kept.
    pub fn take(&mut self, len: usize) -> usize {
        let left = self.limit.saturating_sub(self.used);
        let kept = (len as u64).min(left);
        self.used += kept;
        kept as usize
    }

    /// Whether any output was dropped or the cap is used up.
    pub fn exhausted(&self) -> bool {
        self.used >= self.limit
    }

    /// The cap.
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// Turns a pipe's bytes into event data: `{"text"}` while they are UTF-8 without NUL, else
/// `{"text", "base64", "binary": true}` (see the module doc). A character split between two
/// reads is held back until the next one, so text never turns binary by a chunk boundary.
#[derive(Default)]
pub struct OutputStream {
    carry: Vec<u8>,
    /// Something the stream carried was not text.
    pub binary: bool,
}

impl OutputStream {
    /// The data of the next event, or `None` when there is nothing to send yet. `at_end`
    /// flushes what was held back.
    pub fn event(&mut self, chunk: &[u8], at_end: bool) -> Option<Value> {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(chunk);
        if !at_end {
            let keep = incomplete_tail(&bytes);
            self.carry = bytes.split_off(bytes.len() - keep);
        }
        if bytes.is_empty() {
            return None;
        }
        match std::str::from_utf8(&bytes) {
            Ok(text) if !text.contains('\0') => Some(json!({ "text": text })),
            _ => {
                self.binary = true;
                let text = String::from_utf8_lossy(&bytes).replace('\0', "\u{FFFD}");
                Some(json!({
                    "text": text,
                    "base64": base64::engine::general_purpose::STANDARD.encode(&bytes),
                    "binary": true,
                }))
            }
        }
    }
}

/// How many bytes at the end of `bytes` start a UTF-8 character that is not complete yet.
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xC0 == 0x80 {
            continue;
        }
        let needs = match byte {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        return if needs > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::bounds;

    fn reassemble(events: &[Value]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            match e.get("base64").and_then(Value::as_str) {
                Some(b64) => out.extend(
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .unwrap(),
                ),
                None => out.extend(e["text"].as_str().unwrap().as_bytes()),
            }
        }
        out
    }

    #[test]
    fn output_round_trips_byte_for_byte_and_text_stays_text() {
        let bytes: Vec<u8> = "héllo wörld €\n".bytes().chain([0u8, 0xff, b'x']).collect();
        // Cut at every position, so characters split between reads.
        for cut in 0..bytes.len() {
            let mut stream = OutputStream::default();
            let mut events = Vec::new();
            events.extend(stream.event(&bytes[..cut], false));
            events.extend(stream.event(&bytes[cut..], false));
            events.extend(stream.event(&[], true));
            assert_eq!(reassemble(&events), bytes, "cut at {cut}");
            for e in &events {
                assert_eq!(bounds::nul_path(e), None, "{e}");
            }
            assert!(stream.binary);
        }
        let mut stream = OutputStream::default();
        let text = "€uro".as_bytes();
        let first = stream.event(&text[..2], false);
        assert_eq!(first, None, "half a character waits for the rest");
        let second = stream.event(&text[2..], false).unwrap();
        assert_eq!(second, json!({"text": "€uro"}));
        assert!(!stream.binary);
    }

    #[test]
    fn a_tail_keeps_only_the_last_bytes() {
        let mut tail = Tail::new(5);
        tail.push(b"hello ");
        tail.push(b"world");
        assert_eq!(tail.text(), "world");
        tail.push(b"!");
        assert_eq!(tail.text(), "orld!");
        tail.push(b"0123456789");
        assert_eq!(tail.text(), "56789");
    }

    #[test]
    fn a_tail_replaces_nul_and_invalid_bytes() {
        let mut tail = Tail::new(16);
        tail.push(b"a\0b\xffc");
        assert_eq!(tail.text(), "a\u{FFFD}b\u{FFFD}c");
    }

    #[test]
    fn a_tail_never_starts_inside_a_character() {
        let mut tail = Tail::new(4);
        tail.push("aé€".as_bytes()); // 1 + 2 + 3 bytes; the last 4 cut é in half
        assert_eq!(tail.text(), "€");
    }

    #[test]
    fn the_budget_caps_output_and_reports_exhaustion() {
        let mut budget = Budget::new(10);
        assert_eq!(budget.take(4), 4);
        assert!(!budget.exhausted());
        assert_eq!(budget.take(10), 6);
        assert!(budget.exhausted());
        assert_eq!(budget.take(3), 0);
    }
}
