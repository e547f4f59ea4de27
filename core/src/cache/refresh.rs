//! Keeping hot keys warm: [`Refresh`] (reload an invalidated key in the
//! background), warming after a flush, and bounded stale serving.
//!
//! Every background reload is a flight like a reader's load (see `load.rs`):
//! stamped when it starts, so a write whose invalidation arrives while it runs
//! detaches it (a key invalidation) or outdates its stamp (a table invalidation,
//! a flush), and its result is then dropped, never stored. Readers that miss
//! while it runs join it instead of loading again.
//!
//! Which keys are "read recently" is sampled, so that a hit pays almost nothing
//! for it (`Recency`): about one hit in [`SAMPLE_ONE_IN`] of each thread, and
//! every miss, marks its key in a small table indexed by the key's hash. A key
//! marked since its last invalidation is refreshed when it is invalidated; the
//! keys marked most often are the ones warmed after a flush.

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::flight::{Flight, Stale};
use super::store::Entry;
use super::Cache;
use crate::error::BoxError;

/// A future handed to a [`Refresh::spawner`].
pub type RefreshTask = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

type LoadFn<K, V> =
    Arc<dyn Fn(K) -> Pin<Box<dyn Future<Output = Result<V, BoxError>> + Send>> + Send + Sync>;
type SpawnFn = Arc<dyn Fn(RefreshTask) + Send + Sync>;
/// The time stale serving is measured with.
pub(crate) type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// About one hit in this many (per thread) marks its key as read recently.
pub(crate) const SAMPLE_ONE_IN: u64 = 16;

/// A hit whose per-thread count `n` maps below this is sampled: the count times
/// an odd constant is a Weyl sequence, so a reader cycling through a few keys
/// samples each of them (a plain `n % 16` would sample one key of a cycle of 16
/// for ever).
pub(crate) const SAMPLE_BELOW: u64 = u64::MAX / SAMPLE_ONE_IN;

/// Whether the hit numbered `n` (of its thread) is sampled.
#[inline]
pub(crate) fn sampled(n: u64) -> bool {
    n.wrapping_mul(0x9E37_79B9_7F4A_7C15) < SAMPLE_BELOW
}

/// The refresher of a cache: reloads keys in the background when they are
/// invalidated while hot ([`CacheBuilder::refresh_on_invalidation`]), and warms
/// the hottest keys after a flush ([`CacheBuilder::warm_after_flush`]).
///
/// A refresh is a load like any other: stamped when it starts, and dropped
/// (never stored) if a write's invalidation arrives while it runs. Its errors
/// are counted ([`CacheStats::refreshes_failed`]) and dropped, never cached;
/// readers that were waiting for it load for themselves.
///
/// Why: with push invalidation, a write to a hot key makes the next reads
/// misses that all wait for the database. A refresh reloads the key right after
/// the invalidation, so the next readers hit (or wait for a load already under
/// way) instead.
///
/// Refreshes run on the tokio runtime the cache was built in (or, built outside
/// one, the runtime current where the invalidation is applied; without either,
/// nothing is refreshed and [`CacheStats::refreshes_skipped`] counts it), or
/// through your own [`spawner`](Self::spawner).
///
/// ```
/// use pgcachewatch::{Cache, Refresh};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let users: Cache<u32, String> = Cache::builder()
///     .refresh_on_invalidation(
///         Refresh::new(|id: u32| async move { Ok::<_, std::io::Error>(format!("user {id}")) })
///             .max_concurrent(4),
///     )
///     .build();
/// users.get_or_load(1, || async { Ok::<_, std::io::Error>("user 1".to_string()) }).await?;
/// users.invalidate(&1); // read since it was stored: reloaded in the background
/// assert_eq!(users.stats().refreshes_started, 1);
/// # Ok::<_, pgcachewatch::Error>(())
/// # }).unwrap();
/// ```
///
/// [`CacheBuilder::refresh_on_invalidation`]: super::CacheBuilder::refresh_on_invalidation
/// [`CacheBuilder::warm_after_flush`]: super::CacheBuilder::warm_after_flush
/// [`CacheStats::refreshes_failed`]: super::CacheStats::refreshes_failed
/// [`CacheStats::refreshes_skipped`]: super::CacheStats::refreshes_skipped
pub struct Refresh<K, V> {
    pub(crate) load: LoadFn<K, V>,
    pub(crate) max_concurrent: usize,
    pub(crate) spawner: Option<SpawnFn>,
}

