//! The relay's task: read the source, publish, await acknowledgements, beat.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{Context, ErrorCode};
use parking_lot::Mutex;
use pgcachewatch_core::{Event, GapReason, Health, Lsn, Name, Signal, Subscription};
use tokio::sync::{mpsc, watch};

use super::publisher::{Acked, Control, Failure, InFlight, Outgoing};
use super::resume::Begin;
use super::{Confirm, RelayStatus};
use crate::nats::connect::NatsConnect;
use crate::nats::error::NatsError;
use crate::nats::stream::StreamSettings;
use crate::nats::subject;
use crate::nats::wire::{WireKind, WireMessage};

/// A fresh epoch id: 64 random bits in hexadecimal, after `<origin>/` when the
/// relay's upstream has an identity that survives restarts (a replication slot).
pub(super) fn new_epoch(origin: Option<&str>) -> String {
    match origin {
        Some(origin) => format!("{origin}/{:016x}", rand::random::<u64>()),
        None => format!("{:016x}", rand::random::<u64>()),
    }
}

/// The message id of a message with a position (`(commit LSN, index within
/// the commit)`): `<origin>:<lsn>:<index>`. The origin names the upstream (the
/// replication slot a durable relay reads; for any other relay its epoch), so
/// relays over different upstreams writing into one stream never drop each
/// other's messages as duplicates, while a relay restarted over the same slot
/// gives a republished copy the id of the first. Without a position:
/// `<origin>:<run>:<k>`, where `run` is random to each relay process (one
/// continuing an epoch never reuses an id of the one before) and `k` counts
/// its messages.
pub(crate) fn msg_id(origin: &str, position: Option<(Lsn, u32)>, run: &str, k: u64) -> String {
    match position {
        Some((lsn, index)) => format!("{origin}:{lsn}:{index}"),
        None => format!("{origin}:{run}:{k}"),
    }
}

/// A NATS connection of the relay: the client, its JetStream context
/// (publish acknowledgements time out after the builder's `ack_timeout`) and
/// the client's events.
pub(super) struct Connection {
    pub(super) client: async_nats::Client,
    pub(super) js: Context,
    pub(super) events: mpsc::UnboundedReceiver<async_nats::Event>,
}

impl Connection {
    pub(super) async fn open(
        connect: &NatsConnect,
        ack_timeout: Duration,
    ) -> Result<Connection, NatsError> {
        let (client, events) = connect.connect_with_events().await?;
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(ack_timeout)
            .build(client.clone());
        Ok(Connection { client, js, events })
    }
}

/// What the task is given besides its source.
pub(super) struct Setup {
    pub(super) connection: Connection,
    /// How to connect anew when the connection goes silent.
    pub(super) connect: NatsConnect,
    pub(super) ack_timeout: Duration,
    /// The client the relay's handle reports the state of.
    pub(super) client: Arc<Mutex<async_nats::Client>>,
    pub(super) stream: StreamSettings,
    pub(super) epoch: String,
    /// The upstream's lasting identity (epochs are `<origin>/<random>`).
    pub(super) origin: Option<String>,
    pub(super) begin: Begin,
    pub(super) heartbeat: Duration,
    /// Progress records at most this often while the stored position moves.
    pub(super) progress_interval: Duration,
    pub(super) max_in_flight: usize,
    pub(super) confirm: Option<Arc<dyn Confirm>>,
    pub(super) status: Arc<Mutex<RelayStatus>>,
    pub(super) stop: watch::Receiver<bool>,
}

/// How long the relay waits for JetStream to say whether its stream exists
/// after a publish found no responders.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a stopped relay waits for what it has in flight to be
/// acknowledged, and for its last record of it.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// What JetStream says of a stream after a publish found no responders.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// It answered that the stream does not exist: it is gone.
    Missing,
    /// It exists: its leader is being elected (a cluster node died, or the
    /// leader moved); publishing again succeeds once one is.
    Exists,
    /// No clear answer in time (the cluster's own leader is being elected,
    /// or NATS is unreachable): publish again, ask again next time.
    Unknown(String),
}

