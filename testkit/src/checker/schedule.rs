//! The schedules the checker runs: writes, deliveries, faults and reads, in order.

use std::fmt;

#[cfg(doc)]
use super::SourceDelivery;

/// A row of the simulated table (`0..ROWS`).
pub type Row = u32;

/// How many rows the generated schedules touch.
pub const ROWS: Row = 3;

/// How many reads may be in progress at once in generated schedules.
pub const SLOTS: usize = 3;

/// How many sources feed the cache: row `r`'s notifications come from source
/// `r % SOURCES`, each through a dispatcher of its own (one cache on two sources).
pub const SOURCES: usize = 2;

/// A source (`0..SOURCES`).
pub type Source = usize;

/// One step of a [`Schedule`].
///
/// Steps that make no sense in the current state (delivering with nothing pending,
/// finishing a load nobody started) do nothing, so every sequence is a valid
/// schedule and proptest can shrink freely.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Commit a write to `row` (its version goes up by one) that is visible to new
    /// snapshots at once, and queue its notification, unless the source is
    /// disconnected (then it is lost, as with PostgreSQL). The same in every
    /// [`SourceDelivery`] mode: commit record and visibility in one step.
    ///
    /// If a write to `row` is in flight ([`Op::Commit`]), it becomes visible
    /// first: the second writer waited on the row lock, which its holder releases
    /// only once it has left the proc array.
    Write {
        /// The row written.
        row: Row,
    },
    /// Write the commit record of a write to `row` (its committed version goes up
    /// by one), which is **not yet visible**: loads (new snapshots) still read the
    /// previous version until [`Op::BecomeVisible`]. With
    /// [`SourceDelivery::AnnounceOnReceipt`] its notification is queued now (lost
    /// if the source is disconnected); with
    /// [`SourceDelivery::AnnounceWhenVisible`] it waits for the write to become
    /// visible.
    ///
    /// A write to `row` already in flight becomes visible first (see [`Op::Write`]).
    Commit {
        /// The row written.
        row: Row,
    },
    /// The write to `row` in flight ([`Op::Commit`]) becomes visible to new
    /// snapshots (its backend leaves the proc array); with
    /// [`SourceDelivery::AnnounceWhenVisible`] its notification is queued now.
    /// Nothing happens if no write to `row` is in flight.
    BecomeVisible {
        /// The row whose write becomes visible.
        row: Row,
    },
    /// Deliver every queued signal of every source, oldest first (shrinks better
    /// than several [`Op::Deliver`]s: removing a write elsewhere does not change what
    /// it delivers).
    DeliverAll,
    /// Deliver the oldest queued signal of `source` (to its dispatcher, if one runs).
    Deliver {
        /// The source.
        source: Source,
    },
    /// Deliver the oldest queued event of `source` but keep it queued: it arrives twice.
    Duplicate {
        /// The source.
        source: Source,
    },
    /// Lose the oldest queued event of `source`; a gap takes its place (real sources
    /// never lose silently).
    Lose {
        /// The source.
        source: Source,
    },
    /// `source`'s connection drops: `Unhealthy` and a gap are queued; its writes are
    /// lost until [`Op::Reconnect`].
    Disconnect {
        /// The source.
        source: Source,
    },
    /// `source` listens again: a gap and `Healthy` are queued.
    Reconnect {
        /// The source.
        source: Source,
    },
    /// `source`'s dispatcher stops (its handle is dropped); what the source
    /// delivers meanwhile reaches nobody.
    StopDispatcher {
        /// The source.
        source: Source,
    },
    /// A new dispatcher is attached to `source` (if none runs).
    Attach {
        /// The source.
        source: Source,
    },
    /// The strategy of `source`'s dispatcher panics on the next event it handles.
    PanicOnNext {
        /// The source.
        source: Source,
    },
    /// Reader `slot` starts reading `row` through the cache. A loader, if it runs,
    /// reads the table at once and then waits for [`Op::FinishLoad`].
    StartRead {
        /// The reader.
        slot: usize,
        /// The row read.
        row: Row,
    },
    /// Reader `slot`'s loader (if waiting) returns what it read.
    FinishLoad {
        /// The reader.
        slot: usize,
    },
    /// Reader `slot` gives up (its future is dropped).
    CancelRead {
        /// The reader.
        slot: usize,
    },
    /// Background work runs (with [`ModelChecker::refresh_on_invalidation`]):
    /// every refresh (and warming) the cache started and that has not read yet
    /// reads its row now, then waits for [`Op::FinishRefresh`]. Nothing happens
    /// without refreshes.
    ///
    /// [`ModelChecker::refresh_on_invalidation`]: super::ModelChecker::refresh_on_invalidation
    RunRefreshes,
    /// The oldest refresh that read its row returns what it read (and the
    /// background work runs, as [`Op::RunRefreshes`]).
    FinishRefresh,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Write { row } => write!(f, "write row {row}"),
            Op::Commit { row } => write!(f, "commit a write to row {row} (not yet visible)"),
            Op::BecomeVisible { row } => write!(f, "row {row}'s write becomes visible"),
            Op::DeliverAll => f.write_str("deliver every queued signal"),
            Op::Deliver { source } => write!(f, "deliver next signal of source {source}"),
            Op::Duplicate { source } => write!(f, "deliver next event of source {source} twice"),
            Op::Lose { source } => write!(f, "lose next event of source {source} (gap instead)"),
            Op::Disconnect { source } => write!(f, "source {source} disconnects"),
            Op::Reconnect { source } => write!(f, "source {source} reconnects"),
            Op::StopDispatcher { source } => write!(f, "the dispatcher of source {source} stops"),
            Op::Attach { source } => write!(f, "a dispatcher attaches to source {source}"),
            Op::PanicOnNext { source } => {
                write!(
                    f,
                    "the strategy of source {source} panics on its next event"
                )
            }
            Op::StartRead { slot, row } => write!(f, "reader {slot} starts reading row {row}"),
            Op::FinishLoad { slot } => write!(f, "reader {slot}'s load returns"),
            Op::CancelRead { slot } => write!(f, "reader {slot} cancels"),
            Op::RunRefreshes => f.write_str("background refreshes run"),
            Op::FinishRefresh => f.write_str("the oldest refresh returns"),
        }
    }
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A sequence of [`Op`]s. `Debug` prints one numbered line per step, so a shrunk
/// failing case reads as a short story.
///
/// ```
/// use pgcachewatch::testkit::checker::{Op, Schedule};
/// let s = Schedule::new(vec![Op::Write { row: 1 }, Op::Deliver { source: 1 }]);
/// assert_eq!(format!("{s:?}"), "\n  1: write row 1\n  2: deliver next signal of source 1\n");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Schedule {
    /// The steps, numbered from 1 in output.
    pub ops: Vec<Op>,
}

