//! [`SignalHub`]: the bounded fan-out every built-in source uses.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::event::Event;
use crate::signal::{GapReason, Health, Signal};
use crate::source::{EventSource, InlineAttachment, InlineHandler, Subscription};

/// The default per-subscriber buffer, in signals.
pub const DEFAULT_HUB_CAPACITY: usize = 4096;

/// The largest per-subscriber buffer a hub accepts, in signals (the buffer is
/// allocated up front: about 50 MB at this size).
pub const MAX_HUB_CAPACITY: usize = 1 << 20;

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
///
/// It also runs *inline handlers* ([`attach_inline`](SignalHub::attach_inline)):
/// callbacks run synchronously by whoever emits a signal, before any subscriber
/// sees it. A dispatcher attached inline invalidates caches in the source's own
/// task: no hop to another task, no lag, and the lowest latency.
///
/// A hub is itself an [`EventSource`]: what you send into it by hand reaches
/// the dispatchers spawned on it (handy in tests, or for a feed that needs no
/// more than that; its label is the default, `custom`).
///
/// ```
/// use pgcachewatch::strategies::Greedy;
/// use pgcachewatch_core::{Cache, Dispatcher, Event, Operation, SignalHub};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let hub = SignalHub::new(16);
/// let cache: Cache<u32, u32> = Cache::new(8);
/// let _dispatcher = Dispatcher::new().attach(Greedy::new(), cache.clone()).spawn(&hub);
/// cache.insert(1, 10);
/// hub.publish(Event::new("ch", Operation::Update, "public", "t"));
/// assert_eq!(cache.get(&1), None); // dropped inline, as the event was sent
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct SignalHub {
    tx: broadcast::Sender<Signal>,
    healthy: Arc<AtomicBool>,
    inline: Arc<Inline>,
    /// The source's series, once [`with_label`](SignalHub::with_label)led.
    #[cfg(feature = "metrics")]
    metrics: Option<Arc<crate::telemetry::SourceMetrics>>,
}

impl EventSource for SignalHub {
    fn subscribe(&self) -> Subscription {
        SignalHub::subscribe(self)
    }

    fn health(&self) -> Health {
        SignalHub::health(self)
    }

    fn attach_inline(&self, handler: InlineHandler) -> Option<InlineAttachment> {
        Some(SignalHub::attach_inline(self, handler))
    }
}

/// The inline handlers, and the lock that orders every emission.
#[derive(Default)]
struct Inline {
    next_id: AtomicU64,
    handlers: Mutex<Vec<(u64, InlineHandler)>>,
}

impl fmt::Debug for Inline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inline")
            .field("handlers", &self.handlers.lock().len())
            .finish()
    }
}

/// Detaches an inline handler from its hub when dropped.
struct HubAttachment {
    id: u64,
    inline: Weak<Inline>,
}

impl Drop for HubAttachment {
    fn drop(&mut self) {
        if let Some(inline) = self.inline.upgrade() {
            let removed = {
                let mut handlers = inline.handlers.lock();
                handlers
                    .iter()
                    .position(|(id, _)| *id == self.id)
                    .map(|i| handlers.remove(i))
            };
            // Dropped outside the lock: a handler's drop may do work of its own.
            drop(removed);
        }
    }
}

impl SignalHub {
    /// Checks a buffer size a user asked for: between 1 and [`MAX_HUB_CAPACITY`].
    ///
    /// # Errors
    ///
    /// [`Error::Config`](crate::Error::Config) naming the limits.
    ///
    /// ```
    /// use pgcachewatch_core::SignalHub;
    /// assert!(SignalHub::check_capacity(4096).is_ok());
    /// assert!(SignalHub::check_capacity(0).is_err());
    /// assert!(SignalHub::check_capacity(usize::MAX).is_err());
    /// ```
    pub fn check_capacity(capacity: usize) -> Result<usize, crate::Error> {
        if (1..=MAX_HUB_CAPACITY).contains(&capacity) {
            Ok(capacity)
        } else {
            Err(crate::Error::Config(format!(
                "buffer of {capacity} signals: it must be between 1 and {MAX_HUB_CAPACITY}"
            )))
        }
    }

    /// A healthy hub whose subscribers may fall `capacity` signals behind before they
    /// get a gap. The capacity is clamped to 1..=[`MAX_HUB_CAPACITY`] (see
    /// [`check_capacity`](Self::check_capacity) to reject instead).
    pub fn new(capacity: usize) -> Self {
        Self::with_health(capacity, Health::Healthy)
    }

    /// A hub that starts with the given health (a network source starts unhealthy
    /// and turns healthy once it listens).
    pub fn with_health(capacity: usize, health: Health) -> Self {
        let (tx, _) = broadcast::channel(capacity.clamp(1, MAX_HUB_CAPACITY));
        SignalHub {
            tx,
            healthy: Arc::new(AtomicBool::new(health.is_healthy())),
            inline: Arc::default(),
            #[cfg(feature = "metrics")]
            metrics: None,
        }
    }

