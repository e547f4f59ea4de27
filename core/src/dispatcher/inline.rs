//! Dispatching inline: in the source's own task, as each signal is emitted.
//!
//! The source calls the handler synchronously for every signal, so caches are
//! invalidated before any subscriber even sees the event: no hop to another task,
//! no lag, no buffer. Strategies with deadlines are fired by a small timer task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::shared::{CloseOnDrop, Shared};
use super::sleep_until;
use crate::signal::Signal;

/// The handler the source runs; closes the dispatcher when the source drops it.
pub(super) struct Handler {
    shared: Arc<Shared>,
    /// Set once the handler ran (the source accepted it).
    ran: AtomicBool,
}

impl Handler {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Handler {
            shared,
            ran: AtomicBool::new(false),
        }
    }

    #[inline]
    pub(super) fn on_signal(&mut self, signal: &Signal) {
        self.ran.store(true, Ordering::Relaxed);
        self.shared.apply(signal);
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        // A handler the source refused never ran: the dispatcher goes on without it.
        if self.ran.load(Ordering::Relaxed) {
            self.shared.close();
            tracing::debug!("inline dispatcher detached; its caches bypass from now on");
        }
    }
}

/// Fires deadlines until stopped or closed; closes the dispatcher when it ends.
pub(super) async fn timer(shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let _close = CloseOnDrop(shared.clone());
    loop {
        if shared.is_closed() {
            return;
        }
        let deadline = shared.arm();
        tokio::select! {
            biased;
            _ = &mut stop => return,
            _ = shared.rearmed() => {}
            _ = sleep_until(deadline) => shared.tick(),
        }
    }
}