/// Whether `stream` exists, in at most `within`. Only JetStream's own
/// "stream not found" (10059) is [`Lookup::Missing`]: "no responders" alone
/// is also what a replicated stream answers while it elects a leader, and
/// taking it for a lost stream stalled the relay (10–15 s per leader death
/// in a three-node cluster, waiting on lookups that could not be answered).
pub(crate) async fn lookup(js: &Context, stream: &str, within: Duration) -> Lookup {
    match tokio::time::timeout(within, js.get_stream(stream)).await {
        Ok(Ok(_)) => Lookup::Exists,
        Ok(Err(e)) if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
            Lookup::Missing
        }
        Ok(Err(e)) => Lookup::Unknown(e.to_string()),
        Err(_) => Lookup::Unknown(format!("no answer within {within:?}")),
    }
}

pub(super) struct Task {
    stream: StreamSettings,
    prefix: String,
    /// The upstream's lasting identity (epochs are `<origin>/<random>`).
    origin: Option<String>,
    /// How the task begins (taken at the start).
    begin: Option<Begin>,
    subscription: Subscription,
    /// Shared by every message of the epoch (a clone is no copy).
    epoch: Name,
    /// Random to this relay process: ids of messages without a position.
    run: String,
    /// Messages without a position published by this process.
    k: u64,
    heartbeat: Duration,
    progress_interval: Duration,
    max_in_flight: usize,
    confirm: Option<Arc<dyn Confirm>>,
    status: Arc<Mutex<RelayStatus>>,
    stop: watch::Receiver<bool>,
    /// The NATS client's events (disconnected, connected again).
    nats_events: mpsc::UnboundedReceiver<async_nats::Event>,
    /// The client said it was disconnected and has not said it is connected
    /// again (a new client's first `Connected` is no news).
    disconnected: bool,
    connect: NatsConnect,
    ack_timeout: Duration,
    client: Arc<Mutex<async_nats::Client>>,
    inflight: InFlight,
    health: Health,
    /// The commit the last event belonged to, and its index within it.
    commit: Option<(Lsn, u32)>,
    /// The stream sequence of the last message JetStream stored (not a
    /// duplicate): sequences only grow within one stream.
    last_seq: u64,
    /// The wait before publishing again after the next failure.
    backoff: Duration,
    /// Every event up to this position is stored (acknowledged, in order).
    stored: Option<Lsn>,
    /// The last progress record published: the position it says is stored.
    recorded: Option<Lsn>,
    /// When the last progress record was published (in this epoch).
    recorded_at: Option<tokio::time::Instant>,
    /// A record is due at this instant (the stored position moved while the
    /// last record was too recent).
    record_due: Option<tokio::time::Instant>,
    /// The stream sequence of the latest heartbeat and progress record
    /// stored (by [`Control`]): deleted once the next one is stored.
    kept: [Option<u64>; 2],
    /// A signal taken from the subscription to see whether one waited
    /// ([`backlog`](Self::backlog)): handled next.
    pending: Option<Signal>,
    /// What the last heartbeat published says: while it says unhealthy, the
    /// relay beats again as soon as it is healthy, not at the next beat.
    beaten: Health,
}

enum Step {
    Stop,
    Nats(async_nats::Event),
    Signal(Option<Signal>),
    Acked(Acked),
    Beat,
    Record,
}

/// The first wait before publishing again after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between attempts (a stream leader elected, or a link
/// healed, is found within it).
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// The pause between attempts to replace a silent connection that failed at
/// once (a refused connection).
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

impl Task {
    pub(super) fn new(setup: Setup, subscription: Subscription) -> Self {
        Task {
            prefix: setup.stream.prefix().to_owned(),
            stream: setup.stream,
            origin: setup.origin,
            begin: Some(setup.begin),
            subscription,
            epoch: setup.epoch.into(),
            run: format!("{:016x}", rand::random::<u64>()),
            k: 0,
            heartbeat: setup.heartbeat,
            progress_interval: setup.progress_interval,
            max_in_flight: setup.max_in_flight,
            confirm: setup.confirm,
            status: setup.status,
            stop: setup.stop,
            nats_events: setup.connection.events,
            disconnected: false,
            connect: setup.connect,
            ack_timeout: setup.ack_timeout,
            client: setup.client,
            inflight: InFlight::new(setup.connection.js),
            health: Health::Unhealthy,
            commit: None,
            last_seq: 0,
            backoff: FIRST_BACKOFF,
            stored: None,
            recorded: None,
            recorded_at: None,
            record_due: None,
            kept: [None, None],
            pending: None,
            beaten: Health::Unhealthy,
        }
    }