    /// Names the source this hub belongs to in metrics (feature `metrics`): the
    /// hub then counts the events and gaps it emits and reports the health, under
    /// the label `source` (see [`telemetry`](crate::telemetry)). Use the label the
    /// source's [`EventSource::label`](crate::EventSource::label) returns. Without
    /// the feature, it does nothing. Call it before handing out clones.
    ///
    /// ```
    /// use pgcachewatch_core::{Event, Operation, SignalHub};
    /// let hub = SignalHub::new(16).with_label("orders-feed");
    /// hub.publish(Event::new("ch", Operation::Insert, "public", "orders"));
    /// ```
    #[must_use]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables, unused_mut))]
    pub fn with_label(mut self, source: impl Into<String>) -> Self {
        #[cfg(feature = "metrics")]
        {
            self.metrics = Some(Arc::new(crate::telemetry::SourceMetrics::new(
                &source.into(),
                self.health(),
            )));
        }
        self
    }

    /// Runs `handler` for every signal emitted from now on, synchronously, in the
    /// emitting task, before subscribers see the signal; first with the current
    /// health. The handler is detached when the returned attachment is dropped, and
    /// dropped itself when the last clone of the hub is dropped (the source ended).
    ///
    /// Handlers must be quick and must not emit into this hub.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use pgcachewatch_core::{Event, Operation, Signal, SignalHub};
    /// let hub = SignalHub::new(16);
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let log = seen.clone();
    /// let attachment = hub.attach_inline(Box::new(move |s: &Signal| {
    ///     log.lock().unwrap().push(s.is_gap());
    /// }));
    /// hub.gap(pgcachewatch::GapReason::Reconnected);
    /// drop(attachment);
    /// hub.gap(pgcachewatch::GapReason::Reconnected);
    /// assert_eq!(*seen.lock().unwrap(), vec![false, true]); // health, then the first gap
    /// ```
    pub fn attach_inline(&self, mut handler: InlineHandler) -> InlineAttachment {
        let id = self.inline.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut handlers = self.inline.handlers.lock();
            handler(&Signal::Health(self.health()));
            handlers.push((id, handler));
        }
        InlineAttachment::new(HubAttachment {
            id,
            inline: Arc::downgrade(&self.inline),
        })
    }

    /// A new subscription; its first signal is the current health.
    pub fn subscribe(&self) -> Subscription {
        // Under the emission lock, so no health change falls between the health
        // read here and the receiver's first buffered signal (it would repeat it).
        let _emitting = self.inline.handlers.lock();
        let rx = self.tx.subscribe();
        Subscription::from_hub(Signal::Health(self.health()), rx, self.healthy.clone())
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
        // One lock orders emissions: inline handlers and subscribers see the same order.
        let mut handlers = self.inline.handlers.lock();
        self.emit_locked(&mut handlers, signal, true);
    }

    /// Publishes several signals in order, as [`send`](Self::send) would one by
    /// one, holding the emission lock once for all of them: for a burst a
    /// source read at once. Subscribing (or attaching a handler) waits until
    /// they are all emitted.
    ///
    /// The signals are lent, not given: inline handlers see each one,
    /// subscribers get a clone (for an event, one more reference to it), and
    /// the caller keeps them. A source gives the events that nobody else kept
    /// back to its parser ([`PayloadParser::recycle`](crate::PayloadParser::recycle)),
    /// so a burst with no subscriber allocates no events.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use pgcachewatch_core::{Event, Operation, Signal, SignalHub};
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let hub = SignalHub::new(16);
    /// let event = |i| Signal::Event(Event::new("ch", Operation::Insert, "public", "t").with_txid(i).into());
    /// let mut sub = hub.subscribe();
    /// let mut signals: Vec<Signal> = (0..3).map(event).collect();
    /// hub.send_batch(&signals);
    /// assert!(matches!(sub.recv().await, Some(Signal::Health(_))));
    /// for i in 0..3 {
    ///     assert_eq!(sub.recv().await.unwrap().as_event().unwrap().txid, Some(i));
    /// }
    /// // With nobody subscribed, each event is the caller's alone again.
    /// drop(sub);
    /// hub.send_batch(&signals);
    /// assert!(signals.iter_mut().all(|s| match s {
    ///     Signal::Event(e) => Arc::get_mut(e).is_some(),
    ///     _ => false,
    /// }));
    /// # });
    /// ```
    pub fn send_batch(&self, signals: &[Signal]) {
        let mut handlers = self.inline.handlers.lock();
        // Nobody can subscribe while the lock is held: with no subscriber now,
        // none of these signals is buffered (as `send` would find).
        let subscribed = self.tx.receiver_count() > 0;
        for signal in signals {
            self.run_handlers(&mut handlers, signal);
            if subscribed {
                let _ = self.tx.send(signal.clone());
            }
        }
    }

    /// Emits with the emission lock held; to subscribers only if `subscribed`
    /// (false only when there is none).
    fn emit_locked(&self, handlers: &mut [(u64, InlineHandler)], signal: Signal, subscribed: bool) {
        self.run_handlers(handlers, &signal);
        if subscribed {
            // An error only means nobody subscribes right now: nothing to buffer.
            let _ = self.tx.send(signal);
        }
    }

    /// Counts `signal` (with metrics) and runs every inline handler on it; call
    /// with the emission lock held.
    fn run_handlers(&self, handlers: &mut [(u64, InlineHandler)], signal: &Signal) {
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.emitted(signal);
        }
        for (_, handler) in handlers.iter_mut() {
            handler(signal);
        }
    }

    /// Publishes a gap.
    pub fn gap(&self, reason: GapReason) {
        self.send(Signal::Gap(reason));
    }

    /// Records a health change and tells subscribers; does nothing if unchanged.
    pub fn set_health(&self, health: Health) {
        // The change and its signal under one lock: a subscriber or handler
        // joining meanwhile sees either the old health and then the signal, or
        // the new health and no signal — never the new health twice.
        let mut handlers = self.inline.handlers.lock();
        let was = self.healthy.swap(health.is_healthy(), Ordering::AcqRel);
        if was != health.is_healthy() {
            self.emit_locked(&mut handlers, Signal::Health(health), true);
        }
    }

    /// How many inline handlers are attached.
    pub fn inline_count(&self) -> usize {
        self.inline.handlers.lock().len()
    }

    /// How many subscriptions are alive.
    pub fn subscriber_count(&self) -> usize {
        self.tx.receiver_count()
    }
}

