//! Dispatching inline: in the source's own task, as each signal is emitted.
//!
//! The source calls the handler synchronously for every signal, so caches are
//! invalidated before any subscriber even sees the event: no hop to another task,
//! no lag, no buffer. Strategies with deadlines are fired by a small timer task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

use super::binding::Bindings;
use super::sleep_until;
use crate::signal::Signal;

/// What the handler and the timer task share.
pub(super) struct Shared {
    pub(super) bindings: Mutex<Bindings>,
    /// The deadline the timer task sleeps until.
    armed: Mutex<Option<Instant>>,
    rearm: Notify,
    /// Set once the handler has run (it is attached); cleared never.
    attached: AtomicBool,
    /// Set when the handler is dropped: the source ended or it was detached.
    pub(super) closed: AtomicBool,
}

impl Shared {
    pub(super) fn new(bindings: Bindings) -> Arc<Self> {
        Arc::new(Shared {
            bindings: Mutex::new(bindings),
            armed: Mutex::new(None),
            rearm: Notify::new(),
            attached: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }
}

/// The handler the source runs; closes the bindings when the source drops it.
pub(super) struct Handler(pub(super) Arc<Shared>);

impl Handler {
    pub(super) fn on_signal(&mut self, signal: &Signal) {
        let shared = &*self.0;
        shared.attached.store(true, Ordering::Release);
        let deadline = {
            let mut b = shared.bindings.lock();
            b.apply(signal);
            b.deadline()
        };
        let mut armed = shared.armed.lock();
        if deadline.is_some() && (armed.is_none() || deadline < *armed) {
            *armed = deadline;
            shared.rearm.notify_one();
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        let shared = &*self.0;
        // A handler the source refused never ran: nothing to close.
        if shared.attached.load(Ordering::Acquire) {
            shared.bindings.lock().close();
            shared.closed.store(true, Ordering::Release);
            shared.rearm.notify_one();
            tracing::debug!("inline dispatcher detached; its caches bypass from now on");
        }
    }
}

/// Fires deadlines until stopped or closed.
pub(super) async fn timer(shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    loop {
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let deadline = {
            let d = shared.bindings.lock().deadline();
            *shared.armed.lock() = d;
            d
        };
        tokio::select! {
            biased;
            _ = &mut stop => return,
            _ = shared.rearm.notified() => {}
            _ = sleep_until(deadline) => shared.bindings.lock().tick(),
        }
    }
}
