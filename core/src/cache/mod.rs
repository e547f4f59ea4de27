//! The generation-stamped, single-flight cache engine.
//!
//! # Why `quick_cache` for storage
//!
//! The hit path is one hash-map lookup, one clone of the value and one or two atomic
//! loads (the generation check). We measured the candidate stores on that path
//! (`cargo run --release -p pgcachewatch-bench`, "storage candidates"): `quick_cache`'s
//! sync cache answers a hit in a fraction of the time of `moka`'s (whose reads go
//! through its admission/eviction bookkeeping), is bounded by capacity, and needs no
//! background maintenance. TTL and staleness are checked by the engine itself, so the
//! store needs no time-based features. Single-flight and invalidation are the engine's
//! own too: neither crate closes the stale-set race (DESIGN.md decision 3).

mod flight;
mod generations;
mod stats;

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use self::flight::{Flight, Outcome};
use self::generations::{Generations, Stamp};
pub use self::stats::CacheStats;
use self::stats::{bump, Counters};
use crate::error::{BoxError, Error};
use crate::event::TableRef;
use crate::strategy::Decision;

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

/// Anything a dispatcher can apply [`Decision`]s and health changes to.
///
/// [`Cache`] implements it; implement it to drive another store from a strategy.
pub trait InvalidationTarget<K>: Send + Sync + 'static {
    /// Drops what the decision says.
    fn apply(&self, decision: &Decision<K>);
    /// Told whenever the source's health changes; while unhealthy, do not trust
    /// cached data.
    fn set_healthy(&self, healthy: bool);
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
/// * **Bounded** by `capacity` entries, with an optional time-to-live.
/// * **Health-aware.** While the source is unhealthy reads bypass the cache (or are
///   served within a configured bound, see [`WhileUnhealthy`]).
///
/// `Cache` is cheap to clone; clones share the same entries.
///
/// # Example
///
/// ```
/// use pgcachewatch_core::{Cache, Decision};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let cache: Cache<u32, String> = Cache::new(1_000);
/// let v = cache.get_or_load(1, || async { Ok::<_, std::io::Error>("one".to_string()) }).await?;
/// assert_eq!(v, "one");
/// assert_eq!(cache.get(&1).as_deref(), Some("one"));
/// cache.invalidate(&1);
/// assert_eq!(cache.get(&1), None);
/// # Ok::<_, pgcachewatch_core::Error>(())
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

struct Inner<K, V> {
    name: Option<String>,
    store: quick_cache::sync::Cache<K, Entry<V>>,
    gens: Generations,
    flights: Box<[FlightShard<K, V>]>,
    hasher: RandomState,
    healthy: AtomicBool,
    ttl: Option<Duration>,
    while_unhealthy: WhileUnhealthy,
    counters: Counters,
}

#[derive(Clone)]
struct Entry<V> {
    value: V,
    stamp: Stamp,
    loaded_at: Instant,
}

const FLIGHT_SHARDS: usize = 32;

/// Builds a [`Cache`]. Defaults: 10 000 entries, no TTL, [`WhileUnhealthy::Bypass`].
///
/// ```
/// use std::time::Duration;
/// use pgcachewatch_core::{Cache, WhileUnhealthy};
/// let cache: Cache<String, u64> = Cache::builder()
///     .name("users")
///     .capacity(50_000)
///     .time_to_live(Duration::from_secs(300))
///     .while_unhealthy(WhileUnhealthy::ServeWithin(Duration::from_secs(2)))
///     .build();
/// assert_eq!(cache.name(), Some("users"));
/// ```
pub struct CacheBuilder<K, V> {
    name: Option<String>,
    capacity: usize,
    ttl: Option<Duration>,
    while_unhealthy: WhileUnhealthy,
    _types: std::marker::PhantomData<fn() -> (K, V)>,
}

impl<K, V> fmt::Debug for CacheBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .field("while_unhealthy", &self.while_unhealthy)
            .finish()
    }
}

