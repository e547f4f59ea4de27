//! Caches declared with a strategy, attached to sources by name at start-up: the
//! run-time half of the `#[pgcachewatch::cached]` attribute.
//!
//! A function declared `#[cached(strategy = …)]` (optionally `source = "name"`)
//! [`register`]s its cache with this process-wide registry the first time the
//! cache is used. [`attach`] (or [`attach_as`]) hands the registry a source:
//! every cache registered under that source's name — now, or later, when its
//! function is first called — gets a [`Dispatcher`] of its own on that source,
//! with a fresh strategy from its declaration. The returned [`AttachedCaches`]
//! keeps those dispatchers running; dropping it (or
//! [`shutdown`](AttachedCaches::shutdown)) stops them, and their caches then
//! bypass, as with any stopped dispatcher.
//!
//! Registered caches are built
//! [unhealthy until attached](crate::CacheBuilder::unhealthy_until_attached):
//! a call before [`attach`] reads through to the loader and stores nothing, so no
//! value is ever served that nothing would invalidate.
//!
//! A cache that goes on bypassing because nothing was ever attached under its
//! source's name (a forgotten [`attach`], a typo in `source = "…"`) is logged
//! once: a `warn` [`DEFAULT_UNATTACHED_WARNING`] (30 s) after its first call,
//! naming the cache, its source name, the calls that bypassed and the names
//! sources *are* attached under. [`warn_unattached_after`] changes the delay or
//! turns the warning off. The check runs on one background thread that exists
//! only while a registered cache is waiting for a source.
//!
//! ```
//! use pgcachewatch::{cached, Cache, Decision, Event, InvalidationStrategy, EventSource, Health, Subscription};
//! use pgcachewatch::source_kit::SignalHub;
//! # #[derive(Debug)] struct Source(SignalHub);
//! # impl EventSource for Source { fn subscribe(&self) -> Subscription { self.0.subscribe() } fn health(&self) -> Health { self.0.health() } }
//! #[derive(Debug)]
//! struct DropAll;
//! impl<K> InvalidationStrategy<K> for DropAll {
//!     fn on_event(&mut self, _: &Event, _: std::time::Instant) -> Decision<K> { Decision::All }
//! }
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let users: Cache<u32, String> = Cache::builder().unhealthy_until_attached().build();
//! cached::register("doc-example", &users, || DropAll);
//! assert!(!users.is_healthy()); // nothing feeds it yet: reads bypass
//!
//! let source = Source(SignalHub::new(64));
//! source.0.set_health(Health::Healthy);
//! let attached = cached::attach_as("doc-example", source);
//! assert_eq!(attached.dispatchers(), 1);
//! assert!(users.is_healthy());
//! attached.shutdown().await;
//! assert!(!users.is_healthy()); // stopped: bypasses again
//! # });
//! ```

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::cache::Cache;
use crate::dispatcher::{Dispatcher, DispatcherHandle, WaitError};
use crate::position::Lsn;
use crate::source::EventSource;
use crate::strategy::InvalidationStrategy;

/// The source name of caches declared without `source = "…"`, and of [`attach`].
pub const DEFAULT_SOURCE: &str = "default";

/// How long a registered cache may bypass, with no source ever attached under
/// its source's name, before one warning is logged: see [`warn_unattached_after`].
pub const DEFAULT_UNATTACHED_WARNING: Duration = Duration::from_secs(30);

/// Spawns one dispatcher feeding one registered cache from a source.
type Binder = Arc<dyn Fn(&dyn EventSource) -> DispatcherHandle + Send + Sync>;

/// How many reads of a registered cache bypassed so far.
type Bypasses = Box<dyn Fn() -> u64 + Send + Sync>;

struct Registered {
    source: String,
    cache: Option<String>,
    bind: Binder,
    /// When it registered (its first call).
    since: Instant,
    /// When to check whether it still waits for a source: `None` once a
    /// source was attached for it, or once it was warned about.
    check_at: Option<Instant>,
    bypasses: Bypasses,
}