impl<K, V> Clone for Refresh<K, V> {
    fn clone(&self) -> Self {
        Refresh {
            load: self.load.clone(),
            max_concurrent: self.max_concurrent,
            spawner: self.spawner.clone(),
        }
    }
}

impl<K, V> fmt::Debug for Refresh<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Refresh")
            .field("max_concurrent", &self.max_concurrent)
            .field("spawner", &self.spawner.is_some())
            .finish_non_exhaustive()
    }
}

/// Refreshes run at once by default, at most.
const DEFAULT_MAX_CONCURRENT_REFRESHES: usize = 4;

impl<K, V> Refresh<K, V>
where
    K: Send + 'static,
    V: Send + 'static,
{
    /// A refresher that loads `key`'s value with `load` (typically the same
    /// query as the readers' loader). At most 4 run at once unless
    /// [`max_concurrent`](Self::max_concurrent) says otherwise.
    pub fn new<F, Fut, E>(load: F) -> Self
    where
        F: Fn(K) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        Refresh {
            load: Arc::new(move |key| {
                let fut = load(key);
                Box::pin(async move { fut.await.map_err(Into::into) })
            }),
            max_concurrent: DEFAULT_MAX_CONCURRENT_REFRESHES,
            spawner: None,
        }
    }

    /// At most `n` (at least 1) refreshes and warming loads at once: the bound
    /// on the database load the cache adds by itself. A key invalidated while
    /// `n` refreshes run is not refreshed (counted in
    /// [`CacheStats::refreshes_skipped`](super::CacheStats::refreshes_skipped));
    /// its next reader loads it. Warming waits for a free slot instead.
    ///
    /// ```
    /// use pgcachewatch::Refresh;
    /// let refresh = Refresh::new(|id: u32| async move { Ok::<_, std::io::Error>(id * 2) })
    ///     .max_concurrent(2);
    /// # let _ = refresh;
    /// ```
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    /// Runs refreshes with `spawn` instead of on the tokio runtime: for another
    /// executor, or a test that polls them by hand. `spawn` must not poll the
    /// task before it returns (the cache may hold a lock while calling it).
    ///
    /// ```
    /// use pgcachewatch::Refresh;
    /// let refresh = Refresh::new(|id: u32| async move { Ok::<_, std::io::Error>(id) })
    ///     .spawner(|task| { tokio::spawn(task); });
    /// # let _ = refresh;
    /// ```
    pub fn spawner(mut self, spawn: impl Fn(RefreshTask) + Send + Sync + 'static) -> Self {
        self.spawner = Some(Arc::new(spawn));
        self
    }
}

/// Warming after a flush: how many keys, how fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Warm {
    pub(crate) keys: usize,
    /// Zero: no pause between loads.
    pub(crate) interval: Duration,
}

impl Warm {
    pub(crate) fn new(keys: usize, per_second: u32) -> Self {
        Warm {
            keys,
            interval: Duration::from_nanos(1_000_000_000 / u64::from(per_second.max(1))),
        }
    }
}

/// What a cache with a refresher keeps for it.
pub(crate) struct Keeper<K, V> {
    load: LoadFn<K, V>,
    spawner: Option<SpawnFn>,
    runtime: Option<tokio::runtime::Handle>,
    permits: Arc<Semaphore>,
    /// Refresh keys invalidated while hot.
    pub(crate) on_invalidation: bool,
    pub(crate) warm: Option<Warm>,
    /// Serve the previous value of a key this long after its invalidation while
    /// its refresh runs.
    pub(crate) stale_within: Option<Duration>,
    pub(crate) clock: Clock,
    pub(crate) recency: Recency<K>,
    /// Bumped by each flush: a warming started by an older flush stops.
    warm_epoch: AtomicU64,
    /// Wakes warming tasks: the cache turned healthy, or a newer flush came.
    wake: Notify,
}

