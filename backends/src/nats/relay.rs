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
        if self.heartbeat.is_zero() {
            return Err(NatsError::Config(
                "the heartbeat interval must be above zero".into(),
            ));
        }
        self.stream.check()?;
        let client = self.connect.connect().await?;
        let js = async_nats::jetstream::new(client.clone());
        self.stream.ensure(&js).await?;
        let subscription = source.subscribe();
        let epoch = task::new_epoch();
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
            self.heartbeat,
            self.max_in_flight,
            self.confirm,
            status.clone(),
            stop_rx,
        );
        let handle = tokio::spawn(task.run());
        Ok(RelayHandle {
            status,
            stop: stop_tx,
            task: Some(handle),
            client,
        })
    }
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
