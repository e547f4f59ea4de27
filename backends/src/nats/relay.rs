//! [`Relay`]: publishes an [`EventSource`]'s signals to a JetStream stream.
//!
//! # What it publishes
//!
//! Each event goes to `<prefix>.<schema>.<table>` (names escaped by
//! [`subject`](super::subject)), its payload a [`WireMessage`](super::wire::WireMessage)
//! (version 2 of the relay's contract: the event log's JSON form of the signal
//! plus the relay's *epoch*). Control messages go to `<prefix>.~relay.…`:
//!
//! * `gap`: the relay lost continuity. It starts a new epoch at start-up (a
//!   durable relay may continue the stream's: [`RelayBuilder::start_durable`]),
//!   at every `Gap` of its source (every `LISTEN` reconnect: NOTIFY is not
//!   durable; a replication slot advanced or recreated under its source), and
//!   when its stream was lost; the epoch's first message is this marker. Every
//!   consumer turns it, and any change of epoch, into a `Gap`.
//! * `heartbeat`: every interval, and at once when the source's health changes:
//!   the source's health. A consumer that hears no heartbeat for a while turns
//!   unhealthy.
//! * `progress.<origin>`: every event up to this position is stored in the
//!   stream, before this record (see below).
//!
//! # What the stream keeps
//!
//! Heartbeats and progress records replace the previous one on their subject
//! (JetStream's subject rollup, `Nats-Rollup: sub`): the stream keeps the
//! latest heartbeat and the latest record of each upstream, never one per
//! position, so the stream's limits go to events, however busy the database
//! is with tables nobody watches. Progress records follow the stored position
//! at most every [progress interval](RelayBuilder::progress_interval) (50 ms;
//! the first after a quiet spell at once), and at each heartbeat.
//!
//! # Never lose, never duplicate
//!
//! Each message carries a `Nats-Msg-Id`. An event with a position has
//! `<origin>:<lsn>:<index>`: its commit LSN and index within the commit, after
//! the name of the upstream it came from (a durable relay's replication slot,
//! `pg:<system id>/slot:<name>`; any other relay's epoch), so relays over
//! different upstreams writing into one stream never drop each other's
//! messages, while a relay restarted over the same slot gives each republished
//! copy the id of the first and JetStream's duplicate window drops it. Other
//! messages have `<origin>:<run>:<k>` (random to each relay process, then a
//! count).
//!
//! Acknowledgements are awaited in order. When one fails, the relay publishes
//! that message and every one after it again, in order, with the same ids,
//! until JetStream acknowledges them: the later ones it already stored are
//! dropped as duplicates, and nothing after a failure is left out. (A message
//! stored after later ones is *late*; consumers deliver it, never mistaking it
//! for a copy.)
//!
//! Once JetStream has acknowledged every event up to a position, the relay
//! publishes a `progress` *record* of it, and positions are *confirmed*
//! upstream ([`Confirm`]) only once that record is acknowledged. So over a
//! lossless source a relay killed at any moment loses nothing, and the stream
//! always holds a record at or beyond the slot's confirmed position: a slot
//! further along than the stream's last record was moved by someone else, and
//! a restarted relay starts a new epoch instead of continuing (an event's own
//! position would not prove that the events before it were stored). For the
//! same reason consumers move their read-your-writes position by records, not
//! by events ([`NatsSource`](super::NatsSource)).
//!
//! While JetStream does not acknowledge (NATS unreachable, a slow stream), at
//! most [`max_in_flight`](RelayBuilder::max_in_flight) messages wait, and the
//! relay stops reading its source. Over a replication slot
//! ([`RelayBuilder::start_durable`]) that stops the slot being read: the slot
//! keeps every change, however long NATS is away (bounded only by the
//! server's `max_slot_wal_keep_size`), nothing is confirmed past what
//! JetStream acknowledged, and the relay goes on in the same epoch once NATS
//! is back: no event lost, no gap.
//!
//! If the stream is gone (a NATS restart lost a memory-backed stream, or it was
//! deleted) the relay creates it again with its settings and starts a new
//! epoch: what the stream held is gone. A stream created anew by someone else
//! is noticed by its sequence numbers going back, with the same outcome.

