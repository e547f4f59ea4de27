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
//! ```
//! use pgcachewatch::{cached, Cache, Decision, Event, InvalidationStrategy, SignalHub, EventSource, Health, Subscription};
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

use parking_lot::Mutex;

use crate::cache::Cache;
use crate::dispatcher::{Dispatcher, DispatcherHandle, WaitError};
use crate::position::Lsn;
use crate::source::EventSource;
use crate::strategy::InvalidationStrategy;

/// The source name of caches declared without `source = "…"`, and of [`attach`].
pub const DEFAULT_SOURCE: &str = "default";

/// Spawns one dispatcher feeding one registered cache from a source.
type Binder = Arc<dyn Fn(&dyn EventSource) -> DispatcherHandle + Send + Sync>;

struct Registered {
    source: String,
    cache: Option<String>,
    bind: Binder,
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
}

static REGISTRY: Mutex<Registry> = parking_lot::const_mutex(Registry {
    caches: Vec::new(),
    sources: Vec::new(),
    next_id: 0,
});

fn spawn_on(live: &Live, bind: &Binder) -> Arc<DispatcherHandle> {
    // A cache may be registered from a thread outside the runtime the source
    // was attached from: spawn on that runtime.
    let _entered = live.runtime.as_ref().map(|rt| rt.enter());
    Arc::new(bind(&*live.source))
}

/// Registers `cache` to be fed by every source attached under the name `source`
/// (see [`attach_as`]), each time through a new strategy made by `strategy`.
/// Sources attached already feed it at once.
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
    let mut registry = REGISTRY.lock();
    for live in registry.sources.iter().filter(|l| l.name == source) {
        let handle = spawn_on(live, &bind);
        live.handles.lock().push(handle);
    }
    registry.caches.push(Registered {
        source: source.to_owned(),
        cache: cache.name().map(str::to_owned),
        bind,
    });
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
    for cache in registry.caches.iter().filter(|c| c.source == name) {
        handles.lock().push(spawn_on(&live, &cache.bind));
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
    pub fn source_name(&self) -> &str {
        &self.name
    }

    /// How many dispatchers run now (one per registered cache).
    pub fn dispatchers(&self) -> usize {
        self.handles.lock().len()
    }

    /// The dispatchers, now (for their stats).
    pub fn handles(&self) -> Vec<Arc<DispatcherHandle>> {
        self.handles.lock().clone()
    }

    /// Waits until every dispatcher has applied what the source emitted before
    /// this call (see [`DispatcherHandle::sync`]).
    pub async fn sync(&self) {
        for handle in self.handles() {
            handle.sync().await;
        }
    }

    /// Read-your-writes over the `LISTEN` source, for every cache: see
    /// [`DispatcherHandle::wait_for_txid`].
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
