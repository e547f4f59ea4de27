//! The relay's task: read the source, publish, await acknowledgements, beat.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::Context;
use parking_lot::Mutex;
use pgcachewatch_core::{Event, GapReason, Health, Lsn, Signal, Subscription};
use tokio::sync::watch;

use super::publisher::{Acked, InFlight, Outgoing};
use super::{Confirm, RelayStatus};
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

/// Where a restarted relay over a lossless upstream goes on: the epoch of the
/// stream's last message and the number after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Resume {
    pub(super) epoch: String,
    pub(super) next_n: u64,
}

/// The message id of an event: its commit position and index within the
/// commit when it has one, else its epoch and number.
pub(crate) fn event_msg_id(epoch: &str, n: u64, lsn: Option<(Lsn, u32)>) -> String {
    match lsn {
        Some((lsn, index)) => format!("lsn:{lsn}:{index}"),
        None => format!("{epoch}:{n}"),
    }
}

pub(super) struct Task {
    prefix: String,
    /// The upstream's lasting identity (epochs are `<origin>/<random>`).
    origin: Option<String>,
    /// Continue this epoch instead of starting one.
    resume: Option<Resume>,
    subscription: Subscription,
    epoch: String,
    epoch_started: Instant,
    n: u64,
    heartbeat: Duration,
    max_in_flight: usize,
    confirm: Option<Arc<dyn Confirm>>,
    status: Arc<Mutex<RelayStatus>>,
    stop: watch::Receiver<bool>,
    inflight: InFlight,
    health: Health,
    /// The commit the last event belonged to, and its index within it.
    commit: Option<(Lsn, u32)>,
}

enum Step {
    Stop,
    Signal(Option<Signal>),
    Acked(Acked),
    Beat,
}