impl<K, V> fmt::Debug for Keeper<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keeper")
            .field("on_invalidation", &self.on_invalidation)
            .field("warm", &self.warm)
            .field("stale_within", &self.stale_within)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, V> Keeper<K, V> {
    pub(crate) fn new(
        refresh: Refresh<K, V>,
        on_invalidation: bool,
        warm: Option<Warm>,
        stale_within: Option<Duration>,
        clock: Option<Clock>,
    ) -> Self {
        let slots = warm.map_or(0, |w| w.keys.saturating_mul(4));
        Keeper {
            load: refresh.load,
            runtime: match refresh.spawner {
                Some(_) => None,
                None => tokio::runtime::Handle::try_current().ok(),
            },
            spawner: refresh.spawner,
            permits: Arc::new(Semaphore::new(refresh.max_concurrent)),
            on_invalidation,
            warm,
            stale_within,
            clock: clock.unwrap_or_else(|| Arc::new(Instant::now)),
            recency: Recency::new(slots.clamp(MIN_SLOTS, MAX_SLOTS)),
            warm_epoch: AtomicU64::new(0),
            wake: Notify::new(),
        }
    }

    /// Runs `task`; `false` if there is nowhere to run it (`task` is dropped).
    fn spawn(&self, task: RefreshTask) -> bool {
        if let Some(spawn) = &self.spawner {
            spawn(task);
            return true;
        }
        let handle = self
            .runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok());
        match handle {
            Some(handle) => {
                drop(handle.spawn(task));
                true
            }
            None => false,
        }
    }
}

impl<K, V> Keeper<K, V> {
    /// Wakes warming tasks (the cache turned healthy).
    pub(crate) fn wake(&self) {
        self.wake.notify_waiters();
    }
}

const MIN_SLOTS: usize = 1024;
const MAX_SLOTS: usize = 1 << 20;

/// Which keys were read recently, approximately: a table of buckets of
/// [`WAYS`] slots, picked by the key's hash, each slot holding one key,
/// whether it was read since its last invalidation, and a score (reads seen,
/// halved at each flush). A key that finds its bucket full wears down the
/// lowest score in it, and takes that slot once it reaches zero, so hot keys
/// keep theirs.
pub(crate) struct Recency<K> {
    buckets: Box<[Bucket<K>]>,
    mask: usize,
}

/// [`WAYS`] slots under one lock.
type Bucket<K> = Mutex<[Option<Slot<K>>; WAYS]>;

/// Slots per bucket.
const WAYS: usize = 4;

struct Slot<K> {
    key: K,
    read: bool,
    score: u32,
}

const MAX_SCORE: u32 = 1 << 16;

impl<K: Hash + Eq + Clone> Recency<K> {
    fn new(slots: usize) -> Self {
        let n = (slots / WAYS).next_power_of_two();
        Recency {
            buckets: (0..n).map(|_| Mutex::new([const { None }; WAYS])).collect(),
            mask: n - 1,
        }
    }

    fn bucket(&self, hash: u64) -> &Bucket<K> {
        // The low bits pick the flight shard; these pick the bucket.
        &self.buckets[(hash >> 8) as usize & self.mask]
    }

    /// Marks `key` read (skipped if its bucket is busy: it is a sample anyway).
    pub(crate) fn record(&self, hash: u64, key: &K) {
        let Some(mut bucket) = self.bucket(hash).try_lock() else {
            return;
        };
        if let Some(s) = bucket.iter_mut().flatten().find(|s| s.key == *key) {
            s.read = true;
            s.score = (s.score + 1).min(MAX_SCORE);
            return;
        }
        let fresh = || Slot {
            key: key.clone(),
            read: true,
            score: 1,
        };
        if let Some(empty) = bucket.iter_mut().find(|s| s.is_none()) {
            *empty = Some(fresh());
            return;
        }
        if let Some(weakest) = bucket
            .iter_mut()
            .min_by_key(|s| s.as_ref().map_or(0, |s| s.score))
        {
            match weakest {
                Some(s) if s.score > 1 => s.score -= 1,
                other => *other = Some(fresh()),
            }
        }
    }

    /// Whether `key` was read since this was last asked (and clears it).
    pub(crate) fn take_read(&self, hash: u64, key: &K) -> bool {
        let mut bucket = self.bucket(hash).lock();
        bucket
            .iter_mut()
            .flatten()
            .find(|s| s.key == *key)
            .is_some_and(|s| std::mem::replace(&mut s.read, false))
    }