impl<K, V> Default for CacheBuilder<K, V> {
    fn default() -> Self {
        CacheBuilder {
            name: None,
            capacity: 10_000,
            ttl: None,
            while_unhealthy: WhileUnhealthy::Bypass,
            _types: std::marker::PhantomData,
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

    /// The most entries held (at least 1).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Entries older than this are reloaded, whatever the events say.
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// What reads do while the source is unhealthy.
    pub fn while_unhealthy(mut self, policy: WhileUnhealthy) -> Self {
        self.while_unhealthy = policy;
        self
    }

    /// Builds the cache. It starts healthy; a dispatcher it is attached to sets its
    /// health from the source's.
    pub fn build(self) -> Cache<K, V> {
        Cache {
            inner: Arc::new(Inner {
                name: self.name,
                store: quick_cache::sync::Cache::new(self.capacity),
                gens: Generations::default(),
                flights: (0..FLIGHT_SHARDS).map(|_| Mutex::default()).collect(),
                hasher: RandomState::new(),
                healthy: AtomicBool::new(true),
                ttl: self.ttl,
                while_unhealthy: self.while_unhealthy,
                counters: Counters::default(),
            }),
        }
    }
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A cache of at most `capacity` entries with default settings.
    pub fn new(capacity: usize) -> Self {
        CacheBuilder::default().capacity(capacity).build()
    }

    /// A builder for the other settings.
    pub fn builder() -> CacheBuilder<K, V> {
        CacheBuilder::default()
    }

    /// The name given to the builder.
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }

    /// The fresh cached value for `key`, without loading. Counts a hit or a miss.
    #[inline]
    pub fn get(&self, key: &K) -> Option<V> {
        let found = self.lookup(key);
        let c = &self.inner.counters;
        if found.is_some() {
            c.hits.bump();
        } else {
            bump(&c.misses);
        }
        found
    }

    /// The value for `key`: from the cache if fresh, else from `loader` (run once for
    /// all concurrent callers), stored unless an invalidation arrived meanwhile.
    ///
    /// The entry depends on every table: any table invalidation drops it. Use
    /// [`get_or_load_tagged`](Self::get_or_load_tagged) to narrow that.
    ///
    /// # Errors
    ///
    /// [`Error::Load`] with the loader's error, shared by every caller of this load.
    pub async fn get_or_load<F, Fut, E>(&self, key: K, loader: F) -> Result<V, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Into<BoxError>,
    {
        self.get_or_load_tagged(key, &[], loader).await
    }

    /// Like [`get_or_load`](Self::get_or_load), for a value that depends only on
    /// `tables` (names, schema ignored): invalidations of other tables keep it.
    ///
    /// ```
    /// use pgcachewatch_core::{Cache, Decision, InvalidationTarget, TableRef};
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let cache: Cache<&str, u32> = Cache::new(10);
    /// cache.get_or_load_tagged("n_users", &["users"], || async { Ok::<_, std::io::Error>(3) }).await?;
    /// cache.apply(&Decision::tables([TableRef::new("public", "orders")]));
    /// assert_eq!(cache.get(&"n_users"), Some(3)); // orders do not matter
    /// cache.apply(&Decision::tables([TableRef::new("public", "users")]));
    /// assert_eq!(cache.get(&"n_users"), None);
    /// # Ok::<_, pgcachewatch_core::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn get_or_load_tagged<F, Fut, E>(
        &self,
        key: K,
        tables: &[&str],
        loader: F,
    ) -> Result<V, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Into<BoxError>,
    {
        let inner = &*self.inner;
        if let Some(v) = self.lookup(&key) {
            inner.counters.hits.bump();
            return Ok(v);
        }
        if self.bypassing() {
            bump(&inner.counters.bypasses);
            return loader().await.map_err(|e| {
                bump(&inner.counters.load_errors);
                Error::Load {
                    source: Arc::from(e.into()),
                }
            });
        }
        bump(&inner.counters.misses);

        // Find a flight to join, or lead a new one.
        let flight = loop {
            match self.join_or_lead(&key, tables) {
                Role::Hit(v) => return Ok(v),
                Role::Lead(flight) => break flight,
                Role::Wait(flight) => {
                    if let Some(outcome) = flight.wait().await {
                        return outcome.map_err(|source| Error::Load { source });
                    }
                    // The leader was cancelled: try again (perhaps as the leader).
                }
            }
        };

        let mut guard = LeadGuard {
            cache: self,
            key: &key,
            flight: &flight,
            finished: false,
        };
        bump(&inner.counters.loads);
        let outcome: Outcome<V> = loader().await.map_err(|e| Arc::from(e.into()));
        guard.finished = true;
        self.finish(&key, &flight, outcome.clone());
        outcome.map_err(|source| Error::Load { source })
    }

    /// Drops `key`, and detaches a load of it in flight so its result is not stored.
    pub fn invalidate(&self, key: &K) {
        let inner = &*self.inner;
        let mut flights = self.flight_shard(key).lock();
        if let Some(flight) = flights.remove(key) {
            flight.detach();
        }
        inner.store.remove(key);
        drop(flights);
        bump(&inner.counters.invalidations);
    }

    /// Drops every entry and invalidates every load in flight, in O(1).
    pub fn invalidate_all(&self) {
        self.inner.gens.bump_all();
        bump(&self.inner.counters.flushes);
        tracing::debug!(cache = self.name(), "flushed");
    }

    /// Drops the entries depending on any of `tables` (untagged entries depend on all).
    pub fn invalidate_tables(&self, tables: &[TableRef]) {
        if tables.is_empty() {
            return;
        }
        self.inner.gens.bump_tables(tables);
        bump(&self.inner.counters.invalidations);
    }

