//! The LISTEN/NOTIFY event source: [`PgListenerSource`].
//!
//! # How it works
//!
//! [`connect`](PgListenerBuilder::connect) opens a dedicated connection, `LISTEN`s
//! on every configured channel plus a private heartbeat channel, and returns once
//! that succeeded. A background tokio task then owns the connection:
//!
//! * each notification on a watched channel is parsed with
//!   [`parse_payload`](pgcachewatch_core::parse_payload) (pgcachewatch's payload or
//!   PGCacheWatch's) and published to every subscriber through a
//!   [`SignalHub`];
//! * a payload that is not an event is counted, logged, and dropped or turned into a
//!   gap ([`MalformedPolicy`]); it never stops the source;
//! * every heartbeat interval the task NOTIFYs its own heartbeat channel on the same
//!   connection; if that does not come back within the heartbeat timeout, and no
//!   notification arrived meanwhile (else the heartbeat is only queued behind a
//!   burst the handlers are still working through, and it gets more time), the
//!   task sends `SELECT 1` on the connection: if that is not answered within the
//!   timeout either, the connection is presumed half-open (TCP alone may take
//!   many minutes to notice);
//! * a connection that answers is alive and still listening, and the queue is
//!   *stalled*: a transaction that sent notifications is committing but not yet
//!   visible (its commit waits for a synchronous standby, say). PostgreSQL
//!   delivers nothing queued after it until then, and it holds the NOTIFY commit
//!   lock, so the heartbeat's own commit would wait too: the heartbeat gives up
//!   on the lock after half the timeout (`lock_timeout`), and that answer is
//!   the round trip. The stall is logged once (`warn`), counted
//!   ([`ListenerStats::queue_stalls`]), and waited out, the connection asked
//!   again every interval: no gap, no reconnect, no flush, since nothing is lost
//!   and no watched write becomes visible before the held one;
//! * on a lost connection or a heartbeat timeout it emits `Health::Unhealthy` and
//!   `Gap(ConnectionLost | HeartbeatTimeout)`, opens a *new* connection with capped,
//!   jittered exponential backoff, LISTENs on every channel again, then emits
//!   `Gap(Reconnected)` and only then `Health::Healthy`.
//!
//! sqlx's own `PgListener::recv` reconnects silently, so whatever was sent while it
//! was down is lost without a trace. This source never lets it: each connection
//! lives in its own one-connection pool with `eager_reconnect(false)`, and a loss
//! ends that connection for good.
//!
//! # Lifetime
//!
//! The task runs while anything still depends on it: a [`PgListenerSource`]
//! clone, a [`Subscription`] it handed out, or an inline attachment (a
//! [`Dispatcher`](pgcachewatch_core::Dispatcher) spawned on it). So a setup
//! function may return the dispatcher's handle and drop its local source: the
//! caches keep being invalidated. Once the last of those is dropped, or on
//! [`shutdown`](PgListenerSource::shutdown), the task stops and closes the
//! connection.
//!
//! # TLS
//!
//! `sslmode` (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`) and
//! `sslrootcert` are honoured, from the URL (`?sslmode=verify-ca&sslrootcert=/path/ca.pem`)
//! or `PGSSLMODE`/`PGSSLROOTCERT`, with the crate's `tls-rustls` (default) or
//! `tls-native-tls` feature. A certificate the root certificates do not vouch for
//! fails [`connect`](PgListenerBuilder::connect) with an
//! [`Error::Connection`] that says so and is not temporary.
//!
//! # No leak on a half-open connection
//!
//! Dropping sqlx's `PgListener` sends `UNLISTEN *` from a task that, on a
//! half-open connection, would wait until TCP gives up (minutes, or for ever
//! behind a middlebox). After a heartbeat timeout the source closes the
//! connection itself instead, at once and without leaving a task behind (the
//! session's LISTENs end with it).

mod abandon;
pub(crate) mod backoff;
mod config;
mod connection;
mod publish;
mod stats;
mod task;

use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;
use pgcachewatch_core::{
    ClosableHub, Error, EventSource, Health, InlineAttachment, InlineHandler, SignalHub,
    Subscription,
};
use sqlx::postgres::{PgConnectOptions, PgPool};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use self::config::Settings;
pub use self::config::{
    MalformedPolicy, PgListenerBuilder, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_RECONNECT_MAX, DEFAULT_RECONNECT_MIN,
};
use self::stats::Counters;
pub use self::stats::ListenerStats;
use self::task::{Command, Task};
use crate::keep_alive;

