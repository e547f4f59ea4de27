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
//! own too: neither crate closes the stale-set race (ARCHITECTURE.md, decision 3).

mod flight;
mod generations;
mod stats;

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use self::flight::{Flight, Outcome};
use self::generations::{Generations, Stamp};
pub use self::stats::CacheStats;
use self::stats::{bump, Counters};
use crate::error::{BoxError, Error};
use crate::event::{IntoTableRef, TableRef};
use crate::health::{HasHealthBoard, HealthBoard, HealthVote};
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

/// Anything a dispatcher can apply [`Decision`]s and health to.
///
/// [`Cache`] implements it; implement it to drive another store from a strategy.
///
/// # Contract
///
/// * [`apply`](Self::apply) drops at least what the decision says (more is safe).
/// * [`health_vote`](Self::health_vote) is called once per dispatcher that feeds
///   the target, when it attaches; the dispatcher flushes the target right after
///   (attaching is a gap: writes before it went unseen) and sets the vote from its
///   source's health. While any vote is unhealthy, or a feeding dispatcher has
///   stopped, the target must not serve what it holds — a [`HealthBoard`] keeps
///   that rule for you.
///
/// ```
/// use std::sync::Arc;
/// use pgcachewatch_core::{Decision, HealthBoard, HealthVote, InvalidationTarget};
///
/// #[derive(Default)]
/// struct Counter { flushes: std::sync::atomic::AtomicU64, board: Arc<HealthBoard> }
///
/// impl InvalidationTarget<u32> for Counter {
///     fn apply(&self, decision: &Decision<u32>) {
///         if *decision == Decision::All {
///             self.flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         }
///     }
///     fn health_vote(&self) -> HealthVote {
///         HealthVote::new(self.board.clone())
///     }
/// }
/// ```
pub trait InvalidationTarget<K>: Send + Sync + 'static {
    /// Drops what the decision says.
    fn apply(&self, decision: &Decision<K>);
    /// A new vote on the target's health, for one feeding dispatcher (see the
    /// contract above).
    fn health_vote(&self) -> HealthVote;
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
    health: HealthBoard,
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
                name: self.name.clone(),
                store: quick_cache::sync::Cache::new(self.capacity),
                gens: Generations::default(),
                flights: (0..FLIGHT_SHARDS).map(|_| Mutex::default()).collect(),
                hasher: RandomState::new(),
                health: HealthBoard::new(self.name.clone()),
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
        self.load_through(key, Vec::new, loader).await
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
    /// use pgcachewatch_core::{Cache, Decision, InvalidationTarget, TableRef};
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let cache: Cache<&str, u32> = Cache::new(10);
    /// cache.get_or_load_tagged("n_users", &["public.users"], || async { Ok::<_, std::io::Error>(3) }).await?;
    /// cache.apply(&Decision::tables([TableRef::new("public", "orders")]));
    /// assert_eq!(cache.get(&"n_users"), Some(3)); // orders do not matter
    /// cache.apply(&Decision::tables([TableRef::new("public", "users")]));
    /// assert_eq!(cache.get(&"n_users"), None);
    /// # Ok::<_, pgcachewatch_core::Error>(())
    /// # }).unwrap();
    /// ```
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
        self.load_through(key, || resolve_tags(tables, self.name()), loader)
            .await
    }

    async fn load_through<F, Fut, E>(
        &self,
        key: K,
        tags: impl FnOnce() -> Vec<TableRef>,
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
        let tables = tags();
        let tables = tables.as_slice();

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
        // The guard stays armed until the flight is published: if cloning or storing
        // the value panics, the waiters are released (they retry) instead of hanging.
        let result = outcome.clone();
        self.finish(&key, &flight, outcome);
        guard.finished = true;
        result.map_err(|source| Error::Load { source })
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
        self.inner.health.is_healthy()
    }

    /// Who feeds this cache, and whether it trusts its entries (see [`HealthBoard`]).
    pub fn health(&self) -> crate::health::HealthSummary {
        self.inner.health.summary()
    }

    /// The counters, now.
    pub fn stats(&self) -> CacheStats {
        self.inner
            .counters
            .snapshot(self.inner.store.len() as u64, self.inner.health.summary())
    }

    /// The fresh entry for `key`, if any; counts nothing.
    #[inline]
    fn lookup(&self, key: &K) -> Option<V> {
        let inner = &*self.inner;
        if !inner.health.is_healthy() {
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
    ///
    /// With a TTL, a read may only share a load that started within the TTL, for the
    /// same reason.
    fn may_join(&self, flight: &Flight<V>) -> bool {
        let inner = &*self.inner;
        let bound = match inner.while_unhealthy {
            WhileUnhealthy::ServeWithin(bound) if !self.is_healthy() => Some(bound),
            _ => None,
        };
        let limit = match (bound, inner.ttl) {
            (Some(b), Some(t)) => Some(b.min(t)),
            (b, t) => b.or(t),
        };
        limit.is_none_or(|limit| flight.started_at.elapsed() <= limit)
    }

    fn bypassing(&self) -> bool {
        !self.is_healthy() && self.inner.while_unhealthy == WhileUnhealthy::Bypass
    }

    fn flight_shard(&self, key: &K) -> &FlightShard<K, V> {
        let shard = self.inner.hasher.hash_one(key) as usize % FLIGHT_SHARDS;
        &self.inner.flights[shard]
    }

    fn join_or_lead(&self, key: &K, tables: &[TableRef]) -> Role<V> {
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
        if let Some(replaced) = flights.insert(key.clone(), flight.clone()) {
            // Only the flight in the table may store: the one it replaces hands its
            // result to the callers already waiting on it, and nothing else.
            replaced.detach();
        }
        Role::Lead(flight)
    }

    /// Publishes a finished load: stores it if still valid, then wakes the waiters.
    fn finish(&self, key: &K, flight: &Arc<Flight<V>>, outcome: Outcome<V>) {
        let inner = &*self.inner;
        {
            let mut flights = self.flight_shard(key).lock();
            let in_table = flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight));
            if in_table {
                flights.remove(key);
            }
            match &outcome {
                Ok(value) => {
                    // Checked under the shard lock: `invalidate(key)` takes it too, so
                    // it either detached this flight already or removes the entry after.
                    // A concurrent invalidate-all bumps the generation, which `lookup`
                    // checks on every read.
                    let storable = in_table
                        && !flight.is_detached()
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

/// The tables a tagged load depends on; empty (every table) if any name is invalid.
fn resolve_tags<T: IntoTableRef + Clone>(tables: &[T], cache: Option<&str>) -> Vec<TableRef> {
    let mut out = Vec::with_capacity(tables.len());
    for t in tables {
        match t.clone().into_table_ref() {
            Ok(t) => out.push(t),
            Err(e) => {
                tracing::warn!(
                    cache,
                    error = %e,
                    "invalid table tag: the entry depends on every table instead"
                );
                return Vec::new();
            }
        }
    }
    out
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

    fn health_vote(&self) -> HealthVote {
        HealthVote::new(self.inner.clone())
    }
}

impl<K, V> HasHealthBoard for Inner<K, V>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    fn health_board(&self) -> &HealthBoard {
        &self.health
    }
}

impl<K, V> fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.inner.name)
            .field("healthy", &self.inner.health.is_healthy())
            .field("ttl", &self.inner.ttl)
            .field("while_unhealthy", &self.inner.while_unhealthy)
            .finish_non_exhaustive()
    }
}