    /// Up to `n` keys, the most read first; halves every score (so "most read"
    /// means recently). Marks stay: a key read before a flush and invalidated
    /// after it is still hot.
    pub(crate) fn hottest(&self, n: usize) -> Vec<K> {
        let mut found: Vec<(u32, K)> = Vec::new();
        for bucket in self.buckets.iter() {
            for s in bucket.lock().iter_mut().flatten() {
                if s.score > 0 {
                    found.push((s.score, s.key.clone()));
                }
                s.score /= 2;
            }
        }
        found.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        found.truncate(n);
        found.into_iter().map(|(_, k)| k).collect()
    }
}

/// Why a refresh starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Its key was invalidated while hot.
    Invalidated,
    /// Warming after a flush.
    Warm,
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Marks `key` read recently if the hit numbered `n` (of this thread) is
    /// sampled. Out of line, so that the hit path of a cache without a
    /// refresher never gets here.
    #[inline]
    pub(super) fn sample_hit(&self, n: u64, key: &K) {
        if sampled(n) {
            self.record_read(key);
        }
    }

    /// Marks `key` read recently, if this cache tracks that.
    #[inline(never)]
    pub(super) fn record_read(&self, key: &K) {
        if let Some(keeper) = &self.inner.keeper {
            keeper.recency.record(self.inner.hasher.hash_one(key), key);
        }
    }

    /// After `invalidate(key)` removed `key`'s entry (`removed`) and flight
    /// (`detached`), under the key's flight-shard lock (held by the caller):
    /// starts a refresh if the cache is healthy and the key was read since its
    /// last invalidation. With stale serving, the refresh may serve the value
    /// just removed (if it was fresh), or the one the detached refresh was
    /// serving, with the time of *its* invalidation. Returns the task to spawn
    /// once the lock is released.
    pub(super) fn refresh_invalidated(
        &self,
        key: &K,
        flights: &mut std::collections::HashMap<K, Arc<Flight<V>>>,
        removed: Option<&Entry<V>>,
        detached: Option<&Flight<V>>,
    ) -> Option<RefreshTask> {
        let inner = &*self.inner;
        let keeper = inner.keeper.as_ref()?;
        if !keeper.on_invalidation || !self.is_healthy() {
            return None;
        }
        if !keeper.recency.take_read(inner.hasher.hash_one(key), key) {
            return None;
        }
        let Ok(permit) = keeper.permits.clone().try_acquire_owned() else {
            inner.counters.refresh_skipped();
            return None;
        };
        let stale = keeper.stale_within.and_then(|_| {
            match removed.filter(|e| self.stale_cause(e).is_none()) {
                Some(entry) => Some(Stale {
                    value: entry.value.clone(),
                    invalidated_at: (keeper.clock)(),
                }),
                None => detached
                    .filter(|f| f.refresh && inner.gens.is_current(&f.stamp))
                    .and_then(|f| f.stale.clone()),
            }
        });
        Some(self.lead_refresh(key, flights, permit, stale, Cause::Invalidated))
    }

    /// Puts a refresh flight for `key` in the table (the caller holds its
    /// shard lock) and returns its task.
    fn lead_refresh(
        &self,
        key: &K,
        flights: &mut std::collections::HashMap<K, Arc<Flight<V>>>,
        permit: OwnedSemaphorePermit,
        stale: Option<Stale<V>>,
        cause: Cause,
    ) -> RefreshTask {
        let inner = &*self.inner;
        let flight = Flight::refresh(inner.gens.stamp(&[]), stale);
        if let Some(replaced) = flights.insert(key.clone(), flight.clone()) {
            replaced.detach();
        }
        inner.counters.refresh_started(cause == Cause::Warm);
        // The guard is made now, not when the task first runs: a task dropped
        // unpolled (no runtime) gives its flight up too.
        let guard = RefreshGuard {
            cache: self.clone(),
            key: key.clone(),
            flight,
            finished: false,
        };
        Box::pin(async move {
            guard.run().await;
            drop(permit);
        })
    }

    /// Spawns a refresh task (after the shard lock is released); a task that
    /// cannot run gives its flight up at once.
    pub(super) fn spawn_refresh(&self, task: RefreshTask) {
        let Some(keeper) = &self.inner.keeper else {
            return;
        };
        if !keeper.spawn(task) {
            // The task was dropped unpolled: its guard gave the flight up.
            self.inner.counters.refresh_skipped();
            tracing::debug!(
                cache = self.name(),
                "no tokio runtime to refresh on: the next reader loads"
            );
        }
    }

    /// The value `key` may be served while its refresh runs, if any: the
    /// previous value, within the bound of its invalidation, while the cache is
    /// healthy and the refresh still current.
    pub(super) fn stale_of(&self, flight: &Flight<V>) -> Option<V> {
        let inner = &*self.inner;
        let keeper = inner.keeper.as_ref()?;
        let bound = keeper.stale_within?;
        let stale = flight.stale.as_ref()?;
        if flight.is_detached() || !inner.gens.is_current(&flight.stamp) || !self.is_healthy() {
            return None;
        }
        let now = (keeper.clock)();
        (now.saturating_duration_since(stale.invalidated_at) <= bound).then(|| stale.value.clone())
    }

    /// After a flush: warms the hottest keys once the cache is healthy, paced,
    /// unless a newer flush comes first.
    pub(super) fn schedule_warm(&self) {
        let Some(keeper) = &self.inner.keeper else {
            return;
        };
        let Some(warm) = keeper.warm else {
            return;
        };
        let epoch = keeper.warm_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        keeper.wake.notify_waiters();
        let cache = self.clone();
        let task: RefreshTask = Box::pin(async move { cache.warm(epoch, warm).await });
        if !keeper.spawn(task) {
            tracing::debug!(
                cache = self.name(),
                "no tokio runtime to warm on: nothing is warmed"
            );
        }
    }

    async fn warm(&self, epoch: u64, warm: Warm) {
        let Some(keeper) = &self.inner.keeper else {
            return;
        };
        let current = || keeper.warm_epoch.load(Ordering::Acquire) == epoch;
        if !self.wait_healthy(keeper, &current).await {
            return;
        }
        let keys = keeper.recency.hottest(warm.keys);
        let mut next = tokio::time::Instant::now();
        for key in keys {
            if !self.wait_healthy(keeper, &current).await {
                return;
            }
            if !warm.interval.is_zero() {
                tokio::time::sleep_until(next).await;
                next = next.max(tokio::time::Instant::now() - warm.interval) + warm.interval;
            }
            let Ok(permit) = keeper.permits.clone().acquire_owned().await else {
                return;
            };
            if !current() {
                return;
            }
            let task = {
                let mut flights = self.flight_shard(&key).lock();
                if flights.contains_key(&key) || self.lookup(&key).is_some() || self.bypassing() {
                    continue;
                }
                self.lead_refresh(&key, &mut flights, permit, None, Cause::Warm)
            };
            self.spawn_refresh(task);
        }
    }

    /// Waits until the cache is healthy; `false` if a newer flush came first.
    async fn wait_healthy(&self, keeper: &Keeper<K, V>, current: &impl Fn() -> bool) -> bool {
        loop {
            let woken = keeper.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if !current() {
                return false;
            }
            if self.is_healthy() {
                return true;
            }
            woken.await;
        }
    }
}

