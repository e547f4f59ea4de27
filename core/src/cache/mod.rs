//! The generation-stamped, single-flight cache engine.
//!
//! # Why `quick_cache` for storage
//!
//! The hit path is one hash-map lookup, one clone of the value and one or two atomic
//! loads (the generation check). We measured the candidate stores on that path
//! (`cargo run --release -p pgcachewatch-bench`, "storage candidates"): `quick_cache`'s
//! sync cache answers a hit in a fraction of the time of `moka`'s (whose reads go
//! through its admission/eviction bookkeeping), is bounded by capacity or weight,
//! and needs no background maintenance. TTL, idleness and staleness are checked by
//! the engine itself, so the store needs no time-based features. Single-flight and
//! invalidation are the engine's own too: neither crate closes the stale-set race
//! (ARCHITECTURE.md, decision 3).
//!
//! One job a file: [`builder`] (settings), [`load`] (single-flight loading and
//! publishing), [`store`] (entries, weigher, eviction listener), [`generations`]
//! (the stamps), [`flight`] (one load in progress), [`target`] (what a dispatcher
//! drives), [`stats`] (counters).

mod builder;
mod flight;
mod generations;
mod load;
mod refresh;
mod stats;
mod store;
mod target;

#[cfg(all(test, pgcachewatch_loom))]
mod loom_tests;
#[cfg(all(test, not(pgcachewatch_loom)))]
mod refresh_tests;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sync::Mutex;

pub use self::builder::CacheBuilder;
use self::flight::{Failure, Flight};
use self::generations::{Generations, Stamp};
use self::load::resolve_tags;
use self::refresh::Keeper;
pub use self::refresh::{Refresh, RefreshTask};
pub use self::stats::CacheStats;
use self::stats::{Counters, Dropped};
pub use self::store::RemovalCause;
use self::store::{Entry, Listener, Needs, Store};
pub use self::target::InvalidationTarget;
use crate::error::{BoxError, Error};
use crate::event::{IntoTableRef, TableRef};
use crate::health::{HasHealthBoard, HealthBoard};

/// What a cache does with reads while its event source is unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhileUnhealthy {
    /// Every read runs the loader; nothing is served from or stored in the cache.
    /// The default: no stale read, at the price of database load during an outage.
    #[default]
    Bypass,
    /// Serve entries loaded at most this long ago; older ones are reloaded (and
    /// stored: the flush that follows reconnection drops them).
    ServeWithin(Duration),
}

/// A cache whose entries are dropped by invalidation decisions and never outlive
/// them: the Rust counterpart of PGCacheWatch's `@cache` decorator.
///
/// * **Single-flight.** Concurrent misses on one key run the loader once; every
///   waiter gets its result. A loader error reaches every waiter and is never
///   cached; the next call retries. If the leading caller is cancelled, a waiter
///   takes over.
/// * **Generation stamps.** A load is stamped with the generations current when it
///   *started*. A load that began before an invalidation of its key (or of
///   everything, or of a table it is tagged with) is handed to the callers already
///   waiting on it but never stored and never served after the invalidation.
/// * **O(1) invalidate-all.** One atomic increment; stale entries are evicted lazily.
/// * **Bounded** by `capacity` entries or by weight (a weigher), with an optional
///   time-to-live and time-to-idle, and an eviction listener told why each entry
///   left ([`RemovalCause`]).
/// * **The API of moka / quick_cache**, each call keeping the generation guarantee:
///   [`get`](Self::get), [`get_or_load`](Self::get_or_load) (loader errors shared
///   as [`Error::Load`]), [`try_get_with`](Self::try_get_with) (errors shared as
///   `Arc<E>`), [`optionally_get_with`](Self::optionally_get_with) (nothing cached
///   on `None`), [`insert`](Self::insert), [`remove`](Self::remove),
///   [`contains_key`](Self::contains_key), [`entry_count`](Self::entry_count),
///   [`invalidate`](Self::invalidate), [`invalidate_all`](Self::invalidate_all).
/// * **Health-aware.** While the source is unhealthy reads bypass the cache (or are
///   served within a configured bound, see [`WhileUnhealthy`]).
///
/// `Cache` is cheap to clone; clones share the same entries.
///
/// # Example
///
/// ```
/// use pgcachewatch::{Cache, Decision};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let cache: Cache<u32, String> = Cache::new(1_000);
/// let v = cache.get_or_load(1, || async { Ok::<_, std::io::Error>("one".to_string()) }).await?;
/// assert_eq!(v, "one");
/// assert_eq!(cache.get(&1).as_deref(), Some("one"));
/// cache.invalidate(&1);
/// assert_eq!(cache.get(&1), None);
/// # Ok::<_, pgcachewatch::Error>(())
/// # }).unwrap();
/// ```
pub struct Cache<K, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
        }
    }
}