impl Schedule {
    /// A schedule of these steps.
    pub fn new(ops: Vec<Op>) -> Self {
        Schedule { ops }
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f)?;
        for (i, op) in self.ops.iter().enumerate() {
            writeln!(f, "  {}: {op}", i + 1)?;
        }
        Ok(())
    }
}

/// Proptest generation of schedules.
#[cfg(feature = "proptest")]
pub(crate) mod generate {
    use super::*;
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = Op> {
        let row = 0..ROWS;
        let slot = 0..SLOTS;
        let source = 0..SOURCES;
        // Simple, common steps first: proptest shrinks towards earlier alternatives.
        prop_oneof![
            4 => row.clone().prop_map(|row| Op::Write { row }),
            1 => Just(Op::DeliverAll),
            5 => source.clone().prop_map(|source| Op::Deliver { source }),
            5 => (slot.clone(), row.clone()).prop_map(|(slot, row)| Op::StartRead { slot, row }),
            4 => slot.clone().prop_map(|slot| Op::FinishLoad { slot }),
            // The visibility window: a commit whose visibility lags it by a few
            // steps, so deliveries and loads fall in between.
            2 => row.clone().prop_map(|row| Op::Commit { row }),
            2 => row.prop_map(|row| Op::BecomeVisible { row }),
            1 => source.clone().prop_map(|source| Op::Duplicate { source }),
            1 => source.clone().prop_map(|source| Op::Lose { source }),
            1 => source.clone().prop_map(|source| Op::Disconnect { source }),
            1 => source.clone().prop_map(|source| Op::Reconnect { source }),
            1 => slot.prop_map(|slot| Op::CancelRead { slot }),
            1 => source.clone().prop_map(|source| Op::StopDispatcher { source }),
            1 => source.clone().prop_map(|source| Op::Attach { source }),
            1 => source.prop_map(|source| Op::PanicOnNext { source }),
            // Refreshes (no-ops without them): read, then return later, with
            // writes and deliveries in between.
            2 => Just(Op::RunRefreshes),
            2 => Just(Op::FinishRefresh),
        ]
    }

    pub(crate) fn schedules(max_len: usize) -> impl Strategy<Value = Schedule> {
        proptest::collection::vec(op(), 1..=max_len.max(1)).prop_map(Schedule::new)
    }
}
