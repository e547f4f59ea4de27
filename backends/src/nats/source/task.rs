//! The [`NatsSource`](super::NatsSource)'s task: consume, resume, detect loss.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;
use parking_lot::Mutex;
use pgcachewatch_core::{GapReason, Health, Lsn, Name, Signal, SignalHub};
use tokio::sync::{mpsc, watch};

use super::NatsSourceStats;
use crate::nats::wire::{WireKind, WireMessage};

/// How often the task re-checks heartbeat age and skipped sequences.
const TICK: Duration = Duration::from_millis(250);

/// How long the first attempt to resume the consumer may take ([`Task::open`]).
const FIRST_OPEN_TIMEOUT: Duration = Duration::from_secs(1);
/// How many attempts to resume the consumer run out after
/// [`FIRST_OPEN_TIMEOUT`] before they are given longer (an election takes a
/// few seconds).
const SHORT_OPEN_ATTEMPTS: u32 = 8;
/// The longest an attempt to resume the consumer may take.
const MAX_OPEN_TIMEOUT: Duration = Duration::from_secs(8);
/// The longest pause between attempts to resume the consumer.
const MAX_OPEN_BACKOFF: Duration = Duration::from_millis(500);

/// How long one pull request lasts (the client renews it before it ends).
const PULL_EXPIRES: Duration = Duration::from_secs(30);

/// The server's idle heartbeat on the consumer for a source whose relay
/// heartbeat timeout is `timeout`: a fifth of it, between 250 ms and 5 s, so
/// a dead consumer (its node died) or a silent connection is noticed (two
/// missed beats) well within the timeout.
pub(super) fn idle_heartbeat(timeout: Duration) -> Duration {
    (timeout / 5).clamp(Duration::from_millis(250), Duration::from_secs(5))
}

#[derive(Debug, Default)]
pub(super) struct State {
    epoch: Option<Name>,
    /// When the last fresh heartbeat was received.
    hb_at: Option<Instant>,
    relay_healthy: bool,
    disconnected: bool,
    caught_up: bool,
    /// The stream's last sequence when the current consumer started.
    target: u64,
    /// The highest event position delivered in the current epoch (to count
    /// late events).
    max_lsn: Option<Lsn>,
    /// The last position passed on (from a progress record).
    progress: Option<Lsn>,
}

/// Which stream a sequence number belongs to: a stream deleted and created
/// anew under the same name numbers its messages from 1 again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StreamIdentity {
    /// When the stream was created (JetStream's `created`), in Unix nanoseconds.
    pub(super) created_ns: i128,
}

impl StreamIdentity {
    pub(super) fn of(info: &async_nats::jetstream::stream::Info) -> Self {
        StreamIdentity {
            created_ns: info.created.unix_timestamp_nanos(),
        }
    }
}

pub(super) struct Task {
    pub(super) client: async_nats::Client,
    pub(super) stream: Stream,
    pub(super) prefix: String,
    pub(super) filters: Vec<String>,
    pub(super) hub: SignalHub,
    pub(super) next_seq: u64,
    /// The stream `next_seq` counts in.
    pub(super) identity: StreamIdentity,
    pub(super) heartbeat_timeout: Duration,
    /// The consumer's idle heartbeat ([`idle_heartbeat`]).
    pub(super) idle_heartbeat: Duration,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) nats_events: mpsc::UnboundedReceiver<async_nats::Event>,
    pub(super) stats: Arc<Mutex<NatsSourceStats>>,
    pub(super) state: State,
    /// The source's series (feature `metrics`).
    #[cfg(feature = "metrics")]
    pub(super) metrics: crate::telemetry::SourceMetrics,
}

enum Exit {
    Stop,
    Reopen,
}

type Messages = pull::Stream;

