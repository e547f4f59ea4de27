//! [`NatsSource`]: an [`EventSource`] reading a relay's JetStream stream.
//!
//! # How it works
//!
//! It reads the stream from where the stream ends when it starts, through an
//! ephemeral consumer filtered to the subjects of the tables it is given (and
//! the relay's control subjects), and tracks the stream sequence of each message.
//!
//! * A consumer that goes silent (the server's idle heartbeat on it, a fifth
//!   of the [heartbeat timeout](NatsSourceBuilder::heartbeat_timeout), missed
//!   twice) or is gone (the cluster node holding it died) is replaced by a new
//!   one at the next sequence; a connection that then does not answer a
//!   probe within 2 s (a silent partition) is reconnected at once.
//! * After a disconnect it creates a new consumer starting at the next sequence:
//!   nothing was lost, so there is **no `Gap`**. It turns `Healthy` once it has
//!   read up to where the stream ended when it came back.
//! * If the stream no longer holds that sequence (its limits discarded it) it
//!   emits `Gap(Lagged)` before resuming. While connected it also checks, before
//!   delivering a message that skips sequence numbers, that the stream did not
//!   discard any of them unread; if it may have, a `Gap` comes first
//!   (conservatively: a skipped message may belong to a table it does not watch).
//! * A relay gap marker, or a change of the relay's epoch, is a `Gap`.
//! * It is `Unhealthy` while disconnected from NATS, while the relay's heartbeat
//!   says its own source is unhealthy, and when no heartbeat came for the
//!   heartbeat timeout (the relay is down: nobody listens to PostgreSQL).
//!
//! [`DispatcherHandle::wait_for_lsn`](pgcachewatch_core::DispatcherHandle::wait_for_lsn)
//! works over NATS as over a replication slot, but positions come from the
//! relay's progress records ([`Signal::Progress`](pgcachewatch_core::Signal::Progress)),
//! not from events: a record is stored after every event it covers, so once
//! the source has read it, it has delivered each of them. An event's own
//! position promises nothing about the events before it (one may be stored
//! later, republished after a failure), so events are delivered without their
//! `lsn`. An event whose position is below one already delivered (a
//! republished copy, or a message stored out of order) is delivered all the
//! same: never dropped as a duplicate.
//!
//! * A stream deleted and created anew under the same name (a memory-backed
//!   stream after a NATS restart) is noticed by its creation time, or by
//!   ending before what the source already read: a `Gap`, then reading from
//!   the new stream's start.

mod task;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pgcachewatch_core::{
    ClosableHub, EventSource, Health, InlineAttachment, InlineHandler, IntoTableRef, SignalHub,
    Subscription, TableRef, DEFAULT_HUB_CAPACITY,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::connect::NatsConnect;
use super::error::NatsError;
use super::stream::StreamSettings;
use super::subject;
use crate::keep_alive;

/// The default time without a relay heartbeat after which the source is unhealthy.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds a [`NatsSource`].
#[derive(Debug, Clone)]
pub struct NatsSourceBuilder {
    connect: NatsConnect,
    stream: StreamSettings,
    tables: Vec<TableRef>,
    heartbeat_timeout: Duration,
    buffer: usize,
}

/// An [`EventSource`] over a relay's JetStream stream (see the [module docs](self)).
///
/// Cheap to clone. Its task runs while a clone, a [`Subscription`] or an inline
/// attachment (a [`Dispatcher`](pgcachewatch_core::Dispatcher)) is alive, or
/// until [`shutdown`](Self::shutdown).
///
/// ```no_run
/// use pgcachewatch::nats::{NatsConnect, NatsSource, StreamSettings};
/// use pgcachewatch::strategies::Greedy;
/// use pgcachewatch::{Cache, Dispatcher};
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let source = NatsSource::builder(NatsConnect::new("nats://127.0.0.1:4222"))
///     .stream(StreamSettings::new())
///     .table("public.users")?
///     .connect()
///     .await?;
/// let users: Cache<i64, String> = Cache::new(10_000);
/// let _dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use = "the source stops when dropped unless a Dispatcher is spawned on it or it is subscribed to"]
pub struct NatsSource {
    inner: Arc<Inner>,
}

struct Inner {
    hub: ClosableHub,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Mutex<NatsSourceStats>>,
    description: String,
    /// `nats:<stream>`.
    label: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// A [`NatsSource`]'s counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsSourceStats {
    /// The stream sequence of the last message read.
    pub last_stream_seq: u64,
    /// Events delivered.
    pub events: u64,
    /// Gaps emitted.
    pub gaps: u64,
    /// Events delivered after one with a later position (in one relay epoch):
    /// a copy a restarted relay republished once JetStream's duplicate window
    /// forgot the first, or a first copy that JetStream stored after later
    /// messages (republished after a failed acknowledgement). Delivered, never
    /// dropped: the source cannot tell the two apart, and a second
    /// invalidation is harmless where a lost one serves stale values.
    pub late: u64,
    /// Consumers created (1 + resumptions).
    pub consumers: u64,
    /// The name of the consumer reading now (JetStream's consumer info shows
    /// which server holds it).
    pub consumer: Option<String>,
    /// The relay epoch last seen.
    pub epoch: Option<String>,
}

impl fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSource")
            .field("stream", &self.inner.description)
            .field("health", &self.health())
            .field("stats", &self.stats())
            .finish()
    }
}