/// An [`EventSource`] fed by PostgreSQL `LISTEN`, with reconnect and heartbeat.
///
/// Cheap to clone; clones share one connection and one task. The task stops when
/// [`shutdown`](Self::shutdown) is called, or when the last clone, the last
/// [`Subscription`] and the last [`Dispatcher`](pgcachewatch_core::Dispatcher)
/// spawned on it are all dropped: a dispatcher keeps its source running.
///
/// Build one from a URL ([`builder`](Self::builder)), from ready
/// [`PgConnectOptions`] ([`builder_with_options`](Self::builder_with_options)), or
/// from the [`PgPool`] the application already has ([`from_pool`](Self::from_pool)).
///
/// # Example
///
/// ```no_run
/// use pgcachewatch::postgres::PgListenerSource;
/// use pgcachewatch::strategies::Greedy;
/// use pgcachewatch::{Cache, Dispatcher};
/// # async fn run() -> Result<(), pgcachewatch::Error> {
/// let source = PgListenerSource::builder("postgres://postgres@127.0.0.1/test")
///     .channel("pgcachewatch")
///     .connect()
///     .await?;
/// let users: Cache<u32, String> = Cache::new(10_000);
/// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
/// // … read through `users.get_or_load(..)` …
/// println!("{:?}", source.stats());
/// dispatcher.shutdown().await;
/// source.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use = "the source stops when dropped unless a Dispatcher is spawned on it or it is subscribed to"]
pub struct PgListenerSource {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` after shutdown: new subscriptions end at once.
    hub: ClosableHub,
    counters: Arc<Counters>,
    settings: Arc<Settings>,
    /// Sending (or dropping, with the last handle) stops the task.
    stop: watch::Sender<bool>,
    commands: mpsc::Sender<Command>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl fmt::Debug for PgListenerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgListenerSource")
            .field("target", &self.inner.settings.describe_target())
            .field("channels", &self.inner.settings.channels)
            .field("health", &self.health())
            .field("stats", &self.stats())
            .finish()
    }
}

impl PgListenerSource {
    /// A builder for a source that connects to `database_url`
    /// (`postgres://user[:password]@host[:port]/database`).
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::PgListenerSource;
    /// use pgcachewatch::EventSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// let url = std::env::var("DATABASE_URL").expect("DATABASE_URL"); // postgres://app@db.internal/app
    /// let source = PgListenerSource::builder(url).channel("pgcachewatch").connect().await?;
    /// assert!(source.health().is_healthy()); // listening when `connect` returns
    /// # Ok(()) }
    /// ```
    pub fn builder(database_url: impl Into<String>) -> PgListenerBuilder {
        PgListenerBuilder::from_url(database_url.into())
    }