impl Task {
    pub(super) async fn run(mut self) {
        tracing::debug!(prefix = %self.prefix, filters = ?self.filters, "NATS source starting");
        loop {
            let Some(messages) = self.open().await else {
                break;
            };
            match self.read(messages).await {
                Exit::Stop => break,
                Exit::Reopen => {
                    self.state.caught_up = false;
                    self.update_health();
                }
            }
        }
        self.hub.set_health(Health::Unhealthy);
        drop(self.client);
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn gap(&self, reason: GapReason) {
        self.stats.lock().gaps += 1;
        self.hub.gap(reason);
    }

    fn update_health(&self) {
        let s = &self.state;
        let fresh = s
            .hb_at
            .is_some_and(|at| at.elapsed() < self.heartbeat_timeout);
        let healthy = !s.disconnected && s.caught_up && s.relay_healthy && fresh;
        self.hub.set_health(if healthy {
            Health::Healthy
        } else {
            Health::Unhealthy
        });
    }

    fn on_nats_event(&mut self, event: &async_nats::Event) -> bool {
        match event {
            async_nats::Event::Disconnected => {
                tracing::warn!(
                    "NATS connection lost; resuming from sequence {}",
                    self.next_seq
                );
                self.state.disconnected = true;
                self.update_health();
                false
            }
            // Connected again after a disconnection (the first connection's
            // event, which may come late, is not news).
            async_nats::Event::Connected => {
                let again = self.state.disconnected;
                #[cfg(feature = "metrics")]
                if again {
                    self.metrics.reconnects.increment(1);
                }
                self.state.disconnected = false;
                again
            }
            other => {
                tracing::debug!(event = %other, "NATS event");
                false
            }
        }
    }

    /// Creates a consumer starting at `next_seq` (a `Gap` first if the stream
    /// no longer holds it); retries until it succeeds or the source stops.
    async fn open(&mut self) -> Option<Messages> {
        let mut backoff = Duration::from_millis(50);
        // JetStream answers in milliseconds, or not at all while the stream
        // has no leader (a node died, an election runs): short attempts find
        // the new leader soon after it is elected. After many that ran out,
        // longer ones, so that a slow link or a busy cluster still gets through.
        let mut within = FIRST_OPEN_TIMEOUT;
        let mut ran_out = 0_u32;
        loop {
            if self.stopped() {
                return None;
            }
            // An attempt whose requests went down a connection that was then
            // replaced would wait out their timeouts (seconds after the link
            // healed): connected again, it starts anew.
            let mut events = std::mem::replace(&mut self.nats_events, mpsc::unbounded_channel().1);
            let mut seen = Vec::new();
            let mut stop = self.stop.clone();
            let disconnected = self.state.disconnected;
            let attempt = tokio::select! {
                attempt = tokio::time::timeout(within, self.try_open()) => Some(match attempt {
                    Ok(attempt) => attempt,
                    Err(_) => {
                        let waited = within;
                        ran_out += 1;
                        if ran_out >= SHORT_OPEN_ATTEMPTS {
                            within = (within * 2).min(MAX_OPEN_TIMEOUT);
                        }
                        Err(format!("no answer within {waited:?}"))
                    }
                }),
                () = until_reconnected(&mut events, disconnected, &mut seen) => None,
                _ = stop.wait_for(|s| *s) => None,
            };
            self.nats_events = events;
            for event in &seen {
                self.on_nats_event(event);
            }
            match attempt {
                Some(Ok(messages)) => return Some(messages),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "could not resume the NATS consumer; retrying")
                }
                None => continue,
            }
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = self.stop.changed() => return None,
                    // Connected again (a partition healed, NATS restarted):
                    // try now, not after the backoff.
                    Some(ev) = self.nats_events.recv() => if self.on_nats_event(&ev) { break },
                }
            }
            backoff = (backoff * 2).min(MAX_OPEN_BACKOFF);
        }
    }

    async fn try_open(&mut self) -> Result<Messages, String> {
        let info = self.stream.get_info().await.map_err(|e| e.to_string())?;
        self.check_identity(&info);
        let first = info.state.first_sequence;
        if first > self.next_seq {
            let missed = first - self.next_seq;
            tracing::warn!(
                missed,
                from = self.next_seq,
                "the stream discarded messages this source had not read: gap"
            );
            self.gap(GapReason::Lagged { missed });
            self.next_seq = first;
        }
        let consumer = self
            .stream
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: self.next_seq,
                },
                ack_policy: AckPolicy::None,
                filter_subjects: self.filters.clone(),
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        // The server beats on an idle pull every `idle_heartbeat`; two missed
        // say the consumer (or the node holding it, or the connection) is
        // gone, and `read` makes a new one.
        let messages = consumer
            .stream()
            .heartbeat(self.idle_heartbeat)
            .expires(PULL_EXPIRES.max(self.idle_heartbeat * 3))
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let name = consumer.cached_info().name.clone();
        {
            let mut stats = self.stats.lock();
            stats.consumers += 1;
            stats.consumer = Some(name);
        }
        self.state.target = info.state.last_sequence;
        self.state.caught_up = self.next_seq > self.state.target;
        self.update_health();
        Ok(messages)
    }

    async fn read(&mut self, mut messages: Messages) -> Exit {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.changed() => return Exit::Stop,
                Some(ev) = self.nats_events.recv() => {
                    if self.on_nats_event(&ev) {
                        // Messages pushed into the dropped connection are gone:
                        // resume from our own position.
                        return Exit::Reopen;
                    }
                }
                msg = messages.next() => match msg {
                    Some(Ok(m)) => {
                        // Where it sits in the stream (parsed once, from its
                        // reply subject); a message without is not JetStream's.
                        let Ok(info) = m.info() else { continue };
                        let seq = info.stream_sequence;
                        let published_ns = info.published.unix_timestamp_nanos();
                        if self.check_skipped(seq).await {
                            return Exit::Reopen;
                        }
                        self.on_message(&m, seq, published_ns);
                    }
                    Some(Err(e)) => {
                        use async_nats::jetstream::consumer::pull::MessagesErrorKind;
                        match e.kind() {
                            // Silence: the node holding the consumer died, or
                            // the connection is cut without a word (a silent
                            // partition, noticed now rather than when the
                            // client's pings run out).
                            MessagesErrorKind::MissingHeartbeat => {
                                tracing::warn!("the NATS consumer went silent; making a new one");
                                crate::nats::connect::reconnect_if_silent(&self.client).await;
                            }
                            // The consumer is gone (its node died, or it was deleted).
                            MessagesErrorKind::NoResponders => {
                                tracing::warn!("the NATS consumer is gone; making a new one");
                            }
                            _ => tracing::debug!(error = %e, "NATS consumer error; resuming"),
                        }
                        return Exit::Reopen;
                    }
                    None => return Exit::Reopen,
                },
                _ = tick.tick() => self.update_health(),
            }
        }
    }

    /// Whether the stream is still the one `next_seq` counts in. A stream
    /// deleted and created anew (a memory-backed stream after a NATS restart,
    /// an operator, a relay recreating it) numbers from 1 again: whatever the
    /// old one held that this source had not read is gone, and the new one's
    /// messages (the new relay epoch's gap marker first) sit below `next_seq`.
    /// Either sign is enough: another creation time, or a stream that ends
    /// before what this source already read (sequences never go back within
    /// one stream; a purge keeps them). Then a `Gap`, and reading resumes at
    /// the new stream's start.
    fn check_identity(&mut self, info: &async_nats::jetstream::stream::Info) -> bool {
        let identity = StreamIdentity::of(info);
        let went_back = info.state.last_sequence.saturating_add(1) < self.next_seq;
        if identity == self.identity && !went_back {
            return false;
        }
        tracing::warn!(
            stream = %info.config.name,
            read_up_to = self.next_seq.saturating_sub(1),
            last = info.state.last_sequence,
            "the stream was created anew: what it held is gone; gap, reading from its start"
        );
        self.identity = identity;
        self.next_seq = info.state.first_sequence.max(1);
        self.state.epoch = None;
        self.state.max_lsn = None;
        self.gap(GapReason::Injected {
            detail: format!(
                "stream {} was created anew: its messages are gone",
                info.config.name
            )
            .into(),
        });
        true
    }

    /// Before a message that skips sequences is delivered: if the stream has
    /// discarded any sequence in between, one of them may have been this
    /// source's, so a `Gap` comes first — never after the events that follow it.
    /// (Skips are normal: the consumer is filtered to some tables. Discards only
    /// move the stream's first sequence up, so one check now is exact; when the
    /// stream cannot be asked, the gap is assumed.) True when the stream turns
    /// out to have been created anew: read it again from its start.
    async fn check_skipped(&mut self, seq: u64) -> bool {
        let from = self.next_seq;
        if seq <= from {
            return false;
        }
        match self.stream.get_info().await {
            Ok(stream) if self.check_identity(&stream) => return true,
            Ok(stream) if stream.state.first_sequence <= from => {}
            Ok(stream) => {
                let missed = stream.state.first_sequence - from;
                tracing::warn!(
                    missed,
                    "the stream discarded messages this source skipped: gap"
                );
                self.gap(GapReason::Lagged { missed });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell whether skipped messages were discarded: gap");
                self.gap(GapReason::Injected {
                    detail: "skipped stream sequences could not be checked".into(),
                });
            }
        }
        false
    }

    /// Delivers message `m`, stored at `seq` at `published_ns` (Unix
    /// nanoseconds).
    fn on_message(&mut self, m: &async_nats::jetstream::Message, seq: u64, published_ns: i128) {
        if seq < self.next_seq {
            return;
        }
        self.next_seq = seq + 1;
        // Health changes with what the stream says, or once caught up; not
        // with each event (the tick re-checks the heartbeat's age).
        let mut health_news = !self.state.caught_up && seq >= self.state.target;
        if health_news {
            self.state.caught_up = true;
        }
        let msg = match WireMessage::from_json(&m.payload) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!(error = %e, subject = %m.subject, "not a relay message: gap");
                self.stats.lock().last_stream_seq = seq;
                self.gap(GapReason::MalformedPayload);
                if health_news {
                    self.update_health();
                }
                return;
            }
        };
        if self.state.epoch.as_deref() != Some(msg.epoch.as_str()) {
            let changed = self.state.epoch.is_some();
            self.stats.lock().epoch = Some(msg.epoch.to_string());
            self.state.epoch = Some(msg.epoch);
            self.state.max_lsn = None;
            if changed && !matches!(msg.kind, WireKind::Gap(_)) {
                self.gap(GapReason::Injected {
                    detail: "the relay's epoch changed without a gap marker".into(),
                });
            }
        }
        match msg.kind {
            WireKind::Event(mut event) => {
                // An event below a position already delivered is late: a copy
                // a restarted relay republished, or a first copy stored after
                // later ones (republished after a failed acknowledgement).
                // Nothing here tells the two apart, and invalidating twice is
                // harmless while dropping a first copy serves stale values:
                // deliver it.
                let late =
                    matches!((event.lsn, self.state.max_lsn), (Some(lsn), Some(max)) if lsn < max);
                if let Some(lsn) = event.lsn {
                    self.state.max_lsn = Some(self.state.max_lsn.map_or(lsn, |m| m.max(lsn)));
                }
                {
                    let mut stats = self.stats.lock();
                    stats.last_stream_seq = seq;
                    stats.events += 1;
                    stats.late += u64::from(late);
                }
                // Its position is not passed on: a dispatcher takes an event's
                // position as applied, but an event before it may still come
                // (late). Positions come from progress records, each stored
                // after every event it covers.
                event.lsn = None;
                self.hub.publish(event);
            }
            WireKind::Gap(reason) => {
                self.stats.lock().last_stream_seq = seq;
                self.gap(reason);
            }
            WireKind::Health(health) => {
                self.stats.lock().last_stream_seq = seq;
                health_news = true;
                self.state.relay_healthy = health.is_healthy();
                let now_ns = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as i128);
                // Sent when the relay says (a heartbeat stored late is old
                // news), else stored when JetStream says.
                let sent_ns = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(crate::nats::wire::SENT_AT_HEADER))
                    .and_then(|v| v.as_str().parse::<i64>().ok())
                    .map_or(published_ns, |ms| {
                        (i128::from(ms) * 1_000_000).min(published_ns)
                    });
                let age = Duration::from_nanos(u64::try_from(now_ns - sent_ns).unwrap_or(0));
                if age < self.heartbeat_timeout {
                    self.state.hb_at =
                        Some(Instant::now().checked_sub(age).unwrap_or_else(Instant::now));
                }
            }
            // Every event up to `lsn` is stored before this record, so this
            // source has delivered each of them that it reads: a
            // read-your-writes wait for `lsn` may end.
            WireKind::Progress(lsn) => {
                self.stats.lock().last_stream_seq = seq;
                if self.state.progress.is_none_or(|p| lsn > p) {
                    self.state.progress = Some(lsn);
                    self.hub.send(Signal::Progress(lsn));
                }
            }
        }
        if health_news {
            self.update_health();
        }
    }
}

/// Collects the client's events into `seen` until one says it is connected
/// again after a disconnection (`disconnected`: it was disconnected before
/// the first). Pending for ever once the client is gone.
async fn until_reconnected(
    events: &mut mpsc::UnboundedReceiver<async_nats::Event>,
    mut disconnected: bool,
    seen: &mut Vec<async_nats::Event>,
) {
    while let Some(event) = events.recv().await {
        let reconnected = match event {
            async_nats::Event::Disconnected => {
                disconnected = true;
                false
            }
            async_nats::Event::Connected => disconnected,
            _ => false,
        };
        seen.push(event);
        if reconnected {
            return;
        }
    }
    std::future::pending().await
}
