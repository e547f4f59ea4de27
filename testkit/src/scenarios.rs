//! The cache's guarantees as scenarios over *any* way of reading through a
//! [`Cache`]: `get_or_load` with a closure, a `#[cached]` function, a wrapper of
//! your own. Each scenario takes the cache (to invalidate it and read its
//! counters) and a `read` that goes through it; the loader behind `read` must
//! call [`LoadGate::load`], which counts its runs and waits until the scenario
//! lets it finish.
//!
//! * [`single_flight`]: `n` concurrent misses of one key run the loader once.
//! * [`error_shared_not_cached`]: a failed load reaches every waiter, is not
//!   cached, and the next read retries.
//! * [`stale_set_race`]: a load that began before an invalidation hands its value
//!   to its caller but is not stored.
//!
//! ```
//! use std::sync::Arc;
//! use pgcachewatch::{Cache, Decision};
//! use pgcachewatch::testkit::scenarios::{self, LoadGate};
//! # tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(async {
//! let cache: Cache<u32, String> = Cache::new(100);
//! let gate = LoadGate::new();
//! let read = {
//!     let (cache, gate) = (cache.clone(), gate.clone());
//!     move |key: u32| {
//!         let (cache, gate) = (cache.clone(), gate.clone());
//!         async move { cache.try_get_with(key, || gate.load()).await }
//!     }
//! };
//! scenarios::single_flight(&cache, &gate, &read, 16).await;
//! scenarios::stale_set_race(&cache, &gate, &read, Decision::All).await;
//! # });
//! ```

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pgcachewatch_core::{Cache, Decision, InvalidationTarget};
use tokio::sync::watch;

/// The key every scenario reads.
pub const KEY: u32 = 7;

/// The error a gated loader returns when told to fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GateError(pub String);

/// Holds loads until the scenario opens it, counting them; what they return is
/// set by the scenario. Clones share the gate.
#[derive(Debug, Clone)]
pub struct LoadGate {
    inner: Arc<GateInner>,
}

#[derive(Debug)]
struct GateInner {
    runs: AtomicUsize,
    open: watch::Sender<bool>,
    outcome: Mutex<Result<String, String>>,
}

impl Default for LoadGate {
    fn default() -> Self {
        Self::new()
    }
}

impl LoadGate {
    /// A closed gate; loads return `Ok("value")` unless told otherwise.
    pub fn new() -> Self {
        LoadGate {
            inner: Arc::new(GateInner {
                runs: AtomicUsize::new(0),
                open: watch::channel(false).0,
                outcome: Mutex::new(Ok("value".into())),
            }),
        }
    }

    /// The loader's body: counts a run, waits for the gate, returns the outcome.
    pub async fn load(&self) -> Result<String, GateError> {
        self.inner.runs.fetch_add(1, Ordering::SeqCst);
        let mut open = self.inner.open.subscribe();
        let _ = open.wait_for(|o| *o).await;
        self.outcome().map_err(GateError)
    }

    /// Loads started so far.
    pub fn runs(&self) -> usize {
        self.inner.runs.load(Ordering::SeqCst)
    }

    /// Lets waiting and future loads finish (`true`) or makes them wait (`false`).
    pub fn set_open(&self, open: bool) {
        self.inner.open.send_replace(open);
    }

    /// What loads return from now on.
    pub fn set_outcome(&self, outcome: Result<&str, &str>) {
        let outcome = outcome.map(str::to_owned).map_err(str::to_owned);
        match self.inner.outcome.lock() {
            Ok(mut o) => *o = outcome,
            Err(poisoned) => *poisoned.into_inner() = outcome,
        }
    }

