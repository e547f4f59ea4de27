//! The dispatcher: pushes every signal of a source through strategies into caches.

mod applied;
mod binding;
mod inline;
mod shared;
mod task;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use self::binding::DispatcherStats;
use self::binding::{Binding, Bindings, Bound};
use self::shared::Shared;
use crate::cache::InvalidationTarget;
use crate::position::Lsn;
use crate::signal::Health;
use crate::source::{EventSource, InlineAttachment, Subscription};
use crate::strategy::InvalidationStrategy;

/// Ties strategies and caches to one [`EventSource`] (ARCHITECTURE.md, decisions 1 and 2).
///
/// Build it with [`attach`](Dispatcher::attach), then [`spawn`](Dispatcher::spawn) it
/// on a source. It applies each signal as it arrives (push, not pull): inline, in
/// the source's own task, when the source offers it (every built-in source does),
/// else from a task reading a subscription. It fires time-based strategies at their
/// deadlines, and stops when the returned [`DispatcherHandle`] is dropped or shut
/// down, or when the source ends.
///
/// # What keeps the caches honest
///
/// * **Attaching is a gap.** [`spawn`](Self::spawn) flushes every cache it feeds:
///   nothing watched the source for them before.
/// * **Stopping is loud.** However a dispatcher stops — handle dropped or shut
///   down, task aborted, source ended — its caches are flushed and stop trusting
///   their entries (they bypass, or serve within their bound) before anything else
///   can happen, and one error is logged. A new dispatcher attached to the cache
///   takes the stopped one's place.
/// * **A strategy panic is contained.** It is caught per attachment: that cache is
///   flushed (which covers the event the strategy failed on) and bypasses until
///   its strategy — reset with a gap — handles a signal again; other attachments,
///   the source and its other subscribers go on. Counted in
///   [`DispatcherStats::strategy_panics`], logged once.
/// * **Health is per attachment.** A cache fed by several dispatchers trusts its
///   entries only while every one of their sources is healthy (see
///   [`HealthBoard`](crate::HealthBoard)).
///
/// # Example
///
/// ```
/// use pgcachewatch_core::{Cache, Decision, Dispatcher, Event, InvalidationStrategy, Operation, SignalHub, EventSource, Health, Subscription};
/// # #[derive(Debug)] struct Source(SignalHub);
/// # impl EventSource for Source { fn subscribe(&self) -> Subscription { self.0.subscribe() } fn health(&self) -> Health { self.0.health() } }
/// #[derive(Debug)]
/// struct DropAll;
/// impl<K> InvalidationStrategy<K> for DropAll {
///     fn on_event(&mut self, _: &Event, _: std::time::Instant) -> Decision<K> { Decision::All }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let source = Source(SignalHub::new(64));
/// let users: Cache<u32, String> = Cache::new(100);
/// let handle = Dispatcher::new().attach(DropAll, users.clone()).spawn(&source);
/// users.get_or_load(1, || async { Ok::<_, std::io::Error>("ann".to_string()) }).await?;
/// source.0.publish(Event::new("ch", Operation::Update, "public", "users"));
/// handle.sync().await;
/// assert_eq!(users.get(&1), None);
/// handle.shutdown().await;
/// # Ok::<_, pgcachewatch::Error>(())
/// # }).unwrap();
/// ```
#[derive(Default)]
pub struct Dispatcher {
    bindings: Vec<Box<dyn Binding>>,
    max_latency: Option<Duration>,
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("bindings", &self.bindings.len())
            .finish()
    }
}

