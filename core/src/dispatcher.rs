//! The dispatcher: pushes every signal of a source through strategies into caches.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::cache::InvalidationTarget;
use crate::signal::{Health, Signal};
use crate::source::{EventSource, Subscription, TryRecvError};
use crate::strategy::{Decision, InvalidationStrategy};

/// How many ready signals the dispatcher applies before it yields to the runtime.
const BURST: usize = 1024;

/// One (strategy, target) pair, with the key type erased.
trait Binding: Send {
    fn on_signal(&mut self, signal: &Signal, now: Instant);
    fn on_tick(&mut self, now: Instant);
    fn deadline(&self) -> Option<Instant>;
    fn set_healthy(&self, healthy: bool);
    fn flush(&self);
}

struct Bound<K, S, T> {
    strategy: S,
    target: T,
    _key: std::marker::PhantomData<fn(K)>,
}

impl<K, S, T> Binding for Bound<K, S, T>
where
    K: 'static,
    S: InvalidationStrategy<K>,
    T: InvalidationTarget<K>,
{
    #[inline]
    fn on_signal(&mut self, signal: &Signal, now: Instant) {
        let decision = match signal {
            Signal::Event(event) => self.strategy.on_event(event, now),
            Signal::Gap(reason) => self.strategy.on_gap(reason, now),
            Signal::Health(health) => {
                self.target.set_healthy(health.is_healthy());
                return;
            }
        };
        if !decision.is_nothing() {
            self.target.apply(&decision);
        }
    }

    fn on_tick(&mut self, now: Instant) {
        if self.strategy.next_deadline().is_some_and(|d| d <= now) {
            let decision = self.strategy.on_tick(now);
            if !decision.is_nothing() {
                self.target.apply(&decision);
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.strategy.next_deadline()
    }

    fn set_healthy(&self, healthy: bool) {
        self.target.set_healthy(healthy);
    }

    fn flush(&self) {
        self.target.apply(&Decision::All);
    }
}

/// Counters of a running dispatcher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DispatcherStats {
    /// Events applied.
    pub events: u64,
    /// Gaps applied.
    pub gaps: u64,
    /// Health changes applied.
    pub health_changes: u64,
    /// Deadline ticks delivered to strategies.
    pub ticks: u64,
}

#[derive(Debug, Default)]
struct Counters {
    events: AtomicU64,
    gaps: AtomicU64,
    health_changes: AtomicU64,
    ticks: AtomicU64,
}

/// Ties strategies and caches to one [`EventSource`] (DESIGN.md decisions 1 and 2).
///
/// Build it with [`attach`](Dispatcher::attach), then [`spawn`](Dispatcher::spawn) it
/// on a source. The task it spawns applies each signal as it arrives (push, not
/// pull), fires time-based strategies at their deadlines, and stops when the
/// returned [`DispatcherHandle`] is dropped or shut down, or when the source ends.
/// When it stops, its caches are marked unhealthy: without invalidations they can
/// no longer be trusted, so they bypass.
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

    /// Subscribes to `source` and runs on a new tokio task. The caches take the
    /// source's current health before this returns.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (it spawns a task).
    pub fn spawn<S: EventSource + ?Sized>(self, source: &S) -> DispatcherHandle {
        let subscription = source.subscribe();
        let healthy = source.health().is_healthy();
        for b in &self.bindings {
            b.set_healthy(healthy);
        }
        let counters = Arc::new(Counters::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let (sync_tx, sync_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(self.run_loop(subscription, stop_rx, counters.clone(), sync_rx));
        DispatcherHandle {
            stop: Some(stop_tx),
            task: Some(task),
            counters,
            sync: sync_tx,
        }
    }

    /// Runs on the current task until `subscription` ends; for callers that drive
    /// the dispatcher themselves (benchmarks, custom executors).
    pub async fn run(self, subscription: Subscription) {
        let (_stop_tx, stop_rx) = oneshot::channel();
        let (_sync_tx, sync_rx) = mpsc::unbounded_channel();
        self.run_loop(subscription, stop_rx, Arc::default(), sync_rx)
            .await;
    }

    async fn run_loop(
        mut self,
        mut sub: Subscription,
        mut stop: oneshot::Receiver<()>,
        counters: Arc<Counters>,
        mut sync: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    ) {
        loop {
            let deadline = self.bindings.iter().filter_map(|b| b.deadline()).min();
            let next = tokio::select! {
                biased;
                _ = &mut stop => break,
                s = sub.recv() => s,
                Some(reply) = sync.recv() => {
                    // Everything emitted before the request is buffered by now.
                    let closed = self.drain(&mut sub, &counters);
                    let _ = reply.send(());
                    if closed {
                        break;
                    }
                    continue;
                }
                _ = sleep_until(deadline) => {
                    self.tick(&counters);
                    continue;
                }
            };
            let Some(mut signal) = next else {
                tracing::warn!("event source ended; caches will bypass from now on");
                break;
            };
            // Apply this signal and whatever else is already buffered, in one burst.
            let mut n = 0;
            loop {
                self.apply(&signal, &counters);
                n += 1;
                if n == BURST {
                    break;
                }
                match sub.try_recv() {
                    Ok(s) => signal = s,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => break,
                }
            }
            self.tick(&counters);
            if n == BURST {
                tokio::task::yield_now().await;
            }
        }
        for b in &self.bindings {
            b.set_healthy(false);
            b.flush();
        }
    }

    /// Applies every buffered signal; `true` if the subscription has ended.
    fn drain(&mut self, sub: &mut Subscription, counters: &Counters) -> bool {
        loop {
            match sub.try_recv() {
                Ok(signal) => self.apply(&signal, counters),
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Closed) => return true,
            }
        }
    }

    #[inline]
    fn apply(&mut self, signal: &Signal, counters: &Counters) {
        let now = tokio::time::Instant::now().into_std();
        let counter = match signal {
            Signal::Event(_) => &counters.events,
            Signal::Gap(reason) => {
                tracing::info!(%reason, "gap: flushing");
                &counters.gaps
            }
            Signal::Health(h) => {
                tracing::info!(healthy = (*h == Health::Healthy), "source health changed");
                &counters.health_changes
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        for b in &mut self.bindings {
            b.on_signal(signal, now);
        }
    }

    fn tick(&mut self, counters: &Counters) {
        let now = tokio::time::Instant::now().into_std();
        for b in &mut self.bindings {
            if b.deadline().is_some_and(|d| d <= now) {
                counters.ticks.fetch_add(1, Ordering::Relaxed);
                b.on_tick(now);
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Controls a spawned [`Dispatcher`]. Dropping it stops the task.
#[derive(Debug)]
pub struct DispatcherHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    sync: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

impl DispatcherHandle {
    /// Stops the task and waits for it; its caches are left unhealthy (bypassing).
    pub async fn shutdown(mut self) {
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

    /// Whether the task has stopped (shut down, or its source ended).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// The counters, now.
    pub fn stats(&self) -> DispatcherStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DispatcherStats {
            events: get(&self.counters.events),
            gaps: get(&self.counters.gaps),
            health_changes: get(&self.counters.health_changes),
            ticks: get(&self.counters.ticks),
        }
    }

    /// Waits until the dispatcher has applied every signal its source emitted
    /// before this call (returns at once if the dispatcher has stopped).
    ///
    /// "The notification has been processed" as a point in time, for tests and demos.
    pub async fn sync(&self) {
        let (tx, rx) = oneshot::channel();
        if self.sync.send(tx).is_ok() {
            let _ = rx.await;
        }
    }
}

impl Drop for DispatcherHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
