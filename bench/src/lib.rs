//! Code the benchmark programs in `src/bin/` share.

use chrono::{DateTime, Utc};
use pgcachewatch::source_kit::{PayloadParser, SignalHub};
use pgcachewatch::Signal;

pub mod figures;

/// `n` payloads as a trigger sends them in a burst: one table, in
/// `json_build_object`'s layout, only `sent_at` (its fraction) and `txid`
/// differing, as `burst`'s transaction sends them.
pub fn burst_payloads(n: u64) -> Vec<String> {
    (1..=n)
        .map(|g| {
            format!(
                "{{\"operation\" : \"update\", \"schema\" : \"public\", \"table\" : \"burst\", \
                 \"sent_at\" : \"2026-11-25T11:00:00.{:06}+00:00\", \"txid\" : {g}}}",
                g % 1_000_000
            )
        })
        .collect()
}

/// The most notifications the listener reads, and publishes, at once.
pub const BATCH: usize = 256;

/// What the listener does with a batch of a burst once sqlx has decoded it,
/// first half: each payload parsed into `batch` (an event, or nothing for a
/// payload that is not one).
pub fn parse_batch(
    parser: &mut PayloadParser,
    payloads: &[String],
    received_at: DateTime<Utc>,
    batch: &mut Vec<Signal>,
) {
    for payload in payloads {
        if let Ok(event) = parser.parse_shared("ch", payload, received_at) {
            batch.push(Signal::Event(event));
        }
    }
}

/// Second half: `batch` emitted into `hub` (running its inline handlers) and
/// emptied, its events given back to `parser` when `recycle` (as the listener
/// does) or freed.
pub fn emit_batch(
    hub: &SignalHub,
    parser: &mut PayloadParser,
    batch: &mut Vec<Signal>,
    recycle: bool,
) {
    hub.send_batch(batch);
    for signal in batch.drain(..) {
        if let (true, Signal::Event(event)) = (recycle, signal) {
            parser.recycle(event);
        }
    }
}
