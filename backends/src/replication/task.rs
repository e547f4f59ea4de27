//! The background task: receive, assemble, publish, confirm; reconnect without loss.
//!
//! A *session* streams until the connection fails or the source stops. Then the
//! task reports `Unhealthy`, reconnects with capped jittered backoff and resumes
//! from the slot, which still holds everything not confirmed. Transactions the
//! replay repeats (commit end ≤ what was already emitted) are skipped, so the
//! path has no `Gap`: caches keep their entries. It reports `Healthy` once it has
//! caught up with the server's WAL position at reconnect. A `Gap` comes only when
//! events really are gone: the slot was dropped or invalidated (or, for a
//! temporary slot, died with its connection), or a transaction could not be read.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use pgcachewatch_core::{GapReason, Health, Lsn, Signal, SignalHub};
use tokio::sync::watch;
use tokio::time::Instant;

use super::assembler::{Assembler, Committed};
use super::client::{self, Session, SlotOutcome, Wire};
use super::config::Settings;
use super::gate::Progress;
use super::pgoutput::{self, Message};
use super::stats::{bump, raise, Counters};
use crate::postgres::listener::backoff::Backoff;

/// How long closing a session (CopyDone) may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// At most one `Signal::Progress` per this interval. The server sends a
/// keepalive each time it has read WAL we have not confirmed, which on a busy
/// server (writes to unwatched tables) is once per commit anywhere; relayed
/// one for one they would fill subscribers' buffers (and make them lag).
/// Coalesced, a read-your-writes wait after a write that produced no event
/// ends at most this much later.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(10);

/// Why a session ended.
enum Ended {
    /// The source is shutting down (or every handle is gone).
    Stop,
    /// The stream failed; reconnect.
    Lost(Arc<str>),
}

pub(crate) struct Task {
    pub(crate) settings: Arc<Settings>,
    pub(crate) hub: SignalHub,
    pub(crate) counters: Arc<Counters>,
    pub(crate) progress: Arc<Progress>,
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) assembler: Assembler,
    /// When the last `Progress` was sent, and a newer position not sent yet.
    pub(crate) progress_sent: Option<Instant>,
    pub(crate) progress_pending: Option<Lsn>,
}

impl Task {
    /// Runs until stopped, starting with the session `connect()` opened.
    pub(crate) async fn run(mut self, first: Session) {
        let mut session = first;
        let mut gap = None;
        loop {
            let ended = self.stream(&mut session, gap.take()).await;
            self.counters.set_backend_pid(None);
            session.close(CLOSE_TIMEOUT).await;
            let detail = match ended {
                Ended::Stop => break,
                Ended::Lost(detail) => detail,
            };
            tracing::warn!(
                slot = %self.settings.builder.slot,
                %detail,
                "replication stream lost; reconnecting (no events are lost: the slot keeps them)"
            );
            self.hub.set_health(Health::Unhealthy);
            self.assembler.reset();
            match self.reconnect().await {
                Some((new, slot_gone)) => {
                    self.counters.reconnected();
                    gap = slot_gap(&new.slot, slot_gone, self.settings.builder.temporary_slot);
                    session = new;
                }
                None => break,
            }
        }
        self.hub.set_health(Health::Unhealthy);
        tracing::debug!("replication task stopped");
    }

    fn gap(&self, reason: GapReason) {
        bump(&self.counters.gaps);
        self.hub.gap(reason);
    }

    /// Confirms what may be confirmed: emitted, held back by the gates.
    fn confirm(&self, session: &Session) {
        let lsn = self.progress.advance();
        if lsn > Lsn::ZERO {
            session.confirm(lsn);
            raise(&self.counters.confirmed, lsn);
            self.counters.positions_moved();
        }
    }

    fn emitted(&self, lsn: Lsn) {
        self.progress.set_emitted(lsn);
        raise(&self.counters.emitted, lsn);
    }

    /// Streams one session until it fails or the source stops.
    async fn stream(&mut self, session: &mut Session, gap: Option<GapReason>) -> Ended {
        self.counters.set_backend_pid(session.backend_pid);
        self.counters.set_last_error(None);
        raise(&self.counters.server, session.xlogpos);
        self.counters.positions_moved();
        self.emitted(session.start);
        let target = session.xlogpos;
        tracing::info!(
            slot = %self.settings.builder.slot,
            start = %session.start,
            server = %target,
            backend_pid = ?session.backend_pid,
            "streaming"
        );
        if let Some(reason) = gap {
            tracing::error!(%reason, "events were lost; emitting a gap");
            self.gap(reason);
        }
        let mut caught_up = false;
        loop {
            if !caught_up && self.progress.emitted() >= target {
                caught_up = true;
                tracing::info!(position = %self.progress.emitted(), "caught up with the server");
                self.hub.set_health(Health::Healthy);
            }
            let progress_due = self
                .progress_sent
                .map_or_else(Instant::now, |t| t + PROGRESS_INTERVAL);
            tokio::select! {
                biased;
                _ = self.stop.changed() => return Ended::Stop,
                () = self.progress.changed.notified() => self.confirm(session),
                () = tokio::time::sleep_until(progress_due), if self.progress_pending.is_some() => {
                    self.send_progress();
                }
                item = session.recv() => match item {
                    Ok(Some(wire)) => self.wire(session, wire),
                    Ok(None) => return Ended::Lost("the server ended the replication stream".into()),
                    Err(detail) => return Ended::Lost(detail),
                },
            }
        }
    }

