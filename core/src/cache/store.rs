//! What the cache keeps per key, and the storage around it: the weigher, the
//! eviction listener, and why an entry left ([`RemovalCause`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::generations::Stamp;

/// Why an entry left the cache, as told to an
/// [eviction listener](super::CacheBuilder::eviction_listener).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RemovalCause {
    /// Older than the time-to-live, or idle longer than the time-to-idle.
    Expired,
    /// Invalidated by a decision: its key, or a table it depends on, was written.
    Invalidated,
    /// Dropped by an invalidate-all: a gap (events may have been lost), an
    /// attaching or stopping dispatcher, or [`Decision::All`](crate::Decision::All).
    Flushed,
    /// Evicted to stay within the capacity (entries or weight).
    Size,
    /// Replaced by a newer value for the same key.
    Replaced,
    /// Removed by [`Cache::remove`](super::Cache::remove).
    Explicit,
}

impl RemovalCause {
    /// Whether the cache removed the entry by its own policy (time or size),
    /// rather than because its data changed or you removed it.
    pub fn was_evicted(self) -> bool {
        matches!(self, RemovalCause::Expired | RemovalCause::Size)
    }
}

/// The listener's type: key, value, cause.
pub(crate) type Listener<K, V> = Arc<dyn Fn(&K, V, RemovalCause) + Send + Sync>;
/// The weigher's type: the weight of one entry.
pub(crate) type WeighFn<K, V> = Arc<dyn Fn(&K, &V) -> u64 + Send + Sync>;

/// One cached value and what decides whether it may still be served.
#[derive(Clone)]
pub(crate) struct Entry<V> {
    pub(crate) value: V,
    /// The generations when its load started.
    pub(crate) stamp: Stamp,
    /// When its load started (TTL and the unhealthy bound count from here).
    pub(crate) loaded_at: Instant,
    /// Last read, in nanoseconds since [`epoch`]; only with a time-to-idle.
    pub(crate) last_read: Option<Arc<AtomicU64>>,
    /// Tells this entry apart from a later one for the same key.
    pub(crate) serial: u64,
}

impl<V> Entry<V> {
    pub(crate) fn touch(&self) {
        if let Some(last) = &self.last_read {
            last.store(nanos_since_epoch(), Ordering::Relaxed);
        }
    }

    pub(crate) fn idle_longer_than(&self, tti: std::time::Duration) -> bool {
        self.last_read.as_ref().is_some_and(|last| {
            let idle = nanos_since_epoch().saturating_sub(last.load(Ordering::Relaxed));
            u128::from(idle) > tti.as_nanos()
        })
    }
}

/// A process-wide origin for compact timestamps.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub(crate) fn nanos_since_epoch() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The weigher handed to `quick_cache`: the user's, or one per entry.
pub(crate) struct Weigher<K, V>(pub(crate) Option<WeighFn<K, V>>);

impl<K, V> Clone for Weigher<K, V> {
    fn clone(&self) -> Self {
        Weigher(self.0.clone())
    }
}

impl<K, V> quick_cache::Weighter<K, Entry<V>> for Weigher<K, V> {
    fn weight(&self, key: &K, entry: &Entry<V>) -> u64 {
        // Zero would make an entry unevictable: every entry weighs at least 1.
        self.0.as_ref().map_or(1, |w| w(key, &entry.value).max(1))
    }
}

/// The lifecycle handed to `quick_cache`: reports size evictions to the listener.
pub(crate) struct Evictions<K, V>(pub(crate) Option<Listener<K, V>>);

impl<K, V> Clone for Evictions<K, V> {
    fn clone(&self) -> Self {
        Evictions(self.0.clone())
    }
}

impl<K, V> quick_cache::Lifecycle<K, Entry<V>> for Evictions<K, V> {
    type RequestState = ();

    fn begin_request(&self) -> Self::RequestState {}

    fn on_evict(&self, _state: &mut Self::RequestState, key: K, entry: Entry<V>) {
        if let Some(listener) = &self.0 {
            listener(&key, entry.value, RemovalCause::Size);
        }
    }
}

/// The storage: a bounded concurrent map of entries.
pub(crate) type Store<K, V> = quick_cache::sync::Cache<
    K,
    Entry<V>,
    Weigher<K, V>,
    quick_cache::DefaultHashBuilder,
    Evictions<K, V>,
>;

impl<V> fmt::Debug for Entry<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("loaded_at", &self.loaded_at)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}