/// In-flight loads by key, one map per shard.
type FlightShard<K, V> = Mutex<HashMap<K, Arc<Flight<V>>>>;

const FLIGHT_SHARDS: usize = 32;

struct Inner<K, V> {
    name: Option<String>,
    store: Store<K, V>,
    gens: Generations,
    flights: Box<[FlightShard<K, V>]>,
    hasher: std::collections::hash_map::RandomState,
    health: HealthBoard,
    ttl: Option<Duration>,
    tti: Option<Duration>,
    listener: Option<Listener<K, V>>,
    serial: AtomicU64,
    while_unhealthy: WhileUnhealthy,
    counters: Counters,
    /// Refreshing, warming and stale serving, with a refresher.
    keeper: Option<Keeper<K, V>>,
    /// Hits mark their keys read recently, sampled (for the keeper).
    sampling: bool,
    /// Loading reads may get a refreshing key's previous value.
    serves_stale: bool,
}

/// The error of [`Cache::optionally_get_with`]'s loads: there was nothing to cache.
#[derive(Debug, thiserror::Error)]
#[error("the loader found no value (nothing was cached)")]
struct Absent;

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A cache of at most `capacity` entries with default settings.
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// let users: Cache<u32, String> = Cache::new(10_000);
    /// users.insert(1, "ann".to_string());
    /// assert_eq!(users.get(&1).as_deref(), Some("ann"));
    /// ```
    pub fn new(capacity: usize) -> Self {
        CacheBuilder::default().capacity(capacity).build()
    }

    /// A builder for the other settings.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgcachewatch::Cache;
    /// let users: Cache<u32, String> = Cache::builder()
    ///     .name("users")
    ///     .time_to_live(Duration::from_secs(300))
    ///     .build();
    /// assert_eq!(users.name(), Some("users"));
    /// ```
    pub fn builder() -> CacheBuilder<K, V> {
        CacheBuilder::default()
    }

    /// The name given to the builder.
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// let users: Cache<u32, String> = Cache::builder().name("users").build();
    /// assert_eq!(users.name(), Some("users"));
    /// assert_eq!(Cache::<u32, String>::new(10).name(), None);
    /// ```
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }

    /// The fresh cached value for `key`, without loading. Counts a hit or a miss.
    ///
    /// It never answers a stale value, even with
    /// [`serve_stale_within`](CacheBuilder::serve_stale_within): that is for
    /// the reads that would otherwise wait for a refresh
    /// ([`get_or_load`](Self::get_or_load) and the like).
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// let users: Cache<u32, &str> = Cache::new(10);
    /// assert_eq!(users.get(&1), None); // a miss: `get` never loads
    /// users.insert(1, "ann");
    /// assert_eq!(users.get(&1), Some("ann")); // a hit
    /// let stats = users.stats();
    /// assert_eq!((stats.hits, stats.misses), (1, 1));
    /// ```
    #[inline]
    pub fn get(&self, key: &K) -> Option<V> {
        let found = self.lookup(key);
        if found.is_some() {
            self.count_hit(key);
        } else {
            self.inner.counters.miss();
        }
        found
    }

    /// Counts a hit on `key`. In line, exactly as many instructions as a
    /// plain striped bump; a cache that refreshes counts every hit out of line
    /// instead, where it samples the key as read recently.
    #[inline]
    fn count_hit(&self, key: &K) {
        if !self.inner.counters.try_hit() {
            self.count_hit_out_of_line(key);
        }
    }

    /// The rest of [`count_hit`](Self::count_hit).
    #[inline(never)]
    fn count_hit_out_of_line(&self, key: &K) {
        let n = self.inner.counters.hit();
        if self.inner.sampling {
            self.sample_hit(n, key);
        }
    }

    /// The fresh cached value for `key`, counting a hit if there is one and
    /// nothing otherwise (the load that follows a `None` counts the miss). For
    /// the `#[cached]` attribute's hit path; not part of the stable API.
    #[doc(hidden)]
    #[inline]
    pub fn hit_only(&self, key: &K) -> Option<V> {
        let found = self.lookup(key);
        if found.is_some() {
            self.count_hit(key);
        }
        found
    }

    /// The value for `key`: from the cache if fresh, else from `loader` (run once for
    /// all concurrent callers), stored unless an invalidation arrived meanwhile.
    ///
    /// The entry depends on every table: any table invalidation drops it. Use
    /// [`get_or_load_tagged`](Self::get_or_load_tagged) to narrow that.
    ///
    /// ```
    /// use pgcachewatch::{Cache, Error};
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let users: Cache<u32, String> = Cache::new(100);
    /// let name = users.get_or_load(1, || async { Ok::<_, std::io::Error>("ann".to_string()) }).await?;
    /// assert_eq!(name, "ann");
    /// assert_eq!(users.get(&1).as_deref(), Some("ann")); // stored
    /// // A failed load reaches its callers and is never cached.
    /// let failed = users.get_or_load(2, || async { Err(std::io::Error::other("db down")) }).await;
    /// assert!(matches!(failed, Err(Error::Load { .. })));
    /// assert_eq!(users.get(&2), None);
    /// # Ok::<_, pgcachewatch::Error>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Load`] with the loader's error, shared by every caller of this load
    /// (never cached). For the error as its own type, use
    /// [`try_get_with`](Self::try_get_with).
    pub async fn get_or_load<F, Fut, E>(&self, key: K, loader: F) -> Result<V, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Into<BoxError>,
    {
        self.load_through(key, Vec::new, loader, boxed_failure, |f| {
            Some(Error::Load {
                source: f.error.clone(),
            })
        })
        .await
    }

    /// Like [`get_or_load`](Self::get_or_load), for a value that depends only on
    /// `tables`: invalidations of other tables keep it.
    ///
    /// Tables are named as anywhere else ([`IntoTableRef`]): SQL-style text
    /// (`"users"`, `"public.users"`, parsed by [`TableRef::parse`], so `"Users"` is
    /// `users` as in SQL) or a [`TableRef`]. Entries are matched on the table name:
    /// a write to `users` in any schema drops them (over-invalidation is safe). A
    /// name that does not parse is logged and the entry depends on every table
    /// instead, never on nothing.
    ///
    /// ```
    /// use pgcachewatch::{Cache, Decision, InvalidationTarget, TableRef};
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let cache: Cache<&str, u32> = Cache::new(10);
    /// cache.get_or_load_tagged("n_users", &["public.users"], || async { Ok::<_, std::io::Error>(3) }).await?;
    /// cache.apply(&Decision::tables([TableRef::new("public", "orders")]));
    /// assert_eq!(cache.get(&"n_users"), Some(3)); // orders do not matter
    /// cache.apply(&Decision::tables([TableRef::new("public", "users")]));
    /// assert_eq!(cache.get(&"n_users"), None);
    /// # Ok::<_, pgcachewatch::Error>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`get_or_load`](Self::get_or_load).
    pub async fn get_or_load_tagged<T, F, Fut, E>(
        &self,
        key: K,
        tables: &[T],
        loader: F,
    ) -> Result<V, Error>
    where
        T: IntoTableRef + Clone,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Into<BoxError>,
    {
        let name = self.name();
        self.load_through(
            key,
            || resolve_tags(tables, name),
            loader,
            boxed_failure,
            |f| {
                Some(Error::Load {
                    source: f.error.clone(),
                })
            },
        )
        .await
    }

    /// Like [`get_or_load`](Self::get_or_load), with the loader's error as its own
    /// type: every caller sharing the failed load gets the same `Arc<E>` (moka's
    /// `try_get_with`). Nothing is cached on error.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use pgcachewatch::Cache;
    /// #[derive(Debug, thiserror::Error)]
    /// enum AppError { #[error("user {0} not found")] NotFound(u32) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let users: Cache<u32, String> = Cache::new(100);
    /// let err: Arc<AppError> = users
    ///     .try_get_with(7, || async { Err(AppError::NotFound(7)) })
    ///     .await
    ///     .unwrap_err();
    /// assert!(matches!(*err, AppError::NotFound(7))); // a 404, no downcast
    /// assert_eq!(users.get(&7), None);
    /// # });
    /// ```
    ///
    /// A caller that joins a load led by a caller with another error type (a
    /// mix of `try_get_with::<E1>` and `::<E2>` on one key) runs its own loader
    /// if that load fails.
    ///
    /// # Errors
    ///
    /// The loader's error, shared.
    pub async fn try_get_with<F, Fut, E>(&self, key: K, loader: F) -> Result<V, Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        self.load_through(key, Vec::new, loader, typed_failure, shared_typed)
            .await
    }

    /// [`try_get_with`](Self::try_get_with) for a value that depends only on
    /// `tables` (see [`get_or_load_tagged`](Self::get_or_load_tagged)).
    ///
    /// ```
    /// use pgcachewatch::{Cache, TableRef};
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let counts: Cache<&str, u64> = Cache::new(10);
    /// let load = || async { Ok::<_, std::io::Error>(42) };
    /// assert_eq!(counts.try_get_with_tagged("orders", &["public.orders"], load).await?, 42);
    /// counts.invalidate_tables(&[TableRef::new("public", "users")]);
    /// assert_eq!(counts.get(&"orders"), Some(42)); // users do not matter
    /// counts.invalidate_tables(&[TableRef::new("public", "orders")]);
    /// assert_eq!(counts.get(&"orders"), None);
    /// # Ok::<_, std::sync::Arc<std::io::Error>>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// The loader's error, shared.
    pub async fn try_get_with_tagged<T, F, Fut, E>(
        &self,
        key: K,
        tables: &[T],
        loader: F,
    ) -> Result<V, Arc<E>>
    where
        T: IntoTableRef + Clone,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let name = self.name();
        self.load_through(
            key,
            || resolve_tags(tables, name),
            loader,
            typed_failure,
            shared_typed,
        )
        .await
    }

    /// The value for `key`, or `None` if the loader finds none — and then nothing
    /// is cached: the next call asks again (an absent row may be inserted at any
    /// time). Concurrent callers share one load and its `None` (moka's
    /// `optionally_get_with`). A `None` counts in [`CacheStats::load_errors`].
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let users: Cache<u32, String> = Cache::new(100);
    /// assert_eq!(users.optionally_get_with(1, || async { None }).await, None);
    /// assert_eq!(users.optionally_get_with(1, || async { Some("ann".into()) }).await.as_deref(), Some("ann"));
    /// assert_eq!(users.get(&1).as_deref(), Some("ann"));
    /// # });
    /// ```
    pub async fn optionally_get_with<F, Fut>(&self, key: K, loader: F) -> Option<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Option<V>>,
    {
        self.try_get_with(key, || async move { loader().await.ok_or(Absent) })
            .await
            .ok()
    }

    /// Stores `value` for `key` now, replacing any entry, and detaches a load of
    /// `key` in flight (its value is older than this one).
    ///
    /// The value must be current *as of this call* — typically one your own
    /// transaction just committed. A value read earlier may already be stale (a
    /// write and its invalidation may have come in between); load it through
    /// [`get_or_load`](Self::get_or_load), which stamps it when the read starts.
    /// While the cache bypasses (unhealthy, [`WhileUnhealthy::Bypass`]) nothing
    /// is stored.
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// let cache: Cache<u32, &str> = Cache::new(10);
    /// cache.insert(1, "ann");
    /// assert!(cache.contains_key(&1));
    /// assert_eq!(cache.remove(&1), Some("ann"));
    /// assert_eq!(cache.entry_count(), 0);
    /// ```
    pub fn insert(&self, key: K, value: V) {
        let inner = &*self.inner;
        let replaced = {
            let mut flights = self.flight_shard(&key).lock();
            if let Some(flight) = flights.remove(&key) {
                flight.detach();
            }
            if self.bypassing() {
                return;
            }
            let entry = self.new_entry(value, inner.gens.stamp(&[]), Instant::now());
            self.store_entry(key, entry)
        };
        inner.counters.entries(|| inner.store.len() as u64);
        if let Some((key, value, cause)) = replaced {
            self.notify(&key, value, cause);
        }
    }

    /// Removes `key` (and detaches a load of it in flight); returns its value if
    /// it was fresh. The eviction listener hears [`RemovalCause::Explicit`].
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// let users: Cache<u32, &str> = Cache::new(10);
    /// users.insert(1, "ann");
    /// assert_eq!(users.remove(&1), Some("ann"));
    /// assert_eq!(users.remove(&1), None);
    /// ```
    pub fn remove(&self, key: &K) -> Option<V> {
        let removed = {
            let mut flights = self.flight_shard(key).lock();
            if let Some(flight) = flights.remove(key) {
                flight.detach();
            }
            self.inner.store.remove(key)
        };
        let (key, entry) = removed?;
        self.inner
            .counters
            .entries(|| self.inner.store.len() as u64);
        match self.stale_cause(&entry) {
            None => {
                let value = entry.value.clone();
                self.notify(&key, entry.value, RemovalCause::Explicit);
                Some(value)
            }
            Some(cause) => {
                self.notify(&key, entry.value, cause);
                None
            }
        }
    }

    /// Whether a fresh entry for `key` is held (counts nothing, refreshes no idle
    /// timer).
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// let users: Cache<u32, &str> = Cache::new(10);
    /// users.insert(1, "ann");
    /// assert!(users.contains_key(&1));
    /// users.invalidate(&1);
    /// assert!(!users.contains_key(&1));
    /// assert_eq!(users.stats().hits, 0); // not counted as reads
    /// ```
    pub fn contains_key(&self, key: &K) -> bool {
        if !self.is_healthy() {
            return self.lookup_unhealthy(key).is_some();
        }
        self.inner
            .store
            .peek(key)
            .is_some_and(|e| self.stale_cause(&e).is_none())
    }

    /// Entries held, fresh or not yet dropped (table invalidations and flushes are
    /// O(1): the entries they make stale leave on their next lookup or eviction).
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// let users: Cache<u32, &str> = Cache::new(10);
    /// users.insert(1, "ann");
    /// users.insert(2, "bob");
    /// assert_eq!(users.entry_count(), 2);
    /// users.invalidate_all(); // O(1): drops nothing now
    /// assert_eq!(users.get(&1), None);
    /// assert_eq!(users.entry_count(), 2); // still held: stale entries leave lazily
    /// ```
    pub fn entry_count(&self) -> u64 {
        self.inner.store.len() as u64
    }

    /// The total weight of the entries held (their count without a weigher).
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// let pages: Cache<String, String> = Cache::builder()
    ///     .weigher(1 << 20, |key: &String, html: &String| (key.len() + html.len()) as u64)
    ///     .build();
    /// pages.insert("/".into(), "<h1>hi</h1>".into());
    /// assert_eq!(pages.weighted_size(), 12); // 1 + 11 bytes
    /// ```
    pub fn weighted_size(&self) -> u64 {
        self.inner.store.weight()
    }

    /// Drops `key`, and detaches a load of it in flight so its result is not stored.
    ///
    /// With [`refresh_on_invalidation`](CacheBuilder::refresh_on_invalidation),
    /// a key read since its last invalidation is then reloaded in the
    /// background (a load that starts now: a later write's invalidation
    /// discards it in turn).
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let users: Cache<u32, &str> = Cache::new(10);
    /// users.insert(2, "bob");
    /// users.invalidate(&2); // what a dispatcher does when row 2 is written
    /// assert_eq!(users.get(&2), None);
    /// // Row 1 is written while its load runs: the caller gets the value, unstored.
    /// let v = users.get_or_load(1, || async {
    ///     users.invalidate(&1);
    ///     Ok::<_, std::io::Error>("ann, before the write")
    /// }).await?;
    /// assert_eq!((v, users.get(&1)), ("ann, before the write", None));
    /// # Ok::<_, pgcachewatch::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn invalidate(&self, key: &K) {
        let inner = &*self.inner;
        let mut refresh = None;
        let removed = {
            let mut flights = self.flight_shard(key).lock();
            let detached = flights.remove(key);
            if let Some(flight) = &detached {
                flight.detach();
            }
            let removed = inner.store.remove(key);
            if inner.keeper.is_some() {
                refresh = self.refresh_invalidated(
                    key,
                    &mut flights,
                    removed.as_ref().map(|(_, e)| e),
                    detached.as_deref(),
                );
            }
            removed
        };
        if let Some(task) = refresh {
            self.spawn_refresh(task);
        }
        inner.counters.dropped(Dropped::Key);
        if let Some((key, entry)) = removed {
            inner.counters.entries(|| inner.store.len() as u64);
            let cause = self
                .stale_cause(&entry)
                .unwrap_or(RemovalCause::Invalidated);
            self.notify(&key, entry.value, cause);
        }
    }

    /// Drops every entry and invalidates every load in flight, in O(1).
    ///
    /// With [`warm_after_flush`](CacheBuilder::warm_after_flush), the hottest
    /// keys are then reloaded in the background, paced, once the cache is
    /// healthy.
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// let users: Cache<u32, &str> = Cache::new(10);
    /// users.insert(1, "ann");
    /// users.insert(2, "bob");
    /// users.invalidate_all();
    /// assert_eq!((users.get(&1), users.get(&2)), (None, None));
    /// assert_eq!(users.stats().flushes, 1);
    /// ```
    pub fn invalidate_all(&self) {
        self.inner.gens.bump_all();
        self.inner.counters.dropped(Dropped::All);
        tracing::debug!(cache = self.name(), "flushed");
        if self.inner.keeper.is_some() {
            self.schedule_warm();
        }
    }

    /// Drops the entries depending on any of `tables` (untagged entries depend on all).
    ///
    /// ```
    /// use pgcachewatch::{Cache, TableRef};
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let counts: Cache<&str, u64> = Cache::new(10);
    /// let load = || async { Ok::<_, std::io::Error>(7) };
    /// counts.get_or_load_tagged("n_orders", &["orders"], load).await?;
    /// counts.get_or_load_tagged("n_users", &["users"], load).await?;
    /// counts.invalidate_tables(&[TableRef::new("public", "orders")]);
    /// assert_eq!(counts.get(&"n_orders"), None);
    /// assert_eq!(counts.get(&"n_users"), Some(7));
    /// # Ok::<_, pgcachewatch::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn invalidate_tables(&self, tables: &[TableRef]) {
        if tables.is_empty() {
            return;
        }
        self.inner.gens.bump_tables(tables);
        self.inner.counters.dropped(Dropped::Table);
    }

    /// Whether the cache currently trusts its entries (see [`HealthBoard`]).
    ///
    /// ```
    /// use pgcachewatch::{Cache, Dispatcher};
    /// use pgcachewatch::memory::InMemorySource;
    /// use pgcachewatch::strategies::Greedy;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let (source, control) = InMemorySource::pair();
    /// let users: Cache<u32, String> = Cache::new(100);
    /// let _dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// assert!(users.is_healthy());
    /// control.disconnect("connection reset"); // the source lost its connection
    /// assert!(!users.is_healthy()); // reads bypass the cache
    /// control.reconnect();
    /// assert!(users.is_healthy());
    /// # });
    /// ```
    pub fn is_healthy(&self) -> bool {
        self.inner.health.is_healthy()
    }

    /// Who feeds this cache, and whether it trusts its entries (see [`HealthBoard`]).
    ///
    /// ```
    /// use pgcachewatch::{Cache, Dispatcher};
    /// use pgcachewatch::memory::InMemorySource;
    /// use pgcachewatch::strategies::Greedy;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let (source, control) = InMemorySource::pair();
    /// let users: Cache<u32, String> = Cache::new(100);
    /// let _dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// control.disconnect("connection reset");
    /// let health = users.health();
    /// assert!(!health.healthy);
    /// assert_eq!((health.attached, health.unhealthy), (1, 1)); // one source, and it is down
    /// # });
    /// ```
    pub fn health(&self) -> crate::health::HealthSummary {
        self.inner.health.summary()
    }

    /// The counters, now (refreshes, warming and stale serving included).
    ///
    /// ```
    /// use pgcachewatch::Cache;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let users: Cache<u32, String> = Cache::new(100);
    /// for _ in 0..3 {
    ///     users.get_or_load(1, || async { Ok::<_, std::io::Error>("ann".to_string()) }).await?;
    /// }
    /// let stats = users.stats();
    /// assert_eq!((stats.misses, stats.loads, stats.hits), (1, 1, 2));
    /// assert_eq!(stats.entries, 1);
    /// # Ok::<_, pgcachewatch::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn stats(&self) -> CacheStats {
        self.inner
            .counters
            .snapshot(self.inner.store.len() as u64, self.inner.health.summary())
    }

    /// The fresh entry for `key`, if any; counts nothing.
    ///
    /// A hit on a plain entry is one comparison: its packed stamp against the
    /// [gate](Generations::gate), which holds the current generation and the
    /// cache's health in one word. Everything else (tagged, timed or listened-to
    /// entries, stale entries, an unhealthy cache) takes the full checks.
    #[inline]
    fn lookup(&self, key: &K) -> Option<V> {
        let inner = &*self.inner;
        let entry = inner.store.get(key)?;
        if entry.passes(inner.gens.gate()) {
            return Some(entry.value);
        }
        self.checked_lookup(key, entry)
    }

    /// The rest of [`lookup`](Self::lookup): an entry the one-word check turned
    /// away (kept out of line, so that a plain hit stays in registers).
    #[inline(never)]
    fn checked_lookup(&self, key: &K, entry: Entry<V>) -> Option<V> {
        let inner = &*self.inner;
        if !inner.health.is_healthy() {
            return self.serve_unhealthy(key, entry);
        }
        if !entry.is_current(&inner.gens) {
            self.drop_dead(key, entry, None);
            return None;
        }
        if self.expired(&entry) {
            inner.counters.expired();
            self.drop_dead(key, entry, Some(RemovalCause::Expired));
            return None;
        }
        entry.touch();
        Some(entry.value)
    }

    #[cold]
    fn lookup_unhealthy(&self, key: &K) -> Option<V> {
        let entry = self.inner.store.get(key)?;
        self.serve_unhealthy(key, entry)
    }

    /// `entry` if the cache may serve it while unhealthy.
    #[cold]
    fn serve_unhealthy(&self, key: &K, entry: Entry<V>) -> Option<V> {
        let inner = &*self.inner;
        let WhileUnhealthy::ServeWithin(bound) = inner.while_unhealthy else {
            return None;
        };
        if !entry.is_current(&inner.gens) {
            self.drop_dead(key, entry, None);
            return None;
        }
        if self.expired(&entry) {
            inner.counters.expired();
            self.drop_dead(key, entry, Some(RemovalCause::Expired));
            return None;
        }
        if entry.age() > bound {
            return None;
        }
        entry.touch();
        Some(entry.value)
    }

    fn expired(&self, entry: &Entry<V>) -> bool {
        let inner = &*self.inner;
        inner.ttl.is_some_and(|ttl| entry.age() > ttl)
            || inner.tti.is_some_and(|tti| entry.idle_longer_than(tti))
    }

    /// Why `entry` may no longer be served, if it may not.
    fn stale_cause(&self, entry: &Entry<V>) -> Option<RemovalCause> {
        let gens = &self.inner.gens;
        if !entry.is_current(gens) {
            return Some(if entry.flushed(gens) {
                RemovalCause::Flushed
            } else {
                RemovalCause::Invalidated
            });
        }
        self.expired(entry).then_some(RemovalCause::Expired)
    }

    /// With an eviction listener, removes a dead entry found by a lookup (if it is
    /// still the one stored) and reports it; without one, it is left to eviction.
    #[cold]
    fn drop_dead(&self, key: &K, entry: Entry<V>, cause: Option<RemovalCause>) {
        if self.inner.listener.is_none() {
            return;
        }
        let serial = entry.serial();
        if let Some((key, dead)) = self.inner.store.remove_if(key, |e| e.serial() == serial) {
            let cause = cause
                .or_else(|| self.stale_cause(&dead))
                .unwrap_or(RemovalCause::Invalidated);
            self.notify(&key, dead.value, cause);
        }
        let _ = key;
    }

    fn notify(&self, key: &K, value: V, cause: RemovalCause) {
        if let Some(listener) = &self.inner.listener {
            listener(key, value, cause);
        }
    }

    fn new_entry(&self, value: V, stamp: Stamp, loaded_at: Instant) -> Entry<V> {
        let inner = &*self.inner;
        let serial = inner
            .listener
            .as_ref()
            .map(|_| inner.serial.fetch_add(1, Ordering::Relaxed));
        let needs = Needs {
            age: inner.ttl.is_some()
                || matches!(inner.while_unhealthy, WhileUnhealthy::ServeWithin(_)),
            idle: inner.tti.is_some(),
            serial,
        };
        Entry::new(value, stamp, loaded_at, needs)
    }

    fn bypassing(&self) -> bool {
        !self.is_healthy() && self.inner.while_unhealthy == WhileUnhealthy::Bypass
    }
}