struct Live {
    id: u64,
    name: String,
    source: Arc<dyn EventSource>,
    runtime: Option<tokio::runtime::Handle>,
    handles: Arc<Mutex<Vec<Arc<DispatcherHandle>>>>,
}

struct Registry {
    caches: Vec<Registered>,
    sources: Vec<Live>,
    next_id: u64,
    /// [`warn_unattached_after`]; `None`: off.
    warn_after: Option<Duration>,
    /// Whether the watchdog thread runs.
    watchdog: bool,
}

static REGISTRY: Mutex<Registry> = parking_lot::const_mutex(Registry {
    caches: Vec::new(),
    sources: Vec::new(),
    next_id: 0,
    warn_after: Some(DEFAULT_UNATTACHED_WARNING),
    watchdog: false,
});

/// Wakes the watchdog when the delay changes.
static WATCHDOG: Condvar = Condvar::new();

/// Sets how long a registered cache (a `#[cached(strategy = …)]` function) may
/// bypass, with no source ever attached under its source's name, before one
/// `warn` is logged for it; `None` turns the warning off. The default is
/// [`DEFAULT_UNATTACHED_WARNING`], 30 s from the cache's first call: long
/// enough for any start-up to attach its sources, short enough to be seen in
/// the first minute of a service that forgot to.
///
/// Each cache is warned about once. A cache whose source was attached and later
/// detached (its [`AttachedCaches`] dropped) is not: that was asked for.
///
/// ```
/// use std::time::Duration;
/// use pgcachewatch::cached;
/// // A CLI that runs `#[cached]` functions without any source, on purpose:
/// cached::warn_unattached_after(None);
/// // Or: a service that should be attached within 5 s of its first call.
/// cached::warn_unattached_after(Some(Duration::from_secs(5)));
/// # cached::warn_unattached_after(Some(cached::DEFAULT_UNATTACHED_WARNING));
/// ```
pub fn warn_unattached_after(after: Option<Duration>) {
    let mut registry = REGISTRY.lock();
    registry.warn_after = after;
    for cache in registry.caches.iter_mut() {
        if let Some(check_at) = cache.check_at.as_mut() {
            *check_at = cache.since + after.unwrap_or_default();
        }
    }
    if after.is_some() {
        start_watchdog(&mut registry);
    }
    WATCHDOG.notify_all();
}

/// Starts the watchdog thread unless it runs or has nothing to wait for.
fn start_watchdog(registry: &mut Registry) {
    if registry.watchdog
        || registry.warn_after.is_none()
        || registry.caches.iter().all(|c| c.check_at.is_none())
    {
        return;
    }
    let started = std::thread::Builder::new()
        .name("pgcachewatch-cached-watchdog".into())
        .spawn(watchdog);
    match started {
        Ok(_) => registry.watchdog = true,
        // Only a warning is lost; the caches work as before.
        Err(e) => tracing::debug!(error = %e, "could not start the unattached-cache watchdog"),
    }
}

/// The watchdog thread: logs each overdue cache once, sleeps until the next
/// one is due, and ends when no cache is waiting.
fn watchdog() {
    let mut registry = REGISTRY.lock();
    loop {
        let warnings = overdue(&mut registry, Instant::now());
        if !warnings.is_empty() {
            // Logged without the lock: a subscriber may do anything.
            drop(registry);
            for warning in warnings {
                tracing::warn!("{warning}");
            }
            registry = REGISTRY.lock();
            continue;
        }
        let next = match registry.warn_after {
            Some(_) => registry.caches.iter().filter_map(|c| c.check_at).min(),
            None => None,
        };
        match next {
            Some(at) => {
                WATCHDOG.wait_until(&mut registry, at);
            }
            None => {
                registry.watchdog = false;
                return;
            }
        }
    }
}

