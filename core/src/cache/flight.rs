//! Single-flight: concurrent misses on one key share one load.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::generations::Stamp;
use crate::sync::AtomicBool;

/// What a load ended with, shared by every waiter.
pub(crate) type Outcome<V> = Result<V, Failure>;

/// A loader's error, shared by every waiter of its load.
#[derive(Clone)]
pub(crate) struct Failure {
    /// The error, for [`Error::Load`](crate::Error::Load).
    pub(crate) error: Arc<dyn std::error::Error + Send + Sync + 'static>,
    /// The same error as its own type (`Arc<E>`), when a typed load
    /// (`try_get_with`) produced it.
    pub(crate) typed: Option<Arc<dyn std::any::Any + Send + Sync + 'static>>,
}

impl std::fmt::Debug for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failure")
            .field("error", &self.error)
            .field("typed", &self.typed.is_some())
            .finish()
    }
}

#[derive(Debug)]
enum State<V> {
    Pending,
    Done(Outcome<V>),
    /// The leading caller was dropped (cancelled) before the load finished.
    Abandoned,
}

/// The value a key had when it was invalidated, which a refresh of it may serve
/// for a bounded time ([`CacheBuilder::serve_stale_within`]).
///
/// [`CacheBuilder::serve_stale_within`]: super::CacheBuilder::serve_stale_within
#[derive(Debug, Clone)]
pub(crate) struct Stale<V> {
    pub(crate) value: V,
    /// When the invalidation that made it stale was applied (by the cache's
    /// stale clock).
    pub(crate) invalidated_at: Instant,
}

/// One in-flight load.
#[derive(Debug)]
pub(crate) struct Flight<V> {
    /// Generations when the load started.
    pub(crate) stamp: Stamp,
    /// When the load started: the value is at least this fresh (TTL and the
    /// unhealthy staleness bound count from here, conservatively).
    pub(crate) started_at: Instant,
    /// Set when the key was invalidated while loading: the result is handed to the
    /// callers already waiting but never stored, and no new caller joins.
    detached: AtomicBool,
    /// A background refresh (rather than a reader's load).
    pub(crate) refresh: bool,
    /// For a refresh: the previous value, served meanwhile within the bound.
    pub(crate) stale: Option<Stale<V>>,
    state: watch::Sender<State<V>>,
}

impl<V: Clone> Flight<V> {
    pub(crate) fn new(stamp: Stamp) -> Arc<Self> {
        Arc::new(Flight {
            stamp,
            started_at: Instant::now(),
            detached: AtomicBool::new(false),
            refresh: false,
            stale: None,
            state: watch::Sender::new(State::Pending),
        })
    }

    /// A background refresh, which may serve `stale` meanwhile.
    pub(crate) fn refresh(stamp: Stamp, stale: Option<Stale<V>>) -> Arc<Self> {
        Arc::new(Flight {
            stamp,
            started_at: Instant::now(),
            detached: AtomicBool::new(false),
            refresh: true,
            stale,
            state: watch::Sender::new(State::Pending),
        })
    }

    pub(crate) fn detach(&self) {
        self.detached.store(true, Ordering::Release);
    }

    pub(crate) fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }

    pub(crate) fn finish(&self, outcome: Outcome<V>) {
        self.state.send_replace(State::Done(outcome));
    }

    pub(crate) fn abandon(&self) {
        self.state.send_if_modified(|s| {
            if matches!(s, State::Pending) {
                *s = State::Abandoned;
                true
            } else {
                false
            }
        });
    }

    /// Waits for the leader. `None` if it was abandoned: the caller retries.
    pub(crate) async fn wait(&self) -> Option<Outcome<V>> {
        let mut rx = self.state.subscribe();
        let state = rx.wait_for(|s| !matches!(s, State::Pending)).await.ok()?;
        match &*state {
            State::Done(outcome) => Some(outcome.clone()),
            State::Pending | State::Abandoned => None,
        }
    }
}