    /// Whether the cache currently trusts its entries (its source is healthy).
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire)
    }

    /// The counters, now.
    pub fn stats(&self) -> CacheStats {
        self.inner.counters.snapshot(self.inner.store.len() as u64)
    }

    /// The fresh entry for `key`, if any; counts nothing.
    #[inline]
    fn lookup(&self, key: &K) -> Option<V> {
        let inner = &*self.inner;
        if !inner.healthy.load(Ordering::Acquire) {
            return self.lookup_unhealthy(key);
        }
        let entry = inner.store.get(key)?;
        if !inner.gens.is_current(&entry.stamp) {
            return None;
        }
        if let Some(ttl) = inner.ttl {
            if entry.loaded_at.elapsed() > ttl {
                return None;
            }
        }
        Some(entry.value)
    }

    #[cold]
    fn lookup_unhealthy(&self, key: &K) -> Option<V> {
        let inner = &*self.inner;
        let WhileUnhealthy::ServeWithin(bound) = inner.while_unhealthy else {
            return None;
        };
        let entry = inner.store.get(key)?;
        let limit = inner.ttl.map_or(bound, |ttl| ttl.min(bound));
        (inner.gens.is_current(&entry.stamp) && entry.loaded_at.elapsed() <= limit)
            .then_some(entry.value)
    }

    /// While unhealthy (serving within a bound), a read may only share a load that
    /// started within the bound: the shared value may be as old as the load's start.
    fn may_join(&self, flight: &Flight<V>) -> bool {
        match self.inner.while_unhealthy {
            WhileUnhealthy::ServeWithin(bound) if !self.is_healthy() => {
                flight.started_at.elapsed() <= bound
            }
            _ => true,
        }
    }

    fn bypassing(&self) -> bool {
        !self.is_healthy() && self.inner.while_unhealthy == WhileUnhealthy::Bypass
    }

    fn flight_shard(&self, key: &K) -> &FlightShard<K, V> {
        let shard = self.inner.hasher.hash_one(key) as usize % FLIGHT_SHARDS;
        &self.inner.flights[shard]
    }

    fn join_or_lead(&self, key: &K, tables: &[&str]) -> Role<V> {
        let inner = &*self.inner;
        let mut flights = self.flight_shard(key).lock();
        // A flight may have finished between the first lookup and this lock.
        if let Some(v) = self.lookup(key) {
            return Role::Hit(v);
        }
        if let Some(flight) = flights.get(key) {
            if !flight.is_detached()
                && inner.gens.is_current(&flight.stamp)
                && self.may_join(flight)
            {
                return Role::Wait(flight.clone());
            }
        }
        let flight = Flight::new(inner.gens.stamp(tables));
        flights.insert(key.clone(), flight.clone());
        Role::Lead(flight)
    }

    /// Publishes a finished load: stores it if still valid, then wakes the waiters.
    fn finish(&self, key: &K, flight: &Arc<Flight<V>>, outcome: Outcome<V>) {
        let inner = &*self.inner;
        {
            let mut flights = self.flight_shard(key).lock();
            if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
                flights.remove(key);
            }
            match &outcome {
                Ok(value) => {
                    // Checked under the shard lock: `invalidate(key)` takes it too, so
                    // it either detached this flight already or removes the entry after.
                    // A concurrent invalidate-all bumps the generation, which `lookup`
                    // checks on every read.
                    let storable = !flight.is_detached()
                        && inner.gens.is_current(&flight.stamp)
                        && !self.bypassing();
                    if storable {
                        inner.store.insert(
                            key.clone(),
                            Entry {
                                value: value.clone(),
                                stamp: flight.stamp.clone(),
                                loaded_at: flight.started_at,
                            },
                        );
                    } else {
                        bump(&inner.counters.discarded_loads);
                    }
                }
                Err(_) => bump(&inner.counters.load_errors),
            }
        }
        flight.finish(outcome);
    }
}

enum Role<V> {
    Hit(V),
    Lead(Arc<Flight<V>>),
    Wait(Arc<Flight<V>>),
}

/// Hands a cancelled leader's flight over: waiters retry instead of hanging.
struct LeadGuard<'a, K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    cache: &'a Cache<K, V>,
    key: &'a K,
    flight: &'a Arc<Flight<V>>,
    finished: bool,
}

impl<K, V> Drop for LeadGuard<'_, K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut flights = self.cache.flight_shard(self.key).lock();
        if flights
            .get(self.key)
            .is_some_and(|f| Arc::ptr_eq(f, self.flight))
        {
            flights.remove(self.key);
        }
        drop(flights);
        self.flight.abandon();
    }
}

impl<K, V> InvalidationTarget<K> for Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn apply(&self, decision: &Decision<K>) {
        match decision {
            Decision::Nothing => {}
            Decision::All => self.invalidate_all(),
            Decision::Invalidate(targets) => {
                self.invalidate_tables(&targets.tables);
                for key in &targets.keys {
                    self.invalidate(key);
                }
            }
        }
    }

    fn set_healthy(&self, healthy: bool) {
        let was = self.inner.healthy.swap(healthy, Ordering::AcqRel);
        if was != healthy {
            tracing::info!(cache = self.name(), healthy, "cache health changed");
        }
    }
}

impl<K, V> fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.inner.name)
            .field("healthy", &self.inner.healthy.load(Ordering::Relaxed))
            .field("ttl", &self.inner.ttl)
            .field("while_unhealthy", &self.inner.while_unhealthy)
            .finish_non_exhaustive()
    }
}