/// The warnings due at `now`: each cache still waiting for a source past its
/// time, once. A cache that nobody read yet is checked again one delay later.
fn overdue(registry: &mut Registry, now: Instant) -> Vec<String> {
    let Some(after) = registry.warn_after else {
        return Vec::new();
    };
    let attached: Vec<&str> = registry.sources.iter().map(|l| l.name.as_str()).collect();
    let mut warnings = Vec::new();
    for cache in registry.caches.iter_mut() {
        if cache.check_at.is_none_or(|at| at > now) {
            continue;
        }
        let bypasses = (cache.bypasses)();
        if bypasses == 0 {
            cache.check_at = Some(now + after);
            continue;
        }
        cache.check_at = None;
        warnings.push(unattached_message(cache, bypasses, now, &attached));
    }
    warnings
}

fn unattached_message(
    cache: &Registered,
    bypasses: u64,
    now: Instant,
    attached: &[&str],
) -> String {
    let name = match &cache.cache {
        Some(name) => format!("cache {name:?}"),
        None => "an unnamed cache".to_owned(),
    };
    let source = &cache.source;
    let how = if source == DEFAULT_SOURCE {
        "pgcachewatch::cached::attach(source)".to_owned()
    } else {
        format!("pgcachewatch::cached::attach_as({source:?}, source)")
    };
    let elsewhere = if attached.is_empty() {
        "no source is attached under any name".to_owned()
    } else {
        let mut names: Vec<String> = attached.iter().map(|n| format!("{n:?}")).collect();
        names.sort();
        names.dedup();
        format!("sources are attached under {} only", names.join(", "))
    };
    format!(
        "{name} (#[cached], source {source:?}) has bypassed for {:.0} s, {bypasses} call(s) \
         so far: no source was ever attached under {source:?} ({elsewhere}), so every call \
         runs the function and nothing is cached. Call {how} at start-up and keep what it \
         returns, or fix the source name; pgcachewatch::cached::warn_unattached_after(None) \
         silences this",
        now.saturating_duration_since(cache.since).as_secs_f64()
    )
}

fn spawn_on(live: &Live, bind: &Binder) -> Arc<DispatcherHandle> {
    // A cache may be registered from a thread outside the runtime the source
    // was attached from: spawn on that runtime.
    let _entered = live.runtime.as_ref().map(|rt| rt.enter());
    Arc::new(bind(&*live.source))
}

/// Registers `cache` to be fed by every source attached under the name `source`
/// (see [`attach_as`]), each time through a new strategy made by `strategy`.
/// Sources attached already feed it at once. If none is attached under that
/// name within [`warn_unattached_after`] (30 s) while the cache bypasses, one
/// warning is logged.
///
/// Build the cache with
/// [`unhealthy_until_attached`](crate::CacheBuilder::unhealthy_until_attached) so
/// that it bypasses until then. The `#[cached(strategy = …)]` attribute calls this
/// when its cache is first used.
///
/// # Panics
///
/// If a source is attached and this is called outside a tokio runtime while the
/// runtime the source was attached from has been shut down.
pub fn register<K, V, S, F>(source: &str, cache: &Cache<K, V>, strategy: F)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: InvalidationStrategy<K>,
    F: Fn() -> S + Send + Sync + 'static,
{
    let target = cache.clone();
    let bind: Binder = Arc::new(move |source: &dyn EventSource| {
        Dispatcher::new()
            .attach(strategy(), target.clone())
            .spawn(source)
    });
    let counted = cache.clone();
    let bypasses: Bypasses = Box::new(move || counted.stats().bypasses);
    let mut registry = REGISTRY.lock();
    let mut attached = false;
    for live in registry.sources.iter().filter(|l| l.name == source) {
        let handle = spawn_on(live, &bind);
        live.handles.lock().push(handle);
        attached = true;
    }
    let since = Instant::now();
    let check_at = match registry.warn_after {
        Some(after) if !attached => Some(since + after),
        _ => None,
    };
    registry.caches.push(Registered {
        source: source.to_owned(),
        cache: cache.name().map(str::to_owned),
        bind,
        since,
        check_at,
        bypasses,
    });
    start_watchdog(&mut registry);
}

