//! The logical-replication event source (feature `replication`):
//! [`PgReplicationSource`], lossless where [`PgListenerSource`](crate::postgres::PgListenerSource)
//! is not, and [`ReplicationSetup`], which creates its publication and slot.
//!
//! # How it works
//!
//! The source streams from a replication slot with PostgreSQL's own `pgoutput`
//! plugin (`START_REPLICATION SLOT … LOGICAL … (proto_version '1',
//! publication_names '…')`). No triggers: writers pay nothing beyond the WAL they
//! write anyway. A background task decodes the stream (our own pgoutput v1
//! decoder), buffers each transaction and, at its commit, publishes one
//! [`Event`](pgcachewatch_core::Event) per (table, operation) with the primary
//! keys of the changed rows, `lsn` = the commit's end, `txid` = the 32-bit xid,
//! `channel` = the slot name.
//!
//! **Announced only when visible.** PostgreSQL flushes a commit record (and
//! a walsender may stream it) *before* the committing backend leaves the proc
//! array; until then other sessions still read the old rows. Had the event
//! been applied on receipt, a load starting right after it would store the
//! old row for good. So the source holds each transaction until a snapshot
//! taken on a side connection after its receipt shows it finished
//! (`pg_current_snapshot()`, one query per batch of commits), and publishes in
//! commit order. Nothing later is announced meanwhile: a commit held by a
//! synchronous standby holds the events behind it, as `LISTEN` does.
//! [`ReplicationStats::visibility_checks`] and
//! [`visibility_waits`](ReplicationStats::visibility_waits) count it.
//!
//! **Keys.** A row's key is its primary key (read from `pg_index`, whatever the
//! replica identity), with the values `to_jsonb` gives pgcachewatch's
//! row-level triggers (`numeric` a number, `bool` a boolean, `timestamptz` in
//! UTC), so a [`Keyed`](https://docs.rs/pgcachewatch-strategies/latest/pgcachewatch_strategies/struct.Keyed.html)
//! mapper works on either source. Where the key cannot be known the event is
//! table-level: a table without a primary key, a key column left out of the
//! published columns, an `UPDATE` of a table whose replica identity does not
//! hold the key (`USING INDEX` on other columns: the key may have changed
//! unseen), or a transaction past the key cap. **Partitions** are named by
//! their root: a write to `orders_eu` is an event of `orders`.
//!
//! **Confirmation.** After publishing a transaction, every inline-attached
//! dispatcher has applied it (the hub runs inline handlers synchronously), so the
//! task confirms the commit's end to the server. Subscribers reading from their own
//! task are not waited for: if one falls behind its buffer it gets
//! `Gap(Lagged)`, as with any source. An external consumer that needs its own
//! durability (a relay) holds confirmation back with a [`ConfirmGate`]; its
//! subscription from [`connect_durable`](PgReplicationBuilder::connect_durable)
//! never lags: while it is half its buffer behind (a relay that cannot reach
//! NATS), the source stops reading the slot, which keeps the rest. On an
//! idle stream, a server keepalive outside a transaction becomes
//! [`Signal::Progress`](pgcachewatch_core::Signal::Progress) (at most one per
//! 10 ms), confirmed too.
//!
//! **Reconnect without loss.** A broken stream makes the source `Unhealthy`; it
//! reconnects with capped jittered backoff and resumes from the slot, which kept
//! everything not confirmed; replayed transactions already published are
//! skipped. It reports `Healthy` once caught up with the server's WAL position
//! at reconnect. No `Gap` on this path: caches keep their entries. A `Gap`
//! ([`GapReason::SlotLost`](pgcachewatch_core::GapReason::SlotLost)) only when
//! events really are gone: the slot was dropped or invalidated, a temporary
//! slot died with its connection, or the slot is further along than what this
//! source applied — another consumer advanced it (`pg_replication_slot_advance`,
//! a second source on the same slot name) or it was dropped and created anew
//! under the same name while the source was away. Only the source knows what
//! it applied, so it compares at every reconnect.
//!
//! **Publication membership.** The source re-reads the publication's tables
//! every 10 s and logs a warning naming any table that left it: its changes
//! no longer arrive.
//!
//! **Lifetime.** Clones share one task. Subscriptions and inline attachments
//! (a [`Dispatcher`](pgcachewatch_core::Dispatcher)) keep it running: it stops
//! when the last clone *and* the last attachment and subscription are gone, or
//! on [`shutdown`](PgReplicationSource::shutdown).
//!
//! **A slot retains WAL** until it is confirmed. A slot nobody consumes keeps
//! WAL forever and can fill the disk: drop abandoned slots
//! (`pgcachewatch replication teardown`), watch `pgcachewatch replication
//! status`, and set `max_slot_wal_keep_size` so the server invalidates a slot
//! rather than run out of space (the source then reports the slot lost).
//!
//! # Why this client
//!
//! sqlx cannot speak the CopyBoth sub-protocol replication needs. The connection
//! is `pgwire-replication` (rustls, SCRAM): it answers keepalives from its own
//! worker task even while our task is busy publishing (a slow consumer is not
//! killed by `wal_sender_timeout`), and sends the position we set
//! (`update_applied_lsn`) every status interval. It hands pgoutput row messages
//! over raw; the decoder here is ours. `pg_walstream` was rejected: it answers
//! keepalives only while the application polls it. Known client limitation: a
//! server `CopyDone` inside the stream surfaces as an EOF error, which this
//! source treats like any lost stream (reconnect, no loss). Everything that
//! touches the client is in `client.rs`, behind a three-item seam (open a session,
//! receive, confirm), so it can be swapped or replaced with a hand-written tokio
//! implementation without touching the decoder, the assembler or the task.