#[cfg(test)]
mod model;
mod publisher;
mod resume;
mod task;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pgcachewatch_core::{EventSource, GapReason, Health, Lsn};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::resume::Begin;
use self::task::Connection;
use super::connect::NatsConnect;
use super::error::NatsError;
use super::stream::StreamSettings;

/// Told which positions JetStream has durably stored, so a lossless source
/// (the logical-replication source) may let the server discard them.
///
/// `confirmed(lsn)` is called when every event with a commit position up to and
/// including `lsn` that the relay received has been acknowledged by JetStream,
/// the commit at `lsn` is complete (a later position or a
/// [`Progress`](pgcachewatch_core::Signal::Progress) followed it), and a
/// progress record saying so is stored too (see the [module docs](self)).
/// Calls come in increasing order, from the relay's task: keep them quick.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use pgcachewatch::Lsn;
/// use pgcachewatch::nats::Confirm;
///
/// #[derive(Debug, Default)]
/// struct Flushed(AtomicU64);
/// impl Confirm for Flushed {
///     fn confirmed(&self, lsn: Lsn) {
///         self.0.fetch_max(lsn.as_u64(), Ordering::Release);
///     }
/// }
/// let f = Flushed::default();
/// f.confirmed(Lsn(7));
/// assert_eq!(f.0.load(Ordering::Acquire), 7);
/// ```
pub trait Confirm: Send + Sync + fmt::Debug + 'static {
    /// Everything up to `lsn` is stored in JetStream.
    fn confirmed(&self, lsn: Lsn);
}

/// The replication source's gate: the slot's confirmed position follows what
/// JetStream acknowledged.
#[cfg(feature = "replication")]
impl Confirm for crate::replication::ConfirmGate {
    fn confirmed(&self, lsn: Lsn) {
        self.applied(lsn);
    }
}

/// The default heartbeat interval.
pub const DEFAULT_RELAY_HEARTBEAT: Duration = Duration::from_secs(1);
/// The default number of messages published but not yet acknowledged.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// The default time to wait for JetStream's acknowledgement of a publish
/// (async-nats' own default is 5 s).
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// The default shortest time between two progress records.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_millis(50);

/// A relay's state, now ([`RelayHandle::status`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RelayStatus {
    /// The current epoch.
    pub epoch: String,
    /// The source's health.
    pub upstream: Health,
    /// Whether the last publish was acknowledged (false while retrying).
    pub publishing: bool,
    /// Signals taken from the source.
    pub received: u64,
    /// Messages JetStream acknowledged (events, markers, heartbeats).
    pub acked: u64,
    /// Events JetStream acknowledged.
    pub events: u64,
    /// Epochs started (1 + the source's gaps).
    pub epochs: u64,
    /// Failed acknowledgements: after each, the failed message and every one
    /// after it were published again.
    pub retries: u64,
    /// Messages published, not yet acknowledged.
    pub in_flight: usize,
    /// The stream sequence of the last acknowledged message.
    pub last_stream_seq: u64,
    /// The highest position confirmed upstream.
    pub confirmed: Option<Lsn>,
    /// Time from the source receiving the last acknowledged event to its acknowledgement.
    pub last_event_lag: Option<Duration>,
    /// When JetStream last acknowledged a message (`None`: never yet).
    pub last_ack_at: Option<std::time::Instant>,
    /// Whether the NATS connection is up now (false: NATS is unreachable, and
    /// what the relay publishes waits in flight).
    pub nats_connected: bool,
}

/// Builds and starts a [`Relay`].
#[derive(Debug, Clone)]
pub struct RelayBuilder {
    connect: NatsConnect,
    stream: StreamSettings,
    heartbeat: Duration,
    progress_interval: Duration,
    max_in_flight: usize,
    ack_timeout: Duration,
    confirm: Option<Arc<dyn Confirm>>,
}

/// A relay from an [`EventSource`] to JetStream (see the [module docs](self)).
///
/// ```no_run
/// use pgcachewatch::nats::{NatsConnect, Relay, StreamSettings};
/// use pgcachewatch::postgres::PgListenerSource;
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let source = PgListenerSource::connect("postgres://postgres@127.0.0.1/test").await?;
/// let relay = Relay::builder(NatsConnect::new("nats://127.0.0.1:4222"))
///     .stream(StreamSettings::new().subject_prefix("pgcachewatch"))
///     .start(&source)
///     .await?;
/// println!("{:?}", relay.status());
/// relay.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Relay;