/// [`attach_as`] under [`DEFAULT_SOURCE`]: the source of every cache declared
/// without `source = "…"`.
///
/// # Panics
///
/// Outside a tokio runtime.
#[must_use = "dropping the returned value stops the dispatchers at once (the caches then bypass)"]
pub fn attach<S: EventSource>(source: S) -> AttachedCaches {
    attach_as(DEFAULT_SOURCE, source)
}

/// Feeds every cache registered under `name` from `source`, one dispatcher per
/// cache: those registered so far at once, the others as they register (when
/// their function is first called). Pass an `Arc` of the source to keep using
/// it (`Arc<S>` is a source too).
///
/// Attaching two sources under one name feeds each cache from both (it is then
/// trusted only while both are healthy).
///
/// # Panics
///
/// Outside a tokio runtime (it spawns the dispatchers' tasks).
#[must_use = "dropping the returned value stops the dispatchers at once (the caches then bypass)"]
pub fn attach_as<S: EventSource>(name: &str, source: S) -> AttachedCaches {
    let runtime = tokio::runtime::Handle::current();
    let handles = Arc::new(Mutex::new(Vec::new()));
    let mut registry = REGISTRY.lock();
    let id = registry.next_id;
    registry.next_id += 1;
    let live = Live {
        id,
        name: name.to_owned(),
        source: Arc::new(source),
        runtime: Some(runtime),
        handles: handles.clone(),
    };
    let mut attached = 0;
    for cache in registry.caches.iter_mut().filter(|c| c.source == name) {
        handles.lock().push(spawn_on(&live, &cache.bind));
        cache.check_at = None;
        attached += 1;
    }
    tracing::debug!(
        source = name,
        caches = attached,
        "attached registered caches"
    );
    registry.sources.push(live);
    AttachedCaches {
        id,
        name: name.to_owned(),
        handles,
    }
}

/// The names of the caches registered under `source` so far (unnamed ones
/// as `None`). A cache registers when its function is first called.
pub fn registered(source: &str) -> Vec<Option<String>> {
    REGISTRY
        .lock()
        .caches
        .iter()
        .filter(|c| c.source == source)
        .map(|c| c.cache.clone())
        .collect()
}

/// The dispatchers [`attach`] started, and those it starts as caches register.
/// Dropping it stops them (their caches then bypass, as after any stopped
/// dispatcher); keep it for as long as the caches are used.
#[must_use = "dropping it stops the dispatchers at once (the caches then bypass)"]
pub struct AttachedCaches {
    id: u64,
    name: String,
    handles: Arc<Mutex<Vec<Arc<DispatcherHandle>>>>,
}

impl fmt::Debug for AttachedCaches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttachedCaches")
            .field("source", &self.name)
            .field("dispatchers", &self.dispatchers())
            .finish()
    }
}

impl AttachedCaches {
    /// The source's name (see [`attach_as`]).
    ///
    /// ```
    /// use pgcachewatch::cached;
    /// use pgcachewatch::memory::InMemorySource;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let (source, _control) = InMemorySource::pair();
    /// let attached = cached::attach_as("orders-db", source);
    /// assert_eq!(attached.source_name(), "orders-db");
    /// assert_eq!(cached::attach(InMemorySource::pair().0).source_name(), cached::DEFAULT_SOURCE);
    /// # });
    /// ```
    pub fn source_name(&self) -> &str {
        &self.name
    }