pub(crate) mod assembler;
mod client;
mod config;
mod flow;
mod gate;
mod held;
pub(crate) mod pgoutput;
mod setup;
mod side;
mod stats;
mod task;
mod visibility;

use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;
use pgcachewatch_core::{
    ClosableHub, Error, EventSource, Health, InlineAttachment, InlineHandler, Lsn, SignalHub,
    Subscription,
};
use sqlx::postgres::{PgConnectOptions, PgPool};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::assembler::Assembler;
use self::config::Settings;
pub use self::config::{
    PgReplicationBuilder, DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEY_CAP, DEFAULT_PUBLICATION,
    DEFAULT_RECONNECT_MAX, DEFAULT_RECONNECT_MIN, DEFAULT_SLOT, DEFAULT_STATUS_INTERVAL,
};
pub use self::gate::ConfirmGate;
use self::gate::Progress;
pub use self::setup::{ReplicationSetup, SetupError, SlotStatus};

use self::stats::Counters;
pub use self::stats::ReplicationStats;
use self::task::Task;
use crate::keep_alive;

/// An [`EventSource`] fed by a logical-replication slot: lossless across
/// reconnects, with commit positions for read-your-writes. See the
/// [module docs](self).
///
/// # Example
///
/// ```no_run
/// use pgcachewatch::strategies::Greedy;
/// use pgcachewatch::{Cache, Dispatcher};
/// use pgcachewatch_backends::replication::PgReplicationSource;
/// # async fn run() -> Result<(), pgcachewatch::Error> {
/// // Once: `pgcachewatch replication setup public.users --commit`.
/// let source = PgReplicationSource::builder("postgres://postgres@127.0.0.1/test")
///     .slot("pgcachewatch")
///     .publication("pgcachewatch")
///     .connect()
///     .await?;
/// let users: Cache<u32, String> = Cache::new(10_000);
/// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
/// println!("{:?}", source.stats());
/// dispatcher.shutdown().await;
/// source.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use = "the source stops when its last handle, subscription and attachment are dropped"]
pub struct PgReplicationSource {
    inner: Arc<Inner>,
}

struct Inner {
    hub: ClosableHub,
    counters: Arc<Counters>,
    progress: Arc<Progress>,
    settings: Arc<Settings>,
    /// The cluster's system identifier, from the first session.
    system_id: String,
    /// Sending (or dropping, with the last handle) stops the task.
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl fmt::Debug for PgReplicationSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgReplicationSource")
            .field("target", &self.inner.settings.describe_target())
            .field("slot", &self.inner.settings.builder.slot)
            .field("publication", &self.inner.settings.builder.publication)
            .field("health", &self.health())
            .field("stats", &self.stats())
            .finish()
    }
}

