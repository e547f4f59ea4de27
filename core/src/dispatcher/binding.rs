//! One (strategy, target) pair with its key type erased, and the set of them a
//! dispatcher drives.
//!
//! A binding owns its target's [`HealthVote`]: the target is trusted only while
//! the binding says its source is healthy and its strategy works. Dropping a
//! binding — however its dispatcher stops — flushes the target and leaves the
//! vote's board unhealthy.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::applied::Applied;
use crate::cache::InvalidationTarget;
use crate::event::Event;
use crate::health::HealthVote;
use crate::signal::{GapReason, Health, Signal};
use crate::strategy::{Decision, InvalidationStrategy};

pub(super) trait Binding: Send {
    /// Applies a signal; `false` if the strategy (or the target) panicked.
    fn on_signal(&mut self, signal: &Signal, now: Instant) -> bool;
    /// Fires the strategy's deadline if it has passed; `false` on a panic.
    fn on_tick(&mut self, now: Instant) -> bool;
    fn deadline(&self) -> Option<Instant>;
    /// Whether its strategy reads the clock (see `InvalidationStrategy::reads_clock`).
    fn reads_clock(&self) -> bool;
    /// Takes a health vote on the target and flushes it: attaching is a gap.
    fn attach(&mut self);
    /// Stops feeding the target: flushes it and withdraws the vote (`deliberate`:
    /// shut down on purpose, logged quietly).
    fn stop(&mut self, deliberate: bool);
}

pub(super) struct Bound<K, S, T>
where
    T: InvalidationTarget<K>,
{
    strategy: S,
    target: T,
    vote: Option<HealthVote>,
    source_healthy: bool,
    /// The strategy panicked and has not handled a signal since.
    poisoned: bool,
    _key: std::marker::PhantomData<fn(K)>,
}

impl<K, S, T> Bound<K, S, T>
where
    T: InvalidationTarget<K>,
{
    pub(super) fn new(strategy: S, target: T) -> Self {
        Bound {
            strategy,
            target,
            vote: None,
            source_healthy: false,
            poisoned: false,
            _key: std::marker::PhantomData,
        }
    }

    fn publish_health(&self) {
        if let Some(vote) = &self.vote {
            vote.set(self.source_healthy && !self.poisoned);
        }
    }

    /// Flushes the target; `false` if even that panicked.
    fn flush(&self) -> bool {
        catch_unwind(AssertUnwindSafe(|| self.target.apply(&Decision::All))).is_ok()
    }
}

impl<K, S, T> Bound<K, S, T>
where
    K: 'static,
    S: InvalidationStrategy<K>,
    T: InvalidationTarget<K>,
{
    /// Runs `f` (strategy and target work), catching a panic: the target is then
    /// flushed (that covers the signal the strategy failed on) and marked
    /// unhealthy until the strategy handles a signal again.
    fn guarded(&mut self, now: Instant, f: impl FnOnce(&mut S, &T)) -> bool {
        let recovering = self.poisoned;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            if recovering {
                // The strategy's state is unknown after a panic: reset it the way a
                // gap does, before it sees anything else.
                let reset = self.strategy.on_gap(
                    &GapReason::Injected {
                        detail: "resetting the strategy after a panic".into(),
                    },
                    now,
                );
                apply(&self.target, &reset);
            }
            f(&mut self.strategy, &self.target);
        }));
        match outcome {
            Ok(()) => {
                if recovering {
                    self.poisoned = false;
                    tracing::warn!("invalidation strategy works again after a panic; its cache trusts its entries again");
                    self.publish_health();
                }
                true
            }
            Err(payload) => {
                self.poisoned = true;
                self.publish_health();
                let flushed = self.flush();
                if !recovering {
                    tracing::error!(
                        panic = panic_message(payload.as_ref()),
                        flushed,
                        "invalidation strategy panicked: its cache was flushed and bypasses until the strategy handles a signal without panicking"
                    );
                }
                false
            }
        }
    }
}

fn apply<K, T: InvalidationTarget<K>>(target: &T, decision: &Decision<K>) {
    if !decision.is_nothing() {
        target.apply(decision);
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(not a string)"
    }
}