    /// How many dispatchers run now (one per registered cache).
    ///
    /// ```
    /// use pgcachewatch::{cached, Cache};
    /// use pgcachewatch::memory::InMemorySource;
    /// use pgcachewatch::strategies::Greedy;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let users: Cache<u32, String> = Cache::builder().unhealthy_until_attached().build();
    /// cached::register(cached::DEFAULT_SOURCE, &users, Greedy::new);
    /// let attached = cached::attach(InMemorySource::pair().0);
    /// assert_eq!(attached.dispatchers(), 1); // one per registered cache
    /// let orders: Cache<u32, String> = Cache::builder().unhealthy_until_attached().build();
    /// cached::register(cached::DEFAULT_SOURCE, &orders, Greedy::new); // registers later: attached too
    /// assert_eq!(attached.dispatchers(), 2);
    /// # });
    /// ```
    pub fn dispatchers(&self) -> usize {
        self.handles.lock().len()
    }

    /// The dispatchers, now (for their stats).
    ///
    /// ```
    /// use pgcachewatch::{cached, Event, Operation};
    /// use pgcachewatch::memory::InMemorySource;
    /// # use pgcachewatch::Cache;
    /// # use pgcachewatch::strategies::Greedy;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let users: Cache<u32, String> = Cache::builder().unhealthy_until_attached().build();
    /// # cached::register(cached::DEFAULT_SOURCE, &users, Greedy::new);
    /// let (source, control) = InMemorySource::pair();
    /// let attached = cached::attach(source);
    /// control.publish(Event::new("pgcachewatch", Operation::Update, "public", "users"));
    /// let events: u64 = attached.handles().iter().map(|h| h.stats().events).sum();
    /// assert_eq!(events, 1);
    /// # });
    /// ```
    pub fn handles(&self) -> Vec<Arc<DispatcherHandle>> {
        self.handles.lock().clone()
    }

    /// Waits until every dispatcher has applied what the source emitted before
    /// this call (see [`DispatcherHandle::sync`]).
    ///
    /// ```
    /// use pgcachewatch::{cached, Cache, Event, Operation};
    /// use pgcachewatch::memory::InMemorySource;
    /// use pgcachewatch::strategies::Greedy;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let users: Cache<u32, &str> = Cache::builder().unhealthy_until_attached().build();
    /// cached::register(cached::DEFAULT_SOURCE, &users, Greedy::new);
    /// let (source, control) = InMemorySource::pair();
    /// let attached = cached::attach(source);
    /// users.insert(1, "ann");
    /// control.publish(Event::new("pgcachewatch", Operation::Update, "public", "users"));
    /// attached.sync().await; // every cache has applied the event
    /// assert_eq!(users.get(&1), None);
    /// # });
    /// ```
    pub async fn sync(&self) {
        for handle in self.handles() {
            handle.sync().await;
        }
    }

    /// Read-your-writes over the `LISTEN` source, for every cache: see
    /// [`DispatcherHandle::wait_for_txid`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgcachewatch::cached;
    /// # use pgcachewatch::{Cache, Event, Operation};
    /// # use pgcachewatch::memory::InMemorySource;
    /// # use pgcachewatch::strategies::Greedy;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let users: Cache<u32, String> = Cache::builder().unhealthy_until_attached().build();
    /// # cached::register(cached::DEFAULT_SOURCE, &users, Greedy::new);
    /// # let (source, control) = InMemorySource::pair();
    /// let attached = cached::attach(source);
    /// // In the writing transaction: `SELECT txid_current()` gave 7412.
    /// let txid = 7412;
    /// # control.publish(Event::new("pgcachewatch", Operation::Update, "public", "users").with_txid(txid));
    /// attached.wait_for_txid(txid, Duration::from_secs(1)).await?;
    /// // Every cache has applied the write: a `#[cached]` call now reads it.
    /// # Ok::<_, pgcachewatch::WaitError>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`DispatcherHandle::wait_for_txid`], from the first dispatcher that
    /// did not apply the transaction within `timeout` (counted from this call).
    pub async fn wait_for_txid(&self, txid: i64, timeout: Duration) -> Result<(), WaitError> {
        let deadline = Instant::now() + timeout;
        for handle in self.handles() {
            let left = deadline.saturating_duration_since(Instant::now());
            handle.wait_for_txid(txid, left).await?;
        }
        Ok(())
    }

