//! The background task: receive and publish (through [`publish`](super::publish)); heartbeat; reconnect.
//!
//! One task per source owns the listening connection. A *session* runs until the
//! connection is lost, a heartbeat goes unanswered, or the source shuts down.
//! After a loss the task reports `Unhealthy` and the gap, reconnects with backoff
//! (a new connection, LISTEN on every channel again), then reports
//! `Gap(Reconnected)` and only then `Healthy`: the order the
//! [`EventSource`](pgcachewatch_core::EventSource) contract asks for.
//!
//! A heartbeat that is late does not by itself end a session: a transaction that
//! sent notifications and is committing but not yet visible (its commit waits
//! for a synchronous standby, say) holds PostgreSQL's NOTIFY commit lock and
//! stalls the queue, the heartbeat with it. The task then asks the connection
//! around the queue (the heartbeat's own `lock_timeout`, or a `SELECT 1`): a
//! connection that answers is alive and still listening, so nothing is lost; the
//! stall is logged and counted ([`Stall`]) and the session goes on.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pgcachewatch_core::{Error, GapReason, Health, SignalHub};
use sqlx::postgres::{PgListener, PgNotification};
use sqlx::Executor;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::abandon::abandon;
use super::backoff::Backoff;
use super::config::Settings;
use super::connection::{self, loss_detail, Listening};
use super::publish::{Batch, Publisher};
use super::stats::{bump, Counters};

/// How many already-readable notifications are handled in a row before the task
/// looks at stop, commands and the heartbeat again.
const DRAIN_BATCH: usize = 256;

/// A request from a [`PgListenerSource`](super::PgListenerSource) handle to its task.
#[derive(Debug)]
pub(crate) enum Command {
    /// `SELECT pg_notification_queue_usage()` on the listening connection.
    QueueUsage(oneshot::Sender<Result<f64, Error>>),
}

/// Why a session ended.
enum Ended {
    /// The source is shutting down (or every handle was dropped).
    Stop,
    /// The connection can no longer be trusted: report this gap and reconnect.
    Lost(GapReason),
}

/// PostgreSQL's error code for a lock wait that ran out of `lock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// A heartbeat sent and not yet answered.
struct Pending {
    payload: String,
    sent: Instant,
    deadline: Instant,
    /// Notifications received on this connection when the deadline was last set.
    received_then: u64,
}

impl Pending {
    /// At the deadline: `true` if the connection is presumed half-open. A
    /// connection that delivered notifications since the deadline was set is
    /// alive, only backlogged (a burst the handlers are still working through is
    /// ahead of the heartbeat): the heartbeat gets another `timeout`, so a burst
    /// never costs a spurious `Gap(HeartbeatTimeout)`.
    fn expired(&mut self, received: u64, now: Instant, timeout: Duration) -> bool {
        if received == self.received_then {
            return true;
        }
        self.received_then = received;
        self.deadline = now + timeout;
        false
    }
}

/// What one heartbeat NOTIFY came to.
enum Beat {
    /// Committed: its notification is on its way back.
    Sent(Pending),
    /// The server answered, but the heartbeat's `COMMIT` gave up waiting for
    /// the NOTIFY commit lock: another notifying transaction is committing.
    Blocked {
        /// When the heartbeat was sent.
        sent: Instant,
    },
}

/// The heartbeat state of one session.
#[derive(Default)]
struct Beats {
    pending: Option<Pending>,
    stall: Stall,
}

/// Why the notification path is stalled on a connection that answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StallCause {
    /// The heartbeat's `COMMIT` waited `lock_timeout` for the NOTIFY commit lock.
    CommitLock(Duration),
    /// The heartbeat committed and did not come back in time, but a query did.
    Overdue,
}

/// A stall of the notification queue on a live connection, from its first sign
/// until a heartbeat comes back: logged once and counted once
/// ([`ListenerStats::queue_stalls`](super::ListenerStats::queue_stalls)).
///
/// Staying healthy through it is sound. The NOTIFY commit lock is held from
/// before the committing transaction's commit record until after it became
/// visible, so every later notifying commit (every watched write) waits behind
/// it: no watched write becomes visible during the stall. And a session that
/// answers queries is still listening: PostgreSQL delivers the held
/// notification and everything queued after it once the commit is visible.
#[derive(Debug, Default)]
struct Stall {
    since: Option<Instant>,
}

