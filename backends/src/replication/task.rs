//! The background task: receive, assemble, publish, confirm; reconnect without loss.
//!
//! A *session* streams until the connection fails or the source stops. Then the
//! task reports `Unhealthy`, reconnects with capped jittered backoff and resumes
//! from the slot, which still holds everything not confirmed. Transactions the
//! replay repeats (commit end ≤ what was already emitted) are skipped, so the
//! path has no `Gap`: caches keep their entries. It reports `Healthy` once it has
//! caught up with the server's WAL position at reconnect. A `Gap` comes only when
//! events really are gone: the slot was dropped or invalidated (or, for a
//! temporary slot, died with its connection), another consumer advanced it, or
//! a transaction could not be read.
//!
//! **Announced when visible.** A transaction is published no earlier than a
//! snapshot taken on the side connection after its receipt shows it finished
//! ([`held`](super::held)): one `pg_current_snapshot()` per batch of commits.
//! Relation messages are looked up in the catalog on the same connection (the
//! partition root to name, the primary key to read), and the publication's
//! tables are re-read every [`MEMBERSHIP_INTERVAL`] so a table that leaves it
//! is reported.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use pgcachewatch_core::{GapReason, Health, Lsn, Signal, SignalHub};
use tokio::sync::watch;
use tokio::time::Instant;

use super::assembler::{Assembler, Committed, KeySpec};
use super::client::{self, Session, SlotOutcome, Wire};
use super::config::Settings;
use super::flow::Flow;
use super::gate::Progress;
use super::held::Held;
use super::pgoutput::{self, Message, Relation};
use super::side::SideConnection;
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

/// How often the publication's tables are re-read.
pub(crate) const MEMBERSHIP_INTERVAL: Duration = Duration::from_secs(10);