    /// Read-your-writes over a lossless source, for every cache: see
    /// [`DispatcherHandle::wait_for_lsn`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgcachewatch::{cached, Lsn};
    /// # use pgcachewatch::{Cache, Event, Operation};
    /// # use pgcachewatch::memory::InMemorySource;
    /// # use pgcachewatch::strategies::Greedy;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let users: Cache<u32, String> = Cache::builder().unhealthy_until_attached().build();
    /// # cached::register(cached::DEFAULT_SOURCE, &users, Greedy::new);
    /// # let (source, control) = InMemorySource::pair();
    /// let attached = cached::attach(source); // a replication source, or a NatsSource relaying one
    /// // After `COMMIT`, `SELECT pg_current_wal_lsn()` gave:
    /// let lsn: Lsn = "0/16B3748".parse()?;
    /// # control.publish(Event::new("pgcachewatch", Operation::Update, "public", "users").with_lsn(lsn));
    /// attached.wait_for_lsn(lsn, Duration::from_secs(1)).await?;
    /// // Every cache has applied the write: a `#[cached]` call now reads it.
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`DispatcherHandle::wait_for_lsn`].
    pub async fn wait_for_lsn(&self, lsn: Lsn, timeout: Duration) -> Result<(), WaitError> {
        let deadline = Instant::now() + timeout;
        for handle in self.handles() {
            let left = deadline.saturating_duration_since(Instant::now());
            handle.wait_for_lsn(lsn, left).await?;
        }
        Ok(())
    }

    /// Stops feeding the caches and waits for the dispatchers; the caches are left
    /// bypassing.
    ///
    /// ```
    /// use pgcachewatch::{cached, Cache};
    /// use pgcachewatch::memory::InMemorySource;
    /// use pgcachewatch::strategies::Greedy;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let users: Cache<u32, String> = Cache::builder().unhealthy_until_attached().build();
    /// cached::register(cached::DEFAULT_SOURCE, &users, Greedy::new);
    /// let attached = cached::attach(InMemorySource::pair().0);
    /// assert!(users.is_healthy());
    /// attached.shutdown().await;
    /// assert!(!users.is_healthy()); // nothing feeds it now: reads bypass
    /// # });
    /// ```
    pub async fn shutdown(self) {
        let handles = self.detach();
        for handle in handles {
            match Arc::try_unwrap(handle) {
                Ok(handle) => handle.shutdown().await,
                // Someone holds a clone from `handles()`: dropping ours is all we can do.
                Err(shared) => drop(shared),
            }
        }
    }

    /// Leaves the registry; returns the dispatchers, which stop when dropped.
    fn detach(&self) -> Vec<Arc<DispatcherHandle>> {
        let live = {
            let mut registry = REGISTRY.lock();
            let at = registry.sources.iter().position(|l| l.id == self.id);
            at.map(|at| registry.sources.remove(at))
        };
        // Dropped outside the registry lock: it may be the last handle on the source.
        drop(live);
        std::mem::take(&mut *self.handles.lock())
    }
}