impl Stall {
    /// Notes a sign of a stall; the first one of a stall is counted and logged.
    fn begin(&mut self, counters: &Counters, cause: StallCause) {
        if self.since.is_some() {
            return;
        }
        self.since = Some(Instant::now());
        bump(&counters.queue_stalls);
        match cause {
            StallCause::CommitLock(waited) => tracing::warn!(
                ?waited,
                "notification queue stalled: the heartbeat NOTIFY could not commit, as another \
                 transaction that sent notifications holds the NOTIFY commit lock while it \
                 commits (e.g. its commit waits for a synchronous standby); the connection \
                 answered, so nothing is lost: staying healthy and waiting for that commit"
            ),
            StallCause::Overdue => tracing::warn!(
                "notification queue stalled: the heartbeat has not come back, but the \
                 connection answered a query; notifications wait behind a transaction that \
                 is committing and not yet visible (e.g. its commit waits for a synchronous \
                 standby), so nothing is lost: staying healthy and waiting for that commit"
            ),
        }
    }

    /// A heartbeat came back: the queue moves again.
    fn end(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                stalled_for = ?since.elapsed(),
                "notification queue moving again: heartbeats come back"
            );
        }
    }
}

pub(crate) struct Task {
    pub(crate) settings: Arc<Settings>,
    pub(crate) hub: SignalHub,
    pub(crate) counters: Arc<Counters>,
    /// Changes (or closes, when every handle is gone) to stop the task.
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) commands: mpsc::Receiver<Command>,
}

impl Task {
    /// Runs until stopped, starting with the connection `connect()` opened.
    pub(crate) async fn run(mut self, first: Listening) {
        // Publishes what the connection delivers, and reports gaps.
        let mut publisher = Publisher::new(
            self.settings.clone(),
            self.hub.clone(),
            self.counters.clone(),
        );
        let mut heartbeat_seq: u64 = 0;
        let mut conn = first;
        loop {
            let ended = self
                .session(&mut conn, &mut publisher, &mut heartbeat_seq)
                .await;
            self.counters.set_backend_pid(None);
            match ended {
                // Presumed half-open: sqlx's UNLISTEN on drop would hang on it.
                Ended::Lost(GapReason::HeartbeatTimeout) => abandon(conn.listener),
                _ => drop(conn),
            }
            let reason = match ended {
                Ended::Stop => break,
                Ended::Lost(reason) => reason,
            };
            tracing::warn!(%reason, channels = ?self.settings.channels, "LISTEN connection lost; reconnecting");
            self.hub.set_health(Health::Unhealthy);
            publisher.gap(reason);
            match self.reconnect().await {
                Some(new) => conn = new,
                None => break,
            }
            self.counters.reconnected();
            self.counters.set_backend_pid(Some(conn.backend_pid));
            tracing::info!(backend_pid = conn.backend_pid, "listening again");
            publisher.gap(GapReason::Reconnected);
            self.hub.set_health(Health::Healthy);
        }
        self.hub.set_health(Health::Unhealthy);
        publisher.finish();
        tracing::debug!("listener task stopped");
    }

    /// Receives until the connection fails, a heartbeat times out, or stop; every
    /// event received is published before this returns.
    async fn session(
        &mut self,
        conn: &mut Listening,
        publisher: &mut Publisher,
        heartbeat_seq: &mut u64,
    ) -> Ended {
        match self.receive(conn, publisher, heartbeat_seq).await {
            Ok(never) => match never {},
            Err(ended) => ended,
        }
    }

