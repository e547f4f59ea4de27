//! What an [`EventSource`](crate::EventSource) tells its subscribers.

use std::fmt;
use std::sync::Arc;

use crate::event::Event;
use crate::position::Lsn;

/// One item of a [`Subscription`](crate::Subscription): an event, a gap, or a health change.
///
/// Every subscriber of a source sees every signal, in the order the source emitted them.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Signal {
    /// A table changed.
    Event(Arc<Event>),
    /// Events may have been lost: whoever caches must assume anything changed.
    Gap(GapReason),
    /// The source became healthy (listening; events will arrive) or unhealthy
    /// (not listening; writes may go unnoticed until the next `Gap` + `Healthy`).
    Health(Health),
    /// Sent by a lossless source (one whose events carry an [`Lsn`]): every change
    /// committed before this position has now been emitted. It moves a
    /// dispatcher's applied position forward while the watched tables are quiet,
    /// so a read-your-writes wait for a position ends even when the write itself
    /// produced no event. Strategies never see it.
    Progress(Lsn),
}

impl Signal {
    /// The event, if this signal is one.
    pub fn as_event(&self) -> Option<&Event> {
        match self {
            Signal::Event(e) => Some(e),
            _ => None,
        }
    }

    /// Whether this signal is a gap.
    pub fn is_gap(&self) -> bool {
        matches!(self, Signal::Gap(_))
    }
}

impl From<Event> for Signal {
    fn from(e: Event) -> Self {
        Signal::Event(Arc::new(e))
    }
}

/// Why a [`Signal::Gap`] was emitted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GapReason {
    /// This subscriber fell behind the source's bounded buffer and `missed` signals were dropped.
    Lagged {
        /// How many signals the subscriber missed.
        missed: u64,
    },
    /// The connection to the database was lost; anything sent meanwhile is gone.
    ConnectionLost {
        /// What the driver said.
        detail: Arc<str>,
    },
    /// The heartbeat went unanswered: the connection is presumed half-open.
    HeartbeatTimeout,
    /// The source re-established its connection and is listening again; anything
    /// written while it was down went unnoticed.
    Reconnected,
    /// A payload could not be parsed and the source is configured to treat that as a gap.
    MalformedPayload,
    /// A lossless source's position in the database is gone (its replication
    /// slot was dropped, or the server removed WAL the slot still needed), so
    /// changes since it last confirmed a position are lost.
    SlotLost {
        /// What happened to the slot.
        detail: Arc<str>,
    },
    /// Injected by a test double or by the application.
    Injected {
        /// Free text for logs.
        detail: Arc<str>,
    },
}

impl fmt::Display for GapReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GapReason::Lagged { missed } => write!(f, "subscriber lagged, {missed} signals missed"),
            GapReason::ConnectionLost { detail } => write!(f, "connection lost: {detail}"),
            GapReason::HeartbeatTimeout => f.write_str("heartbeat timed out"),
            GapReason::Reconnected => f.write_str("reconnected"),
            GapReason::MalformedPayload => f.write_str("malformed payload"),
            GapReason::SlotLost { detail } => write!(f, "replication slot lost: {detail}"),
            GapReason::Injected { detail } => write!(f, "injected: {detail}"),
        }
    }
}

/// Whether a source is currently listening.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// Listening: every committed write on a watched table will arrive as an event.
    Healthy,
    /// Not listening: writes may be missed. Caches bypass (or serve within their bound).
    Unhealthy,
}

impl Health {
    /// `true` for [`Health::Healthy`].
    pub fn is_healthy(self) -> bool {
        matches!(self, Health::Healthy)
    }
}