impl<K, S, T> Binding for Bound<K, S, T>
where
    K: 'static,
    S: InvalidationStrategy<K>,
    T: InvalidationTarget<K>,
{
    #[inline]
    fn on_signal(&mut self, signal: &Signal, now: Instant) -> bool {
        match signal {
            Signal::Event(event) => self.guarded(now, |s, t| apply(t, &s.on_event(event, now))),
            Signal::Gap(reason) => self.guarded(now, |s, t| apply(t, &s.on_gap(reason, now))),
            Signal::Health(health) => {
                self.source_healthy = *health == Health::Healthy;
                self.publish_health();
                true
            }
            Signal::Progress(_) => true,
        }
    }

    fn on_tick(&mut self, now: Instant) -> bool {
        if self.strategy.next_deadline().is_some_and(|d| d <= now) {
            return self.guarded(now, |s, t| apply(t, &s.on_tick(now)));
        }
        true
    }

    fn deadline(&self) -> Option<Instant> {
        if self.poisoned {
            return None;
        }
        catch_unwind(AssertUnwindSafe(|| self.strategy.next_deadline())).unwrap_or(None)
    }

    fn reads_clock(&self) -> bool {
        // A strategy that panics here is asked for the clock.
        catch_unwind(AssertUnwindSafe(|| self.strategy.reads_clock())).unwrap_or(true)
    }

    fn attach(&mut self) {
        self.vote = Some(self.target.health_vote());
        self.flush();
        self.publish_health();
    }

    fn stop(&mut self, deliberate: bool) {
        if let Some(vote) = self.vote.take() {
            self.flush();
            if deliberate {
                vote.retire();
            }
        }
    }
}

impl<K, S, T> Drop for Bound<K, S, T>
where
    T: InvalidationTarget<K>,
{
    fn drop(&mut self) {
        // Nothing invalidates the target any more: flush it, then the vote's drop
        // leaves its board unhealthy (it bypasses) until a dispatcher attaches.
        if self.vote.is_some() {
            self.flush();
        }
    }
}

/// Counters of a running dispatcher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DispatcherStats {
    /// Events applied.
    pub events: u64,
    /// Gaps applied.
    pub gaps: u64,
    /// Health changes applied.
    pub health_changes: u64,
    /// Deadline ticks delivered to strategies.
    pub ticks: u64,
    /// Progress marks of a lossless source applied.
    pub progress: u64,
    /// Panics caught in strategies (or targets); each flushed its cache.
    pub strategy_panics: u64,
    /// Events applied later than [`Dispatcher::max_latency`](super::Dispatcher::max_latency)
    /// after they were sent (0 when no bound is set).
    pub late_events: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    events: AtomicU64,
    gaps: AtomicU64,
    health_changes: AtomicU64,
    ticks: AtomicU64,
    progress: AtomicU64,
    panics: AtomicU64,
    late: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> DispatcherStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DispatcherStats {
            events: get(&self.events),
            gaps: get(&self.gaps),
            health_changes: get(&self.health_changes),
            ticks: get(&self.ticks),
            progress: get(&self.progress),
            strategy_panics: get(&self.panics),
            late_events: get(&self.late),
        }
    }
}

/// The bindings of one dispatcher and what it did; driven by a task or inline.
///
/// Dropping (or [`close`](Self::close)-ing) it flushes every target and marks it
/// unhealthy, whatever stopped the dispatcher.
pub(super) struct Bindings {
    list: Vec<Box<dyn Binding>>,
    /// Whether any strategy reads the clock; when none does, signals are
    /// applied with `earlier` instead of a fresh reading (deadlines are still
    /// asked for and kept: a strategy that wrongly says it reads no clock
    /// gets an old `now`, never a lost tick).
    reads_clock: bool,
    /// The last reading of the clock.
    earlier: Instant,
    pub(super) counters: Arc<Counters>,
    pub(super) applied: Arc<Applied>,
    /// Warn about (and count) events applied later than this after being sent.
    max_latency: Option<Duration>,
    /// The event latency histogram of the source (feature `metrics`).
    #[cfg(feature = "metrics")]
    metrics: Option<crate::telemetry::DispatcherMetrics>,
}