    /// The upstream's name in ids and subjects: its lasting origin, or else
    /// the epoch.
    fn origin(&self) -> &str {
        self.origin.as_deref().unwrap_or(self.epoch.as_str())
    }

    fn payload(&self, kind: WireKind) -> bytes::Bytes {
        WireMessage {
            epoch: self.epoch.clone(),
            kind,
        }
        .to_json()
        .into()
    }

    /// The id of the next message without a position.
    fn next_id(&mut self) -> String {
        self.k += 1;
        msg_id(self.origin(), None, &self.run, self.k)
    }

    async fn push(&mut self, out: Outgoing) {
        self.inflight.push(out).await;
    }

    /// Publishes a progress record of the stored position when it moved past
    /// the last record: at once if the last record is older than the progress
    /// interval (the first after a quiet spell goes at once), else when it
    /// is (one record then covers every position stored meanwhile). Each
    /// record replaces the one before on its subject, so the stream keeps one
    /// per upstream whatever the load.
    ///
    /// Positions are confirmed upstream only once a record is stored, so the
    /// stream always holds a record at or beyond the slot's confirmed
    /// position: what a restarted relay checks before it continues the epoch.
    /// And consumers move their read-your-writes position by records only: a
    /// record is stored after every event it covers, which an event's own
    /// position does not promise (an event before it may have failed and be
    /// stored later).
    async fn maybe_record(&mut self) {
        let Some(stored) = self.stored else {
            return;
        };
        if self.recorded >= Some(stored) {
            self.record_due = None;
            return;
        }
        let now = tokio::time::Instant::now();
        if let Some(at) = self.recorded_at {
            let due = at + self.progress_interval;
            if now < due {
                self.record_due = Some(due);
                return;
            }
        }
        self.record_due = None;
        self.recorded = Some(stored);
        self.recorded_at = Some(now);
        let out = Outgoing {
            subject: subject::progress_subject(&self.prefix, self.origin()),
            msg_id: self.next_id(),
            payload: self.payload(WireKind::Progress(stored)),
            stores: None,
            records: Some(stored),
            received_at: None,
            supersedes: Some(Control::Progress),
        };
        self.push(out).await;
    }

    /// Starts a new epoch whose first message is a gap marker.
    async fn new_epoch(&mut self, reason: GapReason) {
        self.epoch = new_epoch(self.origin.as_deref()).into();
        {
            let mut s = self.status.lock();
            s.epoch = self.epoch.to_string();
            s.epochs += 1;
        }
        self.open_epoch(reason, None).await;
    }

    /// Starts the current epoch: its gap marker first.
    ///
    /// The epoch's records start after its marker is stored: what was stored
    /// before (and `covered`, where a durable upstream resumes) becomes stored
    /// in this epoch when the marker is acknowledged, since the marker covers
    /// it, and a record of it follows at once. A record stored without its
    /// epoch's marker could let a later relay continue an epoch that no
    /// consumer saw begin.
    async fn open_epoch(&mut self, reason: GapReason, covered: Option<Lsn>) {
        tracing::info!(epoch = %self.epoch, %reason, "relay starts a new epoch");
        let stores = self.stored.take().max(covered);
        self.recorded = None;
        self.recorded_at = None;
        self.record_due = None;
        let out = Outgoing {
            subject: subject::control_subject(&self.prefix, "gap"),
            msg_id: self.next_id(),
            payload: self.payload(WireKind::Gap(reason)),
            stores,
            records: None,
            received_at: None,
            supersedes: None,
        };
        self.push(out).await;
    }

    /// Whether the relay is caught up: JetStream acknowledges what it
    /// publishes (no failure since the last acknowledgement) and no backlog
    /// waits (room in flight, and no signal of its source waiting to be
    /// read). A slow link alone (many messages in flight, all of them
    /// published) is not a backlog.
    fn caught_up(&mut self) -> bool {
        self.status.lock().publishing && self.inflight.len() < self.max_in_flight && !self.backlog()
    }