impl Relay {
    /// A builder connecting with `connect`.
    pub fn builder(connect: NatsConnect) -> RelayBuilder {
        RelayBuilder {
            connect,
            stream: StreamSettings::new(),
            heartbeat: DEFAULT_RELAY_HEARTBEAT,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            confirm: None,
        }
    }
}

impl RelayBuilder {
    /// The stream to publish into (created or checked at start).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pgcachewatch::nats::{NatsConnect, Relay, StreamSettings};
    /// # async fn run(source: pgcachewatch::postgres::PgListenerSource) -> Result<(), pgcachewatch::nats::NatsError> {
    /// let stream = StreamSettings::new()
    ///     .stream("ORDERS")
    ///     .subject_prefix("orders")
    ///     .max_age(Duration::from_secs(3600)); // a subscriber away longer gets a gap
    /// let relay = Relay::builder(NatsConnect::new("nats://nats.internal:4222"))
    ///     .stream(stream) // each NatsSource reads it with the same settings
    ///     .start(&source)
    ///     .await?;
    /// # drop(relay); Ok(()) }
    /// ```
    pub fn stream(mut self, stream: StreamSettings) -> Self {
        self.stream = stream;
        self
    }

    /// How often to publish a heartbeat (default 1 s).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pgcachewatch::nats::{NatsConnect, Relay};
    /// # async fn run(source: pgcachewatch::postgres::PgListenerSource) -> Result<(), pgcachewatch::nats::NatsError> {
    /// // Subscribers then notice a dead relay sooner: give their
    /// // `NatsSourceBuilder::heartbeat_timeout` a few intervals (say 1.5 s).
    /// let relay = Relay::builder(NatsConnect::new("nats://nats.internal:4222"))
    ///     .heartbeat_interval(Duration::from_millis(500))
    ///     .start(&source)
    ///     .await?;
    /// # drop(relay); Ok(()) }
    /// ```
    pub fn heartbeat_interval(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// The shortest time between two progress records (default 50 ms). A
    /// consumer's read-your-writes wait ends once a record covers the write,
    /// so under a steady stream of commits a wait takes up to this much
    /// longer; after a quiet spell the first record goes at once. Each record
    /// replaces the one before in the stream, so this bounds what the relay
    /// writes, not what the stream keeps.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pgcachewatch::nats::{NatsConnect, Relay};
    /// # async fn run(source: pgcachewatch::postgres::PgListenerSource) -> Result<(), pgcachewatch::nats::NatsError> {
    /// // Subscribers' `wait_for_lsn` ends at most 10 ms after the write's own record.
    /// let relay = Relay::builder(NatsConnect::new("nats://nats.internal:4222"))
    ///     .progress_interval(Duration::from_millis(10))
    ///     .start(&source)
    ///     .await?;
    /// # drop(relay); Ok(()) }
    /// ```
    pub fn progress_interval(mut self, every: Duration) -> Self {
        self.progress_interval = every;
        self
    }

    /// How many messages may await their acknowledgement (default 256).
    ///
    /// ```no_run
    /// use pgcachewatch::nats::{NatsConnect, Relay};
    /// # async fn run(source: pgcachewatch::postgres::PgListenerSource) -> Result<(), pgcachewatch::nats::NatsError> {
    /// // NATS in another region: more messages on the wire at once.
    /// let relay = Relay::builder(NatsConnect::new("nats://nats.eu-west.internal:4222"))
    ///     .max_in_flight(2048)
    ///     .start(&source)
    ///     .await?;
    /// println!("{} awaiting acknowledgement", relay.status().in_flight);
    /// # Ok(()) }
    /// ```
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// How long to wait for JetStream's acknowledgement of a publish (and
    /// for its answer to a stream lookup) before publishing again (default
    /// [`DEFAULT_ACK_TIMEOUT`], 2 s). A publish in flight to a cluster node
    /// that died is never acknowledged: this bounds the stall; a copy sent
    /// again that JetStream already stored is dropped by its message id.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout.max(Duration::from_millis(100));
        self
    }

