//! [`Relay`]: publishes an [`EventSource`]'s signals to a JetStream stream.
//!
//! # What it publishes
//!
//! Each event goes to `<prefix>.<schema>.<table>` (names escaped by
//! [`subject`](super::subject)), its payload a [`WireMessage`](super::wire::WireMessage):
//! the event log's JSON form plus the relay's *epoch* and the message's number
//! within it. Control messages go to `<prefix>.~relay.<kind>`:
//!
//! * `gap`: the relay lost continuity. It starts a new epoch at start-up and at
//!   every `Gap` of its source (every `LISTEN` reconnect: NOTIFY is not durable),
//!   and the epoch's first message is this marker. Every consumer turns it, and
//!   any change of epoch, into a `Gap`.
//! * `heartbeat`: every interval, and at once when the source's health changes:
//!   the source's health and the number of the last message before it. A
//!   consumer that hears no heartbeat for a while turns unhealthy.
//! * `progress`: a lossless source passed this position.
//!
//! # Never lose, never duplicate
//!
//! Each message carries a `Nats-Msg-Id` derived from its position: commit LSN and
//! index within the commit for events that carry one (`lsn:<lsn>:<index>`),
//! `<epoch>:<n>` otherwise, so a republished message is dropped by JetStream's
//! duplicate window. A message whose acknowledgement fails is published again,
//! with the same id, until JetStream acknowledges it. Positions are *confirmed*
//! upstream ([`Confirm`]) only once JetStream has acknowledged every message up
//! to them, so over a lossless source a relay killed at any moment loses nothing.

mod publisher;
mod task;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pgcachewatch_core::{EventSource, Health, Lsn};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::connect::NatsConnect;
use super::error::NatsError;
use super::stream::StreamSettings;

/// Told which positions JetStream has durably stored, so a lossless source
/// (the logical-replication source) may let the server discard them.
///
/// `confirmed(lsn)` is called when every event with a commit position up to and
/// including `lsn` that the relay received has been acknowledged by JetStream,
/// and the commit at `lsn` is complete (a later position or a
/// [`Progress`](pgcachewatch_core::Signal::Progress) followed it). Calls come in
/// increasing order, from the relay's task: keep them quick.
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
    /// Messages published again after a failed acknowledgement.
    pub retries: u64,
    /// Messages published, not yet acknowledged.
    pub in_flight: usize,
    /// The stream sequence of the last acknowledged message.
    pub last_stream_seq: u64,
    /// The highest position confirmed upstream.
    pub confirmed: Option<Lsn>,
    /// Time from the source receiving the last acknowledged event to its acknowledgement.
    pub last_event_lag: Option<Duration>,
}

/// Builds and starts a [`Relay`].
#[derive(Debug, Clone)]
pub struct RelayBuilder {
    connect: NatsConnect,
    stream: StreamSettings,
    heartbeat: Duration,
    max_in_flight: usize,
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
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            confirm: None,
        }
    }
}

impl RelayBuilder {
    /// The stream to publish into (created or checked at start).
    pub fn stream(mut self, stream: StreamSettings) -> Self {
        self.stream = stream;
        self
    }