/// Held transactions past which the visibility check goes before reading
/// more of the stream (a backlog is still checked in batches this large).
const HELD_BATCH: usize = 512;

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
    /// Visibility checks and catalog lookups.
    pub(crate) side: SideConnection,
    /// Assembled transactions not yet visible to other sessions.
    pub(crate) held: Held,
    /// The publication's tables when last read, and when to read them again.
    pub(crate) published: Option<BTreeSet<String>>,
    pub(crate) membership_due: Instant,
    /// A durable consumer's backpressure: while it is a window behind, the
    /// task neither reads the slot nor publishes what it holds.
    pub(crate) flow: Option<Arc<Flow>>,
    /// Counts emitted signals into `flow` while it lives.
    pub(crate) _counting: Option<pgcachewatch_core::InlineAttachment>,
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
            // Not published, so not confirmed: the slot sends them again.
            self.held.clear();
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
        let mut target = target;
        let mut held_back = false;
        // One timer for the membership check, moved when its time moves: a
        // timer made anew on every turn of the loop (every message) was
        // registered with the runtime's timer wheel and removed again each time.
        let membership = tokio::time::sleep_until(self.membership_due);
        tokio::pin!(membership);
        loop {
            if membership.deadline() != self.membership_due {
                membership.as_mut().reset(self.membership_due);
            }
            if !caught_up && !held_back && self.progress.emitted() >= target {
                caught_up = true;
                tracing::info!(position = %self.progress.emitted(), "caught up with the server");
                self.hub.set_health(Health::Healthy);
            }
            let progress_due = self
                .progress_sent
                .map_or_else(Instant::now, |t| t + PROGRESS_INTERVAL);
            let release_due = self.held.due();
            let release_at = release_due.unwrap_or(self.membership_due);
            let backlog = self.held.len() >= HELD_BATCH;
            // Backpressure: a durable consumer a window behind stops reading
            // and publishing until it has read enough (confirming goes on).
            let room = self.flow.as_ref().is_none_or(|f| f.has_room());
            // Held back, the source falls behind the server: not healthy
            // until it has read what was committed before it could read
            // again (as after a reconnect).
            if !room && !held_back {
                held_back = true;
                if caught_up {
                    caught_up = false;
                    tracing::info!(
                        "the durable consumer is behind; not reading the slot until it catches up"
                    );
                    self.hub.set_health(Health::Unhealthy);
                }
            } else if room && held_back {
                held_back = false;
                match self.side.wal_flush_position().await {
                    Ok(at) => target = target.max(at),
                    Err(e) => return Ended::Lost(Arc::from(e.to_string())),
                }
            }
            let result = tokio::select! {
                biased;
                _ = self.stop.changed() => return Ended::Stop,
                () = self.progress.changed.notified() => {
                    self.confirm(session);
                    Ok(())
                }
                () = tokio::time::sleep_until(progress_due), if self.progress_pending.is_some() => {
                    self.send_progress();
                    Ok(())
                }
                () = wait_room(self.flow.as_deref()), if !room => Ok(()),
                // A long backlog is checked before more is read…
                () = at_or_now(release_at), if room && backlog && release_due.is_some() => {
                    self.release(session).await
                }
                item = session.recv(), if room => match item {
                    Ok(Some(wire)) => self.wire(session, wire).await,
                    Ok(None) => return Ended::Lost("the server ended the replication stream".into()),
                    Err(detail) => return Ended::Lost(detail),
                },
                // …otherwise once nothing more is ready: one check per batch.
                () = at_or_now(release_at), if room && release_due.is_some() => {
                    self.release(session).await
                }
                () = &mut membership => {
                    self.check_membership().await
                }
            };
            if let Err(detail) = result {
                return Ended::Lost(detail);
            }
        }
    }

    /// Handles one item of the stream.
    async fn wire(&mut self, session: &Session, wire: Wire) -> Result<(), Arc<str>> {
        match wire {
            Wire::Begin(begin) => self.message(Message::Begin(begin)),
            Wire::Commit(commit) => self.message(Message::Commit(commit)),
            Wire::Data(bytes) => match pgoutput::decode(&bytes) {
                Ok(Message::Relation(rel)) => self.relation(rel).await?,
                Ok(msg) => self.message(msg),
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
                if !self.assembler.in_transaction() {
                    if self.held.is_empty() {
                        self.keepalive(session, wal_end);
                    } else {
                        self.held.defer_keepalive(wal_end);
                    }
                }
            }
        }
        Ok(())
    }

    /// Everything before `wal_end` was sent and published.
    fn keepalive(&mut self, session: &Session, wal_end: Lsn) {
        if wal_end > self.progress.emitted() {
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

    /// A relation message: its key and name come from the catalog.
    async fn relation(&mut self, rel: Relation) -> Result<(), Arc<str>> {
        let info = self
            .side
            .describe(rel.id)
            .await
            .map_err(|e| Arc::<str>::from(e.to_string()))?;
        let spec = match info {
            Some(info) => {
                if (info.schema.as_str(), info.name.as_str())
                    != (rel.namespace.as_str(), rel.name.as_str())
                {
                    tracing::debug!(
                        partition = %format!("{}.{}", rel.namespace, rel.name),
                        root = %format!("{}.{}", info.schema, info.name),
                        "events of a partition name its root"
                    );
                }
                KeySpec {
                    table: Some((info.schema, info.name)),
                    columns: info.primary_key,
                }
            }
            // Dropped since: its changes are table-level, under the stream's name.
            None => KeySpec::default(),
        };
        self.assembler.describe(rel, &spec);
        Ok(())
    }

    /// Publishes, in commit order, the held transactions other sessions can see.
    async fn release(&mut self, session: &Session) -> Result<(), Arc<str>> {
        if self.held.needs_snapshot() {
            let snapshot = self
                .side
                .snapshot()
                .await
                .map_err(|e| Arc::<str>::from(e.to_string()))?;
            bump(&self.counters.visibility_checks);
            self.held.saw(snapshot, Instant::now());
        }
        while let Some(committed) = self.held.pop_visible() {
            self.publish(session, committed);
            if self.flow.as_ref().is_some_and(|f| !f.has_room()) {
                // The rest waits for the durable consumer (still held, in order).
                return Ok(());
            }
        }
        if let Some(wal_end) = self.held.take_keepalive() {
            self.keepalive(session, wal_end);
        }
        if self.held.schedule(Instant::now()) {
            bump(&self.counters.visibility_waits);
            tracing::debug!(
                held = self.held.len(),
                "a streamed commit is not visible to other sessions yet; holding it"
            );
        }
        Ok(())
    }

    /// Re-reads the publication's tables; warns about each one that left it.
    async fn check_membership(&mut self) -> Result<(), Arc<str>> {
        self.membership_due = Instant::now() + MEMBERSHIP_INTERVAL;
        let publication = self.settings.builder.publication.clone();
        let now = self
            .side
            .published_tables(&publication)
            .await
            .map_err(|e| Arc::<str>::from(e.to_string()))?;
        if let Some(before) = &self.published {
            for gone in before.difference(&now) {
                tracing::warn!(
                    table = %gone,
                    %publication,
                    "a table left the publication: its changes no longer reach this source, \
                     so caches that depend on it are stale from now on; add it back \
                     (`pgcachewatch replication setup {gone} --commit`) or stop caching it"
                );
            }
        }
        self.published = Some(now);
        Ok(())
    }

    /// Sends the pending `Progress`, if any.
    fn send_progress(&mut self) {
        if let Some(lsn) = self.progress_pending.take() {
            self.progress_sent = Some(Instant::now());
            self.hub.send(Signal::Progress(lsn));
        }
    }

    fn message(&mut self, msg: Message) {
        match self.assembler.apply(msg) {
            Ok(None) => {}
            Ok(Some(committed)) => self.committed(committed),
            Err(e) => {
                tracing::error!(error = %e, "pgoutput stream out of order; emitting a gap");
                self.gap(GapReason::MalformedPayload);
            }
        }
    }

    /// Holds an assembled transaction until other sessions can see it.
    fn committed(&mut self, committed: Committed) {
        let end = committed.end_lsn();
        if end
            <= self
                .progress
                .emitted()
                .max(self.held.last_end().unwrap_or(Lsn::ZERO))
        {
            // Replayed after a reconnect: already published.
            bump(&self.counters.skipped_transactions);
            return;
        }
        self.held.push(committed);
    }

    /// Publishes a visible transaction's events, then confirms its end: every
    /// inline handler (dispatcher) has applied them when `send` returns.
    fn publish(&mut self, session: &Session, committed: Committed) {
        let end = committed.end_lsn();
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
            let known = client::Known {
                confirmed: self.progress.confirmed(),
                applied: Some(self.progress.emitted()),
            };
            let result = tokio::select! {
                biased;
                _ = self.stop.changed() => return None,
                result = client::open(&settings, known) => result,
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

/// Waits until the durable consumer has room again.
async fn wait_room(flow: Option<&Flow>) {
    if let Some(flow) = flow {
        flow.wait_room().await;
    }
}

/// Waits until `at`; returns at once when it has passed (a timer would add
/// up to a tick to every announcement).
async fn at_or_now(at: Instant) {
    if at > Instant::now() {
        tokio::time::sleep_until(at).await;
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
        SlotOutcome::Advanced { applied, slot } => format!(
            "slot is at {slot}, beyond the {applied} this source applied: another consumer \
             advanced it, or it was dropped and created anew"
        ),
        SlotOutcome::Existing if slot_gone => {
            "the slot was dropped while disconnected and has been created anew".to_owned()
        }
        SlotOutcome::Existing => return None,
    };
    Some(GapReason::SlotLost {
        detail: detail.into(),
    })
}