    /// [`session`](Self::session)'s loop; returns only why it ended.
    async fn receive(
        &mut self,
        conn: &mut Listening,
        publisher: &mut Publisher,
        heartbeat_seq: &mut u64,
    ) -> Result<std::convert::Infallible, Ended> {
        let interval = self.settings.builder.heartbeat_interval;
        let timeout = self.settings.builder.heartbeat_timeout;
        let mut next_beat = Instant::now() + interval;
        let mut beats = Beats::default();
        // Everything this connection delivered, heartbeats included.
        let mut received: u64 = 0;
        // Refilled for every read (its buffer is kept).
        let mut batch = Batch::new();
        loop {
            let wake = beats.pending.as_ref().map_or(next_beat, |p| p.deadline);
            tokio::select! {
                biased;
                _ = self.stop.changed() => return Err(Ended::Stop),
                Some(command) = self.commands.recv() => {
                    self.command(conn, command).await?;
                }
                next = conn.listener.try_recv() => {
                    batch.restart();
                    let mut result = self.received(next, &mut beats, &mut received, &mut batch);
                    // A burst: take what is already readable without going
                    // round the select (its futures cost more than a
                    // notification), in batches so that stop, commands and the
                    // heartbeat's deadline are still looked at between them.
                    for _ in 0..DRAIN_BATCH {
                        if result.is_err() {
                            break;
                        }
                        match ready(&mut conn.listener) {
                            Some(next) => {
                                result = self.received(next, &mut beats, &mut received, &mut batch);
                            }
                            None => break,
                        }
                    }
                    // What arrived before a loss is published before its gap.
                    publisher.publish(&batch);
                    result?;
                }
                _ = tokio::time::sleep_until(wake) => {
                    if let Some(p) = beats.pending.as_mut() {
                        if !p.expired(received, Instant::now(), timeout) {
                            continue;
                        }
                        // Overdue, and nothing came meanwhile: a dead connection,
                        // or a queue stalled behind a commit? Ask the connection
                        // around the queue; it is asked again every interval
                        // until the heartbeat comes back.
                        self.answers(conn, timeout).await?;
                        beats.stall.begin(&self.counters, StallCause::Overdue);
                        p.deadline = Instant::now() + interval;
                        continue;
                    }
                    *heartbeat_seq += 1;
                    match self.beat(conn, *heartbeat_seq, timeout, received).await? {
                        Beat::Sent(p) => {
                            next_beat = p.sent + interval;
                            beats.pending = Some(p);
                        }
                        Beat::Blocked { sent } => {
                            beats.stall.begin(&self.counters, StallCause::CommitLock(lock_timeout(timeout)));
                            next_beat = sent + interval;
                        }
                    }
                }
            }
        }
    }

    /// One result of `try_recv`: a heartbeat's answer, a notification to
    /// publish (added to `batch`), or the end of the connection.
    fn received(
        &self,
        next: Result<Option<PgNotification>, sqlx::Error>,
        beats: &mut Beats,
        received: &mut u64,
        batch: &mut Batch,
    ) -> Result<(), Ended> {
        match next {
            Ok(Some(n)) => {
                *received += 1;
                if n.channel() == self.settings.heartbeat_channel {
                    if let Some(p) = beats.pending.take_if(|p| p.payload == n.payload()) {
                        bump(&self.counters.heartbeats);
                        self.counters.set_heartbeat_rtt(p.sent.elapsed());
                        beats.stall.end();
                    }
                } else {
                    batch.items.push(n);
                }
                Ok(())
            }
            Ok(None) => Err(Ended::Lost(GapReason::ConnectionLost {
                detail: loss_detail(None),
            })),
            Err(e) => Err(Ended::Lost(GapReason::ConnectionLost {
                detail: loss_detail(Some(&e)),
            })),
        }
    }