impl NatsSource {
    /// A builder connecting with `connect` (default stream, every table).
    ///
    /// ```no_run
    /// use pgcachewatch::nats::{NatsConnect, NatsSource};
    /// # async fn run() -> Result<(), pgcachewatch::nats::NatsError> {
    /// // The stream a relay started with the defaults publishes into; every table.
    /// let source = NatsSource::builder(NatsConnect::new("nats://nats.internal:4222"))
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn builder(connect: NatsConnect) -> NatsSourceBuilder {
        NatsSourceBuilder {
            connect,
            stream: StreamSettings::new(),
            tables: Vec::new(),
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            buffer: DEFAULT_HUB_CAPACITY,
        }
    }

    /// The counters now.
    ///
    /// ```no_run
    /// # async fn run(source: pgcachewatch::nats::NatsSource) {
    /// let stats = source.stats();
    /// println!(
    ///     "{} events, {} gaps, read up to stream sequence {}",
    ///     stats.events, stats.gaps, stats.last_stream_seq,
    /// );
    /// # }
    /// ```
    pub fn stats(&self) -> NatsSourceStats {
        self.inner.stats.lock().clone()
    }

    /// Stops reading: subscriptions end; the task is gone when this returns.
    ///
    /// ```no_run
    /// use pgcachewatch::nats::{NatsConnect, NatsSource};
    /// use pgcachewatch::strategies::Greedy;
    /// use pgcachewatch::{Cache, Dispatcher};
    /// # async fn run(users: Cache<u32, String>) -> Result<(), pgcachewatch::nats::NatsError> {
    /// let source = NatsSource::builder(NatsConnect::new("nats://nats.internal:4222"))
    ///     .connect()
    ///     .await?;
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// // … serve; then, at exit:
    /// dispatcher.shutdown().await;
    /// source.shutdown().await; // its NATS consumer is gone when this returns
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self) {
        self.inner.hub.close();
        self.inner.stop.send_replace(true);
        let task = self.inner.task.lock().take();
        keep_alive::join_task(task, "NATS source").await;
    }
}

impl NatsSourceBuilder {
    /// The relay's stream (its name and prefix must match the relay's).
    ///
    /// ```no_run
    /// use pgcachewatch::nats::{NatsConnect, NatsSource, StreamSettings};
    /// # async fn run() -> Result<(), pgcachewatch::nats::NatsError> {
    /// // The same settings the relay publishes with.
    /// let stream = StreamSettings::new().stream("ORDERS").subject_prefix("orders");
    /// let source = NatsSource::builder(NatsConnect::new("nats://nats.internal:4222"))
    ///     .stream(stream)
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn stream(mut self, stream: StreamSettings) -> Self {
        self.stream = stream;
        self
    }

    /// Reads only this table's events (repeat for several; none: every table).
    /// `users` matches the table in any schema, `public.users` only in `public`.
    ///
    /// ```
    /// use pgcachewatch::nats::{NatsConnect, NatsSource};
    /// let nats = NatsConnect::new("nats://nats.internal:4222");
    /// let builder = NatsSource::builder(nats.clone())
    ///     .table("public.users")? // `users` in `public` only
    ///     .table("orders")?; // `orders` in any schema
    /// # let _ = builder;
    /// assert!(NatsSource::builder(nats).table("a.b.c").is_err()); // not a table name
    /// # Ok::<_, pgcachewatch::nats::NatsError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`NatsError::Config`] if the name does not parse.
    pub fn table(mut self, table: impl IntoTableRef) -> Result<Self, NatsError> {
        let t = table
            .into_table_ref()
            .map_err(|e| NatsError::Config(e.to_string()))?;
        self.tables.push(t);
        Ok(self)
    }