    /// A builder for a source that connects with ready-made options (TLS,
    /// socket paths, and anything else sqlx lets you set).
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::PgListenerSource;
    /// use pgcachewatch::sqlx::postgres::{PgConnectOptions, PgSslMode};
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// let options = PgConnectOptions::new()
    ///     .host("db.internal")
    ///     .username("app")
    ///     .database("app")
    ///     .ssl_mode(PgSslMode::VerifyFull)
    ///     .ssl_root_cert("/etc/ssl/db-ca.pem");
    /// let source = PgListenerSource::builder_with_options(options).connect().await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn builder_with_options(options: PgConnectOptions) -> PgListenerBuilder {
        PgListenerBuilder::from_options(options)
    }

    /// A builder for a source that connects where `pool` connects, with its
    /// options (host, user, password, database, TLS settings): the listener then
    /// needs no URL of its own. The pool's connections are not used: listening
    /// takes a dedicated connection.
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::PgListenerSource;
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = pgcachewatch::sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?;
    /// let source = PgListenerSource::from_pool(&pool).connect().await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn from_pool(pool: &PgPool) -> PgListenerBuilder {
        PgListenerBuilder::from_options((*pool.connect_options()).clone())
    }

    /// Connects to `database_url` with every default (channel
    /// [`DEFAULT_CHANNEL`](crate::postgres::DEFAULT_CHANNEL)).
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::{PgListenerSource, DEFAULT_CHANNEL};
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// let source = PgListenerSource::connect("postgres://app@db.internal/app").await?;
    /// assert_eq!(source.channels(), [DEFAULT_CHANNEL]); // "pgcachewatch"
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`PgListenerBuilder::connect`].
    pub async fn connect(database_url: impl Into<String>) -> Result<Self, Error> {
        Self::builder(database_url).connect().await
    }

    pub(crate) async fn start(settings: Settings) -> Result<Self, Error> {
        let first = connection::open(&settings, connection::Probe::First).await?;
        tracing::info!(
            target = %settings.describe_target(),
            channels = ?settings.channels,
            backend_pid = first.backend_pid,
            "listening"
        );
        let settings = Arc::new(settings);
        let counters = Arc::new(Counters::for_source(LABEL));
        counters.set_backend_pid(Some(first.backend_pid));
        let hub =
            SignalHub::with_health(settings.builder.buffer, Health::Healthy).with_label(LABEL);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (command_tx, command_rx) = mpsc::channel(16);
        let task = Task {
            settings: settings.clone(),
            hub: hub.clone(),
            counters: counters.clone(),
            stop: stop_rx,
            commands: command_rx,
        };
        let handle = tokio::spawn(task.run(first));
        Ok(PgListenerSource {
            inner: Arc::new(Inner {
                hub: ClosableHub::new(hub),
                counters,
                settings,
                stop: stop_tx,
                commands: command_tx,
                task: Mutex::new(Some(handle)),
            }),
        })
    }

    /// The counters, now.
    ///
    /// ```no_run
    /// # async fn run(source: pgcachewatch::postgres::PgListenerSource) {
    /// let stats = source.stats();
    /// println!(
    ///     "{} events, {} reconnects, {} malformed, heartbeat round trip {:?}",
    ///     stats.events, stats.reconnects, stats.malformed, stats.last_heartbeat_rtt,
    /// );
    /// # }
    /// ```
    pub fn stats(&self) -> ListenerStats {
        self.inner.counters.snapshot()
    }

    /// The channels listened on (sorted, without duplicates).
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::PgListenerSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// let source = PgListenerSource::builder("postgres://app@db.internal/app")
    ///     .channels(["pgcachewatch", "app_cache", "pgcachewatch"])
    ///     .connect()
    ///     .await?;
    /// assert_eq!(source.channels(), ["app_cache", "pgcachewatch"]);
    /// # Ok(()) }
    /// ```
    pub fn channels(&self) -> &[String] {
        &self.inner.settings.channels
    }

    /// This source's private heartbeat channel (its notifications are never events).
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::PgListenerSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// let source = PgListenerSource::connect("postgres://app@db.internal/app").await?;
    /// // Seen from PostgreSQL: `SELECT pg_listening_channels()` on its connection
    /// // lists "pgcachewatch" and this one.
    /// println!("heartbeats on {}", source.heartbeat_channel()); // pgcachewatch_hb_…
    /// assert!(source.heartbeat_channel().starts_with("pgcachewatch_hb_"));
    /// # Ok(()) }
    /// ```
    pub fn heartbeat_channel(&self) -> &str {
        &self.inner.settings.heartbeat_channel
    }

    /// `pg_notification_queue_usage()`: the fraction (0 to 1) of PostgreSQL's
    /// notification queue in use. A queue that fills up makes writers' commits
    /// fail; it grows when a listening session stops reading (or sits in a long
    /// transaction). Asked on the listening connection.
    ///
    /// ```no_run
    /// # async fn run(source: pgcachewatch::postgres::PgListenerSource) -> Result<(), pgcachewatch::Error> {
    /// let usage = source.queue_usage().await?;
    /// if usage > 0.5 {
    ///     eprintln!("NOTIFY queue {:.0} % full: a listening session is not reading", usage * 100.0);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Connection`] while reconnecting or if the query fails;
    /// [`Error::Closed`] after shutdown.
    pub async fn queue_usage(&self) -> Result<f64, Error> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commands
            .send(Command::QueueUsage(tx))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Stops listening: subscriptions end, the task and its connection are gone
    /// when this returns. Later calls (on any clone) return at once.
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::PgListenerSource;
    /// use pgcachewatch::strategies::Greedy;
    /// use pgcachewatch::{Cache, Dispatcher};
    /// # async fn run(users: Cache<u32, String>) -> Result<(), pgcachewatch::Error> {
    /// let source = PgListenerSource::connect("postgres://app@db.internal/app").await?;
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// // … serve; then, at exit:
    /// dispatcher.shutdown().await;
    /// source.shutdown().await; // its connection is closed when this returns
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self) {
        self.inner.hub.close();
        self.inner.stop.send_replace(true);
        let task = self.inner.task.lock().take();
        keep_alive::join_task(task, "listener").await;
    }
}

/// The `source` label of LISTEN sources.
const LABEL: &str = "listen";

impl EventSource for PgListenerSource {
    /// `listen`.
    fn label(&self) -> String {
        LABEL.into()
    }

    /// A subscription that keeps the listener running while it exists.
    fn subscribe(&self) -> Subscription {
        keep_alive::subscription(self.inner.hub.subscribe(), self.inner.clone())
    }

    fn health(&self) -> Health {
        self.inner.hub.health()
    }

    /// Decisions are then applied in the listener task as each notification is
    /// parsed: the lowest write → invalidation latency. The attachment keeps the
    /// listener running while it exists.
    fn attach_inline(&self, handler: InlineHandler) -> Option<InlineAttachment> {
        Some(keep_alive::attachment(
            self.inner.hub.attach_inline(handler),
            self.inner.clone(),
        ))
    }
}