#[cfg(all(test, not(pgcachewatch_loom)))]
mod tests {
    use super::*;

    /// Subscriptions (or handlers) that join while the health flips.
    const JOINERS: usize = 1000;
    /// Each race is run this many times (it is a race: one round may miss it).
    const ROUNDS: usize = 20;

    /// Flips the hub's health until told to stop, at most `FLIPS` times (fewer
    /// than a subscription buffers, so none lags).
    fn flip_until_stopped(hub: &SignalHub, stop: &AtomicBool) {
        const FLIPS: usize = 3000;
        let mut healthy = false;
        for i in 0..FLIPS {
            if i > 0 && stop.load(Ordering::Acquire) {
                break;
            }
            healthy = !healthy;
            hub.set_health(if healthy {
                Health::Healthy
            } else {
                Health::Unhealthy
            });
        }
    }

    /// Health signals a subscription saw, in order.
    fn healths(sub: &mut Subscription) -> Vec<Health> {
        let mut seen = Vec::new();
        while let Ok(signal) = sub.try_recv() {
            if let Signal::Health(h) = signal {
                seen.push(h);
            }
        }
        seen
    }

    /// A subscription made while another thread flips the health never sees
    /// the same health twice in a row: its first signal and the broadcast
    /// change are ordered by the emission lock.
    #[test]
    fn subscribing_during_health_changes_never_repeats_a_health() {
        for _ in 0..ROUNDS {
            subscribing_during_health_changes_round();
        }
    }

    /// Runs `join` on a hub (with `capacity`) while another thread flips its
    /// health; returns what each joiner saw, in order.
    fn while_flipping<J>(capacity: usize, join: impl FnOnce(&SignalHub) -> J) -> J {
        let hub = SignalHub::with_health(capacity, Health::Unhealthy);
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let hub = hub.clone();
            let stop = stop.clone();
            std::thread::spawn(move || flip_until_stopped(&hub, &stop))
        };
        // Join while it flips (it flips at least once).
        while hub.health() == Health::Unhealthy && !flipper.is_finished() {
            std::thread::yield_now();
        }
        let joined = join(&hub);
        stop.store(true, Ordering::Release);
        flipper.join().expect("the flipping thread panicked");
        joined
    }

    fn assert_no_repeats(who: &str, seen: &[Health]) {
        for pair in seen.windows(2) {
            assert_ne!(pair[0], pair[1], "{who} saw {seen:?}");
        }
    }

    fn subscribing_during_health_changes_round() {
        let mut subs = while_flipping(4096, |hub| {
            (0..JOINERS).map(|_| hub.subscribe()).collect::<Vec<_>>()
        });
        for (n, sub) in subs.iter_mut().enumerate() {
            assert_no_repeats(&format!("subscription {n}"), &healths(sub));
        }
    }

    /// The same for inline handlers attached during health changes.
    #[test]
    fn attaching_during_health_changes_never_repeats_a_health() {
        for _ in 0..ROUNDS {
            attaching_during_health_changes_round();
        }
    }

    fn attaching_during_health_changes_round() {
        use std::sync::Mutex as StdMutex;
        let (logs, _attachments) = while_flipping(16, |hub| {
            let mut logs = Vec::new();
            let mut attachments = Vec::new();
            for _ in 0..JOINERS {
                let log: Arc<StdMutex<Vec<Health>>> = Arc::default();
                let sink = log.clone();
                attachments.push(hub.attach_inline(Box::new(move |s: &Signal| {
                    if let Signal::Health(h) = s {
                        sink.lock().expect("log poisoned").push(*h);
                    }
                })));
                logs.push(log);
            }
            (logs, attachments)
        });
        for (n, log) in logs.iter().enumerate() {
            let seen = log.lock().expect("log poisoned").clone();
            assert_no_repeats(&format!("handler {n}"), &seen);
        }
    }
}
