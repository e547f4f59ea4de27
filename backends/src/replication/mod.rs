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
//! **Confirmation.** After publishing a transaction, every inline-attached
//! dispatcher has applied it (the hub runs inline handlers synchronously), so the
//! task confirms the commit's end to the server. Subscribers reading from their own
//! task are not waited for: if one falls behind its buffer it gets
//! `Gap(Lagged)`, as with any source. An external consumer that needs its own
//! durability (a relay) holds confirmation back with a [`ConfirmGate`]. On an
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
//! events really are gone: the slot was dropped or invalidated, or a temporary
//! slot died with its connection.
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
mod gate;
pub(crate) mod pgoutput;
mod setup;
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
/// use pgcachewatch_backends::replication::PgReplicationSource;
/// use pgcachewatch_core::{Cache, Dispatcher};
/// use pgcachewatch_strategies::Greedy;
/// # async fn run() -> Result<(), pgcachewatch_core::Error> {
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
    pub fn builder(database_url: impl Into<String>) -> PgReplicationBuilder {
        PgReplicationBuilder::from_url(database_url.into())
    }

    /// A builder for a source that connects with ready-made options. sqlx does not
    /// hand back a password or root certificate: set them with
    /// [`password`](PgReplicationBuilder::password) and
    /// [`ssl_root_cert`](PgReplicationBuilder::ssl_root_cert) (or `PGPASSWORD`,
    /// `PGSSLROOTCERT`).
    pub fn builder_with_options(options: PgConnectOptions) -> PgReplicationBuilder {
        PgReplicationBuilder::from_options(options)
    }

    /// A builder with the connect options of `pool` (see
    /// [`builder_with_options`](Self::builder_with_options) for the password).
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
        let first = client::open(&settings, None).await?;
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
        let settings = Arc::new(settings);
        let label = label_of(&settings.builder.slot);
        let counters = Arc::new(Counters::for_source(&label));
        counters.set_backend_pid(first.backend_pid);
        let progress = Arc::new(Progress::default());
        let hub =
            SignalHub::with_health(settings.builder.buffer, Health::Unhealthy).with_label(label);
        let early = durable.then(|| (hub.subscribe(), ConfirmGate::new_sticky(progress.clone())));
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
        };
        let handle = tokio::spawn(task.run(first));
        let source = PgReplicationSource {
            inner: Arc::new(Inner {
                hub: ClosableHub::new(hub),
                counters,
                progress,
                settings,
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
        })
    }

    /// The counters, now.
    pub fn stats(&self) -> ReplicationStats {
        self.inner.counters.snapshot()
    }

    /// The slot streamed from.
    pub fn slot(&self) -> &str {
        &self.inner.settings.builder.slot
    }

    /// A gate through which an external consumer reports what it has durably
    /// applied; while any gate lives, the source confirms no further than the
    /// slowest gate. See [`ConfirmGate`].
    pub fn confirm_gate(&self) -> ConfirmGate {
        ConfirmGate::new(self.inner.progress.clone())
    }

    /// Stops streaming: subscriptions end, the task and its connection are gone
    /// when this returns. Later calls (on any clone) return at once.
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
