//! The relay's message payloads: event-log records with the relay's epoch.
//!
//! Every payload is one JSON object in the form of a line of pgcachewatch's
//! event log (`offset_us` plus exactly one of `event`, `gap`, `health`,
//! `progress`; see the testkit's `eventlog` module), with two more fields: the
//! relay's `epoch` and `n`, the message's number within that epoch. A heartbeat is a
//! `health` record and also carries `last_n`, the number of the last message the relay
//! published before it.
//!
//! ```text
//! {"offset_us":0,"gap":{"reason":"injected","detail":"relay started"},"epoch":"5f0c…","n":0}
//! {"offset_us":1520,"event":{"channel":"pgcachewatch","operation":"update","schema":"public","table":"users","received_at":"…"},"epoch":"5f0c…","n":1}
//! {"offset_us":1000000,"health":"healthy","epoch":"5f0c…","n":2,"last_n":1}
//! ```

use pgcachewatch_core::{Event, GapReason, Health, Lsn};
use serde::{Deserialize, Serialize};

/// What one relay message says.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum WireKind {
    /// A table changed.
    Event(Event),
    /// The relay lost continuity: consumers must assume anything changed.
    Gap(GapReason),
    /// A heartbeat: the relay's upstream health and its last message number.
    Heartbeat {
        /// Whether the relay's upstream is listening.
        health: Health,
        /// The number (`n`) of the last message published before this one.
        last_n: u64,
    },
    /// Every change committed before this position has been published.
    Progress(Lsn),
}

/// One relay message: what it says, the relay epoch and its number in the epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct WireMessage {
    /// Changes whenever the relay loses continuity (a restart, an upstream gap).
    pub epoch: String,
    /// The message's number within its epoch (0 is the epoch's gap marker).
    pub n: u64,
    /// Microseconds since the epoch started.
    pub offset_us: u64,
    /// The content.
    pub kind: WireKind,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    offset_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event: Option<Event>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gap: Option<WireGap>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    health: Option<WireHealth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    progress: Option<Lsn>,
    epoch: String,
    n: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_n: Option<u64>,
}

/// A gap reason as the event log writes it.
#[derive(Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
enum WireGap {
    Lagged { missed: u64 },
    ConnectionLost { detail: String },
    HeartbeatTimeout,
    Reconnected,
    MalformedPayload,
    Injected { detail: String },
    Other { detail: String },
}

#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum WireHealth {
    Healthy,
    Unhealthy,
}

impl From<&GapReason> for WireGap {
    fn from(r: &GapReason) -> Self {
        match r {
            GapReason::Lagged { missed } => WireGap::Lagged { missed: *missed },
            GapReason::ConnectionLost { detail } => WireGap::ConnectionLost {
                detail: detail.to_string(),
            },
            GapReason::HeartbeatTimeout => WireGap::HeartbeatTimeout,
            GapReason::Reconnected => WireGap::Reconnected,
            GapReason::MalformedPayload => WireGap::MalformedPayload,
            GapReason::Injected { detail } => WireGap::Injected {
                detail: detail.to_string(),
            },
            other => WireGap::Other {
                detail: other.to_string(),
            },
        }
    }
}

impl From<WireGap> for GapReason {
    fn from(w: WireGap) -> Self {
        match w {
            WireGap::Lagged { missed } => GapReason::Lagged { missed },
            WireGap::ConnectionLost { detail } => GapReason::ConnectionLost {
                detail: detail.into(),
            },
            WireGap::HeartbeatTimeout => GapReason::HeartbeatTimeout,
            WireGap::Reconnected => GapReason::Reconnected,
            WireGap::MalformedPayload => GapReason::MalformedPayload,
            WireGap::Injected { detail } | WireGap::Other { detail } => GapReason::Injected {
                detail: detail.into(),
            },
        }
    }
}

/// A payload that is not a relay message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Not JSON of the expected shape.
    #[error("not a relay message: {0}")]
    Json(#[from] serde_json::Error),
    /// Not exactly one of `event`, `gap`, `health`, `progress`.
    #[error("a relay message has exactly one of `event`, `gap`, `health`, `progress`")]
    Kind,
}

impl WireMessage {
    /// The JSON payload.
    ///
    /// ```
    /// use pgcachewatch::nats::wire::{WireKind, WireMessage};
    /// use pgcachewatch::{Event, Operation};
    /// let m = WireMessage {
    ///     epoch: "e1".into(),
    ///     n: 3,
    ///     offset_us: 10,
    ///     kind: WireKind::Event(Event::new("ch", Operation::Insert, "public", "users")),
    /// };
    /// let bytes = m.to_json();
    /// assert_eq!(WireMessage::from_json(&bytes)?, m);
    /// # Ok::<_, pgcachewatch::nats::wire::WireError>(())
    /// ```
    pub fn to_json(&self) -> Vec<u8> {
        let mut wire = Wire {
            offset_us: self.offset_us,
            event: None,
            gap: None,
            health: None,
            progress: None,
            epoch: self.epoch.clone(),
            n: self.n,
            last_n: None,
        };
        match &self.kind {
            WireKind::Event(e) => wire.event = Some(e.clone()),
            WireKind::Gap(g) => wire.gap = Some(g.into()),
            WireKind::Heartbeat { health, last_n } => {
                wire.health = Some(if health.is_healthy() {
                    WireHealth::Healthy
                } else {
                    WireHealth::Unhealthy
                });
                wire.last_n = Some(*last_n);
            }
            WireKind::Progress(lsn) => wire.progress = Some(*lsn),
        }
        // Serializing these types to a Vec cannot fail (string keys, no maps of
        // non-string keys); an empty payload would be rejected by consumers.
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// Parses a payload.
    ///
    /// # Errors
    ///
    /// [`WireError`] if it is not a relay message.
    pub fn from_json(bytes: &[u8]) -> Result<Self, WireError> {
        let w: Wire = serde_json::from_slice(bytes)?;
        let kind = match (w.event, w.gap, w.health, w.progress) {
            (Some(e), None, None, None) => WireKind::Event(e),
            (None, Some(g), None, None) => WireKind::Gap(g.into()),
            (None, None, Some(h), None) => WireKind::Heartbeat {
                health: match h {
                    WireHealth::Healthy => Health::Healthy,
                    WireHealth::Unhealthy => Health::Unhealthy,
                },
                last_n: w.last_n.unwrap_or_default(),
            },
            (None, None, None, Some(lsn)) => WireKind::Progress(lsn),
            _ => return Err(WireError::Kind),
        };
        Ok(WireMessage {
            epoch: w.epoch,
            n: w.n,
            offset_us: w.offset_us,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        for kind in [
            WireKind::Gap(GapReason::Reconnected),
            WireKind::Gap(GapReason::Lagged { missed: 4 }),
            WireKind::Heartbeat {
                health: Health::Unhealthy,
                last_n: 9,
            },
            WireKind::Progress(Lsn(77)),
        ] {
            let m = WireMessage {
                epoch: "x".into(),
                n: 1,
                offset_us: 2,
                kind,
            };
            assert_eq!(WireMessage::from_json(&m.to_json()).unwrap(), m);
        }
        assert!(WireMessage::from_json(b"{\"offset_us\":0,\"epoch\":\"e\",\"n\":0}").is_err());
    }
}
