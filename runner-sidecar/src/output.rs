//! Bounded handling of a tool's output: a per-attempt byte cap and the tails kept for the
//! result, so a tool printing forever cannot grow the sidecar's memory.

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

#[cfg(test)]
mod tests {
    use super::*;

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