/// Runs a refresh, and gives its flight up if it ends without publishing (its
/// loader failed or panicked, or its task was dropped): waiters then load for
/// themselves, with their own loaders, and nothing is cached.
struct RefreshGuard<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    cache: Cache<K, V>,
    key: K,
    flight: Arc<Flight<V>>,
    finished: bool,
}

impl<K, V> RefreshGuard<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    async fn run(mut self) {
        let Some(keeper) = &self.cache.inner.keeper else {
            return;
        };
        let loaded = std::panic::AssertUnwindSafe((keeper.load)(self.key.clone()))
            .catch_unwind()
            .await;
        let counters = &self.cache.inner.counters;
        match loaded {
            Ok(Ok(value)) => {
                self.cache.finish(&self.key, &self.flight, Ok(value));
                self.finished = true;
            }
            Ok(Err(error)) => {
                counters.refresh_failed();
                tracing::debug!(cache = self.cache.name(), %error, "refresh failed (dropped)");
            }
            Err(_) => {
                counters.refresh_failed();
                tracing::warn!(cache = self.cache.name(), "a refresh panicked (dropped)");
            }
        }
    }
}

impl<K, V> Drop for RefreshGuard<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut flights = self.cache.flight_shard(&self.key).lock();
        if flights
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            flights.remove(&self.key);
        }
        drop(flights);
        self.flight.abandon();
    }
}