/// A loader error of any kind, boxed and shared.
fn boxed_failure<E: Into<BoxError>>(e: E) -> (Failure, Error) {
    let error: Arc<dyn std::error::Error + Send + Sync> = Arc::from(e.into());
    (
        Failure {
            error: error.clone(),
            typed: None,
        },
        Error::Load { source: error },
    )
}

/// A loader error kept as its own type, shared as `Arc<E>`.
fn typed_failure<E: std::error::Error + Send + Sync + 'static>(e: E) -> (Failure, Arc<E>) {
    let e = Arc::new(e);
    (
        Failure {
            error: e.clone(),
            typed: Some(e.clone()),
        },
        e,
    )
}

/// Another caller's failure as `Arc<E>`, if it had that type.
fn shared_typed<E: std::error::Error + Send + Sync + 'static>(f: &Failure) -> Option<Arc<E>> {
    f.typed.clone()?.downcast::<E>().ok()
}

impl<K, V> HasHealthBoard for Inner<K, V>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    fn health_board(&self) -> &HealthBoard {
        &self.health
    }

    fn health_changed(&self, healthy: bool) {
        self.gens.set_healthy(healthy);
        if healthy {
            if let Some(keeper) = &self.keeper {
                keeper.wake();
            }
        }
    }
}

impl<K, V> fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.inner.name)
            .field("healthy", &self.inner.health.is_healthy())
            .field("ttl", &self.inner.ttl)
            .field("tti", &self.inner.tti)
            .field("while_unhealthy", &self.inner.while_unhealthy)
            .field("keeper", &self.inner.keeper)
            .finish_non_exhaustive()
    }
}