    /// Sends one heartbeat: a NOTIFY on this source's private channel, which comes
    /// back on the same connection if (and only if) it still works both ways and
    /// the notification queue moves.
    async fn beat(
        &self,
        conn: &mut Listening,
        seq: u64,
        timeout: Duration,
        received: u64,
    ) -> Result<Beat, Ended> {
        let payload = seq.to_string();
        // One round trip (simple query protocol). NOTIFY assigns a transaction id, so
        // its commit would wait for a WAL flush (and a synchronous standby);
        // asynchronous commit skips that: the notification is delivered at commit
        // either way, and a heartbeat needs no durability.
        //
        // Its COMMIT takes the NOTIFY commit lock, which a notifying transaction
        // holds until it is visible: behind a held commit the heartbeat would
        // wait, and the connection with it, for as long as the hold lasts. The
        // lock timeout (half the heartbeat timeout) makes the server answer
        // anyway, which tells a stalled queue from a dead connection.
        //
        // The channel name is ours (letters, digits, underscores).
        let sql = format!(
            "BEGIN; SET LOCAL synchronous_commit TO off; SET LOCAL lock_timeout TO {}; \
             NOTIFY \"{}\", '{payload}'; COMMIT;",
            lock_timeout(timeout).as_millis(),
            self.settings.heartbeat_channel
        );
        let sent = Instant::now();
        match tokio::time::timeout(timeout, (&mut conn.listener).execute(sql.as_str())).await {
            Ok(Ok(_)) => Ok(Beat::Sent(Pending {
                payload,
                sent,
                deadline: sent + timeout,
                received_then: received,
            })),
            // The COMMIT failed and the session is idle again (no transaction).
            Ok(Err(e)) if is_lock_timeout(&e) => Ok(Beat::Blocked { sent }),
            Ok(Err(e)) => Err(Ended::Lost(GapReason::ConnectionLost {
                detail: loss_detail(Some(&e)),
            })),
            Err(_) => {
                bump(&self.counters.heartbeat_timeouts);
                tracing::warn!(
                    ?timeout,
                    "heartbeat NOTIFY did not complete: the connection is presumed half-open"
                );
                Err(Ended::Lost(GapReason::HeartbeatTimeout))
            }
        }
    }

    /// Whether the connection answers a query within `timeout`: a round trip that
    /// does not go through the notification queue. `Err` if it does not.
    async fn answers(&self, conn: &mut Listening, timeout: Duration) -> Result<(), Ended> {
        match tokio::time::timeout(timeout, (&mut conn.listener).execute("SELECT 1")).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Ended::Lost(GapReason::ConnectionLost {
                detail: loss_detail(Some(&e)),
            })),
            Err(_) => {
                bump(&self.counters.heartbeat_timeouts);
                tracing::warn!(
                    ?timeout,
                    "heartbeat unanswered, and the connection did not answer a query either: \
                     it is presumed half-open"
                );
                Err(Ended::Lost(GapReason::HeartbeatTimeout))
            }
        }
    }

    /// Answers a handle's request on the listening connection.
    async fn command(&self, conn: &mut Listening, command: Command) -> Result<(), Ended> {
        match command {
            Command::QueueUsage(reply) => {
                let timeout = self.settings.builder.heartbeat_timeout;
                let query = sqlx::query_scalar::<_, f64>("SELECT pg_notification_queue_usage()")
                    .fetch_one(&mut conn.listener);
                match tokio::time::timeout(timeout, query).await {
                    Ok(Ok(usage)) => {
                        self.counters.queue_usage(usage);
                        let _ = reply.send(Ok(usage));
                        Ok(())
                    }
                    Ok(Err(e @ sqlx::Error::Database(_))) => {
                        let _ = reply.send(Err(Error::Connection {
                            temporary: connection::is_temporary(&e),
                            source: Box::new(e),
                        }));
                        Ok(())
                    }
                    Ok(Err(e)) => {
                        let detail = loss_detail(Some(&e));
                        let _ = reply.send(Err(Error::Connection {
                            temporary: true,
                            source: Box::new(e),
                        }));
                        Err(Ended::Lost(GapReason::ConnectionLost { detail }))
                    }
                    Err(_) => {
                        let _ = reply.send(Err(Error::Connection {
                            temporary: true,
                            source: format!("pg_notification_queue_usage() took over {timeout:?}")
                                .into(),
                        }));
                        bump(&self.counters.heartbeat_timeouts);
                        Err(Ended::Lost(GapReason::HeartbeatTimeout))
                    }
                }
            }
        }
    }

    /// Reconnects with capped, jittered exponential backoff; `None` on stop.
    async fn reconnect(&mut self) -> Option<Listening> {
        let settings = self.settings.clone();
        let mut backoff = Backoff::new(
            settings.builder.reconnect_min,
            settings.builder.reconnect_max,
        );
        loop {
            let delay = backoff.next_delay();
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    biased;
                    _ = self.stop.changed() => return None,
                    Some(command) = self.commands.recv() => disconnected(command),
                    _ = &mut sleep => break,
                }
            }
            let attempt = connection::open(&settings, connection::Probe::Reconnect);
            tokio::pin!(attempt);
            let result = loop {
                tokio::select! {
                    biased;
                    _ = self.stop.changed() => return None,
                    Some(command) = self.commands.recv() => disconnected(command),
                    result = &mut attempt => break result,
                }
            };
            match result {
                Ok(conn) => return Some(conn),
                Err(e) if e.is_temporary() => {
                    tracing::warn!(error = %e, "reconnect failed; retrying");
                }
                Err(e) => {
                    tracing::error!(error = %e, "reconnect failed, and retrying is unlikely to help; retrying anyway");
                }
            }
        }
    }
}

