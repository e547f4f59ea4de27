//! The dispatcher: pushes every signal of a source through strategies into caches.

mod binding;
mod inline;
mod task;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use self::binding::DispatcherStats;
use self::binding::{Binding, Bindings, Bound, Counters};
use crate::cache::InvalidationTarget;
use crate::source::{EventSource, InlineAttachment, Subscription};
use crate::strategy::InvalidationStrategy;

/// Ties strategies and caches to one [`EventSource`] (DESIGN.md decisions 1 and 2).
///
/// Build it with [`attach`](Dispatcher::attach), then [`spawn`](Dispatcher::spawn) it
/// on a source. It applies each signal as it arrives (push, not pull): inline, in
/// the source's own task, when the source offers it (every built-in source does),
/// else from a task reading a subscription. It fires time-based strategies at their
/// deadlines, and stops when the returned [`DispatcherHandle`] is dropped or shut
/// down, or when the source ends. When it stops, its caches are marked unhealthy:
/// without invalidations they can no longer be trusted, so they bypass.
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
/// # Ok::<_, pgcachewatch_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Default)]
pub struct Dispatcher {
    bindings: Vec<Box<dyn Binding>>,
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
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `strategy`'s decisions to `target` (usually a [`Cache`](crate::Cache)).
    pub fn attach<K, S, T>(mut self, strategy: S, target: T) -> Self
    where
        K: 'static,
        S: InvalidationStrategy<K>,
        T: InvalidationTarget<K>,
    {
        self.bindings.push(Box::new(Bound {
            strategy,
            target,
            _key: std::marker::PhantomData,
        }));
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
    /// # Panics
    ///
    /// Outside a tokio runtime (it spawns a task).
    pub fn spawn<S: EventSource + ?Sized>(self, source: &S) -> DispatcherHandle {
        let counters = Arc::new(Counters::default());
        let shared = inline::Shared::new(Bindings {
            list: self.bindings,
            counters: counters.clone(),
        });
        let mut handler = inline::Handler(shared.clone());
        if let Some(attachment) =
            source.attach_inline(Box::new(move |signal| handler.on_signal(signal)))
        {
            let (stop_tx, stop_rx) = oneshot::channel();
            let task = tokio::spawn(inline::timer(shared.clone(), stop_rx));
            return DispatcherHandle {
                stop: Some(stop_tx),
                task: Some(task),
                counters,
                mode: Mode::Inline {
                    attachment: Some(attachment),
                    shared,
                },
            };
        }
        // Refused: the handler was dropped without running; take the bindings back.
        let bindings = std::mem::replace(
            &mut *shared.bindings.lock(),
            Bindings {
                list: Vec::new(),
                counters: counters.clone(),
            },
        );
        Self::spawn_task(bindings, source, counters)
    }

    /// Like [`spawn`](Self::spawn), but always on a task of its own reading a
    /// [`Subscription`] of the source: the dispatcher then sees what any
    /// subscriber sees, including [`GapReason::Lagged`](crate::GapReason::Lagged)
    /// gaps if it falls behind.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (it spawns a task).
    pub fn spawn_subscribed<S: EventSource + ?Sized>(self, source: &S) -> DispatcherHandle {
        let counters = Arc::new(Counters::default());
        let bindings = Bindings {
            list: self.bindings,
            counters: counters.clone(),
        };
        Self::spawn_task(bindings, source, counters)
    }

    fn spawn_task<S: EventSource + ?Sized>(
        bindings: Bindings,
        source: &S,
        counters: Arc<Counters>,
    ) -> DispatcherHandle {
        let subscription = source.subscribe();
        bindings.set_healthy(source.health().is_healthy());
        let (stop_tx, stop_rx) = oneshot::channel();
        let (sync_tx, sync_rx) = mpsc::unbounded_channel();
        let bindings = Arc::new(Mutex::new(bindings));
        let task = tokio::spawn(task::run(bindings, subscription, stop_rx, sync_rx));
        DispatcherHandle {
            stop: Some(stop_tx),
            task: Some(task),
            counters,
            mode: Mode::Task { sync: sync_tx },
        }
    }

    /// Runs on the current task until `subscription` ends; for callers that drive
    /// the dispatcher themselves (benchmarks, custom executors).
    pub async fn run(self, subscription: Subscription) {
        let (_stop_tx, stop_rx) = oneshot::channel();
        let (_sync_tx, sync_rx) = mpsc::unbounded_channel();
        let bindings = Bindings {
            list: self.bindings,
            counters: Arc::default(),
        };
        task::run(
            Arc::new(Mutex::new(bindings)),
            subscription,
            stop_rx,
            sync_rx,
        )
        .await;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Controls a spawned [`Dispatcher`]. Dropping it stops dispatching; the caches
/// are then marked unhealthy (they bypass), since nothing invalidates them any more.
#[derive(Debug)]
pub struct DispatcherHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
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
        shared: Arc<inline::Shared>,
    },
}

impl fmt::Debug for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Task { .. } => "Task",
            Mode::Inline { .. } => "Inline",
        })
    }
}

impl DispatcherHandle {
    /// Stops dispatching and waits for the task; its caches are left unhealthy
    /// (bypassing).
    pub async fn shutdown(mut self) {
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
    pub fn is_finished(&self) -> bool {
        match &self.mode {
            Mode::Inline { shared, .. } => shared.closed.load(Ordering::Acquire),
            Mode::Task { .. } => self.task.as_ref().is_none_or(|t| t.is_finished()),
        }
    }

    /// Whether decisions are applied inline, in the source's task (see
    /// [`Dispatcher::spawn`]).
    pub fn is_inline(&self) -> bool {
        matches!(self.mode, Mode::Inline { .. })
    }

    /// The counters, now.
    pub fn stats(&self) -> DispatcherStats {
        self.counters.snapshot()
    }

    /// Waits until the dispatcher has applied every signal its source emitted
    /// before this call (returns at once if the dispatcher has stopped).
    ///
    /// "The notification has been processed" as a point in time, for tests and demos.
    pub async fn sync(&self) {
        match &self.mode {
            // Applied as emitted; the lock waits out an emission in progress.
            Mode::Inline { shared, .. } => drop(shared.bindings.lock()),
            Mode::Task { sync } => {
                let (tx, rx) = oneshot::channel();
                if sync.send(tx).is_ok() {
                    let _ = rx.await;
                }
            }
        }
    }

    fn detach(&mut self) {
        if let Mode::Inline { attachment, .. } = &mut self.mode {
            // Dropping the attachment drops the handler, which closes the bindings.
            drop(attachment.take());
        }
    }
}

impl Drop for DispatcherHandle {
    fn drop(&mut self) {
        self.detach();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