    /// Whether a signal of the source is waiting to be read (looked at
    /// without losing it: it is read next).
    fn backlog(&mut self) -> bool {
        if self.pending.is_none() {
            match self.subscription.try_recv() {
                Ok(signal) => self.pending = Some(signal),
                Err(_) => return false,
            }
        }
        true
    }

    /// What a heartbeat says now: healthy only while the source is healthy
    /// and the relay is [caught up](Self::caught_up), so a consumer that reads
    /// it has what was committed up to about then.
    fn beat_health(&mut self) -> Health {
        if self.health.is_healthy() && self.caught_up() {
            Health::Healthy
        } else {
            Health::Unhealthy
        }
    }

    /// A heartbeat: the source's health and the relay's (see
    /// [`beat_health`](Self::beat_health)). Once it is stored, the one before
    /// is deleted.
    async fn beat(&mut self) {
        let health = self.beat_health();
        self.beaten = health;
        let out = Outgoing {
            subject: subject::control_subject(&self.prefix, "heartbeat"),
            msg_id: self.next_id(),
            payload: self.payload(WireKind::Health(health)),
            stores: None,
            records: None,
            received_at: None,
            supersedes: Some(Control::Heartbeat),
        };
        self.push(out).await;
    }

    async fn on_event(&mut self, event: &Event) {
        // A finished commit is stored once this later message is acknowledged.
        let mut stores = None;
        let position = event.lsn.map(|lsn| match self.commit {
            Some((prev, index)) if prev == lsn => (lsn, index + 1),
            Some((prev, _)) => {
                stores = Some(prev);
                (lsn, 0)
            }
            None => (lsn, 0),
        });
        if position.is_some() {
            self.commit = position;
        }
        let msg_id = match position {
            Some(_) => msg_id(self.origin(), position, &self.run, 0),
            None => self.next_id(),
        };
        let out = Outgoing {
            subject: subject::table_subject(&self.prefix, event.schema.as_deref(), &event.table),
            msg_id,
            payload: self.payload(WireKind::Event(event.clone())),
            stores,
            records: None,
            received_at: Some(event.received_at),
            supersedes: None,
        };
        self.push(out).await;
    }

    async fn on_signal(&mut self, signal: Signal) {
        self.status.lock().received += 1;
        match signal {
            Signal::Event(e) => self.on_event(&e).await,
            // Whatever the source lost (a LISTEN reconnect, a replication slot
            // advanced or recreated under it) is lost for every consumer.
            Signal::Gap(reason) => {
                self.commit = None;
                self.new_epoch(reason).await;
            }
            Signal::Health(h) => {
                self.health = h;
                self.status.lock().upstream = h;
                self.beat().await;
            }
            // Everything before `lsn` was received: stored once what is in
            // flight is, and then recorded.
            Signal::Progress(lsn) => {
                self.commit = None;
                if !self.inflight.stores_after_last(lsn) {
                    self.stored = self.stored.max(Some(lsn));
                }
                self.maybe_record().await;
            }
            other => {
                tracing::debug!(?other, "relay ignores an unknown signal kind");
            }
        }
    }

    /// A message was stored. True if its sequence shows the stream was
    /// created anew under the relay (sequences only grow within one stream).
    fn on_ack(&mut self, out: &Outgoing, ack: &PublishAck) -> bool {
        self.backoff = FIRST_BACKOFF;
        let reset = !ack.duplicate && ack.sequence <= self.last_seq;
        if !ack.duplicate {
            self.last_seq = ack.sequence;
        }
        let mut s = self.status.lock();
        s.acked += 1;
        s.publishing = true;
        s.last_ack_at = Some(std::time::Instant::now());
        s.last_stream_seq = if reset {
            ack.sequence
        } else {
            s.last_stream_seq.max(ack.sequence)
        };
        if let Some(at) = out.received_at {
            s.events += 1;
            s.last_event_lag = (chrono::Utc::now() - at).to_std().ok();
        }
        self.stored = self.stored.max(out.stores);
        if let Some(kind) = out.supersedes {
            if !reset {
                let before = self.kept[kind as usize].replace(ack.sequence);
                if let Some(seq) = before.filter(|seq| *seq != ack.sequence) {
                    self.delete(seq);
                }
            }
        }
        if let Some(lsn) = out.records {
            s.confirmed = s.confirmed.max(Some(lsn));
            drop(s);
            if let Some(c) = &self.confirm {
                c.confirmed(lsn);
            }
        }
        reset
    }