impl Dispatcher {
    /// A dispatcher with nothing attached.
    ///
    /// ```
    /// use pgcachewatch::{Cache, Dispatcher};
    /// use pgcachewatch::memory::InMemorySource;
    /// use pgcachewatch::strategies::Greedy;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let (source, _control) = InMemorySource::pair();
    /// let users: Cache<u32, String> = Cache::new(100);
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// assert_eq!(users.stats().dispatchers, 1);
    /// # drop(dispatcher);
    /// # });
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Warns when an event is applied more than `bound` after it was sent (its
    /// [`sent_at`](crate::Event::sent_at): the trigger's or the commit's time),
    /// at most once a second, and counts such events in
    /// [`DispatcherStats::late_events`]: PGCacheWatch's `max_latency`. A late
    /// event is still applied; the warning says the pipeline (database, network,
    /// a lagging source) is slower than the bound the application relies on.
    /// Off by default.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgcachewatch_core::{Cache, Dispatcher, Event, EventSource, Health, Operation, SignalHub, Subscription};
    /// use pgcachewatch::strategies::Greedy;
    /// # #[derive(Debug)] struct Source(SignalHub);
    /// # impl EventSource for Source { fn subscribe(&self) -> Subscription { self.0.subscribe() } fn health(&self) -> Health { self.0.health() } }
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let source = Source(SignalHub::new(16));
    /// let cache: Cache<u32, String> = Cache::new(100);
    /// let handle = Dispatcher::new()
    ///     .max_latency(Duration::from_millis(500))
    ///     .attach(Greedy::new(), cache.clone())
    ///     .spawn(&source);
    /// let mut late = Event::new("ch", Operation::Update, "public", "users");
    /// late.sent_at = Some(late.received_at - Duration::from_secs(2)); // sent 2 s ago
    /// source.0.publish(late);
    /// handle.sync().await;
    /// assert_eq!(handle.stats().late_events, 1);
    /// # });
    /// ```
    pub fn max_latency(mut self, bound: Duration) -> Self {
        self.max_latency = Some(bound);
        self
    }

    /// Applies `strategy`'s decisions to `target` (usually a [`Cache`](crate::Cache)).
    ///
    /// ```
    /// use pgcachewatch::{Cache, Dispatcher, Event, Operation};
    /// use pgcachewatch::strategies::Greedy;
    /// # use pgcachewatch::memory::InMemorySource;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let (source, control) = InMemorySource::pair();
    /// let users: Cache<u32, &str> = Cache::new(100);
    /// let orders: Cache<u32, &str> = Cache::new(100);
    /// let _dispatcher = Dispatcher::new()
    ///     .attach(Greedy::with_predicate(|e: &Event| e.table == "users"), users.clone())
    ///     .attach(Greedy::with_predicate(|e: &Event| e.table == "orders"), orders.clone())
    ///     .spawn(&source);
    /// users.insert(1, "ann");
    /// orders.insert(1, "book");
    /// control.publish(Event::new("pgcachewatch", Operation::Update, "public", "users"));
    /// assert_eq!((users.get(&1), orders.get(&1)), (None, Some("book")));
    /// # });
    /// ```
    pub fn attach<K, S, T>(mut self, strategy: S, target: T) -> Self
    where
        K: 'static,
        S: InvalidationStrategy<K>,
        T: InvalidationTarget<K>,
    {
        self.bindings.push(Box::new(Bound::new(strategy, target)));
        self
    }

    /// Starts dispatching `source`'s signals. The caches take the source's current
    /// health before this returns.
    ///
    /// If the source offers [`attach_inline`](EventSource::attach_inline) (every
    /// built-in source does), decisions are applied *inline*, in the source's own
    /// task as each signal is emitted: no hop to another task, no buffer, no lag.
    /// Otherwise (or with [`spawn_subscribed`](Self::spawn_subscribed)) a task reads
    /// a subscription. Either way a small task fires strategies' deadlines.
    ///
    /// ```
    /// use pgcachewatch::{Cache, Dispatcher, Event, Operation};
    /// use pgcachewatch::memory::InMemorySource;
    /// use pgcachewatch::strategies::Greedy;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let (source, control) = InMemorySource::pair();
    /// let users: Cache<u32, &str> = Cache::new(100);
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// assert!(dispatcher.is_inline());
    /// users.insert(1, "ann");
    /// control.publish(Event::new("pgcachewatch", Operation::Update, "public", "users"));
    /// assert_eq!(users.get(&1), None); // applied as the source emitted it
    /// # });
    /// ```
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (it spawns a task).
    #[must_use = "dropping the handle stops dispatching at once (the caches then bypass); keep it for as long as the caches are used"]
    pub fn spawn<S: EventSource + ?Sized>(self, source: &S) -> DispatcherHandle {
        let shared = self.attach_to(source);
        let mut handler = inline::Handler::new(shared.clone());
        if let Some(attachment) =
            source.attach_inline(Box::new(move |signal| handler.on_signal(signal)))
        {
            let (stop_tx, stop_rx) = oneshot::channel();
            let task = tokio::spawn(inline::timer(shared.clone(), stop_rx));
            return DispatcherHandle {
                stop: Some(stop_tx),
                task: Some(task),
                shared,
                mode: Mode::Inline {
                    attachment: Some(attachment),
                },
            };
        }
        // Refused: the handler was dropped without running; a task reads instead.
        Self::spawn_task(shared, source)
    }

    /// Like [`spawn`](Self::spawn), but always on a task of its own reading a
    /// [`Subscription`] of the source: the dispatcher then sees what any
    /// subscriber sees, including [`GapReason::Lagged`](crate::GapReason::Lagged)
    /// gaps if it falls behind.
    ///
    /// ```
    /// use pgcachewatch::{Cache, Dispatcher, Event, Operation};
    /// use pgcachewatch::memory::InMemorySource;
    /// use pgcachewatch::strategies::Greedy;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let (source, control) = InMemorySource::pair();
    /// let users: Cache<u32, &str> = Cache::new(100);
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn_subscribed(&source);
    /// assert!(!dispatcher.is_inline());
    /// users.insert(1, "ann");
    /// control.publish(Event::new("pgcachewatch", Operation::Update, "public", "users"));
    /// dispatcher.sync().await; // its task has applied the event
    /// assert_eq!(users.get(&1), None);
    /// # });
    /// ```
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (it spawns a task).
    #[must_use = "dropping the handle stops dispatching at once (the caches then bypass); keep it for as long as the caches are used"]
    pub fn spawn_subscribed<S: EventSource + ?Sized>(self, source: &S) -> DispatcherHandle {
        let shared = self.attach_to(source);
        Self::spawn_task(shared, source)
    }

    /// Attaches every binding (a health vote and a flush per target: attaching is
    /// a gap, since nothing watched the source for these caches before) and takes
    /// the source's current health.
    fn attach_to<S: EventSource + ?Sized>(self, source: &S) -> Arc<Shared> {
        let bindings = Bindings::new(self.bindings).with_max_latency(self.max_latency);
        #[cfg(feature = "metrics")]
        let bindings = bindings.with_source(source.label());
        let mut bindings = bindings;
        bindings.attach(source.health());
        Shared::new(bindings)
    }

    fn spawn_task<S: EventSource + ?Sized>(shared: Arc<Shared>, source: &S) -> DispatcherHandle {
        let subscription = source.subscribe();
        let (stop_tx, stop_rx) = oneshot::channel();
        let (sync_tx, sync_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(task::run(shared.clone(), subscription, stop_rx, sync_rx));
        DispatcherHandle {
            stop: Some(stop_tx),
            task: Some(task),
            shared,
            mode: Mode::Task { sync: sync_tx },
        }
    }

    /// Runs on the current task until `subscription` ends; for callers that drive
    /// the dispatcher themselves (benchmarks, custom executors). The caches are
    /// attached (flushed, health taken from the subscription's first signal) and
    /// left bypassing when it returns.
    ///
    /// ```
    /// use pgcachewatch::{Cache, Dispatcher, EventSource, Event, Operation};
    /// use pgcachewatch::memory::InMemorySource;
    /// use pgcachewatch::strategies::Greedy;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let (source, control) = InMemorySource::pair();
    /// let users: Cache<u32, &str> = Cache::new(100);
    /// let run = Dispatcher::new().attach(Greedy::new(), users.clone()).run(source.subscribe());
    /// control.publish(Event::new("pgcachewatch", Operation::Update, "public", "users"));
    /// control.close(); // the subscription ends after that event
    /// run.await; // dispatches on this task until then
    /// assert!(!users.is_healthy()); // left bypassing: nothing invalidates it now
    /// # });
    /// ```
    pub async fn run(self, subscription: Subscription) {
        let (_stop_tx, stop_rx) = oneshot::channel();
        let (_sync_tx, sync_rx) = mpsc::unbounded_channel();
        let bindings = Bindings::new(self.bindings).with_max_latency(self.max_latency);
        #[cfg(feature = "metrics")]
        let bindings = bindings.with_source("custom".into());
        let mut bindings = bindings;
        bindings.attach(Health::Unhealthy);
        task::run(Shared::new(bindings), subscription, stop_rx, sync_rx).await;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Controls a spawned [`Dispatcher`]. Dropping it stops dispatching at once; the
/// handle is `#[must_use]`, so discarding it by mistake is a warning:
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// # use pgcachewatch_core::{Cache, Dispatcher, SignalHub, EventSource, Health, Subscription};
/// # #[derive(Debug)] struct Source(SignalHub);
/// # impl EventSource for Source { fn subscribe(&self) -> Subscription { self.0.subscribe() } fn health(&self) -> Health { self.0.health() } }
/// # #[derive(Debug)] struct All;
/// # impl pgcachewatch::InvalidationStrategy<u32> for All { fn on_event(&mut self, _: &pgcachewatch::Event, _: std::time::Instant) -> pgcachewatch::Decision<u32> { pgcachewatch::Decision::All } }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let source = Source(SignalHub::new(64));
/// let cache: Cache<u32, String> = Cache::new(100);
/// Dispatcher::new().attach(All, cache.clone()).spawn(&source); // error: unused `DispatcherHandle`
/// # });
/// ```
///
/// The same code, keeping the handle, compiles:
///
/// ```
/// #![deny(unused_must_use)]
/// # use pgcachewatch_core::{Cache, Dispatcher, SignalHub, EventSource, Health, Subscription};
/// # #[derive(Debug)] struct Source(SignalHub);
/// # impl EventSource for Source { fn subscribe(&self) -> Subscription { self.0.subscribe() } fn health(&self) -> Health { self.0.health() } }
/// # #[derive(Debug)] struct All;
/// # impl pgcachewatch::InvalidationStrategy<u32> for All { fn on_event(&mut self, _: &pgcachewatch::Event, _: std::time::Instant) -> pgcachewatch::Decision<u32> { pgcachewatch::Decision::All } }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let source = Source(SignalHub::new(64));
/// let cache: Cache<u32, String> = Cache::new(100);
/// let _dispatcher = Dispatcher::new().attach(All, cache.clone()).spawn(&source);
/// # });
/// ```
///
/// Dropping it stops dispatching; the
/// caches are then flushed and marked unhealthy (they bypass), since nothing
/// invalidates them any more.
///
/// Whatever stops a dispatcher — this handle dropped or shut down, its task
/// aborted, a panic, its source ending — its caches stop trusting their entries
/// before anything else can happen: no cache is left serving values nobody
/// invalidates.
#[must_use = "dropping the handle stops dispatching at once (the caches then bypass); keep it for as long as the caches are used"]
pub struct DispatcherHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    mode: Mode,
}

enum Mode {
    /// A task reads a subscription; `sync` requests reach it in order.
    Task {
        sync: mpsc::UnboundedSender<oneshot::Sender<()>>,
    },
    /// The source runs the bindings as it emits; a task fires deadlines.
    Inline {
        attachment: Option<InlineAttachment>,
    },
}

impl fmt::Debug for DispatcherHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DispatcherHandle")
            .field("inline", &self.is_inline())
            .field("finished", &self.is_finished())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Why a read-your-writes wait ([`DispatcherHandle::wait_for_lsn`],
/// [`DispatcherHandle::wait_for_txid`]) ended without its write applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The write was not applied within the timeout. The caches may still hold
    /// what it changed: invalidate the keys you wrote, or read around the cache.
    #[error("the write was not applied within {waited:?} (applied up to {applied:?})")]
    Timeout {
        /// How long the wait lasted.
        waited: Duration,
        /// The highest position applied when it gave up, if any.
        applied: Option<Lsn>,
    },
    /// The dispatcher stopped; its caches bypass, so reads are fresh anyway.
    #[error("the dispatcher stopped before the write was applied")]
    Stopped,
}

impl DispatcherHandle {
    /// Stops dispatching and waits for the task; its caches are left unhealthy
    /// (bypassing).
    ///
    /// ```
    /// use pgcachewatch::{Cache, Dispatcher};
    /// use pgcachewatch::strategies::Greedy;
    /// # use pgcachewatch::memory::InMemorySource;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let (source, _control) = InMemorySource::pair();
    /// let users: Cache<u32, String> = Cache::new(100);
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// assert!(users.is_healthy());
    /// dispatcher.shutdown().await;
    /// assert!(!users.is_healthy()); // nothing invalidates it now: reads bypass
    /// # });
    /// ```
    pub async fn shutdown(mut self) {
        self.shared.close_as(true);
        self.detach();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                if e.is_panic() {
                    tracing::error!("dispatcher task panicked: {e}");
                }
            }
        }
    }

    /// Whether dispatching has stopped (shut down, or its source ended).
    ///
    /// ```
    /// use pgcachewatch::Dispatcher;
    /// use pgcachewatch::memory::InMemorySource;
    /// use pgcachewatch::strategies::Greedy;
    /// # use pgcachewatch::Cache;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let (source, control) = InMemorySource::pair();
    /// # let users: Cache<u32, String> = Cache::new(100);
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// assert!(!dispatcher.is_finished());
    /// control.close(); // the source ends
    /// assert!(dispatcher.is_finished());
    /// # });
    /// ```
    pub fn is_finished(&self) -> bool {
        self.shared.is_closed()
    }

    /// Whether decisions are applied inline, in the source's task (see
    /// [`Dispatcher::spawn`]).
    ///
    /// ```
    /// use pgcachewatch::Dispatcher;
    /// use pgcachewatch::strategies::Greedy;
    /// # use pgcachewatch::Cache;
    /// # use pgcachewatch::memory::InMemorySource;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let (source, _control) = InMemorySource::pair();
    /// # let users: Cache<u32, String> = Cache::new(100);
    /// let inline = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// assert!(inline.is_inline()); // every built-in source runs it in its own task
    /// let task = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn_subscribed(&source);
    /// assert!(!task.is_inline());
    /// # });
    /// ```
    pub fn is_inline(&self) -> bool {
        matches!(self.mode, Mode::Inline { .. })
    }

    /// The counters, now.
    ///
    /// ```
    /// use pgcachewatch::{Dispatcher, Event, Operation};
    /// use pgcachewatch::strategies::Greedy;
    /// # use pgcachewatch::Cache;
    /// # use pgcachewatch::memory::InMemorySource;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let (source, control) = InMemorySource::pair();
    /// # let users: Cache<u32, String> = Cache::new(100);
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// control.publish(Event::new("pgcachewatch", Operation::Update, "public", "users"));
    /// control.disconnect("connection reset");
    /// let stats = dispatcher.stats();
    /// assert_eq!((stats.events, stats.gaps), (1, 1));
    /// # });
    /// ```
    pub fn stats(&self) -> DispatcherStats {
        self.shared.counters.snapshot()
    }

    /// Waits until the dispatcher has applied every signal its source emitted
    /// before this call (returns at once if the dispatcher has stopped).
    ///
    /// "The notification has been processed" as a point in time, for tests and demos.
    ///
    /// ```
    /// use pgcachewatch::{Dispatcher, Event, Operation};
    /// use pgcachewatch::strategies::Greedy;
    /// # use pgcachewatch::Cache;
    /// # use pgcachewatch::memory::InMemorySource;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let (source, control) = InMemorySource::pair();
    /// # let users: Cache<u32, &str> = Cache::new(100);
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn_subscribed(&source);
    /// users.insert(1, "ann");
    /// control.publish(Event::new("pgcachewatch", Operation::Update, "public", "users"));
    /// dispatcher.sync().await; // the event above has been applied
    /// assert_eq!(users.get(&1), None);
    /// # });
    /// ```
    pub async fn sync(&self) {
        match &self.mode {
            // Applied as emitted; the lock waits out an emission in progress.
            Mode::Inline { .. } => drop(self.shared.lock()),
            Mode::Task { sync } => {
                let (tx, rx) = oneshot::channel();
                if sync.send(tx).is_ok() {
                    let _ = rx.await;
                }
            }
        }
    }

    /// The highest commit position this dispatcher has applied (from events of a
    /// lossless source, or its progress marks); `None` before the first.
    ///
    /// ```
    /// use pgcachewatch::{Dispatcher, Event, Lsn, Operation};
    /// use pgcachewatch::strategies::Greedy;
    /// # use pgcachewatch::Cache;
    /// # use pgcachewatch::memory::InMemorySource;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let (source, control) = InMemorySource::pair();
    /// # let users: Cache<u32, String> = Cache::new(100);
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// assert_eq!(dispatcher.applied_lsn(), None);
    /// // What the replication source sends for a transaction committed at 0/16B3748:
    /// let lsn: Lsn = "0/16B3748".parse()?;
    /// control.publish(Event::new("pgcachewatch", Operation::Update, "public", "users").with_lsn(lsn));
    /// assert_eq!(dispatcher.applied_lsn(), Some(lsn));
    /// # Ok::<_, pgcachewatch::ParseLsnError>(())
    /// # }).unwrap();
    /// ```
    pub fn applied_lsn(&self) -> Option<Lsn> {
        self.shared.applied.lsn()
    }

    /// Read-your-writes over a lossless source (the logical-replication source,
    /// or a relay of it): waits until every change committed at or before `lsn`
    /// has been applied to the caches, so a read through them that starts after
    /// this returns sees the write. Positions are ordered like commits, so this
    /// is exact.
    ///
    /// Take `lsn` from `SELECT pg_current_wal_lsn()` after your `COMMIT` (or
    /// `pg_current_wal_insert_lsn()` inside the transaction).
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgcachewatch::{Dispatcher, Lsn, WaitError};
    /// use pgcachewatch::strategies::Greedy;
    /// # use pgcachewatch::{Cache, Event, Operation};
    /// # use pgcachewatch::memory::InMemorySource;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let (source, control) = InMemorySource::pair();
    /// # let users: Cache<u32, String> = Cache::new(100);
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// // After `UPDATE users …; COMMIT;`, `SELECT pg_current_wal_lsn()` gave:
    /// let lsn: Lsn = "0/16B3748".parse()?;
    /// # control.publish(Event::new("pgcachewatch", Operation::Update, "public", "users").with_lsn(lsn));
    /// dispatcher.wait_for_lsn(lsn, Duration::from_secs(1)).await?;
    /// // `users` has applied the write: a read from now on sees it.
    /// let later: Lsn = "0/16C0000".parse()?;
    /// let waited = dispatcher.wait_for_lsn(later, Duration::from_millis(10)).await;
    /// assert!(matches!(waited, Err(WaitError::Timeout { .. }))); // not applied (yet)
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// [`WaitError::Timeout`] if it was not applied within `timeout`;
    /// [`WaitError::Stopped`] if the dispatcher stopped (its caches bypass).
    pub async fn wait_for_lsn(&self, lsn: Lsn, timeout: Duration) -> Result<(), WaitError> {
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(timeout, self.shared.applied.wait_for_lsn(lsn)).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(WaitError::Stopped),
            Err(_) => Err(WaitError::Timeout {
                waited: started.elapsed(),
                applied: self.applied_lsn(),
            }),
        }
    }

