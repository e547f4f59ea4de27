//! Cache statistics.

use std::sync::atomic::{AtomicU64, Ordering};

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
/// stripe, each thread on its own stripe, so hits on different cores do not fight
/// over one line. Read by summing the stripes.
#[derive(Debug, Default)]
pub(crate) struct StripedCounter {
    stripes: [Stripe; STRIPES],
}

const STRIPES: usize = 16;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

impl StripedCounter {
    #[inline]
    pub(crate) fn bump(&self) {
        thread_local! {
            static STRIPE: usize = {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed) as usize % STRIPES
            };
        }
        let i = STRIPE.with(|s| *s);
        self.stripes[i].0.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn sum(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: StripedCounter,
    pub(crate) misses: AtomicU64,
    pub(crate) loads: AtomicU64,
    pub(crate) load_errors: AtomicU64,
    pub(crate) bypasses: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) discarded_loads: AtomicU64,
}

#[inline]
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(
        &self,
        entries: u64,
        health: crate::health::HealthSummary,
    ) -> CacheStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheStats {
            hits: self.hits.sum(),
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
