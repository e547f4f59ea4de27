//! The relay's messages: a documented, versioned contract (version 2).
//!
//! Every message the relay publishes is one JSON object: the contract's
//! version `v`, the relay's `epoch`, and one signal in the form the event log
//! shares ([`SignalRecord`], one definition for both): exactly one of
//! `event`, `gap`, `health` (a heartbeat), `progress`.
//!
//! ```text
//! {"v":2,"epoch":"pg:7312…/slot:pgcachewatch/5f0c…","gap":{"reason":"injected","detail":"relay started"}}
//! {"v":2,"epoch":"pg:7312…/slot:pgcachewatch/5f0c…","progress":"0/234CD68","progress_u64":36983144}
//! {"v":2,"epoch":"pg:7312…/slot:pgcachewatch/5f0c…","event":{"slot":"pgcachewatch","operation":"update","schema":"public","table":"users","received_at":"2025-01-01T12:00:00.001520Z","keys":[{"id":7}],"xid32":741,"lsn":"0/234CE00","lsn_u64":36983296}}
//! {"v":2,"epoch":"pg:7312…/slot:pgcachewatch/5f0c…","health":"healthy"}
//! ```
//!
//! * `v`: `2`. A reader refuses a higher version (a message without `v` is
//!   version 1, which also had `offset_us` and `n`: ignore them).
//! * `epoch`: changes whenever the relay lost continuity; a consumer that sees
//!   it change (or reads a `gap`) must assume anything changed. A relay over a
//!   replication slot names its epochs `<origin>/<random>`, where the origin
//!   names the database cluster and slot, and keeps its epoch across restarts
//!   that lost nothing.
//! * `event`: a table changed (fields: [`SignalRecord`]). Events with a
//!   position (`slot`, `lsn`, `lsn_u64`, `xid32`) come from a replication
//!   slot; events without (`channel`, `txid`) from `LISTEN`.
//! * `gap`: the epoch's first message, saying why continuity was lost.
//! * `health`: a heartbeat, every interval (1 s by default) and when the
//!   relay's source changes health. Only the latest is kept in the stream.
//! * `progress`: every event at or before this position is stored in the
//!   stream *before* this message. Only the latest per upstream is kept. A
//!   consumer that reads in stream order has seen every event up to it: that,
//!   and not an event's own position, is how far a read-your-writes wait may
//!   go (an event can be stored after later ones when the relay published it
//!   again after a failure).
//!
//! Order and loss are read from JetStream, not from the payload: messages are
//! read in stream-sequence order; a consumer whose next sequence the stream no
//! longer holds (its limits discarded it) has missed messages. Unknown fields
//! are ignored: a later minor version may add some.
//!
//! The JSON Schema is `docs/wire/relay-message.schema.json` in the repository,
//! with a consumer in Python beside it.

use pgcachewatch_core::{EnvelopedRecord, Name, SignalRecord};
use serde::Serialize;

/// What one relay message says: the event log's record kinds, with a
/// heartbeat as a [`Health`](WireKind::Health) record.
pub use pgcachewatch_core::SignalRecord as WireKind;

/// The version of this contract the relay writes, and the highest it reads.
pub const WIRE_VERSION: u32 = 2;

/// One relay message: what it says, and the relay epoch it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct WireMessage {
    /// Changes whenever the relay loses continuity (a restart that lost
    /// something, an upstream gap, a lost stream). A [`Name`]: every message
    /// of an epoch shares its text.
    pub epoch: Name,
    /// The content.
    pub kind: WireKind,
}

#[derive(Serialize)]
struct WireOut<'a> {
    v: u32,
    epoch: &'a str,
    #[serde(flatten)]
    kind: &'a SignalRecord,
}

/// A payload that is not a relay message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Not JSON of the expected shape (exactly one of `event`, `gap`,
    /// `health`, `progress`, and an `epoch`).
    #[error("not a relay message: {0}")]
    Json(#[from] serde_json::Error),
    /// Written by a newer relay than this reader knows.
    #[error("relay message version {found}: this reader knows up to {WIRE_VERSION}")]
    Version {
        /// The version found.
        found: u64,
    },
}