    /// How often to publish a heartbeat (default 1 s).
    pub fn heartbeat_interval(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// How many messages may await their acknowledgement (default 256).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Confirms acknowledged positions upstream (the replication source).
    pub fn confirm(mut self, confirm: Arc<dyn Confirm>) -> Self {
        self.confirm = Some(confirm);
        self
    }

    /// Connects, creates or checks the stream, subscribes to `source` and starts
    /// publishing. The relay runs until [`RelayHandle::shutdown`], until the
    /// handle is dropped, or until the source ends.
    ///
    /// # Errors
    ///
    /// [`NatsError`] if connecting or the stream fails.
    pub async fn start<S: EventSource + ?Sized>(
        self,
        source: &S,
    ) -> Result<RelayHandle, NatsError> {
        self.check()?;
        let (client, js) = self.open().await?;
        let subscription = source.subscribe();
        Ok(self.run(client, js, subscription, Continuity::None).await)
    }

    /// Starts a relay over a replication source started with
    /// [`connect_durable`](crate::replication::PgReplicationBuilder::connect_durable):
    /// lossless end to end. The relay reads every event from the slot's
    /// confirmed position on, and the slot is confirmed only up to what
    /// JetStream acknowledged, so a relay killed at any moment loses nothing:
    /// the next one republishes what was not confirmed (JetStream drops the
    /// copies it still remembers; consumers skip the others). When the slot
    /// resumed, the relay continues the stream's epoch, so consumers keep their
    /// caches across relay restarts; a created or recreated slot starts a new
    /// epoch (a gap for every consumer).
    ///
    /// Returns the relay and the source (shut the source down after the relay).
    ///
    /// ```no_run
    /// use pgcachewatch::nats::{NatsConnect, Relay};
    /// use pgcachewatch::replication::PgReplicationSource;
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
        let (source, subscription, gate) = start.into_parts();
        let origin = format!("slot:{}", source.slot());
        self.confirm = Some(Arc::new(gate));
        let (client, js) = self.open().await?;
        let resume = if resumed {
            last_epoch(&js, &self.stream, &origin).await
        } else {
            None
        };
        let handle = self
            .run(client, js, subscription, Continuity::Origin(origin, resume))
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

    async fn open(
        &self,
    ) -> Result<(async_nats::Client, async_nats::jetstream::Context), NatsError> {
        let client = self.connect.connect().await?;
        let js = async_nats::jetstream::new(client.clone());
        self.stream.ensure(&js).await?;
        Ok((client, js))
    }

    async fn run(
        self,
        client: async_nats::Client,
        js: async_nats::jetstream::Context,
        subscription: pgcachewatch_core::Subscription,
        continuity: Continuity,
    ) -> RelayHandle {
        let (origin, resume) = match continuity {
            Continuity::None => (None, None),
            Continuity::Origin(origin, resume) => (Some(origin), resume),
        };
        let epoch = resume
            .as_ref()
            .map_or_else(|| task::new_epoch(origin.as_deref()), |r| r.epoch.clone());
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
        }));
        let (stop_tx, stop_rx) = watch::channel(false);
        tracing::info!(stream = %self.stream.name(), prefix = %self.stream.prefix(), %epoch, "relay starting");
        let task = task::Task::new(
            js,
            self.stream.prefix().to_owned(),
            subscription,
            epoch,
            (origin, resume),
            self.heartbeat,
            self.max_in_flight,
            self.confirm,
            status.clone(),
            stop_rx,
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

/// Whether the relay's upstream has an identity that outlives the relay.
#[cfg_attr(not(feature = "replication"), allow(dead_code))]
enum Continuity {
    /// No: every start is a new epoch (the LISTEN source).
    None,
    /// Yes (a replication slot), and maybe the epoch to continue.
    Origin(String, Option<task::Resume>),
}

/// The epoch of the stream's last message, if it came from a relay over the
/// same upstream (`<origin>/…`): the one to continue.
#[cfg(feature = "replication")]
async fn last_epoch(
    js: &async_nats::jetstream::Context,
    stream: &StreamSettings,
    origin: &str,
) -> Option<task::Resume> {
    let handle = match stream.open(js).await {
        Ok(handle) => handle,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the stream's last message: starting a new epoch");
            return None;
        }
    };
    let last = match handle
        .get_last_raw_message_by_subject(&format!("{}.>", stream.prefix()))
        .await
    {
        Ok(last) => last,
        Err(e) => {
            tracing::info!(error = %e, "no earlier relay message: starting a new epoch");
            return None;
        }
    };
    let msg = match super::wire::WireMessage::from_json(&last.payload) {
        Ok(msg) => msg,
        Err(e) => {
            tracing::warn!(error = %e, "the stream's last message is not a relay message: starting a new epoch");
            return None;
        }
    };
    let continues = msg
        .epoch
        .strip_prefix(origin)
        .is_some_and(|rest| rest.starts_with('/'));
    continues.then(|| task::Resume {
        epoch: msg.epoch,
        next_n: msg.n.saturating_add(1),
    })
}

/// A running relay. Dropping it stops the relay (as
/// [`shutdown`](Self::shutdown) does, without waiting).
#[must_use = "the relay stops when its handle is dropped"]
pub struct RelayHandle {
    status: Arc<Mutex<RelayStatus>>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    client: async_nats::Client,
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
        self.status.lock().clone()
    }

    /// The NATS connection's state (connected, pending, disconnected).
    pub fn nats_state(&self) -> async_nats::connection::State {
        self.client.connection_state()
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