    /// Read-your-writes over the `LISTEN` source: waits until an event of
    /// transaction `txid` has been applied to the caches (pgcachewatch's triggers
    /// send `txid_current()`; read it in your transaction). Transaction ids are not
    /// ordered like commits, so this waits for that transaction's own event: a
    /// transaction that changed no watched table never produces one (the wait
    /// times out). The last 4096 transactions applied are remembered, so a wait
    /// that starts after its event was applied returns at once.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgcachewatch::{Dispatcher, Event, Operation};
    /// use pgcachewatch::strategies::Greedy;
    /// # use pgcachewatch::Cache;
    /// # use pgcachewatch::memory::InMemorySource;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let (source, control) = InMemorySource::pair();
    /// # let users: Cache<u32, String> = Cache::new(100);
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// // In the writing transaction: `SELECT txid_current()` gave 7412.
    /// let txid = 7412;
    /// // Its trigger's notification, as the LISTEN source delivers it:
    /// control.publish(Event::new("pgcachewatch", Operation::Update, "public", "users").with_txid(txid));
    /// dispatcher.wait_for_txid(txid, Duration::from_secs(1)).await?;
    /// // `users` has applied the write: a read from now on sees it.
    /// # Ok::<_, pgcachewatch::WaitError>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`wait_for_lsn`](Self::wait_for_lsn).
    pub async fn wait_for_txid(&self, txid: i64, timeout: Duration) -> Result<(), WaitError> {
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(timeout, self.shared.applied.wait_for_txid(txid)).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(WaitError::Stopped),
            Err(_) => Err(WaitError::Timeout {
                waited: started.elapsed(),
                applied: self.applied_lsn(),
            }),
        }
    }

    fn detach(&mut self) {
        if let Mode::Inline { attachment } = &mut self.mode {
            // Dropping the attachment drops the handler, which closes the bindings.
            drop(attachment.take());
        }
    }
}

impl Drop for DispatcherHandle {
    fn drop(&mut self) {
        // First, synchronously: the caches stop trusting their entries before any
        // further write could go unapplied.
        self.shared.close();
        self.detach();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