    /// Handles one item of the stream.
    fn wire(&mut self, session: &Session, wire: Wire) {
        match wire {
            Wire::Begin(begin) => self.message(session, Message::Begin(begin)),
            Wire::Commit(commit) => self.message(session, Message::Commit(commit)),
            Wire::Data(bytes) => match pgoutput::decode(&bytes) {
                Ok(msg) => self.message(session, msg),
                Err(e) => {
                    tracing::error!(error = %e, "undecodable pgoutput message");
                    if !self.assembler.unreadable(e.to_string()) {
                        self.gap(GapReason::MalformedPayload);
                    }
                }
            },
            Wire::KeepAlive { wal_end } => {
                raise(&self.counters.server, wal_end);
                self.counters.positions_moved();
                // With no transaction open, everything before wal_end was sent.
                if !self.assembler.in_transaction() && wal_end > self.progress.emitted() {
                    self.emitted(wal_end);
                    self.progress_pending = Some(wal_end);
                    if self
                        .progress_sent
                        .is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL)
                    {
                        self.send_progress();
                    }
                    self.confirm(session);
                }
            }
        }
    }

    /// Sends the pending `Progress`, if any.
    fn send_progress(&mut self) {
        if let Some(lsn) = self.progress_pending.take() {
            self.progress_sent = Some(Instant::now());
            self.hub.send(Signal::Progress(lsn));
        }
    }

    fn message(&mut self, session: &Session, msg: Message) {
        match self.assembler.apply(msg) {
            Ok(None) => {}
            Ok(Some(committed)) => self.committed(session, committed),
            Err(e) => {
                tracing::error!(error = %e, "pgoutput stream out of order; emitting a gap");
                self.gap(GapReason::MalformedPayload);
            }
        }
    }

    /// Publishes a transaction's events, then confirms its end: every inline
    /// handler (dispatcher) has applied them when `send` returns.
    fn committed(&mut self, session: &Session, committed: Committed) {
        let end = committed.end_lsn();
        if end <= self.progress.emitted() {
            // Replayed after a reconnect: already published.
            bump(&self.counters.skipped_transactions);
            return;
        }
        match committed {
            Committed::Events {
                events, degraded, ..
            } => {
                if degraded > 0 {
                    self.counters
                        .degraded_tables
                        .fetch_add(degraded as u64, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(
                        key_cap = self.settings.builder.key_cap,
                        degraded,
                        "transaction over the key cap: table-level events"
                    );
                }
                let empty = events.is_empty();
                for event in events {
                    self.counters.event_published(Utc::now());
                    self.hub.publish(event);
                }
                // Events carry their position; a pending Progress before it is moot.
                if self.progress_pending.is_some_and(|p| p <= end) {
                    self.progress_pending = None;
                }
                if empty {
                    self.progress_pending = Some(end);
                    self.send_progress();
                }
            }
            Committed::Unreadable { detail, .. } => {
                tracing::error!(%detail, commit = %end, "a transaction could not be read; emitting a gap");
                self.gap(GapReason::MalformedPayload);
            }
        }
        bump(&self.counters.transactions);
        self.emitted(end);
        self.confirm(session);
    }

    /// Reconnects with capped, jittered backoff; `None` on stop. Also says
    /// whether an attempt found the slot gone (dropped or lost) meanwhile.
    async fn reconnect(&mut self) -> Option<(Session, bool)> {
        let settings = self.settings.clone();
        let mut backoff = Backoff::new(
            settings.builder.reconnect_min,
            settings.builder.reconnect_max,
        );
        let mut slot_gone = false;
        loop {
            let delay = backoff.next_delay();
            tokio::select! {
                biased;
                _ = self.stop.changed() => return None,
                () = tokio::time::sleep(delay) => {}
            }
            let resume = self.progress.confirmed();
            let result = tokio::select! {
                biased;
                _ = self.stop.changed() => return None,
                result = client::open(&settings, resume) => result,
            };
            match result {
                Ok(session) => return Some((session, slot_gone)),
                Err(e) => {
                    self.counters.set_last_error(Some(e.to_string()));
                    if e.is_slot_gone() {
                        slot_gone = true;
                        tracing::error!(error = %e, "reconnect failed: the replication slot is gone; retrying");
                    } else if e.is_temporary() {
                        tracing::warn!(error = %e, "reconnect failed; retrying");
                    } else {
                        tracing::error!(error = %e, "reconnect failed, and retrying is unlikely to help; retrying anyway");
                    }
                }
            }
        }
    }
}

/// The gap a new session owes its subscribers, if its slot lost events.
fn slot_gap(outcome: &SlotOutcome, slot_gone: bool, temporary: bool) -> Option<GapReason> {
    let detail = match outcome {
        SlotOutcome::Recreated { detail } => detail.clone(),
        SlotOutcome::Created if temporary => {
            "the temporary slot died with its connection and was created anew".to_owned()
        }
        SlotOutcome::Created => "the slot was dropped and has been created anew".to_owned(),
        SlotOutcome::Existing if slot_gone => {
            "the slot was dropped while disconnected and has been created anew".to_owned()
        }
        SlotOutcome::Existing => return None,
    };
    Some(GapReason::SlotLost {
        detail: detail.into(),
    })
}