    /// The oldest message was not acknowledged: waits, then publishes it and
    /// everything after it again, in order, with the same ids. If its stream is
    /// gone (a NATS restart lost a memory-backed stream, or it was deleted),
    /// creates it again and starts a new epoch: what it held is gone, and what
    /// was in flight is covered by the new epoch's gap marker. False if the
    /// relay was stopped meanwhile.
    async fn recover(&mut self, failure: Failure) -> bool {
        tracing::warn!(error = %failure.error, subject = %failure.subject, "publish not acknowledged; publishing again from it on");
        {
            let mut s = self.status.lock();
            s.publishing = false;
            s.retries += 1;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = self.stop.wait_for(|s| *s) => return false,
        }
        if failure.no_responders {
            let js = self.inflight.js().clone();
            match lookup(&js, self.stream.name(), LOOKUP_TIMEOUT).await {
                Lookup::Missing => match self.stream.ensure(&js).await {
                    Ok(_) => {
                        let dropped = self.inflight.clear();
                        tracing::warn!(stream = %self.stream.name(), dropped, "the relay's stream was gone: created it anew");
                        self.last_seq = 0;
                        self.stream_lost("was lost and created anew").await;
                        return true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, stream = %self.stream.name(), "cannot create the relay's stream again; retrying");
                    }
                },
                Lookup::Exists => {
                    tracing::info!(stream = %self.stream.name(), "the stream has no leader (a cluster node died or it moved); publishing again");
                }
                Lookup::Unknown(detail) => {
                    tracing::info!(stream = %self.stream.name(), %detail, "cannot tell whether the stream exists; publishing again");
                }
            }
        } else if failure.timed_out {
            self.replace_if_silent().await;
        }
        self.republish().await;
        true
    }

    /// Deletes the heartbeat or progress record at `seq`, superseded by a
    /// later one: the stream keeps the latest of each, so its limits go to
    /// events. In the background, best effort (one left behind takes a little
    /// room until the stream's age limit, nothing more).
    ///
    /// Not JetStream's subject rollup (`Nats-Rollup: sub`): a rollup purges,
    /// and a purge moves the cursor of a consumer reading other subjects past
    /// messages it has not read yet (nats-server before 2.9.13, and consumers
    /// with several filters until 2.14; measured here on 2.9.10: events lost
    /// without a gap). Deleting one message leaves every cursor alone.
    fn delete(&self, seq: u64) {
        let js = self.inflight.js().clone();
        let name = self.stream.name().to_owned();
        tokio::spawn(async move {
            let done = match js.get_stream_no_info(&name).await {
                Ok(stream) => stream
                    .delete_message(seq)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(error) = done {
                tracing::debug!(%error, seq, "a superseded relay message was not deleted");
            }
        });
    }

    /// The latest heartbeat and progress record of this upstream already in
    /// the stream (a relay before this one): deleted once this relay's are
    /// stored.
    async fn find_kept(&mut self) {
        let Ok(stream) = self
            .inflight
            .js()
            .get_stream_no_info(self.stream.name())
            .await
        else {
            return;
        };
        let subjects = [
            (
                Control::Heartbeat,
                subject::control_subject(&self.prefix, "heartbeat"),
            ),
            (
                Control::Progress,
                subject::progress_subject(&self.prefix, self.origin()),
            ),
        ];
        for (kind, subject) in subjects {
            if let Ok(m) = stream.get_last_raw_message_by_subject(&subject).await {
                self.kept[kind as usize] = Some(m.sequence);
            }
        }
    }

    /// The stream's contents are gone (it `what`): a new epoch whose gap
    /// marker covers everything before.
    async fn stream_lost(&mut self, what: &str) {
        // Sequences of the stream that is gone: never delete by them.
        self.kept = [None, None];
        let detail = format!("stream {} {what}: what it held is gone", self.stream.name());
        self.new_epoch(GapReason::Injected {
            detail: detail.into(),
        })
        .await;
    }

    async fn step(&mut self, beat: &mut tokio::time::Interval) -> Step {
        let room = self.inflight.len() < self.max_in_flight;
        if room {
            if let Some(signal) = self.pending.take() {
                return Step::Signal(Some(signal));
            }
        }
        let record_due = self.record_due;
        let inflight = &mut self.inflight;
        let sub = &mut self.subscription;
        let stop = &mut self.stop;
        let nats_events = &mut self.nats_events;
        let record = async {
            match record_due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Step::Stop,
            Some(event) = nats_events.recv() => Step::Nats(event),
            acked = std::future::poll_fn(|cx| inflight.poll_front(cx)) => Step::Acked(acked),
            signal = sub.recv(), if room => Step::Signal(signal),
            _ = record => Step::Record,
            _ = beat.tick() => Step::Beat,
        }
    }

    /// Begins as told: the stream's epoch continued, or a new one.
    async fn begin(&mut self) {
        match self.begin.take() {
            // The upstream resumes right after what the stream holds of this
            // epoch: nothing was lost, consumers keep their caches.
            Some(Begin::Continue(resume)) => {
                tracing::info!(epoch = %resume.epoch, "relay continues its epoch");
                self.epoch = resume.epoch.into();
                self.status.lock().epoch = self.epoch.to_string();
            }
            // The epoch the handle reports from the start.
            // Over a durable upstream, a record of where it resumes follows
            // the gap marker (which covers everything before) at once.
            Some(Begin::New { reason, covered }) => self.open_epoch(reason, covered).await,
            None => {}
        }
    }

    pub(super) async fn run(mut self) {
        let mut stop = self.stop.clone();
        let started = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => false,
            () = async {
                self.find_kept().await;
                self.begin().await;
            } => true,
        };
        if started {
            let mut beat = tokio::time::interval(self.heartbeat);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let step = self.step(&mut beat).await;
                // A step may wait on NATS (a publish, a stream lookup, a
                // reconnect) for seconds while it is down: a stop ends it
                // there. What it was doing is redone by the next relay, which
                // resumes from the last acknowledged record.
                let go_on = tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => false,
                    go_on = self.handle(step) => go_on,
                };
                self.status.lock().in_flight = self.inflight.len();
                if !go_on {
                    break;
                }
            }
        }
        if tokio::time::timeout(DRAIN_LIMIT, self.drain())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.inflight.len(),
                "messages in flight at shutdown were not acknowledged within {DRAIN_LIMIT:?}"
            );
        }
        self.status.lock().in_flight = self.inflight.len();
    }

    /// Does what `step` calls for; false when the relay stops.
    async fn handle(&mut self, step: Step) -> bool {
        match step {
            Step::Stop => return false,
            Step::Signal(Some(signal)) => self.on_signal(signal).await,
            Step::Signal(None) => {
                tracing::info!("the relay's source ended; relay stops");
                return false;
            }
            Step::Beat => {
                self.beat().await;
                self.maybe_record().await;
            }
            Step::Record => self.maybe_record().await,
            Step::Acked(Acked::Ok(out, ack)) => {
                if self.on_ack(&out, &ack) {
                    tracing::warn!(stream = %self.stream.name(), seq = ack.sequence, "the relay's stream was created anew under it");
                    self.stream_lost("was created anew").await;
                } else {
                    self.maybe_record().await;
                    // Caught up after a failure: say so now. Subscribers
                    // bypass their caches until a heartbeat says healthy,
                    // and the next beat may be seconds away.
                    if !self.beaten.is_healthy() && self.beat_health().is_healthy() {
                        self.beat().await;
                    }
                }
            }
            Step::Acked(Acked::Failed(failure)) => return self.recover(failure).await,
            Step::Nats(event) => self.on_nats_event(&event).await,
        }
        true
    }

    /// Connected again (a partition healed, NATS restarted, a reconnect the
    /// relay forced): what was in flight on the old connection will never be
    /// acknowledged, so it is published again now, in order and with the same
    /// ids, rather than when its acknowledgements time out.
    async fn on_nats_event(&mut self, event: &async_nats::Event) {
        match event {
            async_nats::Event::Disconnected => self.disconnected = true,
            async_nats::Event::Connected if std::mem::take(&mut self.disconnected) => {
                if self.inflight.len() == 0 {
                    return;
                }
                tracing::info!(
                    in_flight = self.inflight.len(),
                    "connected to NATS again: publishing what is in flight again"
                );
                self.backoff = FIRST_BACKOFF;
                self.republish().await;
            }
            other => tracing::debug!(event = %other, "NATS event"),
        }
    }

    /// A connection that claims to be up but does not answer a probe (a
    /// silent partition) is replaced by a new one now, not when the client's
    /// pings run out. Not by asking the client to reconnect: it reads that
    /// request only once its write buffer drains, and a relay's buffer is full
    /// of publishes the cut link holds, so the request would wait until the
    /// kernel's retransmissions get through, seconds after the link healed.
    /// The old client is dropped; its connection ends on its own.
    async fn replace_if_silent(&mut self) {
        let client = self.inflight.js().client();
        if client.connection_state() != async_nats::connection::State::Connected {
            // Reconnecting already: its `Connected` event republishes.
            return;
        }
        let silent = tokio::select! {
            answered = crate::nats::connect::answers(&client, crate::nats::connect::PROBE_TIMEOUT) => !answered,
            // Connected anew meanwhile: the probe went down the old
            // connection (what is in flight is published again next).
            () = connected(&mut self.nats_events, &mut self.disconnected) => false,
        };
        if !silent {
            return;
        }
        tracing::warn!(
            "the NATS connection does not answer (a silent partition?): connecting anew"
        );
        // Until it connects (or the relay is stopped): each attempt lasts at
        // most a second, so the relay is back within about a second of the
        // link healing.
        let mut tries = 0_u32;
        let connection = loop {
            match Connection::open(&self.connect, self.ack_timeout).await {
                Ok(connection) => break connection,
                Err(e) => {
                    tries += 1;
                    if tries == 1 {
                        tracing::warn!(error = %e, "cannot connect to NATS anew; trying again");
                    }
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                }
            }
        };
        tracing::info!(tries, "connected to NATS anew");
        *self.client.lock() = connection.client;
        self.nats_events = connection.events;
        self.disconnected = false;
        self.inflight.set_js(connection.js);
    }

    /// Publishes everything in flight again, in order, with the same ids.
    /// Heartbeats among them were made before the trouble showed: they say
    /// healthy, and stored now they would tell consumers so before the backlog
    /// behind them is stored. They say what is true now instead (same ids: a
    /// copy already stored stays).
    async fn republish(&mut self) {
        let unhealthy = self.payload(WireKind::Health(Health::Unhealthy));
        self.inflight.restamp(Control::Heartbeat, &unhealthy);
        self.beaten = Health::Unhealthy;
        self.inflight.resend_all().await;
    }

    /// On shutdown: awaits what is in flight and a last record of it (so the
    /// next relay replays as little as possible); bounded by [`DRAIN_LIMIT`].
    async fn drain(&mut self) {
        loop {
            if self.inflight.len() == 0 {
                // The last record goes now, however recent the one before.
                self.recorded_at = None;
                self.maybe_record().await;
                if self.inflight.len() == 0 {
                    break;
                }
            }
            let inflight = &mut self.inflight;
            match std::future::poll_fn(|cx| inflight.poll_front(cx)).await {
                Acked::Ok(out, ack) => {
                    self.on_ack(&out, &ack);
                }
                Acked::Failed(failure) => {
                    tracing::warn!(error = %failure.error, subject = %failure.subject, in_flight = self.inflight.len(), "messages in flight at shutdown were not acknowledged");
                    break;
                }
            }
        }
    }
}

/// Waits for a `Connected` event, noting a disconnection in `disconnected`
/// on the way (pending for ever once the client is gone).
async fn connected(
    events: &mut mpsc::UnboundedReceiver<async_nats::Event>,
    disconnected: &mut bool,
) {
    while let Some(event) = events.recv().await {
        match event {
            async_nats::Event::Disconnected => *disconnected = true,
            async_nats::Event::Connected => {
                *disconnected = false;
                return;
            }
            _ => {}
        }
    }
    std::future::pending().await
}