impl PgReplicationSource {
    /// A builder for a source that connects to `database_url`
    /// (`postgres://user[:password]@host[:port]/database[?sslmode=…&sslrootcert=…]`).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pgcachewatch::sqlx::{self, PgPool};
    /// use pgcachewatch::strategies::Greedy;
    /// use pgcachewatch::{Cache, Dispatcher};
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run(pool: PgPool, users: Cache<i64, String>) -> Result<(), Box<dyn std::error::Error>> {
    /// let source = PgReplicationSource::builder("postgres://app@db.internal/app").connect().await?;
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// // Read-your-writes: write, take the commit position, wait until the caches applied it.
    /// sqlx::query("UPDATE users SET name = 'Ann' WHERE id = 1").execute(&pool).await?;
    /// let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&pool).await?;
    /// dispatcher.wait_for_lsn(lsn.parse()?, Duration::from_secs(5)).await?;
    /// # Ok(()) }
    /// ```
    pub fn builder(database_url: impl Into<String>) -> PgReplicationBuilder {
        PgReplicationBuilder::from_url(database_url.into())
    }

    /// A builder for a source that connects with ready-made options. sqlx does not
    /// hand back a password or root certificate: set them with
    /// [`password`](PgReplicationBuilder::password) and
    /// [`ssl_root_cert`](PgReplicationBuilder::ssl_root_cert) (or `PGPASSWORD`,
    /// `PGSSLROOTCERT`).
    ///
    /// ```no_run
    /// use pgcachewatch::sqlx::postgres::PgConnectOptions;
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let options = PgConnectOptions::new().host("db.internal").username("app").database("app");
    /// let source = PgReplicationSource::builder_with_options(options)
    ///     .password(std::env::var("APP_DB_PASSWORD")?) // options do not hand theirs back
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn builder_with_options(options: PgConnectOptions) -> PgReplicationBuilder {
        PgReplicationBuilder::from_options(options)
    }

    /// A builder with the connect options of `pool` (see
    /// [`builder_with_options`](Self::builder_with_options) for the password).
    ///
    /// ```no_run
    /// use pgcachewatch::sqlx::PgPool;
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let password = std::env::var("APP_DB_PASSWORD")?;
    /// let pool = PgPool::connect(&format!("postgres://app:{password}@db.internal/app")).await?;
    /// // Where the pool connects, as the pool does (its password is not handed back).
    /// let source = PgReplicationSource::from_pool(&pool).password(password).connect().await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn from_pool(pool: &PgPool) -> PgReplicationBuilder {
        PgReplicationBuilder::from_options((*pool.connect_options()).clone())
    }

    pub(crate) async fn start(settings: Settings) -> Result<Self, Error> {
        Ok(Self::start_with(settings, false).await?.source)
    }