    /// Confirms acknowledged positions upstream (the replication source).
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use pgcachewatch::nats::{NatsConnect, Relay};
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let source = PgReplicationSource::builder("postgres://app@db.internal/app").connect().await?;
    /// // The slot frees WAL only up to what JetStream acknowledged. (`start_durable`
    /// // does this, and from the slot's first unconfirmed event on.)
    /// let relay = Relay::builder(NatsConnect::new("nats://nats.internal:4222"))
    ///     .confirm(Arc::new(source.confirm_gate()))
    ///     .start(&source)
    ///     .await?;
    /// # drop(relay); Ok(()) }
    /// ```
    pub fn confirm(mut self, confirm: Arc<dyn Confirm>) -> Self {
        self.confirm = Some(confirm);
        self
    }

    /// Connects, creates or checks the stream, subscribes to `source` and starts
    /// publishing. The relay runs until [`RelayHandle::shutdown`], until the
    /// handle is dropped, or until the source ends.
    ///
    /// ```no_run
    /// use pgcachewatch::nats::{NatsConnect, Relay};
    /// use pgcachewatch::postgres::PgListenerSource;
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let source = PgListenerSource::connect("postgres://app@db.internal/app").await?;
    /// let relay = Relay::builder(NatsConnect::new("nats://nats.internal:4222"))
    ///     .start(&source)
    ///     .await?;
    /// // … until the process exits:
    /// println!("{} events published", relay.status().events);
    /// relay.shutdown().await;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`NatsError`] if connecting or the stream fails.
    pub async fn start<S: EventSource + ?Sized>(
        self,
        source: &S,
    ) -> Result<RelayHandle, NatsError> {
        self.check()?;
        let connection = self.open().await?;
        let subscription = source.subscribe();
        let begin = Begin::New {
            reason: GapReason::Injected {
                detail: "relay started".into(),
            },
            covered: None,
        };
        Ok(self.run(connection, subscription, None, begin).await)
    }