/// How long the heartbeat's COMMIT waits for the NOTIFY commit lock: half the
/// heartbeat timeout (at least 1 ms; `lock_timeout` 0 would mean no limit), so
/// that a live server's answer arrives within the timeout.
fn lock_timeout(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout / 2).max(Duration::from_millis(1))
}

/// Whether a statement failed because a lock wait ran out of `lock_timeout`.
fn is_lock_timeout(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == LOCK_NOT_AVAILABLE)
}

/// Answers a request while there is no connection.
fn disconnected(command: Command) {
    match command {
        Command::QueueUsage(reply) => {
            let _ = reply.send(Err(Error::Connection {
                temporary: true,
                source: "the listener is reconnecting".into(),
            }));
        }
    }
}

/// `try_recv`'s result if a notification (or the end of the connection) is
/// already readable, `None` if it would wait. Polled once where it is made:
/// `now_or_never` would first move sqlx's sizeable future (measured: a visible
/// part of each notification's cost in a burst).
fn ready(listener: &mut PgListener) -> Option<Result<Option<PgNotification>, sqlx::Error>> {
    let mut next = pin!(listener.try_recv());
    match next.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => Some(result),
        Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_behind_a_backlog_gets_more_time_a_silent_one_expires() {
        let timeout = Duration::from_millis(50);
        let sent = Instant::now();
        let mut p = Pending {
            payload: "1".into(),
            sent,
            deadline: sent + timeout,
            received_then: 10,
        };
        // Notifications came in since: alive, only backlogged.
        let at = sent + timeout;
        assert!(!p.expired(500, at, timeout));
        assert_eq!(p.deadline, at + timeout);
        // Nothing since the deadline was moved: half-open.
        assert!(p.expired(500, at + timeout, timeout));
    }

    #[test]
    fn a_stall_is_counted_once_however_many_signs_until_a_heartbeat_ends_it() {
        let counters = Counters::default();
        let mut stall = Stall::default();
        stall.begin(&counters, StallCause::CommitLock(Duration::from_millis(5)));
        stall.begin(&counters, StallCause::Overdue);
        stall.begin(&counters, StallCause::CommitLock(Duration::from_millis(5)));
        assert_eq!(counters.snapshot().queue_stalls, 1);
        stall.end();
        stall.end();
        stall.begin(&counters, StallCause::Overdue);
        assert_eq!(counters.snapshot().queue_stalls, 2, "a new stall");
    }

    #[test]
    fn the_heartbeat_waits_for_the_commit_lock_half_its_timeout_and_never_without_limit() {
        assert_eq!(lock_timeout(Duration::from_secs(2)), Duration::from_secs(1));
        // lock_timeout 0 would mean "wait for ever".
        assert_eq!(
            lock_timeout(Duration::from_micros(300)),
            Duration::from_millis(1)
        );
        assert!(!is_lock_timeout(&sqlx::Error::PoolTimedOut));
    }
}