impl Bindings {
    pub(super) fn new(list: Vec<Box<dyn Binding>>) -> Self {
        Bindings {
            reads_clock: list.iter().any(|b| b.reads_clock()),
            earlier: tokio::time::Instant::now().into_std(),
            list,
            counters: Arc::default(),
            applied: Arc::default(),
            max_latency: None,
            #[cfg(feature = "metrics")]
            metrics: None,
        }
    }

    /// Records the latency of the events applied, labelled with `source`.
    #[cfg(feature = "metrics")]
    pub(super) fn with_source(mut self, source: String) -> Self {
        self.metrics = Some(crate::telemetry::DispatcherMetrics::new(source));
        self
    }

    pub(super) fn with_max_latency(mut self, bound: Option<Duration>) -> Self {
        self.max_latency = bound;
        self
    }

    /// Counts, and warns about (at most once a second), an event applied more
    /// than `bound` after it was sent.
    #[cold]
    fn check_latency(&self, event: &Event, bound: Duration) {
        static LIMIT: crate::rate_limit::RateLimit = crate::rate_limit::RateLimit::new();
        let Some(sent_at) = event.sent_at else {
            return;
        };
        let Ok(latency) = (chrono::Utc::now() - sent_at).to_std() else {
            return; // sent "in the future": clocks disagree, not a late event
        };
        if latency > bound {
            self.counters.late.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = LIMIT.check() {
                tracing::warn!(
                    latency_ms = latency.as_millis() as u64,
                    bound_ms = bound.as_millis() as u64,
                    table = %event.table,
                    suppressed,
                    "an event was applied later than max_latency after it was sent (at most one such warning a second; `suppressed` were not logged)"
                );
            }
        }
    }

    /// Takes each target's health vote and flushes it (attaching is a gap), then
    /// sets the votes from the source's current health.
    pub(super) fn attach(&mut self, health: Health) {
        let now = tokio::time::Instant::now().into_std();
        self.earlier = now;
        for b in &mut self.list {
            b.attach();
            b.on_signal(&Signal::Health(health), now);
        }
    }

    /// Now, or (when no strategy reads the clock) an earlier reading.
    #[inline]
    fn now(&mut self) -> Instant {
        if self.reads_clock {
            self.earlier = tokio::time::Instant::now().into_std();
        }
        self.earlier
    }

    #[inline]
    pub(super) fn apply(&mut self, signal: &Signal) {
        let now = self.now();
        let counter = match signal {
            Signal::Event(_) => &self.counters.events,
            Signal::Gap(reason) => {
                tracing::info!(%reason, "gap: flushing");
                &self.counters.gaps
            }
            Signal::Health(h) => {
                tracing::info!(healthy = (*h == Health::Healthy), "source health changed");
                &self.counters.health_changes
            }
            Signal::Progress(_) => &self.counters.progress,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        for b in &mut self.list {
            if !b.on_signal(signal, now) {
                self.counters.panics.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Recorded after every cache applied it: a read-your-writes waiter woken now
        // reads through caches that already dropped what the event changed.
        match signal {
            Signal::Event(e) => {
                self.applied.record(e.lsn, e.txid);
                if let Some(bound) = self.max_latency {
                    self.check_latency(e, bound);
                }
                #[cfg(feature = "metrics")]
                if let Some(metrics) = &self.metrics {
                    metrics.applied(e);
                }
            }
            Signal::Progress(lsn) => self.applied.progress(*lsn),
            _ => {}
        }
    }

    /// Fires every strategy whose deadline has passed.
    pub(super) fn tick(&mut self) {
        let now = tokio::time::Instant::now().into_std();
        for b in &mut self.list {
            if b.deadline().is_some_and(|d| d <= now) {
                self.counters.ticks.fetch_add(1, Ordering::Relaxed);
                if !b.on_tick(now) {
                    self.counters.panics.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The earliest deadline of any strategy.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.list.iter().filter_map(|b| b.deadline()).min()
    }

    /// Nothing will invalidate these targets any more: flush them and leave them
    /// unhealthy (they bypass); wake every read-your-writes waiter. `deliberate`:
    /// shut down on purpose (logged at `info`, not `error`).
    pub(super) fn close(&mut self, deliberate: bool) {
        for b in &mut self.list {
            b.stop(deliberate);
        }
        self.list.clear();
        self.applied.stop();
    }
}

impl Drop for Bindings {
    fn drop(&mut self) {
        self.close(false);
    }
}