    /// Starts a relay over a replication source started with
    /// [`connect_durable`](crate::replication::PgReplicationBuilder::connect_durable):
    /// lossless end to end. The relay reads every event from the slot's
    /// confirmed position on, and the slot is confirmed only up to what
    /// JetStream acknowledged, so a relay killed at any moment loses nothing:
    /// the next one republishes what was not confirmed (JetStream drops the
    /// copies it still remembers; consumers invalidate the others twice).
    ///
    /// The relay continues the stream's epoch for this slot, so consumers keep
    /// their caches across relay restarts, only when the stream holds
    /// everything the slot will not replay: its last progress record from
    /// this slot (see the [module docs](self)) is at or beyond the slot's
    /// confirmed position. A slot created or recreated now, one that someone
    /// else consumed or advanced meanwhile, or a stream that lost this slot's
    /// messages, starts a new epoch (a gap for every consumer).
    ///
    /// Returns the relay and the source (shut the source down after the relay).
    ///
    /// ```no_run
    /// // Through this crate, not the facade: the facade's `replication` feature
    /// // is off in this crate's own doc tests (it would bring a second TLS
    /// // provider into its rustls-only test run).
    /// use pgcachewatch_backends::nats::{NatsConnect, Relay};
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let start = PgReplicationSource::builder("postgres://postgres@127.0.0.1/test")
    ///     .connect_durable()
    ///     .await?;
    /// let (relay, source) = Relay::builder(NatsConnect::new("nats://127.0.0.1:4222"))
    ///     .start_durable(start)
    ///     .await?;
    /// relay.shutdown().await;
    /// source.shutdown().await;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`NatsError`] if connecting or the stream fails, or a confirm target was
    /// already set with [`confirm`](Self::confirm).
    #[cfg(feature = "replication")]
    pub async fn start_durable(
        mut self,
        start: crate::replication::DurableStart,
    ) -> Result<(RelayHandle, crate::replication::PgReplicationSource), NatsError> {
        self.check()?;
        if self.confirm.is_some() {
            return Err(NatsError::Config(
                "start_durable confirms to the replication slot itself: do not also set confirm()"
                    .into(),
            ));
        }
        let resumed = start.resumed();
        let slot_confirmed = start.slot_confirmed();
        let (source, subscription, gate) = start.into_parts();
        let origin = durable_origin(&source);
        self.confirm = Some(Arc::new(gate));
        let connection = self.open().await?;
        let found = if resumed {
            match self.stream.open(&connection.js).await {
                Ok(stream) => resume::find_last(&stream, self.stream.prefix(), &origin).await,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the stream back: starting a new epoch");
                    None
                }
            }
        } else {
            None
        };
        let begin = resume::decide(&origin, resumed, slot_confirmed, found);
        let handle = self
            .run(connection, subscription, Some(origin), begin)
            .await;
        Ok((handle, source))
    }

    fn check(&self) -> Result<(), NatsError> {
        if self.heartbeat.is_zero() {
            return Err(NatsError::Config(
                "the heartbeat interval must be above zero".into(),
            ));
        }
        self.stream.check()
    }

    async fn open(&self) -> Result<Connection, NatsError> {
        let connection = Connection::open(&self.connect, self.ack_timeout).await?;
        self.stream.ensure(&connection.js).await?;
        Ok(connection)
    }

    async fn run(
        self,
        connection: Connection,
        subscription: pgcachewatch_core::Subscription,
        origin: Option<String>,
        begin: Begin,
    ) -> RelayHandle {
        let epoch = match &begin {
            Begin::Continue(resume) => resume.epoch.clone(),
            Begin::New { .. } => task::new_epoch(origin.as_deref()),
        };
        let status = Arc::new(Mutex::new(RelayStatus {
            epoch: epoch.clone(),
            upstream: Health::Unhealthy,
            publishing: true,
            received: 0,
            acked: 0,
            events: 0,
            epochs: 1,
            retries: 0,
            in_flight: 0,
            last_stream_seq: 0,
            confirmed: None,
            last_event_lag: None,
            last_ack_at: None,
            nats_connected: true,
        }));
        let (stop_tx, stop_rx) = watch::channel(false);
        tracing::info!(stream = %self.stream.name(), prefix = %self.stream.prefix(), %epoch, "relay starting");
        let client = Arc::new(Mutex::new(connection.client.clone()));
        let task = task::Task::new(
            task::Setup {
                connection,
                connect: self.connect,
                ack_timeout: self.ack_timeout,
                client: client.clone(),
                stream: self.stream,
                epoch,
                origin,
                begin,
                heartbeat: self.heartbeat,
                progress_interval: self.progress_interval,
                max_in_flight: self.max_in_flight,
                confirm: self.confirm,
                status: status.clone(),
                stop: stop_rx,
            },
            subscription,
        );
        let handle = tokio::spawn(task.run());
        RelayHandle {
            status,
            stop: stop_tx,
            task: Some(handle),
            client,
        }
    }
}

/// The lasting name of a durable relay's upstream: its replication slot. A
/// slot's name is unique within its PostgreSQL cluster and the slot belongs to
/// one database, so two relays over different slots (of one database or of
/// several databases of one cluster) never share it, while a relay restarted
/// over the same slot gets the same one.
#[cfg(feature = "replication")]
fn durable_origin(source: &crate::replication::PgReplicationSource) -> String {
    // Slot names are unique within a cluster only: the system identifier
    // keeps relays of two clusters from deduplicating each other's messages.
    format!("pg:{}/slot:{}", source.system_identifier(), source.slot())
}

/// A running relay. Dropping it stops the relay (as
/// [`shutdown`](Self::shutdown) does, without waiting).
#[must_use = "the relay stops when its handle is dropped"]
pub struct RelayHandle {
    status: Arc<Mutex<RelayStatus>>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    /// The relay's current NATS client (the task replaces it when its
    /// connection goes silent).
    client: Arc<Mutex<async_nats::Client>>,
}

impl fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayHandle")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// The relay's state now.
    pub fn status(&self) -> RelayStatus {
        let mut s = self.status.lock().clone();
        s.nats_connected =
            self.client.lock().connection_state() == async_nats::connection::State::Connected;
        s
    }

    /// The NATS connection's state (connected, pending, disconnected).
    pub fn nats_state(&self) -> async_nats::connection::State {
        self.client.lock().connection_state()
    }

    /// Whether the relay's task has ended (its source ended, or it was stopped).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the relay after the messages in flight are acknowledged (or 5 s).
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        crate::keep_alive::join_task(self.task.take(), "relay").await;
    }

    /// Stops the relay at once, as a crash would: messages in flight may or may
    /// not reach JetStream. For tests of what consumers see.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
