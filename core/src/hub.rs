//! [`SignalHub`]: the bounded fan-out every built-in source uses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::event::Event;
use crate::signal::{GapReason, Health, Signal};
use crate::source::Subscription;

/// The default per-subscriber buffer, in signals.
pub const DEFAULT_HUB_CAPACITY: usize = 4096;

/// Bounded broadcast of [`Signal`]s plus the source's current [`Health`].
///
/// A source owns one hub, publishes into it, and hands out
/// [`subscribe`](SignalHub::subscribe)d [`Subscription`]s. It implements the
/// fan-out half of the [`EventSource`](crate::EventSource) contract: every
/// subscriber sees every signal; one that falls more than `capacity` signals
/// behind gets a [`GapReason::Lagged`] gap instead of what it missed; nothing
/// is buffered while nobody subscribes. Cloning a hub gives another handle to
/// the same hub.
///
/// ```
/// use pgcachewatch_core::{Event, Operation, Signal, SignalHub};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let hub = SignalHub::new(2);
/// let mut a = hub.subscribe();
/// let mut b = hub.subscribe();
/// hub.publish(Event::new("ch", Operation::Insert, "public", "t"));
/// for sub in [&mut a, &mut b] {
///     assert!(matches!(sub.recv().await, Some(Signal::Health(_))));
///     assert_eq!(sub.recv().await.unwrap().as_event().unwrap().table, "t");
/// }
/// // `a` falls behind a buffer of 2: it sees a gap, not silence.
/// for _ in 0..5 { hub.publish(Event::new("ch", Operation::Insert, "public", "t")); }
/// assert!(a.recv().await.unwrap().is_gap());
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct SignalHub {
    tx: broadcast::Sender<Signal>,
    healthy: Arc<AtomicBool>,
}

impl SignalHub {
    /// A healthy hub whose subscribers may fall `capacity` signals behind before they
    /// get a gap. A capacity of 0 is raised to 1.
    pub fn new(capacity: usize) -> Self {
        Self::with_health(capacity, Health::Healthy)
    }

    /// A hub that starts with the given health (a network source starts unhealthy
    /// and turns healthy once it listens).
    pub fn with_health(capacity: usize, health: Health) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        SignalHub {
            tx,
            healthy: Arc::new(AtomicBool::new(health.is_healthy())),
        }
    }

    /// A new subscription; its first signal is the current health.
    pub fn subscribe(&self) -> Subscription {
        let rx = self.tx.subscribe();
        Subscription::from_hub(Signal::Health(self.health()), rx)
    }

    /// The current health.
    pub fn health(&self) -> Health {
        if self.healthy.load(Ordering::Acquire) {
            Health::Healthy
        } else {
            Health::Unhealthy
        }
    }

    /// Publishes an event to every subscriber.
    pub fn publish(&self, event: Event) {
        self.send(Signal::Event(Arc::new(event)));
    }

    /// Publishes any signal. Prefer [`set_health`](Self::set_health) for health
    /// changes, so that [`health`](Self::health) stays in step.
    pub fn send(&self, signal: Signal) {
        // An error only means nobody subscribes right now: nothing to buffer.
        let _ = self.tx.send(signal);
    }

    /// Publishes a gap.
    pub fn gap(&self, reason: GapReason) {
        self.send(Signal::Gap(reason));
    }

    /// Records a health change and tells subscribers; does nothing if unchanged.
    pub fn set_health(&self, health: Health) {
        let was = self.healthy.swap(health.is_healthy(), Ordering::AcqRel);
        if was != health.is_healthy() {
            self.send(Signal::Health(health));
        }
    }

    /// How many subscriptions are alive.
    pub fn subscriber_count(&self) -> usize {
        self.tx.receiver_count()
    }
}
