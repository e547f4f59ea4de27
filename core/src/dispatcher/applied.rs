//! What a dispatcher has applied, for read-your-writes waits.
//!
//! The applying side (inline handler or task) records each event's commit
//! position and transaction id with a few relaxed-cost atomic writes; waiters
//! are woken only when somebody waits. A waiter registers before it checks, and
//! the applier writes before it looks for waiters, so no wake-up is lost.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Notify;

use crate::position::Lsn;

/// How many recently applied transaction ids are remembered for
/// [`DispatcherHandle::wait_for_txid`](super::DispatcherHandle::wait_for_txid):
/// a waiter that starts after its transaction's event was applied still finds it
/// among the last this many.
pub(super) const TXID_MEMORY: usize = 4096;

/// The applied position, the recent transaction ids, and the waiters.
pub(super) struct Applied {
    lsn: AtomicU64,
    txids: Box<[AtomicI64]>,
    next_txid: AtomicUsize,
    stopped: AtomicBool,
    waiters: AtomicUsize,
    wake: Notify,
}

impl Default for Applied {
    fn default() -> Self {
        Applied {
            lsn: AtomicU64::new(0),
            // -1 is no transaction id (they are positive).
            txids: (0..TXID_MEMORY).map(|_| AtomicI64::new(-1)).collect(),
            next_txid: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            wake: Notify::new(),
        }
    }
}

impl Applied {
    /// Records an applied event's position and transaction.
    #[inline]
    pub(super) fn record(&self, lsn: Option<Lsn>, txid: Option<i64>) {
        if lsn.is_none() && txid.is_none() {
            return;
        }
        if let Some(lsn) = lsn {
            self.lsn.fetch_max(lsn.0, Ordering::SeqCst);
        }
        if let Some(txid) = txid {
            let slot = self.next_txid.fetch_add(1, Ordering::Relaxed) % TXID_MEMORY;
            self.txids[slot].store(txid, Ordering::SeqCst);
        }
        self.wake_waiters();
    }

    /// Records a position passed without an event (a source's progress mark).
    pub(super) fn progress(&self, lsn: Lsn) {
        self.lsn.fetch_max(lsn.0, Ordering::SeqCst);
        self.wake_waiters();
    }

    /// The dispatcher stopped: nothing will be applied any more.
    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    fn wake_waiters(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.wake.notify_waiters();
        }
    }

    /// The highest position applied, if any.
    pub(super) fn lsn(&self) -> Option<Lsn> {
        match self.lsn.load(Ordering::SeqCst) {
            0 => None,
            v => Some(Lsn(v)),
        }
    }

    fn has_txid(&self, txid: i64) -> bool {
        self.txids.iter().any(|t| t.load(Ordering::SeqCst) == txid)
    }

    /// Waits until `done` holds; `false` if the dispatcher stopped first.
    async fn wait_until(&self, done: impl Fn(&Self) -> bool) -> bool {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let _registered = Registered(&self.waiters);
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(self) {
                return true;
            }
            if self.stopped.load(Ordering::SeqCst) {
                return false;
            }
            notified.await;
        }
    }

    pub(super) async fn wait_for_lsn(&self, lsn: Lsn) -> bool {
        self.wait_until(|a| a.lsn.load(Ordering::SeqCst) >= lsn.0)
            .await
    }

    pub(super) async fn wait_for_txid(&self, txid: i64) -> bool {
        self.wait_until(|a| a.has_txid(txid)).await
    }
}

struct Registered<'a>(&'a AtomicUsize);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
