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
    /// Background reloads started: keys refreshed after their invalidation
    /// ([`refresh_on_invalidation`](crate::CacheBuilder::refresh_on_invalidation))
    /// and keys warmed after a flush (also counted in
    /// [`warm_loads`](Self::warm_loads)).
    pub refreshes_started: u64,
    /// Refreshes whose value was stored: the reads after the write hit it
    /// instead of loading.
    pub refreshes_served: u64,
    /// Refreshes whose value was dropped, not stored: a write's invalidation (or
    /// a flush, or an outage) arrived while they ran.
    pub refreshes_discarded: u64,
    /// Refreshes whose refresher failed (or panicked): counted and dropped,
    /// never cached; the readers that waited for them loaded for themselves.
    pub refreshes_failed: u64,
    /// Refreshes not started: as many as the refresher's `max_concurrent` were
    /// running, or there was no tokio runtime to run them on.
    pub refreshes_skipped: u64,
    /// Refreshes started by warming after a flush
    /// ([`warm_after_flush`](crate::CacheBuilder::warm_after_flush)).
    pub warm_loads: u64,
    /// Reads answered with a key's previous value while its refresh ran, within
    /// the bound of [`serve_stale_within`](crate::CacheBuilder::serve_stale_within)
    /// (0 unless that option is on).
    pub stale_served: u64,
}

/// A counter bumped from many threads at once (the hit counter): one cache line per
/// stripe, so hits on different cores do not fight over one line. Read by summing
/// the stripes.
///
/// The first [`OWNED`] threads that ever bump a counter of this kind get a stripe
/// of their own, which only they write: a plain load and store, no atomic
/// read-modify-write on the hit path. Later threads share the other stripes with
/// `fetch_add`. Either way no increment is lost.
#[derive(Debug)]
pub(crate) struct StripedCounter {
    stripes: [Stripe; OWNED + SHARED],
    /// Threads whose stripe is below this bump it in line
    /// ([`try_bump_in_line`](Self::try_bump_in_line)): [`OWNED`], or 0 for a
    /// counter whose every bump must go out of line (a cache that samples its
    /// hits does so there, so that other caches' hit paths pay nothing for it).
    in_line: usize,
}

impl Default for StripedCounter {
    fn default() -> Self {
        StripedCounter {
            stripes: Default::default(),
            in_line: OWNED,
        }
    }
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
    /// A counter whose every bump goes out of line (see `in_line`).
    pub(crate) fn out_of_line() -> Self {
        StripedCounter {
            in_line: 0,
            ..Self::default()
        }
    }

    /// Adds one if this thread owns a stripe and the counter allows bumps in
    /// line: returns the stripe's new count, or `None` (then call
    /// [`bump`](Self::bump)). Costs what `bump`'s own fast path does: the
    /// bound is compared from memory instead of as a constant.
    #[inline]
    pub(crate) fn try_bump_in_line(&self) -> Option<u64> {
        let i = STRIPE.get();
        if i < self.in_line {
            // Only this thread writes this stripe. (`in_line` is at most
            // `OWNED`, a power of two, so the mask keeps `i` and spares the
            // bounds check.)
            let stripe = &self.stripes[i % OWNED].0;
            let n = stripe.load(Ordering::Relaxed) + 1;
            stripe.store(n, Ordering::Relaxed);
            return Some(n);
        }
        None
    }

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
    refreshes_started: AtomicU64,
    refreshes_served: AtomicU64,
    refreshes_discarded: AtomicU64,
    refreshes_failed: AtomicU64,
    refreshes_skipped: AtomicU64,
    warm_loads: AtomicU64,
    stale_served: AtomicU64,
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
    /// Counters for a cache named `name`; with `sampled_hits`, every hit is
    /// counted out of line ([`hit`](Self::hit)), where the cache samples it.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(name: Option<&str>, sampled_hits: bool) -> Self {
        Counters {
            hits: if sampled_hits {
                StripedCounter::out_of_line()
            } else {
                StripedCounter::default()
            },
            misses: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            load_errors: AtomicU64::new(0),
            bypasses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            discarded_loads: AtomicU64::new(0),
            refreshes_started: AtomicU64::new(0),
            refreshes_served: AtomicU64::new(0),
            refreshes_discarded: AtomicU64::new(0),
            refreshes_failed: AtomicU64::new(0),
            refreshes_skipped: AtomicU64::new(0),
            warm_loads: AtomicU64::new(0),
            stale_served: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metrics: crate::telemetry::CacheMetrics::new(name),
        }
    }

    /// The hit path: one striped bump in line (with `metrics`, an export once
    /// in [`HIT_BATCH`](crate::telemetry::HIT_BATCH) hits of a thread);
    /// `false` if the hit is not counted yet: the caller counts it with
    /// [`hit`](Self::hit), out of line (a thread without a stripe of its own,
    /// or a cache that samples its hits).
    #[inline]
    pub(crate) fn try_hit(&self) -> bool {
        let Some(n) = self.hits.try_bump_in_line() else {
            return false;
        };
        #[cfg(feature = "metrics")]
        if n % crate::telemetry::HIT_BATCH == 0 {
            self.export_hits();
        }
        let _ = n;
        true
    }

    /// Counts a hit: one striped bump (with `metrics`, an export once in
    /// [`HIT_BATCH`](crate::telemetry::HIT_BATCH) hits of a thread). Returns
    /// this thread's count of hits, for sampling.
    #[inline]
    pub(crate) fn hit(&self) -> u64 {
        let n = self.hits.bump();
        #[cfg(feature = "metrics")]
        if n.is_multiple_of(crate::telemetry::HIT_BATCH) {
            self.export_hits();
        }
        n
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

    pub(crate) fn refresh_started(&self, warm: bool) {
        bump(&self.refreshes_started);
        if warm {
            bump(&self.warm_loads);
        }
        #[cfg(feature = "metrics")]
        {
            self.metrics.refreshes_started.increment(1);
            if warm {
                self.metrics.warm_loads.increment(1);
            }
        }
    }

    pub(crate) fn refresh_served(&self) {
        bump(&self.refreshes_served);
        #[cfg(feature = "metrics")]
        self.metrics.refreshes_served.increment(1);
    }

    pub(crate) fn refresh_discarded(&self) {
        bump(&self.refreshes_discarded);
        #[cfg(feature = "metrics")]
        self.metrics.refreshes_discarded.increment(1);
    }

    pub(crate) fn refresh_failed(&self) {
        bump(&self.refreshes_failed);
        #[cfg(feature = "metrics")]
        self.metrics.refreshes_failed.increment(1);
    }

    pub(crate) fn refresh_skipped(&self) {
        bump(&self.refreshes_skipped);
        #[cfg(feature = "metrics")]
        self.metrics.refreshes_skipped.increment(1);
    }

    pub(crate) fn stale_served(&self) {
        bump(&self.stale_served);
        #[cfg(feature = "metrics")]
        self.metrics.stale_served.increment(1);
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
            refreshes_started: get(&self.refreshes_started),
            refreshes_served: get(&self.refreshes_served),
            refreshes_discarded: get(&self.refreshes_discarded),
            refreshes_failed: get(&self.refreshes_failed),
            refreshes_skipped: get(&self.refreshes_skipped),
            warm_loads: get(&self.warm_loads),
            stale_served: get(&self.stale_served),
        }
    }
}
