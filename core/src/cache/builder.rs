//! [`CacheBuilder`]: the settings of a [`Cache`].

use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::generations::Generations;
use super::refresh::{Clock, Keeper, Refresh, Warm};
use super::stats::Counters;
use super::store::{Evictions, Listener, RemovalCause, Store, WeighFn, Weigher};
use super::{Cache, Inner, WhileUnhealthy, FLIGHT_SHARDS};
use crate::health::HealthBoard;

/// Builds a [`Cache`]. Defaults: 10 000 entries, no time-to-live or -idle, no
/// weigher, no eviction listener, [`WhileUnhealthy::Bypass`].
///
/// ```
/// use std::time::{Duration, Instant};
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
    refresh: Option<Refresh<K, V>>,
    refresh_on_invalidation: bool,
    warm: Option<Warm>,
    stale_within: Option<Duration>,
    stale_clock: Option<Clock>,
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
            .field("refresh", &self.refresh)
            .field("refresh_on_invalidation", &self.refresh_on_invalidation)
            .field("warm_after_flush", &self.warm)
            .field("serve_stale_within", &self.stale_within)
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
            refresh: None,
            refresh_on_invalidation: false,
            warm: None,
            stale_within: None,
            stale_clock: None,
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
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// let users: Cache<u32, String> = Cache::builder().name("users").build();
    /// assert_eq!(users.name(), Some("users")); // and `cache = "users"` in logs and metrics
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The most entries held (at least 1); with a [`weigher`](Self::weigher), the
    /// number of entries expected (the weight is the bound).
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// let users: Cache<u32, u32> = Cache::builder().capacity(100).build();
    /// for id in 0..1_000 {
    ///     users.insert(id, id);
    /// }
    /// assert!(users.entry_count() <= 100); // the others were evicted
    /// ```
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Entries whose load started longer ago than this are reloaded, whatever the
    /// events say.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgcachewatch::Cache;
    /// let rates: Cache<&str, f64> = Cache::builder().time_to_live(Duration::from_millis(50)).build();
    /// rates.insert("EUR", 1.08);
    /// assert_eq!(rates.get(&"EUR"), Some(1.08));
    /// std::thread::sleep(Duration::from_millis(100));
    /// assert_eq!(rates.get(&"EUR"), None); // expired: the next read reloads it
    /// ```
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Entries not read for this long are reloaded. Costs one atomic store per hit.
    ///
    /// ```
    /// use std::time::Duration;
    /// use std::thread::sleep;
    /// use pgcachewatch::Cache;
    /// let sessions: Cache<u32, &str> = Cache::builder().time_to_idle(Duration::from_millis(300)).build();
    /// sessions.insert(1, "ann");
    /// sleep(Duration::from_millis(200));
    /// assert!(sessions.get(&1).is_some()); // read: idle for 0 ms again
    /// sleep(Duration::from_millis(200));
    /// assert!(sessions.get(&1).is_some()); // 400 ms old, but read 200 ms ago
    /// sleep(Duration::from_millis(400));
    /// assert_eq!(sessions.get(&1), None); // idle too long
    /// ```
    pub fn time_to_idle(mut self, tti: Duration) -> Self {
        self.tti = Some(tti);
        self
    }

    /// Bounds the cache by weight instead of entry count: `weigher` gives each
    /// entry's weight (say, its size in bytes; at least 1 is counted), and entries
    /// are evicted to keep the total within `max_weight`.
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// let blobs: Cache<u32, Vec<u8>> = Cache::builder()
    ///     .weigher(64 * 1024, |_id: &u32, bytes: &Vec<u8>| bytes.len() as u64)
    ///     .build();
    /// for id in 0..100 {
    ///     blobs.insert(id, vec![0; 4 * 1024]);
    /// }
    /// assert!(blobs.weighted_size() <= 64 * 1024); // at most 64 KiB held
    /// ```
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
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use pgcachewatch::{Cache, RemovalCause};
    /// let removed = Arc::new(Mutex::new(Vec::new()));
    /// let log = removed.clone();
    /// let users: Cache<u32, &str> = Cache::builder()
    ///     .eviction_listener(move |id: &u32, _name, cause| log.lock().unwrap().push((*id, cause)))
    ///     .build();
    /// users.insert(1, "ann");
    /// users.invalidate(&1);
    /// users.insert(2, "bob");
    /// users.remove(&2);
    /// assert_eq!(*removed.lock().unwrap(), [(1, RemovalCause::Invalidated), (2, RemovalCause::Explicit)]);
    /// ```
    pub fn eviction_listener(
        mut self,
        listener: impl Fn(&K, V, RemovalCause) + Send + Sync + 'static,
    ) -> Self {
        self.listener = Some(Arc::new(listener));
        self
    }

    /// What reads do while the source is unhealthy.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgcachewatch::{Cache, Dispatcher, WhileUnhealthy};
    /// use pgcachewatch::strategies::Greedy;
    /// # use pgcachewatch::memory::InMemorySource;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let (source, control) = InMemorySource::pair();
    /// let users: Cache<u32, String> = Cache::builder()
    ///     .while_unhealthy(WhileUnhealthy::ServeWithin(Duration::from_secs(5)))
    ///     .build();
    /// let _dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// control.disconnect("connection reset"); // an outage: events may be lost
    /// users.get_or_load(1, || async { Ok::<_, std::io::Error>("ann".to_string()) }).await?;
    /// // Loaded less than 5 s ago: served (with the default, `Bypass`, every read would load).
    /// assert_eq!(users.get(&1).as_deref(), Some("ann"));
    /// # Ok::<_, pgcachewatch::Error>(())
    /// # }).unwrap();
    /// ```
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

    /// Reloads a key in the background right after its invalidation, if it was
    /// read since it was last invalidated, so the next reader hits a fresh
    /// value instead of waiting for the database. Off by default.
    ///
    /// The reload is stamped like any load: a write whose invalidation arrives
    /// while it runs discards it, so nothing older than an applied invalidation
    /// is ever stored or served (unless you opt into
    /// [`serve_stale_within`](Self::serve_stale_within)). Readers that miss
    /// while it runs wait for it rather than loading again. At most
    /// [`Refresh::max_concurrent`] refreshes run at once.
    ///
    /// "Read recently" is sampled so that hits stay cheap: every miss, and
    /// about one hit in 16 of each thread, marks its key. A key read only a few
    /// times since its last write may therefore not be refreshed (its next
    /// reader loads it, as without the option). Key invalidations refresh;
    /// table invalidations and flushes drop entries in O(1) without naming
    /// them (see [`warm_after_flush`](Self::warm_after_flush) for flushes).
    ///
    /// ```
    /// use pgcachewatch::{Cache, Refresh};
    /// # async fn query(id: u32) -> Result<String, std::io::Error> { Ok(format!("user {id}")) }
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let users: Cache<u32, String> = Cache::builder()
    ///     .refresh_on_invalidation(Refresh::new(|id: u32| query(id)).max_concurrent(4))
    ///     .build();
    /// users.get_or_load(7, || query(7)).await?;
    /// users.invalidate(&7); // what a dispatcher does when row 7 is written
    /// tokio::task::yield_now().await; // the refresh runs in the background
    /// assert_eq!(users.get(&7).as_deref(), Some("user 7")); // a hit: reloaded
    /// assert_eq!(users.stats().refreshes_served, 1);
    /// # Ok::<_, pgcachewatch::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn refresh_on_invalidation(mut self, refresh: Refresh<K, V>) -> Self {
        self.refresh = Some(refresh);
        self.refresh_on_invalidation = true;
        self
    }

    /// The loader for [`warm_after_flush`](Self::warm_after_flush) (and
    /// [`serve_stale_within`](Self::serve_stale_within)) without refreshing
    /// keys on invalidation. [`refresh_on_invalidation`](Self::refresh_on_invalidation)
    /// sets it too.
    ///
    /// ```
    /// use pgcachewatch::{Cache, Refresh};
    /// let cache: Cache<u32, u32> = Cache::builder()
    ///     .refresher(Refresh::new(|k: u32| async move { Ok::<_, std::io::Error>(k) }))
    ///     .warm_after_flush(1_000, 200)
    ///     .build();
    /// # let _ = cache;
    /// ```
    pub fn refresher(mut self, refresh: Refresh<K, V>) -> Self {
        self.refresh = Some(refresh);
        self
    }

    /// After a flush (a gap, a dispatcher attaching, [`Decision::All`]),
    /// reloads the `keys` most read keys in the background, at most
    /// `per_second` loads a second (and at most the refresher's
    /// [`max_concurrent`](Refresh::max_concurrent) at once), so that a
    /// reconnect does not turn into a storm of misses. Needs a refresher
    /// ([`refresh_on_invalidation`](Self::refresh_on_invalidation) or
    /// [`refresher`](Self::refresher)); does nothing without one.
    ///
    /// Warming respects health: it starts only once the cache is healthy again
    /// (after a reconnect, once the source says so), pauses while it is not,
    /// and a newer flush stops it (the next warming starts over). Each load is
    /// stamped like any other, so one that a write or a flush overtakes is
    /// dropped. Keys whose entry is fresh, or that a reader is already
    /// loading, are skipped.
    ///
    /// Hotness is sampled (see
    /// [`refresh_on_invalidation`](Self::refresh_on_invalidation)); the table
    /// it is kept in has room for about four times `keys` keys. A strategy
    /// that answers every event with [`Decision::All`] (`Greedy`) flushes on
    /// every write, and so warms on every write: pair warming with strategies
    /// that name keys or tables.
    ///
    /// ```
    /// use pgcachewatch::{Cache, Refresh};
    /// let cache: Cache<u32, String> = Cache::builder()
    ///     .refresh_on_invalidation(Refresh::new(|id: u32| async move {
    ///         Ok::<_, std::io::Error>(format!("user {id}"))
    ///     }))
    ///     .warm_after_flush(10_000, 500) // the 10 000 hottest, 500 a second
    ///     .build();
    /// # let _ = cache;
    /// ```
    ///
    /// [`Decision::All`]: crate::Decision::All
    pub fn warm_after_flush(mut self, keys: usize, per_second: u32) -> Self {
        self.warm = (keys > 0).then(|| Warm::new(keys, per_second));
        self
    }

    /// Lets a read get a key's previous value for at most `bound` after its
    /// invalidation, while the key's refresh runs, instead of waiting for it
    /// (stale-while-revalidate, bounded). Off by default: without it nothing
    /// older than an applied invalidation is served. The reads are the loading
    /// ones ([`Cache::get_or_load`] and the like, `#[cached]`); [`Cache::get`],
    /// which never waits, answers fresh values only.
    ///
    /// Only a key being refreshed serves its previous value (so it needs
    /// [`refresh_on_invalidation`](Self::refresh_on_invalidation)), only while
    /// the cache is healthy and the refresh is current, and never past `bound`
    /// after the invalidation that made the value stale, even across further
    /// writes (the bound counts from the first). Each such read is counted in
    /// [`CacheStats::stale_served`](super::CacheStats::stale_served) (metric
    /// `pgcachewatch_cache_stale_served_total`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgcachewatch::{Cache, Refresh};
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let prices: Cache<u32, u64> = Cache::builder()
    ///     .refresh_on_invalidation(Refresh::new(|id: u32| async move {
    ///         tokio::time::sleep(Duration::from_millis(20)).await; // a slow query
    ///         Ok::<_, std::io::Error>(200)
    ///     }))
    ///     .serve_stale_within(Duration::from_millis(100))
    ///     .build();
    /// let load = || async { Ok::<_, std::io::Error>(100) };
    /// prices.get_or_load(1, load).await?;
    /// prices.invalidate(&1); // the price changed: a refresh starts
    /// // The previous price, within 100 ms, instead of waiting for the refresh.
    /// assert_eq!(prices.get_or_load(1, load).await?, 100);
    /// assert_eq!(prices.stats().stale_served, 1);
    /// # Ok::<_, pgcachewatch::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn serve_stale_within(mut self, bound: Duration) -> Self {
        self.stale_within = Some(bound);
        self
    }

    /// The clock [`serve_stale_within`](Self::serve_stale_within)'s bound is
    /// measured with (default: [`Instant::now`]). For tests that move time by
    /// hand (the testkit's model checker); not part of the stable API.
    #[doc(hidden)]
    pub fn stale_clock(mut self, now: impl Fn() -> Instant + Send + Sync + 'static) -> Self {
        self.stale_clock = Some(Arc::new(now));
        self
    }

    /// Builds the cache. It is healthy while nothing is attached to it (a cache
    /// you invalidate by hand; see also
    /// [`unhealthy_until_attached`](Self::unhealthy_until_attached)); once a dispatcher feeds it, its health follows the
    /// rules of [`HealthBoard`].
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// let users: Cache<u32, &str> = Cache::builder().capacity(1_000).build();
    /// assert!(users.is_healthy()); // nothing attached yet: a cache you invalidate by hand
    /// let shared = users.clone(); // clones share the entries
    /// shared.insert(1, "ann");
    /// assert_eq!(users.get(&1), Some("ann"));
    /// ```
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
        if self.refresh.is_none() && (self.warm.is_some() || self.stale_within.is_some()) {
            tracing::warn!(
                cache = self.name.as_deref(),
                "warm_after_flush and serve_stale_within need a refresher \
                 (refresh_on_invalidation or refresher): ignored"
            );
        }
        let keeper = self.refresh.map(|refresh| {
            Keeper::new(
                refresh,
                self.refresh_on_invalidation,
                self.warm,
                self.stale_within,
                self.stale_clock,
            )
        });
        let sampling = keeper
            .as_ref()
            .is_some_and(|k| k.on_invalidation || k.warm.is_some());
        let serves_stale = keeper
            .as_ref()
            .is_some_and(|k| k.on_invalidation && k.stale_within.is_some());
        let health = if self.until_attached {
            HealthBoard::awaiting_attachment(self.name.clone())
        } else {
            HealthBoard::with_name(self.name.clone())
        };
        Cache {
            inner: Arc::new(Inner {
                gens: Generations::new(health.is_healthy()),
                health,
                counters: Counters::new(self.name.as_deref(), sampling),
                name: self.name,
                store,
                flights: (0..FLIGHT_SHARDS).map(|_| Default::default()).collect(),
                hasher: Default::default(),
                ttl: self.ttl,
                tti: self.tti,
                listener: self.listener,
                serial: AtomicU64::new(0),
                while_unhealthy: self.while_unhealthy,
                keeper,
                sampling,
                serves_stale,
            }),
        }
    }
}