impl WireMessage {
    /// The JSON payload.
    ///
    /// ```
    /// use pgcachewatch::nats::wire::{WireKind, WireMessage};
    /// use pgcachewatch::{Event, Operation};
    /// let m = WireMessage {
    ///     epoch: "e1".into(),
    ///     kind: WireKind::Event(Event::new("ch", Operation::Insert, "public", "users")),
    /// };
    /// let bytes = m.to_json();
    /// assert!(bytes.starts_with(br#"{"v":2,"epoch":"e1","event":{"channel":"ch""#));
    /// assert_eq!(WireMessage::from_json(&bytes)?, m);
    /// # Ok::<_, pgcachewatch::nats::wire::WireError>(())
    /// ```
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these types to a Vec cannot fail (string keys, no maps of
        // non-string keys); an empty payload would be rejected by consumers.
        serde_json::to_vec(&WireOut {
            v: WIRE_VERSION,
            epoch: &self.epoch,
            kind: &self.kind,
        })
        .unwrap_or_default()
    }

    /// Parses a payload (version 1, without `v`, included).
    ///
    /// # Errors
    ///
    /// [`WireError`] if it is not a relay message of a known version.
    pub fn from_json(bytes: &[u8]) -> Result<Self, WireError> {
        // One pass over the object (the envelope is read with the record). The
        // payload's UTF-8 is checked once, whole: reading from a `str`,
        // serde_json does not check each string again (from a byte slice it
        // does, at a sixth of the parse's cost).
        let text = std::str::from_utf8(bytes).map_err(|e| {
            WireError::Json(serde::de::Error::custom(format_args!(
                "not UTF-8 text: {e}"
            )))
        })?;
        let w: EnvelopedRecord = serde_json::from_str(text)?;
        match (w.version, w.epoch) {
            (Some(found), _) if found > u64::from(WIRE_VERSION) => {
                Err(WireError::Version { found })
            }
            (_, None) => Err(WireError::Json(serde::de::Error::missing_field("epoch"))),
            (_, Some(epoch)) => Ok(WireMessage {
                epoch,
                kind: w.record,
            }),
        }
    }
}

/// The header on a relay heartbeat holding when the relay sent it (Unix time
/// in milliseconds). A consumer judges a heartbeat's age by the later of this
/// and JetStream's store time: a heartbeat held up by a partition and stored
/// after healing is not fresh news. Optional: older relays do not send it.
pub const SENT_AT_HEADER: &str = "Pgcw-Sent-At";

#[cfg(test)]
mod tests {
    use super::*;
    use pgcachewatch_core::{Event, GapReason, Health, Lsn, Operation};

    #[test]
    fn every_kind_round_trips() {
        for kind in [
            WireKind::Gap(GapReason::Reconnected),
            WireKind::Gap(GapReason::Lagged { missed: 4 }),
            WireKind::Health(Health::Unhealthy),
            WireKind::Progress(Lsn(77)),
            WireKind::Event(
                Event::new("slot", Operation::Update, "public", "t")
                    .with_lsn(Lsn(0x1_0000_0000))
                    .with_txid(3),
            ),
        ] {
            let m = WireMessage {
                epoch: "x".into(),
                kind,
            };
            assert_eq!(WireMessage::from_json(&m.to_json()).unwrap(), m);
        }
        assert!(WireMessage::from_json(b"{\"v\":2,\"epoch\":\"e\"}").is_err());
        // The epoch is required.
        assert!(WireMessage::from_json(br#"{"v":2,"health":"healthy"}"#).is_err());
    }

    #[test]
    fn version_1_is_read_and_a_newer_version_refused() {
        let v1 = br#"{"offset_us":0,"health":"healthy","epoch":"e","n":2,"last_n":1}"#;
        assert_eq!(
            WireMessage::from_json(v1).unwrap().kind,
            WireKind::Health(Health::Healthy)
        );
        let v3 = br#"{"v":3,"epoch":"e","health":"healthy"}"#;
        assert!(matches!(
            WireMessage::from_json(v3),
            Err(WireError::Version { found: 3 })
        ));
    }

    #[test]
    fn bytes_that_are_not_utf8_are_a_clear_error() {
        let mut bad = br#"{"v":2,"epoch":"e","health":"healthy"}"#.to_vec();
        bad[13] = 0xff; // inside the epoch's text
        let err = WireMessage::from_json(&bad).unwrap_err();
        assert!(matches!(err, WireError::Json(_)), "{err:?}");
        assert!(err.to_string().contains("not UTF-8 text"), "{err}");
        // Text outside strings, and escapes inside them, read as before.
        let ok = br#" { "v" : 2, "epoch" : "\u00e9", "health" : "healthy" } "#;
        assert_eq!(WireMessage::from_json(ok).unwrap().epoch, "\u{e9}");
    }
}
