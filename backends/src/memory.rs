//! The in-memory event source and the handle that drives it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::keep_alive;
use pgcachewatch_core::{
    ClosableHub, Event, EventSource, GapReason, Health, InlineAttachment, InlineHandler, SignalHub,
    Subscription, DEFAULT_HUB_CAPACITY,
};

/// An [`EventSource`] fed by its [`InMemoryHandle`]: no database, same contract.
///
/// Built as a pair, like `tower-test`'s mock: the source goes to the code under
/// test, the handle stays with the test to publish events and inject faults.
///
/// Subscriptions and inline attachments (a spawned
/// [`Dispatcher`](pgcachewatch_core::Dispatcher)) keep the source's state alive,
/// so dropping the local `InMemorySource` after spawning changes nothing.
///
/// ```
/// use pgcachewatch::memory::InMemorySource;
/// use pgcachewatch::{Event, EventSource, Operation, Signal};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let (source, handle) = InMemorySource::pair();
/// let mut sub = source.subscribe();
/// handle.publish(Event::new("ch", Operation::Insert, "public", "users"));
/// handle.disconnect("test");            // Unhealthy + Gap
/// handle.publish(Event::new("ch", Operation::Update, "public", "users")); // lost, like PostgreSQL
/// handle.reconnect();                   // Gap + Healthy
/// let signals: Vec<Signal> = std::iter::from_fn(|| sub.try_recv().ok()).collect();
/// assert_eq!(signals.len(), 6); // Health, Event, Health, Gap, Gap, Health
/// assert_eq!(handle.lost(), 1);
/// # });
/// ```
#[derive(Debug, Clone)]
#[must_use = "an event source does nothing unless a Dispatcher is spawned on it or it is subscribed to"]
pub struct InMemorySource {
    shared: Arc<Shared>,
}

/// Drives an [`InMemorySource`]: publish, disconnect, reconnect, lose, close, observe.
#[derive(Debug, Clone)]
pub struct InMemoryHandle {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// `None` once closed: subscriptions end.
    hub: ClosableHub,
    published: AtomicU64,
    lost: AtomicU64,
    /// Events still to drop silently (an undetected loss, for checker tests).
    to_lose: AtomicU64,
}

impl InMemorySource {
    /// A healthy source and its handle, with the default buffer per subscriber.
    pub fn pair() -> (InMemorySource, InMemoryHandle) {
        Self::with_capacity(DEFAULT_HUB_CAPACITY)
    }

    /// A healthy source whose subscribers may fall `capacity` signals behind before
    /// they get a [`GapReason::Lagged`] gap.
    pub fn with_capacity(capacity: usize) -> (InMemorySource, InMemoryHandle) {
        let shared = Arc::new(Shared {
            hub: ClosableHub::new(SignalHub::new(capacity).with_label(LABEL)),
            published: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            to_lose: AtomicU64::new(0),
        });
        (
            InMemorySource {
                shared: shared.clone(),
            },
            InMemoryHandle { shared },
        )
    }
}

/// The `source` label of every in-memory source.
const LABEL: &str = "memory";

impl EventSource for InMemorySource {
    fn label(&self) -> String {
        LABEL.into()
    }

    /// A subscription that keeps the source's state alive while it exists.
    fn subscribe(&self) -> Subscription {
        keep_alive::subscription(self.shared.hub.subscribe(), self.shared.clone())
    }

    fn health(&self) -> Health {
        self.shared.hub.health()
    }

    /// The attachment keeps the source's state alive while it exists.
    fn attach_inline(&self, handler: InlineHandler) -> Option<InlineAttachment> {
        Some(keep_alive::attachment(
            self.shared.hub.attach_inline(handler),
            self.shared.clone(),
        ))
    }
}

impl InMemoryHandle {
    fn with_hub<R>(&self, f: impl FnOnce(&SignalHub) -> R) -> Option<R> {
        self.shared.hub.with(f)
    }

    /// Publishes an event to every subscriber. While disconnected (or after
    /// [`lose_next`](Self::lose_next)) the event is lost, as PostgreSQL loses
    /// notifications sent while nobody listens; returns whether it was delivered.
    pub fn publish(&self, event: Event) -> bool {
        self.shared.published.fetch_add(1, Ordering::Relaxed);
        let losing = self
            .shared
            .to_lose
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        let delivered = !losing
            && self
                .with_hub(|hub| {
                    let healthy = hub.health().is_healthy();
                    if healthy {
                        hub.publish(event);
                    }
                    healthy
                })
                .unwrap_or(false);
        if !delivered {
            self.shared.lost.fetch_add(1, Ordering::Relaxed);
        }
        delivered
    }

    /// The connection drops: subscribers see `Unhealthy`, then a
    /// [`GapReason::ConnectionLost`] gap. Events published until
    /// [`reconnect`](Self::reconnect) are lost.
    pub fn disconnect(&self, detail: &str) {
        self.with_hub(|hub| {
            hub.set_health(Health::Unhealthy);
            hub.gap(GapReason::ConnectionLost {
                detail: detail.into(),
            });
        });
    }

    /// Listening again: a [`GapReason::Reconnected`] gap, then `Healthy`.
    pub fn reconnect(&self) {
        self.with_hub(|hub| {
            hub.gap(GapReason::Reconnected);
            hub.set_health(Health::Healthy);
        });
    }

    /// Emits a gap without any health change (a lagging upstream, a bad payload).
    pub fn gap(&self, reason: GapReason) {
        self.with_hub(|hub| hub.gap(reason));
    }

    /// Silently drops the next `n` published events with no gap: an *undetected*
    /// loss, which no correct source produces. For showing what such a loss does to
    /// a cache (the staleness checker's planted faults).
    pub fn lose_next(&self, n: u64) {
        self.shared.to_lose.fetch_add(n, Ordering::AcqRel);
    }

    /// Shuts the source down: every subscription ends, later ones end at once.
    pub fn close(&self) {
        self.shared.hub.close();
    }

    /// How many subscriptions are alive.
    pub fn subscriber_count(&self) -> usize {
        self.with_hub(|hub| hub.subscriber_count()).unwrap_or(0)
    }

    /// How many inline handlers (inline dispatchers) are attached.
    pub fn inline_count(&self) -> usize {
        self.with_hub(|hub| hub.inline_count()).unwrap_or(0)
    }

    /// Events handed to [`publish`](Self::publish) so far.
    pub fn published(&self) -> u64 {
        self.shared.published.load(Ordering::Relaxed)
    }

    /// Events published but not delivered (disconnected, lost on purpose or closed).
    pub fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Relaxed)
    }

    /// The source this handle drives (another handle to the same source).
    pub fn source(&self) -> InMemorySource {
        InMemorySource {
            shared: self.shared.clone(),
        }
    }
}