    fn outcome(&self) -> Result<String, String> {
        match self.inner.outcome.lock() {
            Ok(o) => o.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Resets the counter, closes the gate and sets the outcome to `Ok(value)`.
    pub fn reset(&self, value: &str) {
        self.inner.runs.store(0, Ordering::SeqCst);
        self.set_open(false);
        self.set_outcome(Ok(value));
    }
}

/// Waits until `cache` has counted `n` more misses than `before` (each is the
/// leader of a load or waits on it).
async fn misses_reach<K, V>(cache: &Cache<K, V>, before: u64, n: u64)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    while cache.stats().misses < before + n {
        tokio::task::yield_now().await;
    }
}

/// `n` concurrent reads of [`KEY`] on a cold cache run the loader once; every
/// caller gets its value.
///
/// # Panics
///
/// When the guarantee does not hold (it is a test).
pub async fn single_flight<R, Fut, E>(
    cache: &Cache<u32, String>,
    gate: &LoadGate,
    read: &R,
    n: usize,
) where
    R: Fn(u32) -> Fut,
    Fut: Future<Output = Result<String, E>> + Send + 'static,
    E: fmt::Debug + Send + 'static,
{
    cache.invalidate_all();
    gate.reset("shared");
    let (misses, loads) = (cache.stats().misses, cache.stats().loads);
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(read(KEY))).collect();
    misses_reach(cache, misses, n as u64).await;
    gate.set_open(true);
    for t in tasks {
        let got = t.await.expect("a read panicked");
        assert_eq!(got.expect("the loader succeeded"), "shared");
    }
    assert_eq!(gate.runs(), 1, "the loader ran more than once");
    assert_eq!(cache.stats().loads - loads, 1);
    assert_eq!(cache.get(&KEY).as_deref(), Some("shared"));
}

/// `n` concurrent reads of [`KEY`] whose one load fails all get its error; the
/// error is not cached and the next read loads again.
///
/// # Panics
///
/// When the guarantee does not hold.
pub async fn error_shared_not_cached<R, Fut, E>(
    cache: &Cache<u32, String>,
    gate: &LoadGate,
    read: &R,
    n: usize,
) where
    R: Fn(u32) -> Fut,
    Fut: Future<Output = Result<String, E>> + Send + 'static,
    E: fmt::Display + fmt::Debug + Send + 'static,
{
    cache.invalidate_all();
    gate.reset("unused");
    gate.set_outcome(Err("database is down"));
    let misses = cache.stats().misses;
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(read(KEY))).collect();
    misses_reach(cache, misses, n as u64).await;
    gate.set_open(true);
    for t in tasks {
        let err = t
            .await
            .expect("a read panicked")
            .expect_err("the error must reach every waiter");
        assert!(
            err.to_string().contains("database is down"),
            "another error: {err}"
        );
    }
    assert_eq!(gate.runs(), 1, "the loader ran more than once");
    assert_eq!(cache.get(&KEY), None, "an error was cached");
    gate.set_outcome(Ok("recovered"));
    let again = read(KEY).await.expect("the next read retries");
    assert_eq!(again, "recovered");
    assert_eq!(gate.runs(), 2);
}

/// A read of [`KEY`] starts, `invalidation` is applied while it loads, the load
/// finishes: its caller gets the value, but it is not stored, and the next read
/// loads again and is stored.
///
/// # Panics
///
/// When the guarantee does not hold.
pub async fn stale_set_race<R, Fut, E>(
    cache: &Cache<u32, String>,
    gate: &LoadGate,
    read: &R,
    invalidation: Decision<u32>,
) where
    R: Fn(u32) -> Fut,
    Fut: Future<Output = Result<String, E>> + Send + 'static,
    E: fmt::Debug + Send + 'static,
{
    cache.invalidate_all();
    gate.reset("old");
    let (loads, discarded) = (cache.stats().loads, cache.stats().discarded_loads);
    let loading = tokio::spawn(read(KEY));
    while cache.stats().loads == loads {
        tokio::task::yield_now().await;
    }
    cache.apply(&invalidation);
    gate.set_open(true);
    let got = loading.await.expect("no panic").expect("loader ok");
    assert_eq!(got, "old", "the caller of the load gets its value");
    assert_eq!(
        cache.get(&KEY),
        None,
        "{invalidation:?}: a load that began before the invalidation was served after it"
    );
    assert_eq!(cache.stats().discarded_loads - discarded, 1);
    gate.set_outcome(Ok("new"));
    assert_eq!(read(KEY).await.expect("loader ok"), "new");
    assert_eq!(cache.get(&KEY).as_deref(), Some("new"), "caching resumes");
}
