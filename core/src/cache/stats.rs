//! Cache statistics.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A snapshot of a [`Cache`](crate::Cache)'s counters, readable at any time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that found no fresh entry (each is followed by a load, or joins one).
    pub misses: u64,
    /// Loader runs that stored, or tried to store, their result.
    pub loads: u64,
    /// Loader runs that failed (their error went to every waiter, nothing was cached).
    pub load_errors: u64,
    /// Reads that went straight to the loader because the source was unhealthy.
    pub bypasses: u64,
    /// Key or table invalidations applied.
    pub invalidations: u64,
    /// Invalidate-all operations applied (gaps, `Decision::All`).
    pub flushes: u64,
    /// Loads whose result was not stored because an invalidation arrived while they
    /// ran: the stale-set race, prevented.
    pub discarded_loads: u64,
    /// Entries currently held (fresh or not yet evicted stale ones).
    pub entries: u64,
    /// Whether the cache trusts its entries now (see
    /// [`HealthBoard`](crate::HealthBoard)); `false` means reads bypass it (or are
    /// served within the configured bound).
    pub healthy: bool,
    /// Dispatchers feeding the cache now.
    pub dispatchers: u64,
    /// Dispatchers that fed the cache and stopped since the last attachment: while
    /// this is not 0, nothing feeds the cache from their sources and it bypasses.
    pub stopped_dispatchers: u64,
}

/// A counter bumped from many threads at once (the hit counter): one cache line per
/// stripe, so hits on different cores do not fight over one line. Read by summing
/// the stripes.
///
/// The first [`OWNED`] threads that ever bump a counter of this kind get a stripe
/// of their own, which only they write: a plain load and store, no atomic
/// read-modify-write on the hit path. Later threads share the other stripes with
/// `fetch_add`. Either way no increment is lost.
#[derive(Debug, Default)]
pub(crate) struct StripedCounter {
    stripes: [Stripe; OWNED + SHARED],
}

/// Stripes owned by one thread each.
const OWNED: usize = 16;
/// Stripes shared (with atomic increments) by every later thread.
const SHARED: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

/// A thread's stripe before it first bumps a counter.
const UNASSIGNED: usize = usize::MAX;

thread_local! {
    /// This thread's stripe: below [`OWNED`] its own, else shared; or
    /// [`UNASSIGNED`].
    static STRIPE: Cell<usize> = const { Cell::new(UNASSIGNED) };
}

impl StripedCounter {
    /// Adds one; returns this thread's stripe's new count (for batching).
    #[inline]
    pub(crate) fn bump(&self) -> u64 {
        let i = STRIPE.get();
        if i < OWNED {
            // Only this thread writes this stripe.
            let stripe = &self.stripes[i].0;
            let n = stripe.load(Ordering::Relaxed) + 1;
            stripe.store(n, Ordering::Relaxed);
            return n;
        }
        self.bump_shared_or_first(i)
    }

    /// [`bump`](Self::bump) for a thread that shares its stripe, or has none yet.
    #[cold]
    fn bump_shared_or_first(&self, mut i: usize) -> u64 {
        if i == UNASSIGNED {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            i = if n < OWNED { n } else { OWNED + n % SHARED };
            STRIPE.set(i);
            if i < OWNED {
                return self.bump();
            }
        }
        self.stripes[i].0.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn sum(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// The cache's counters, and (feature `metrics`) the series they are mirrored to.
#[derive(Debug)]
pub(crate) struct Counters {
    hits: StripedCounter,
    misses: AtomicU64,
    loads: AtomicU64,
    load_errors: AtomicU64,
    bypasses: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
    discarded_loads: AtomicU64,
    #[cfg(feature = "metrics")]
    pub(crate) metrics: crate::telemetry::CacheMetrics,
}

#[inline]
fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What an invalidation dropped.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dropped {
    Key,
    Table,
    All,
}

impl Counters {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(name: Option<&str>) -> Self {
        Counters {
            hits: StripedCounter::default(),
            misses: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            load_errors: AtomicU64::new(0),
            bypasses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            discarded_loads: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metrics: crate::telemetry::CacheMetrics::new(name),
        }
    }

    /// The hit path: one striped bump (with `metrics`, an export once in
    /// [`HIT_BATCH`](crate::telemetry::HIT_BATCH) hits of a thread).
    #[inline]
    pub(crate) fn hit(&self) {
        #[cfg(not(feature = "metrics"))]
        self.hits.bump();
        #[cfg(feature = "metrics")]
        if self.hits.bump() % crate::telemetry::HIT_BATCH == 0 {
            self.export_hits();
        }
    }

    #[cfg(feature = "metrics")]
    #[cold]
    fn export_hits(&self) {
        self.metrics.export_hits(self.hits.sum());
    }

    pub(crate) fn miss(&self) {
        bump(&self.misses);
        #[cfg(feature = "metrics")]
        {
            self.metrics.misses.increment(1);
            self.export_hits();
        }
    }

    pub(crate) fn load(&self) {
        bump(&self.loads);
        #[cfg(feature = "metrics")]
        self.metrics.loads.increment(1);
    }

    pub(crate) fn load_error(&self) {
        bump(&self.load_errors);
        #[cfg(feature = "metrics")]
        self.metrics.load_errors.increment(1);
    }

    pub(crate) fn bypass(&self) {
        bump(&self.bypasses);
        #[cfg(feature = "metrics")]
        self.metrics.bypasses.increment(1);
    }

    pub(crate) fn discarded_load(&self) {
        bump(&self.discarded_loads);
        #[cfg(feature = "metrics")]
        self.metrics.discarded_loads.increment(1);
    }

    pub(crate) fn dropped(&self, what: Dropped) {
        match what {
            Dropped::Key | Dropped::Table => bump(&self.invalidations),
            Dropped::All => bump(&self.flushes),
        }
        #[cfg(feature = "metrics")]
        match what {
            Dropped::Key => self.metrics.by_key.increment(1),
            Dropped::Table => self.metrics.by_table.increment(1),
            Dropped::All => self.metrics.flushes.increment(1),
        }
    }

    /// A read found its entry past its time-to-live or -idle (only counted as a
    /// metric: `stats()` has no field for it).
    #[inline]
    pub(crate) fn expired(&self) {
        #[cfg(feature = "metrics")]
        self.metrics.expired.increment(1);
    }

    /// Sets the entries gauge (with `metrics`; nothing otherwise).
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn entries(&self, entries: impl FnOnce() -> u64) {
        #[cfg(feature = "metrics")]
        self.metrics.entries.set(entries() as f64);
    }

    pub(crate) fn snapshot(
        &self,
        entries: u64,
        health: crate::health::HealthSummary,
    ) -> CacheStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let hits = self.hits.sum();
        #[cfg(feature = "metrics")]
        {
            self.metrics.export_hits(hits);
            self.metrics.entries.set(entries as f64);
        }
        CacheStats {
            hits,
            misses: get(&self.misses),
            loads: get(&self.loads),
            load_errors: get(&self.load_errors),
            bypasses: get(&self.bypasses),
            invalidations: get(&self.invalidations),
            flushes: get(&self.flushes),
            discarded_loads: get(&self.discarded_loads),
            entries,
            healthy: health.healthy,
            dispatchers: health.attached,
            stopped_dispatchers: health.stopped,
        }
    }
}