impl Task {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        js: Context,
        prefix: String,
        subscription: Subscription,
        epoch: String,
        continuity: (Option<String>, Option<Resume>),
        heartbeat: Duration,
        max_in_flight: usize,
        confirm: Option<Arc<dyn Confirm>>,
        status: Arc<Mutex<RelayStatus>>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let (origin, resume) = continuity;
        Task {
            prefix,
            origin,
            resume,
            subscription,
            epoch,
            epoch_started: Instant::now(),
            n: 0,
            heartbeat,
            max_in_flight,
            confirm,
            status,
            stop,
            inflight: InFlight::new(js),
            health: Health::Unhealthy,
            commit: None,
        }
    }

    fn message(&mut self, kind: WireKind) -> (WireMessage, u64) {
        let n = self.n;
        self.n += 1;
        let offset_us = u64::try_from(self.epoch_started.elapsed().as_micros()).unwrap_or(u64::MAX);
        (
            WireMessage {
                epoch: self.epoch.clone(),
                n,
                offset_us,
                kind,
            },
            n,
        )
    }

    async fn publish_control(&mut self, kind: &str, wire: WireKind, confirm: Option<Lsn>) {
        let (msg, n) = self.message(wire);
        let out = Outgoing {
            subject: subject::control_subject(&self.prefix, kind),
            msg_id: format!("{}:{n}", self.epoch),
            payload: msg.to_json().into(),
            confirm,
            received_at: None,
        };
        self.inflight.push(out).await;
    }

    /// Starts a new epoch whose first message is a gap marker.
    async fn new_epoch(&mut self, reason: GapReason) {
        self.epoch = new_epoch(self.origin.as_deref());
        {
            let mut s = self.status.lock();
            s.epoch = self.epoch.clone();
            s.epochs += 1;
        }
        self.open_epoch(reason).await;
    }

    /// Starts the current epoch: numbering from 0, its gap marker first.
    async fn open_epoch(&mut self, reason: GapReason) {
        self.epoch_started = Instant::now();
        self.n = 0;
        tracing::info!(epoch = %self.epoch, %reason, "relay starts a new epoch");
        self.publish_control("gap", WireKind::Gap(reason), None)
            .await;
    }

    async fn beat(&mut self) {
        let last_n = self.n.saturating_sub(1);
        self.publish_control(
            "heartbeat",
            WireKind::Heartbeat {
                health: self.health,
                last_n,
            },
            None,
        )
        .await;
    }

    async fn on_event(&mut self, event: &Event) {
        // A finished commit is confirmed once this later message is acknowledged.
        let mut confirm = None;
        let position = event.lsn.map(|lsn| match self.commit {
            Some((prev, index)) if prev == lsn => (lsn, index + 1),
            Some((prev, _)) => {
                confirm = Some(prev);
                (lsn, 0)
            }
            None => (lsn, 0),
        });
        if position.is_some() {
            self.commit = position;
        }
        let (msg, n) = self.message(WireKind::Event(event.clone()));
        let out = Outgoing {
            subject: subject::table_subject(&self.prefix, event.schema.as_deref(), &event.table),
            msg_id: event_msg_id(&self.epoch, n, position),
            payload: msg.to_json().into(),
            confirm,
            received_at: Some(event.received_at),
        };
        self.inflight.push(out).await;
    }

    async fn on_signal(&mut self, signal: Signal) {
        self.status.lock().received += 1;
        match signal {
            Signal::Event(e) => self.on_event(&e).await,
            Signal::Gap(reason) => {
                self.commit = None;
                self.new_epoch(reason).await;
            }
            Signal::Health(h) => {
                self.health = h;
                self.status.lock().upstream = h;
                self.beat().await;
            }
            Signal::Progress(lsn) => {
                self.commit = None;
                self.publish_control("progress", WireKind::Progress(lsn), Some(lsn))
                    .await;
            }
            other => {
                tracing::debug!(?other, "relay ignores an unknown signal kind");
            }
        }
    }

    fn on_ack(&mut self, out: &Outgoing, seq: u64) {
        let mut s = self.status.lock();
        s.acked += 1;
        s.publishing = true;
        s.last_stream_seq = s.last_stream_seq.max(seq);
        if let Some(at) = out.received_at {
            s.events += 1;
            s.last_event_lag = (chrono::Utc::now() - at).to_std().ok();
        }
        if let Some(lsn) = out.confirm {
            s.confirmed = Some(s.confirmed.map_or(lsn, |c| c.max(lsn)));
            drop(s);
            if let Some(c) = &self.confirm {
                c.confirmed(lsn);
            }
        }
    }

    async fn step(&mut self, beat: &mut tokio::time::Interval) -> Step {
        let room = self.inflight.len() < self.max_in_flight;
        let inflight = &mut self.inflight;
        let sub = &mut self.subscription;
        let stop = &mut self.stop;
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Step::Stop,
            acked = std::future::poll_fn(|cx| inflight.poll_front(cx)) => Step::Acked(acked),
            signal = sub.recv(), if room => Step::Signal(signal),
            _ = beat.tick() => Step::Beat,
        }
    }

    pub(super) async fn run(mut self) {
        match self.resume.take() {
            // The upstream resumes right after what this epoch's last run
            // confirmed: nothing was lost, consumers keep their caches.
            Some(resume) => {
                tracing::info!(epoch = %resume.epoch, next = resume.next_n, "relay continues its epoch");
                self.epoch = resume.epoch;
                self.n = resume.next_n;
                self.status.lock().epoch = self.epoch.clone();
            }
            // The epoch the handle reports from the start.
            None => {
                self.open_epoch(GapReason::Injected {
                    detail: "relay started".into(),
                })
                .await
            }
        }
        let mut beat = tokio::time::interval(self.heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let step = self.step(&mut beat).await;
            match step {
                Step::Stop => break,
                Step::Signal(Some(signal)) => self.on_signal(signal).await,
                Step::Signal(None) => {
                    tracing::info!("the relay's source ended; relay stops");
                    break;
                }
                Step::Beat => self.beat().await,
                Step::Acked(Acked::Ok(out, ack)) => self.on_ack(&out, ack.sequence),
                Step::Acked(Acked::Failed(out, error)) => {
                    tracing::warn!(%error, subject = %out.subject, "publish not acknowledged; publishing again");
                    self.status.lock().publishing = false;
                    let status = self.status.clone();
                    let mut stop = self.stop.clone();
                    let acked = InFlight::republish(self.inflight.js(), &out, &mut stop, || {
                        status.lock().retries += 1
                    })
                    .await;
                    match acked {
                        Some(ack) => self.on_ack(&out, ack.sequence),
                        None => break,
                    }
                }
            }
            self.status.lock().in_flight = self.inflight.len();
        }
        self.drain().await;
    }

    /// On shutdown: awaits what is in flight, for at most 5 s.
    async fn drain(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.inflight.len() > 0 {
            let inflight = &mut self.inflight;
            match tokio::time::timeout_at(
                deadline,
                std::future::poll_fn(|cx| inflight.poll_front(cx)),
            )
            .await
            {
                Ok(Acked::Ok(out, ack)) => self.on_ack(&out, ack.sequence),
                Ok(Acked::Failed(out, e)) => {
                    tracing::warn!(error = %e, subject = %out.subject, "a message in flight at shutdown was not acknowledged")
                }
                Err(_) => break,
            }
        }
        self.status.lock().in_flight = self.inflight.len();
    }
}
