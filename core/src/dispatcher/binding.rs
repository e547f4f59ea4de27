//! One (strategy, target) pair with its key type erased, and the set of them a
//! dispatcher drives.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::cache::InvalidationTarget;
use crate::signal::{Health, Signal};
use crate::strategy::{Decision, InvalidationStrategy};

pub(super) trait Binding: Send {
    fn on_signal(&mut self, signal: &Signal, now: Instant);
    fn on_tick(&mut self, now: Instant);
    fn deadline(&self) -> Option<Instant>;
    fn set_healthy(&self, healthy: bool);
    fn flush(&self);
}

pub(super) struct Bound<K, S, T> {
    pub(super) strategy: S,
    pub(super) target: T,
    pub(super) _key: std::marker::PhantomData<fn(K)>,
}

impl<K, S, T> Binding for Bound<K, S, T>
where
    K: 'static,
    S: InvalidationStrategy<K>,
    T: InvalidationTarget<K>,
{
    #[inline]
    fn on_signal(&mut self, signal: &Signal, now: Instant) {
        let decision = match signal {
            Signal::Event(event) => self.strategy.on_event(event, now),
            Signal::Gap(reason) => self.strategy.on_gap(reason, now),
            Signal::Health(health) => {
                self.target.set_healthy(health.is_healthy());
                return;
            }
            Signal::Progress(_) => return,
        };
        if !decision.is_nothing() {
            self.target.apply(&decision);
        }
    }

    fn on_tick(&mut self, now: Instant) {
        if self.strategy.next_deadline().is_some_and(|d| d <= now) {
            let decision = self.strategy.on_tick(now);
            if !decision.is_nothing() {
                self.target.apply(&decision);
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.strategy.next_deadline()
    }

    fn set_healthy(&self, healthy: bool) {
        self.target.set_healthy(healthy);
    }

    fn flush(&self) {
        self.target.apply(&Decision::All);
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
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    events: AtomicU64,
    gaps: AtomicU64,
    health_changes: AtomicU64,
    ticks: AtomicU64,
    progress: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> DispatcherStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DispatcherStats {
            events: get(&self.events),
            gaps: get(&self.gaps),
            health_changes: get(&self.health_changes),
            ticks: get(&self.ticks),
        }
    }
}

/// The bindings of one dispatcher and what it did; driven by a task or inline.
pub(super) struct Bindings {
    pub(super) list: Vec<Box<dyn Binding>>,
    pub(super) counters: std::sync::Arc<Counters>,
}

impl Bindings {
    #[inline]
    pub(super) fn apply(&mut self, signal: &Signal) {
        let now = tokio::time::Instant::now().into_std();
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
            b.on_signal(signal, now);
        }
    }

    /// Fires every strategy whose deadline has passed.
    pub(super) fn tick(&mut self) {
        let now = tokio::time::Instant::now().into_std();
        for b in &mut self.list {
            if b.deadline().is_some_and(|d| d <= now) {
                self.counters.ticks.fetch_add(1, Ordering::Relaxed);
                b.on_tick(now);
            }
        }
    }

    /// The earliest deadline of any strategy.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.list.iter().filter_map(|b| b.deadline()).min()
    }

    pub(super) fn set_healthy(&self, healthy: bool) {
        for b in &self.list {
            b.set_healthy(healthy);
        }
    }

    /// Nothing will invalidate these targets any more: make them bypass.
    pub(super) fn close(&self) {
        for b in &self.list {
            b.set_healthy(false);
            b.flush();
        }
    }
}