    /// Connects and spawns the task; with `durable`, the subscription and the
    /// gate exist before the first message is read.
    pub(crate) async fn start_with(
        settings: Settings,
        durable: bool,
    ) -> Result<DurableStart, Error> {
        let first = client::open(&settings, client::Known::default()).await?;
        let resumed =
            first.slot == client::SlotOutcome::Existing && !settings.builder.temporary_slot;
        tracing::info!(
            target = %settings.describe_target(),
            slot = %settings.builder.slot,
            publication = %settings.builder.publication,
            tls = ?settings.tls_mode(),
            resumed,
            "replication started"
        );
        let slot_confirmed = first.slot_confirmed;
        let system_id = first.system_id.clone();
        let settings = Arc::new(settings);
        let label = label_of(&settings.builder.slot);
        let counters = Arc::new(Counters::for_source(&label));
        counters.set_backend_pid(first.backend_pid);
        let progress = Arc::new(Progress::default());
        let hub =
            SignalHub::with_health(settings.builder.buffer, Health::Unhealthy).with_label(label);
        // A durable consumer's subscription holds the slot back while it is
        // half its buffer behind (see `flow`): it never lags, so it never
        // loses what the slot still holds.
        let flow = durable.then(|| flow::Flow::new(settings.builder.buffer));
        let early = flow.as_ref().map(|flow| {
            let sub = flow.counted(hub.subscribe());
            let counter = flow.clone();
            let counting = hub.attach_inline(Box::new(move |_: &pgcachewatch_core::Signal| {
                counter.emitted();
            }));
            (sub, ConfirmGate::new_sticky(progress.clone()), counting)
        });
        let (early, counting) = match early {
            Some((sub, gate, counting)) => (Some((sub, gate)), Some(counting)),
            None => (None, None),
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = Task {
            settings: settings.clone(),
            hub: hub.clone(),
            counters: counters.clone(),
            progress: progress.clone(),
            stop: stop_rx,
            assembler: Assembler::new(settings.builder.slot.clone(), settings.builder.key_cap),
            progress_sent: None,
            progress_pending: None,
            side: side::SideConnection::new(
                settings.side.clone(),
                settings.builder.connect_timeout,
            ),
            held: held::Held::default(),
            published: None,
            membership_due: tokio::time::Instant::now(),
            flow,
            _counting: counting,
        };
        let handle = tokio::spawn(task.run(first));
        let source = PgReplicationSource {
            inner: Arc::new(Inner {
                hub: ClosableHub::new(hub),
                counters,
                progress,
                settings,
                system_id,
                stop: stop_tx,
                task: Mutex::new(Some(handle)),
            }),
        };
        let early =
            early.map(|(sub, gate)| (keep_alive::subscription(sub, source.inner.clone()), gate));
        Ok(DurableStart {
            source,
            early,
            resumed,
            slot_confirmed,
        })
    }

    /// The counters, now.
    ///
    /// ```no_run
    /// # async fn run(source: pgcachewatch_backends::replication::PgReplicationSource) {
    /// let stats = source.stats();
    /// println!("{} events; confirmed {:?}", stats.events, stats.confirmed_lsn);
    /// if stats.lag_bytes.unwrap_or(0) > 1 << 30 {
    ///     eprintln!("slot {} retains over 1 GiB of WAL", source.slot());
    /// }
    /// # }
    /// ```
    pub fn stats(&self) -> ReplicationStats {
        self.inner.counters.snapshot()
    }

    /// The slot streamed from.
    ///
    /// ```no_run
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// let source = PgReplicationSource::builder("postgres://app@db.internal/app")
    ///     .slot("orders_service")
    ///     .connect()
    ///     .await?;
    /// assert_eq!(source.slot(), "orders_service");
    /// # Ok(()) }
    /// ```
    pub fn slot(&self) -> &str {
        &self.inner.settings.builder.slot
    }

    /// The PostgreSQL cluster's system identifier (`IDENTIFY_SYSTEM`, decimal
    /// text): with [`slot`](Self::slot), it names this source's upstream
    /// uniquely, across clusters that reuse a slot name.
    ///
    /// ```no_run
    /// # async fn run(source: pgcachewatch_backends::replication::PgReplicationSource) {
    /// let origin = format!("pg:{}/slot:{}", source.system_identifier(), source.slot());
    /// # }
    /// ```
    pub fn system_identifier(&self) -> &str {
        &self.inner.system_id
    }

    /// A gate through which an external consumer reports what it has durably
    /// applied; while any gate lives, the source confirms no further than the
    /// slowest gate. See [`ConfirmGate`].
    ///
    /// ```no_run
    /// use pgcachewatch::{EventSource, Signal};
    /// # async fn run(source: pgcachewatch_backends::replication::PgReplicationSource) {
    /// let gate = source.confirm_gate(); // the slot keeps what this has not reported
    /// let mut events = source.subscribe();
    /// while let Some(signal) = events.recv().await {
    ///     if let Signal::Event(e) = signal {
    ///         // … write `e` to an outbox, commit, then:
    ///         if let Some(lsn) = e.lsn {
    ///             gate.applied(lsn);
    ///         }
    ///     }
    /// }
    /// # }
    /// ```
    pub fn confirm_gate(&self) -> ConfirmGate {
        ConfirmGate::new(self.inner.progress.clone())
    }

    /// Stops streaming: subscriptions end, the task and its connection are gone
    /// when this returns. Later calls (on any clone) return at once.
    ///
    /// ```no_run
    /// use pgcachewatch::strategies::Greedy;
    /// use pgcachewatch::{Cache, Dispatcher};
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run(users: Cache<u32, String>) -> Result<(), pgcachewatch::Error> {
    /// let source = PgReplicationSource::builder("postgres://app@db.internal/app").connect().await?;
    /// let dispatcher = Dispatcher::new().attach(Greedy::new(), users.clone()).spawn(&source);
    /// // … serve; then, at exit:
    /// dispatcher.shutdown().await;
    /// source.shutdown().await; // the slot is released: the next run resumes from it
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self) {
        self.inner.hub.close();
        self.inner.stop.send_replace(true);
        let task = self.inner.task.lock().take();
        keep_alive::join_task(task, "replication").await;
    }
}

/// A replication source started for a durable consumer (a relay, an outbox
/// writer): [`PgReplicationBuilder::connect_durable`].
///
/// Its subscription and gate ([`into_parts`](Self::into_parts)) existed before
/// the source read its first message, so the consumer sees every event from
/// the slot's confirmed position on, and the server discards nothing the
/// consumer has not reported through the gate — even after the gate is
/// dropped: a consumer that stopped (or crashed) never lets the source confirm
/// what it did not store; the next run resumes from its last report. A source from
/// [`connect`](PgReplicationBuilder::connect) starts streaming at once: what
/// it reads before a later `subscribe` reaches nobody, and is confirmed.
#[derive(Debug)]
#[must_use = "the source stops when its last handle, subscription and attachment are dropped"]
pub struct DurableStart {
    source: PgReplicationSource,
    early: Option<(Subscription, ConfirmGate)>,
    resumed: bool,
    slot_confirmed: Lsn,
}

impl DurableStart {
    /// The source (for health, stats, shutdown, more subscribers).
    pub fn source(&self) -> &PgReplicationSource {
        &self.source
    }