impl Drop for AttachedCaches {
    fn drop(&mut self) {
        drop(self.detach());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::SignalHub;
    use crate::signal::Health;
    use crate::source::Subscription;
    use crate::strategy::Decision;
    use crate::Event;

    #[derive(Debug)]
    struct DropAll;

    impl<K> InvalidationStrategy<K> for DropAll {
        fn on_event(&mut self, _: &Event, _: Instant) -> Decision<K> {
            Decision::All
        }
    }

    #[derive(Debug)]
    struct Source(SignalHub);

    impl EventSource for Source {
        fn subscribe(&self) -> Subscription {
            self.0.subscribe()
        }
        fn health(&self) -> Health {
            self.0.health()
        }
    }

    /// A registered cache named `name` under `source`, read `reads` times.
    async fn registered(name: &str, source: &str, reads: u32) -> Cache<u32, u32> {
        let cache: Cache<u32, u32> = Cache::builder()
            .name(name)
            .unhealthy_until_attached()
            .build();
        register(source, &cache, || DropAll);
        for _ in 0..reads {
            let loaded = cache
                .try_get_with(1, || async { Ok::<_, std::convert::Infallible>(7) })
                .await;
            assert_eq!(loaded.ok(), Some(7));
        }
        cache
    }

    /// The warnings due at `now` for the caches registered under `source`.
    fn due_for(source: &str, now: Instant) -> Vec<String> {
        let mut registry = REGISTRY.lock();
        let mut others: Vec<Option<Instant>> = Vec::new();
        // Only this test's caches: the others keep their state.
        for cache in registry.caches.iter_mut().filter(|c| c.source != source) {
            others.push(cache.check_at.take());
        }
        let warnings = overdue(&mut registry, now);
        let mut others = others.into_iter();
        for cache in registry.caches.iter_mut().filter(|c| c.source != source) {
            cache.check_at = others.next().flatten();
        }
        warnings
    }

    fn waiting(source: &str) -> bool {
        REGISTRY
            .lock()
            .caches
            .iter()
            .any(|c| c.source == source && c.check_at.is_some())
    }

    // One test: the delay is process-wide.
    #[tokio::test]
    async fn a_cache_never_attached_is_warned_about_once() {
        let later = || Instant::now() + DEFAULT_UNATTACHED_WARNING + Duration::from_secs(1);

        // Read twice, no source under its name (another name has one): one
        // warning, naming the cache, its source, the calls, what to call.
        let other = Source(SignalHub::new(16));
        other.0.set_health(Health::Healthy);
        let _other = attach_as("cached-test-elsewhere", other);
        let _forgotten = registered("forgotten", "cached-test-forgotten", 2).await;
        assert!(due_for("cached-test-forgotten", Instant::now()).is_empty());
        let warnings = due_for("cached-test-forgotten", later());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let w = &warnings[0];
        assert!(
            w.contains("cache \"forgotten\"")
                && w.contains("source \"cached-test-forgotten\"")
                && w.contains("2 call(s)")
                && w.contains("\"cached-test-elsewhere\"")
                && w.contains("attach_as(\"cached-test-forgotten\", source)"),
            "{w}"
        );
        // Once.
        assert!(due_for("cached-test-forgotten", later()).is_empty());

        // Attached: nothing, whether before or after the cache registered.
        let source = Source(SignalHub::new(16));
        source.0.set_health(Health::Healthy);
        let _fed = registered("fed", "cached-test-fed", 1).await;
        let attached = attach_as("cached-test-fed", source);
        let _fed_later = registered("fed-later", "cached-test-fed", 1).await;
        assert!(due_for("cached-test-fed", later()).is_empty());
        assert!(!waiting("cached-test-fed"));
        attached.shutdown().await;

        // Not read yet: nothing bypassed, nothing to say (checked again later).
        let _unread = registered("unread", "cached-test-unread", 0).await;
        assert!(due_for("cached-test-unread", later()).is_empty());
        assert!(waiting("cached-test-unread"));

        // Off: nothing.
        warn_unattached_after(None);
        let _quiet = registered("quiet", "cached-test-quiet", 1).await;
        assert!(due_for("cached-test-quiet", later()).is_empty());

        // The watchdog thread logs it by itself once the delay passed.
        warn_unattached_after(Some(Duration::from_millis(20)));
        let _late = registered("late", "cached-test-late", 1).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while waiting("cached-test-late") {
            assert!(Instant::now() < deadline, "the watchdog never warned");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        warn_unattached_after(Some(DEFAULT_UNATTACHED_WARNING));
    }
}