    /// Unhealthy after this long without a relay heartbeat (default 5 s; keep
    /// it a few relay heartbeat intervals).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pgcachewatch::nats::{NatsConnect, NatsSource};
    /// # async fn run() -> Result<(), pgcachewatch::nats::NatsError> {
    /// // The relay heartbeats every 2 s (`RelayBuilder::heartbeat_interval`): allow three.
    /// let source = NatsSource::builder(NatsConnect::new("nats://nats.internal:4222"))
    ///     .heartbeat_timeout(Duration::from_secs(6))
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = timeout;
        self
    }

    /// The per-subscriber buffer, in signals (default 4096).
    ///
    /// ```no_run
    /// use pgcachewatch::nats::{NatsConnect, NatsSource};
    /// # async fn run() -> Result<(), pgcachewatch::nats::NatsError> {
    /// // Subscribers that read in bursts may fall 8192 signals behind before a `Lagged` gap.
    /// let source = NatsSource::builder(NatsConnect::new("nats://nats.internal:4222"))
    ///     .buffer(8192)
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn buffer(mut self, signals: usize) -> Self {
        self.buffer = signals;
        self
    }

    fn filters(&self) -> Vec<String> {
        let prefix = self.stream.prefix();
        if self.tables.is_empty() {
            return vec![format!("{prefix}.>")];
        }
        let mut f: Vec<String> = self
            .tables
            .iter()
            .map(|t| match &t.schema {
                Some(s) => subject::table_subject(prefix, Some(s), &t.table),
                None => format!("{prefix}.*.{}", subject::escape_token(&t.table)),
            })
            .collect();
        f.push(subject::control_filter(prefix));
        f.sort();
        f.dedup();
        f
    }

    /// Connects, checks the stream exists, and starts reading at its end. The
    /// source is `Unhealthy` until the relay's first heartbeat.
    ///
    /// ```no_run
    /// use pgcachewatch::nats::{NatsConnect, NatsError, NatsSource};
    /// # async fn run() -> Result<(), NatsError> {
    /// let builder = NatsSource::builder(NatsConnect::new("nats://nats.internal:4222"));
    /// let source = match builder.table("public.users")?.connect().await {
    ///     Ok(source) => source, // caches bypass until the relay's first heartbeat
    ///     Err(e @ NatsError::StreamNotFound { .. }) => panic!("start the relay first: {e}"),
    ///     Err(e) => return Err(e),
    /// };
    /// # drop(source); Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`NatsError`] if connecting fails or the stream does not exist.
    pub async fn connect(self) -> Result<NatsSource, NatsError> {
        let buffer =
            SignalHub::check_capacity(self.buffer).map_err(|e| NatsError::Config(e.to_string()))?;
        if self.heartbeat_timeout.is_zero() {
            return Err(NatsError::Config(
                "the heartbeat timeout must be above zero".into(),
            ));
        }
        let (client, events_rx) = self.connect.connect_with_events().await?;
        let js = async_nats::jetstream::new(client.clone());
        let mut stream = self.stream.open(&js).await?;
        let info = stream
            .info()
            .await
            .map_err(|e| NatsError::js("stream info", e))?;
        let start = info.state.last_sequence + 1;
        let identity = task::StreamIdentity::of(info);
        let label = format!("nats:{}", self.stream.name());
        let hub = SignalHub::with_health(buffer, Health::Unhealthy).with_label(label.clone());
        let (stop_tx, stop_rx) = watch::channel(false);
        let stats = Arc::new(Mutex::new(NatsSourceStats::default()));
        let description = format!("{} ({})", self.stream.name(), self.filters().join(", "));
        let task = task::Task {
            client,
            stream,
            prefix: self.stream.prefix().to_owned(),
            filters: self.filters(),
            hub: hub.clone(),
            next_seq: start,
            identity,
            heartbeat_timeout: self.heartbeat_timeout,
            idle_heartbeat: task::idle_heartbeat(self.heartbeat_timeout),
            stop: stop_rx,
            nats_events: events_rx,
            stats: stats.clone(),
            state: task::State::default(),
            #[cfg(feature = "metrics")]
            metrics: crate::telemetry::SourceMetrics::new(&label),
        };
        let handle = tokio::spawn(task.run());
        Ok(NatsSource {
            inner: Arc::new(Inner {
                hub: ClosableHub::new(hub),
                stop: stop_tx,
                task: Mutex::new(Some(handle)),
                stats,
                description,
                label,
            }),
        })
    }
}

impl EventSource for NatsSource {
    /// `nats:<stream>`.
    fn label(&self) -> String {
        self.inner.label.clone()
    }

    /// A subscription that keeps the source running while it exists.
    fn subscribe(&self) -> Subscription {
        keep_alive::subscription(self.inner.hub.subscribe(), self.inner.clone())
    }

    fn health(&self) -> Health {
        self.inner.hub.health()
    }

    /// The attachment keeps the source running while it exists.
    fn attach_inline(&self, handler: InlineHandler) -> Option<InlineAttachment> {
        Some(keep_alive::attachment(
            self.inner.hub.attach_inline(handler),
            self.inner.clone(),
        ))
    }
}
