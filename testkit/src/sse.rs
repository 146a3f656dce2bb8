//! A Server-Sent Events client over the real HTTP stack, for the live event streams: it
//! reads the body as it arrives and splits it into events and comments.

use std::time::Duration;

use serde_json::Value;

/// One event of a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// `id:`; terminal events have none.
    pub id: Option<i64>,
    /// `event:`.
    pub kind: String,
    /// `data:`, parsed.
    pub data: Value,
}

/// What the reader met next.
#[derive(Debug, Clone, PartialEq)]
pub enum SseItem {
    Event(SseEvent),
    /// A `:` line (keep-alive).
    Comment(String),
    /// The server ended the stream.
    End,
}

/// An open stream.
pub struct SseStream {
    response: reqwest::Response,
    buffer: String,
    ended: bool,
}

impl SseStream {
    /// GETs `url` with `token`, and `Last-Event-ID` when given. Errors with the status and
    /// body when the answer is not a stream.
    pub async fn open(
        http: &reqwest::Client,
        url: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> Result<SseStream, (u16, Value)> {
        let mut request = http.get(url).bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status().as_u16();
        let is_stream = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if status != 200 || !is_stream {
            let bytes = response.bytes().await.unwrap_or_default();
            let body = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
            return Err((status, body));
        }
        Ok(SseStream {
            response,
            buffer: String::new(),
            ended: false,
        })
    }

    /// The next event, comment or end, within `timeout` (panics past it).
    pub async fn next(&mut self, timeout: Duration) -> SseItem {
        tokio::time::timeout(timeout, self.next_item())
            .await
            .unwrap_or_else(|_| panic!("no event within {timeout:?}"))
    }

    /// The next event (comments skipped), or `None` at the end of the stream.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<SseEvent> {
        loop {
            match self.next(timeout).await {
                SseItem::Event(event) => return Some(event),
                SseItem::Comment(_) => continue,
                SseItem::End => return None,
            }
        }
    }

    /// Every event up to the end of the stream.
    pub async fn until_end(&mut self, timeout: Duration) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next_event(timeout).await {
            events.push(event);
        }
        events
    }

    async fn next_item(&mut self) -> SseItem {
        loop {
            if let Some(at) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..at + 2).collect();
                if let Some(item) = parse_block(&block) {
                    return item;
                }
                continue;
            }
            if self.ended {
                return SseItem::End;
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(None) | Err(_) => self.ended = true,
            }
        }
    }
}

fn parse_block(block: &str) -> Option<SseItem> {
    let (mut id, mut kind, mut data, mut comment) = (None, None, Vec::new(), None);
    for line in block.lines() {
        if let Some(text) = line.strip_prefix(':') {
            comment = Some(text.trim().to_string());
        } else if let Some(value) = line.strip_prefix("id: ") {
            id = Some(value.parse().expect("numeric id"));
        } else if let Some(value) = line.strip_prefix("event: ") {
            kind = Some(value.to_string());
        } else if let Some(value) = line.strip_prefix("data: ") {
            data.push(value);
        }
    }
    match (kind, comment) {
        (Some(kind), _) => Some(SseItem::Event(SseEvent {
            id,
            kind,
            data: serde_json::from_str(&data.join("\n")).expect("data is JSON"),
        })),
        (None, Some(comment)) => Some(SseItem::Comment(comment)),
        // `retry:` alone.
        (None, None) => None,
    }
}