    /// Whether the slot existed and streaming resumes right after what was
    /// confirmed before (`false` when it was created or recreated now, or is
    /// temporary: what happened before it is unknown).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The slot's confirmed position (`confirmed_flush_lsn`) when the source
    /// opened it: streaming starts right after it. A durable consumer compares
    /// it with the last position it stored: a slot that is further along was
    /// consumed (or replaced) by someone else, and the changes in between are
    /// gone for this consumer.
    ///
    /// ```no_run
    /// # async fn run(last_stored: pgcachewatch::Lsn) -> Result<(), pgcachewatch::Error> {
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// let start = PgReplicationSource::builder("postgres://postgres@127.0.0.1/test")
    ///     .connect_durable()
    ///     .await?;
    /// if !start.resumed() || start.slot_confirmed() > last_stored {
    ///     // … tell every consumer that events were lost (a gap) …
    /// }
    /// # Ok(()) }
    /// ```
    pub fn slot_confirmed(&self) -> Lsn {
        self.slot_confirmed
    }

    /// The source, the subscription made before streaming, and the gate.
    pub fn into_parts(self) -> (PgReplicationSource, Subscription, ConfirmGate) {
        let (subscription, gate) = self
            .early
            .unwrap_or_else(|| (self.source.subscribe(), self.source.confirm_gate()));
        (self.source, subscription, gate)
    }
}

/// The `source` label of a replication source: `replication:<slot>`.
fn label_of(slot: &str) -> String {
    format!("replication:{slot}")
}

impl EventSource for PgReplicationSource {
    /// `replication:<slot>`.
    fn label(&self) -> String {
        label_of(self.slot())
    }

    /// The subscription keeps the source running while it lives.
    fn subscribe(&self) -> Subscription {
        keep_alive::subscription(self.inner.hub.subscribe(), self.inner.clone())
    }

    fn health(&self) -> Health {
        self.inner.hub.health()
    }

    /// Decisions are applied in the replication task before the transaction is
    /// confirmed. The attachment keeps the source running while it lives.
    fn attach_inline(&self, handler: InlineHandler) -> Option<InlineAttachment> {
        Some(keep_alive::attachment(
            self.inner.hub.attach_inline(handler),
            self.inner.clone(),
        ))
    }
}
