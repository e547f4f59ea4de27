//! The [`NatsSource`](super::NatsSource)'s task: consume, resume, detect loss.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;
use parking_lot::Mutex;
use pgcachewatch_core::{GapReason, Health, Lsn, Signal, SignalHub};
use tokio::sync::{mpsc, watch};

use super::NatsSourceStats;
use crate::nats::wire::{WireKind, WireMessage};

/// How often the task re-checks heartbeat age and skipped sequences.
const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
pub(super) struct State {
    epoch: Option<String>,
    /// When the last fresh heartbeat was received.
    hb_at: Option<Instant>,
    relay_healthy: bool,
    disconnected: bool,
    caught_up: bool,
    /// The stream's last sequence when the current consumer started.
    target: u64,
    max_lsn: Option<Lsn>,
}

pub(super) struct Task {
    pub(super) client: async_nats::Client,
    pub(super) stream: Stream,
    pub(super) prefix: String,
    pub(super) filters: Vec<String>,
    pub(super) hub: SignalHub,
    pub(super) next_seq: u64,
    pub(super) heartbeat_timeout: Duration,
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
            async_nats::Event::Connected => {
                #[cfg(feature = "metrics")]
                if self.state.disconnected {
                    self.metrics.reconnects.increment(1);
                }
                self.state.disconnected = false;
                true
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
        loop {
            if self.stopped() {
                return None;
            }
            match self.try_open().await {
                Ok(messages) => return Some(messages),
                Err(e) => {
                    tracing::debug!(error = %e, "could not resume the NATS consumer; retrying")
                }
            }
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = self.stop.changed() => return None,
                    Some(ev) = self.nats_events.recv() => { self.on_nats_event(&ev); }
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn try_open(&mut self) -> Result<Messages, String> {
        let info = self.stream.get_info().await.map_err(|e| e.to_string())?;
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
        let messages = consumer.messages().await.map_err(|e| e.to_string())?;
        self.stats.lock().consumers += 1;
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
                        self.check_skipped(&m).await;
                        self.on_message(&m);
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "NATS consumer error; resuming");
                        return Exit::Reopen;
                    }
                    None => return Exit::Reopen,
                },
                _ = tick.tick() => self.update_health(),
            }
        }
    }

    /// Before a message that skips sequences is delivered: if the stream has
    /// discarded any sequence in between, one of them may have been this
    /// source's, so a `Gap` comes first — never after the events that follow it.
    /// (Skips are normal: the consumer is filtered to some tables. Discards only
    /// move the stream's first sequence up, so one check now is exact; when the
    /// stream cannot be asked, the gap is assumed.)
    async fn check_skipped(&mut self, m: &async_nats::jetstream::Message) {
        let Ok(info) = m.info() else {
            return;
        };
        let from = self.next_seq;
        if info.stream_sequence <= from {
            return;
        }
        match self.stream.get_info().await {
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
    }

    fn on_message(&mut self, m: &async_nats::jetstream::Message) {
        let Ok(info) = m.info() else {
            return;
        };
        let seq = info.stream_sequence;
        if seq < self.next_seq {
            return;
        }
        self.next_seq = seq + 1;
        let published_ns = info.published.unix_timestamp_nanos();
        if seq >= self.state.target {
            self.state.caught_up = true;
        }
        self.stats.lock().last_stream_seq = seq;
        let msg = match WireMessage::from_json(&m.payload) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!(error = %e, subject = %m.subject, "not a relay message: gap");
                self.gap(GapReason::MalformedPayload);
                return;
            }
        };
        if self.state.epoch.as_deref() != Some(msg.epoch.as_str()) {
            let changed = self.state.epoch.is_some();
            self.stats.lock().epoch = Some(msg.epoch.clone());
            self.state.epoch = Some(msg.epoch);
            self.state.max_lsn = None;
            if changed && !matches!(msg.kind, WireKind::Gap(_)) {
                self.gap(GapReason::Injected {
                    detail: "the relay's epoch changed without a gap marker".into(),
                });
            }
        }
        match msg.kind {
            WireKind::Event(event) => {
                if let (Some(lsn), Some(max)) = (event.lsn, self.state.max_lsn) {
                    if lsn < max {
                        // Within one epoch positions only grow: an earlier
                        // commit again is a restarted relay republishing what
                        // it had not confirmed, already delivered.
                        self.stats.lock().duplicates += 1;
                        self.update_health();
                        return;
                    }
                }
                if let Some(lsn) = event.lsn {
                    self.state.max_lsn = Some(self.state.max_lsn.map_or(lsn, |m| m.max(lsn)));
                }
                self.stats.lock().events += 1;
                self.hub.publish(event);
            }
            WireKind::Gap(reason) => self.gap(reason),
            WireKind::Heartbeat { health, .. } => {
                self.state.relay_healthy = health.is_healthy();
                let now_ns = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as i128);
                let age = Duration::from_nanos(u64::try_from(now_ns - published_ns).unwrap_or(0));
                if age < self.heartbeat_timeout {
                    self.state.hb_at =
                        Some(Instant::now().checked_sub(age).unwrap_or_else(Instant::now));
                }
            }
            WireKind::Progress(lsn) => {
                if self.state.max_lsn.is_some_and(|max| lsn < max) {
                    self.stats.lock().duplicates += 1;
                } else {
                    self.state.max_lsn = Some(lsn);
                    self.hub.send(Signal::Progress(lsn));
                }
            }
        }
        self.update_health();
    }
}
