//! [`ConfirmGate`]: lets an external consumer hold back what the source confirms.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use pgcachewatch_core::Lsn;
use tokio::sync::Notify;

/// The positions the task confirms from: what it emitted, and what each gate applied.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Everything committed before it has been emitted (0 = nothing yet).
    emitted: AtomicU64,
    /// The position last confirmed to the server.
    confirmed: AtomicU64,
    next_id: AtomicU64,
    gates: Mutex<HashMap<u64, Lsn>>,
    /// Wakes the task when a gate moves or goes.
    pub(crate) changed: Notify,
}

impl Progress {
    pub(crate) fn emitted(&self) -> Lsn {
        Lsn(self.emitted.load(Ordering::Acquire))
    }

    pub(crate) fn set_emitted(&self, lsn: Lsn) {
        self.emitted.fetch_max(lsn.0, Ordering::AcqRel);
    }

    pub(crate) fn confirmed(&self) -> Option<Lsn> {
        Some(Lsn(self.confirmed.load(Ordering::Acquire))).filter(|l| l.0 > 0)
    }

    /// What may be confirmed now: the emitted position, held back by the
    /// slowest gate; never below what was confirmed already. Records it.
    pub(crate) fn advance(&self) -> Lsn {
        let mut target = self.emitted();
        if let Some(slowest) = self.gates.lock().values().min() {
            target = target.min(*slowest);
        }
        let before = self.confirmed.fetch_max(target.0, Ordering::AcqRel);
        Lsn(before.max(target.0))
    }
}

/// Reports what an external consumer (a relay to another system) has durably
/// applied; from [`PgReplicationSource::confirm_gate`](super::PgReplicationSource::confirm_gate).
///
/// While any gate is alive, the source confirms to the server (lets the slot
/// free WAL, and resumes after a restart from) the minimum of every gate's
/// applied position and what it has emitted. A new gate starts at the position
/// confirmed so far. Dropping a gate releases its hold.
///
/// ```no_run
/// # async fn run(source: pgcachewatch_backends::replication::PgReplicationSource) {
/// use pgcachewatch_core::{EventSource, Signal};
/// let gate = source.confirm_gate();
/// let mut sub = source.subscribe();
/// while let Some(signal) = sub.recv().await {
///     if let Signal::Event(e) = signal {
///         // … write `e` somewhere durable …
///         if let Some(lsn) = e.lsn {
///             gate.applied(lsn);
///         }
///     }
/// }
/// # }
/// ```
pub struct ConfirmGate {
    id: u64,
    progress: Arc<Progress>,
    /// Dropping it keeps its hold (a durable consumer that is gone must not
    /// let the source confirm what it never stored).
    sticky: bool,
}

impl fmt::Debug for ConfirmGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfirmGate")
            .field("applied", &self.position())
            .finish()
    }
}

impl ConfirmGate {
    pub(crate) fn new(progress: Arc<Progress>) -> Self {
        Self::with_hold(progress, false)
    }

    fn with_hold(progress: Arc<Progress>, sticky: bool) -> Self {
        let id = progress.next_id.fetch_add(1, Ordering::Relaxed);
        let start = progress.confirmed().unwrap_or(Lsn::ZERO);
        progress.gates.lock().insert(id, start);
        ConfirmGate {
            id,
            progress,
            sticky,
        }
    }

    /// A gate whose hold outlives it: once dropped, the source confirms no
    /// further than its last report for as long as the source runs.
    pub(crate) fn new_sticky(progress: Arc<Progress>) -> Self {
        Self::with_hold(progress, true)
    }

    /// Everything up to `lsn` (an [`Event::lsn`](pgcachewatch_core::Event::lsn) or a
    /// [`Signal::Progress`](pgcachewatch_core::Signal::Progress) position) is applied
    /// durably. A lower position than before is ignored.
    pub fn applied(&self, lsn: Lsn) {
        if let Some(at) = self.progress.gates.lock().get_mut(&self.id) {
            *at = (*at).max(lsn);
        }
        self.progress.changed.notify_one();
    }

    /// The position this gate reported last.
    pub fn position(&self) -> Lsn {
        self.progress
            .gates
            .lock()
            .get(&self.id)
            .copied()
            .unwrap_or_default()
    }
}

impl Drop for ConfirmGate {
    fn drop(&mut self) {
        if self.sticky {
            return;
        }
        self.progress.gates.lock().remove(&self.id);
        self.progress.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slowest_gate_holds_back_and_dropping_releases() {
        let p = Arc::new(Progress::default());
        p.set_emitted(Lsn(100));
        assert_eq!(p.advance(), Lsn(100));
        let a = ConfirmGate::new(p.clone());
        let b = ConfirmGate::new(p.clone());
        assert_eq!(a.position(), Lsn(100));
        p.set_emitted(Lsn(300));
        assert_eq!(p.advance(), Lsn(100));
        a.applied(Lsn(250));
        b.applied(Lsn(200));
        assert_eq!(p.advance(), Lsn(200));
        b.applied(Lsn(150)); // ignored: lower
        assert_eq!(b.position(), Lsn(200));
        drop(b);
        assert_eq!(p.advance(), Lsn(250));
        drop(a);
        assert_eq!(p.advance(), Lsn(300));
        // Never backwards.
        let _c = ConfirmGate::new(p.clone());
        assert_eq!(p.advance(), Lsn(300));
    }

    #[test]
    fn a_sticky_gate_keeps_its_hold_after_it_is_dropped() {
        let p = Arc::new(Progress::default());
        let durable = ConfirmGate::new_sticky(p.clone());
        p.set_emitted(Lsn(500));
        assert_eq!(p.advance(), Lsn::ZERO, "nothing reported yet");
        durable.applied(Lsn(200));
        assert_eq!(p.advance(), Lsn(200));
        drop(durable);
        p.set_emitted(Lsn(900));
        assert_eq!(p.advance(), Lsn(200), "the consumer is gone: no further");
    }
}
