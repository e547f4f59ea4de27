//! [`Flow`]: backpressure from a durable consumer to the slot.
//!
//! A durable consumer (a relay) reads its subscription from its own task. Were
//! the source to read the slot at full speed while that consumer cannot keep
//! up (NATS unreachable for a while, a slow JetStream), the consumer's buffer
//! would overflow, and it would get a `Lagged` gap for events the slot still
//! held: a loss that did not have to be. So the source counts the signals it
//! emits, the durable subscription counts those it hands out, and the source
//! stops reading the slot (and publishing held transactions) while more than
//! a window (half the buffer) is unread. Nothing is confirmed meanwhile beyond
//! what the consumer reported through its gate: the slot keeps the rest, and
//! reading resumes once the consumer catches up. A consumer that is gone (its
//! subscription dropped) holds nothing back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use pgcachewatch_core::{Signal, Subscription};
use tokio::sync::Notify;

/// Signals emitted by the source and read by the durable subscription.
#[derive(Debug)]
pub(crate) struct Flow {
    /// Emitted into the hub since the durable subscription was made (counted
    /// by an inline handler, so every signal subscribers get).
    emitted: AtomicU64,
    /// Handed out by the durable subscription.
    consumed: AtomicU64,
    /// How many may be unread before the source stops reading.
    window: u64,
    /// The durable subscription is gone: nothing to wait for.
    closed: AtomicBool,
    /// The source is waiting for room.
    waiting: AtomicBool,
    /// Wakes the source when the consumer read something while it waited.
    room: Notify,
}

impl Flow {
    /// A flow over a buffer of `capacity` signals: the window is half of it,
    /// leaving the other half for what one step emits past the window (a
    /// transaction's events, health changes).
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Flow {
            emitted: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            window: (capacity as u64 / 2).max(1),
            closed: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            room: Notify::new(),
        })
    }

    /// Counts one emitted signal (the hub's inline handler).
    pub(crate) fn emitted(&self) {
        self.emitted.fetch_add(1, Ordering::AcqRel);
    }

    /// Signals emitted and not yet read by the durable consumer.
    pub(crate) fn unread(&self) -> u64 {
        self.emitted
            .load(Ordering::Acquire)
            .saturating_sub(self.consumed.load(Ordering::Acquire))
    }

    /// Whether the source may read and publish more.
    pub(crate) fn has_room(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.unread() < self.window
    }

    /// Waits until [`has_room`](Self::has_room) (the consumer read enough, or
    /// is gone).
    pub(crate) async fn wait_room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waiting.store(true, Ordering::Release);
            if self.has_room() {
                self.waiting.store(false, Ordering::Release);
                return;
            }
            notified.await;
        }
    }

    fn consumed(&self) {
        self.consumed.fetch_add(1, Ordering::AcqRel);
        // Wake the source once half the window is free again, not per signal.
        if self.waiting.load(Ordering::Acquire) && self.unread() <= self.window / 2 {
            self.waiting.store(false, Ordering::Release);
            self.room.notify_one();
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.room.notify_one();
    }

    /// `subscription`, counting what it hands out into this flow; dropping it
    /// releases the source.
    pub(crate) fn counted(self: &Arc<Self>, subscription: Subscription) -> Subscription {
        // The stream owns the release (a guard set later would replace one
        // set here).
        let release = Release(self.clone());
        let stream = subscription.into_stream().inspect(move |_: &Signal| {
            release.0.consumed();
        });
        Subscription::from_stream(stream)
    }
}

/// Releases the source when the durable subscription is dropped.
struct Release(Arc<Flow>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pgcachewatch_core::{GapReason, Health, SignalHub};

    use super::*;

    #[tokio::test]
    async fn the_source_waits_while_the_consumer_is_a_window_behind() {
        let hub = SignalHub::with_health(8, Health::Healthy);
        let flow = Flow::new(8);
        let mut sub = flow.counted(hub.subscribe());
        let counter = flow.clone();
        let _attached = hub.attach_inline(Box::new(move |_: &Signal| counter.emitted()));
        // The subscription's first signal (health) balances the handler's
        // first call.
        assert!(flow.has_room());
        for _ in 0..4 {
            hub.gap(GapReason::Reconnected);
        }
        assert!(!flow.has_room(), "4 unread of a window of 4");
        let waiter = tokio::spawn({
            let flow = flow.clone();
            async move { flow.wait_room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        for _ in 0..3 {
            sub.recv().await.expect("a signal");
        }
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken once half the window is free")
            .expect("no panic");
        assert!(flow.has_room());
        // No lag: nothing was lost.
        while let Ok(s) = sub.try_recv() {
            assert!(matches!(s, Signal::Gap(GapReason::Reconnected)), "{s:?}");
        }
    }

    #[tokio::test]
    async fn a_dropped_consumer_holds_nothing_back() {
        let hub = SignalHub::with_health(8, Health::Healthy);
        let flow = Flow::new(8);
        // A guard set afterwards (the source's keep-alive) must not release it.
        let sub = flow.counted(hub.subscribe()).with_guard(());
        let counter = flow.clone();
        let _attached = hub.attach_inline(Box::new(move |_: &Signal| counter.emitted()));
        for _ in 0..6 {
            hub.gap(GapReason::Reconnected);
        }
        assert!(!flow.has_room());
        drop(sub);
        assert!(flow.has_room());
        tokio::time::timeout(Duration::from_secs(5), flow.wait_room())
            .await
            .expect("no wait");
    }
}
