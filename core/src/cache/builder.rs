//! [`CacheBuilder`]: the settings of a [`Cache`].

use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use super::generations::Generations;
use super::stats::Counters;
use super::store::{Evictions, Listener, RemovalCause, Store, WeighFn, Weigher};
use super::{Cache, Inner, WhileUnhealthy, FLIGHT_SHARDS};
use crate::health::HealthBoard;

/// Builds a [`Cache`]. Defaults: 10 000 entries, no time-to-live or -idle, no
/// weigher, no eviction listener, [`WhileUnhealthy::Bypass`].
///
/// ```
/// use std::time::Duration;
/// use pgcachewatch::{Cache, RemovalCause, WhileUnhealthy};
/// let cache: Cache<String, String> = Cache::builder()
///     .name("users")
///     .capacity(50_000)
///     .time_to_live(Duration::from_secs(300))
///     .time_to_idle(Duration::from_secs(60))
///     .weigher(64 * 1024 * 1024, |key: &String, value: &String| (key.len() + value.len()) as u64)
///     .eviction_listener(|key: &String, _value, cause| {
///         if cause == RemovalCause::Size {
///             eprintln!("{key} evicted to make room");
///         }
///     })
///     .while_unhealthy(WhileUnhealthy::ServeWithin(Duration::from_secs(2)))
///     .build();
/// assert_eq!(cache.name(), Some("users"));
/// ```
pub struct CacheBuilder<K, V> {
    name: Option<String>,
    capacity: usize,
    ttl: Option<Duration>,
    tti: Option<Duration>,
    weigher: Option<(u64, WeighFn<K, V>)>,
    listener: Option<Listener<K, V>>,
    while_unhealthy: WhileUnhealthy,
    until_attached: bool,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> fmt::Debug for CacheBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .field("tti", &self.tti)
            .field("max_weight", &self.weigher.as_ref().map(|(w, _)| w))
            .field("eviction_listener", &self.listener.is_some())
            .field("while_unhealthy", &self.while_unhealthy)
            .field("unhealthy_until_attached", &self.until_attached)
            .finish()
    }
}

impl<K, V> Default for CacheBuilder<K, V> {
    fn default() -> Self {
        CacheBuilder {
            name: None,
            capacity: 10_000,
            ttl: None,
            tti: None,
            weigher: None,
            listener: None,
            while_unhealthy: WhileUnhealthy::Bypass,
            until_attached: false,
            _types: PhantomData,
        }
    }
}

impl<K, V> CacheBuilder<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A name for logs and statistics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The most entries held (at least 1); with a [`weigher`](Self::weigher), the
    /// number of entries expected (the weight is the bound).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Entries whose load started longer ago than this are reloaded, whatever the
    /// events say.
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Entries not read for this long are reloaded. Costs one atomic store per hit.
    pub fn time_to_idle(mut self, tti: Duration) -> Self {
        self.tti = Some(tti);
        self
    }

    /// Bounds the cache by weight instead of entry count: `weigher` gives each
    /// entry's weight (say, its size in bytes; at least 1 is counted), and entries
    /// are evicted to keep the total within `max_weight`.
    pub fn weigher(
        mut self,
        max_weight: u64,
        weigher: impl Fn(&K, &V) -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.weigher = Some((max_weight.max(1), Arc::new(weigher)));
        self
    }

    /// Called with each entry that leaves the cache and why ([`RemovalCause`]).
    ///
    /// Called at once for removals by key (a per-key invalidation,
    /// [`Cache::remove`], a replacement, a size eviction). Table invalidations and
    /// flushes are O(1) and touch no entry, so the entries they drop are reported
    /// when they are next looked up (or evicted). Keep it quick: it runs in the
    /// thread that removed the entry, sometimes under a storage lock.
    pub fn eviction_listener(
        mut self,
        listener: impl Fn(&K, V, RemovalCause) + Send + Sync + 'static,
    ) -> Self {
        self.listener = Some(Arc::new(listener));
        self
    }

    /// What reads do while the source is unhealthy.
    pub fn while_unhealthy(mut self, policy: WhileUnhealthy) -> Self {
        self.while_unhealthy = policy;
        self
    }

    /// Makes the cache unhealthy until a dispatcher is first attached to it: until
    /// then every read bypasses it (or, with [`WhileUnhealthy::ServeWithin`], is
    /// served only within the bound), as after a dispatcher stopped. For a cache
    /// that something is *meant* to invalidate: a read before the dispatcher is
    /// attached must not store a value nothing would ever drop. (By default a
    /// cache nothing was attached to is healthy: a cache you invalidate by hand.)
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let users: Cache<u32, String> = Cache::builder().unhealthy_until_attached().build();
    /// users.get_or_load(1, || async { Ok::<_, std::io::Error>("ann".to_string()) }).await?;
    /// assert_eq!(users.get(&1), None); // not stored: nothing invalidates it yet
    /// assert!(!users.is_healthy());
    /// # Ok::<_, pgcachewatch::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn unhealthy_until_attached(mut self) -> Self {
        self.until_attached = true;
        self
    }

    /// Builds the cache. It is healthy while nothing is attached to it (a cache
    /// you invalidate by hand; see also
    /// [`unhealthy_until_attached`](Self::unhealthy_until_attached)); once a dispatcher feeds it, its health follows the
    /// rules of [`HealthBoard`].
    pub fn build(self) -> Cache<K, V> {
        // Entries keep their times relative to a process-wide origin, set before
        // any load of this cache starts.
        let _ = super::store::epoch();
        let evictions = Evictions(self.listener.clone());
        let (estimated, weight, weigher) = match self.weigher {
            Some((max_weight, f)) => (self.capacity, max_weight, Weigher(Some(f))),
            None => (self.capacity, self.capacity as u64, Weigher(None)),
        };
        let store: Store<K, V> =
            Store::with(estimated, weight, weigher, Default::default(), evictions);
        let health = if self.until_attached {
            HealthBoard::awaiting_attachment(self.name.clone())
        } else {
            HealthBoard::with_name(self.name.clone())
        };
        Cache {
            inner: Arc::new(Inner {
                gens: Generations::new(health.is_healthy()),
                health,
                counters: Counters::new(self.name.as_deref()),
                name: self.name,
                store,
                flights: (0..FLIGHT_SHARDS).map(|_| Default::default()).collect(),
                hasher: Default::default(),
                ttl: self.ttl,
                tti: self.tti,
                listener: self.listener,
                serial: AtomicU64::new(0),
                while_unhealthy: self.while_unhealthy,
            }),
        }
    }
}
