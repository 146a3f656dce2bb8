//! The attempt's event sink: events numbered in order and handed to the attempt's stream
//! (see `attempt::stream`), which sends them in batches.

use serde_json::Value;
use sluice_protocol::{bounds, Event, EventKind};
use tokio::sync::mpsc;

/// Numbers an attempt's events from 1 and queues them for its stream.
pub struct Events {
    tx: mpsc::Sender<Event>,
    next_seq: i64,
}

impl Events {
    /// A sink feeding `tx`, numbering from 1.
    pub fn new(tx: mpsc::Sender<Event>) -> Events {
        Events { tx, next_seq: 1 }
    }

    /// Queues an event, NUL characters replaced (Postgres stores none); `false` when the
    /// stream has ended (refused or given up on: the stream has stopped the attempt).
    pub async fn send(&mut self, kind: EventKind, mut data: Value) -> bool {
        bounds::scrub_nul(&mut data);
        let event = Event {
            seq: self.next_seq,
            kind,
            data,
        };
        self.next_seq += 1;
        self.tx.send(event).await.is_ok()
    }
}
