//! Streamed commits held until other sessions can see them. No I/O.
//!
//! The task pushes every assembled transaction here in commit order and
//! publishes only the prefix a snapshot taken after their receipt shows as
//! finished ([`visibility`](super::visibility)). Transactions that change no
//! cache (no event) need no check but keep their place: positions are
//! published in order, so read-your-writes and confirmation never pass a
//! transaction still held. A keepalive position seen while something is held
//! is deferred until the queue drains.

use std::collections::VecDeque;
use std::time::Duration;

use pgcachewatch_core::Lsn;
use tokio::time::Instant;

use super::assembler::Committed;
use super::visibility::Snapshot;

/// The first wait before asking again whether a held commit is visible; it
/// doubles up to [`MAX_RECHECK`]. A commit normally becomes visible
/// microseconds after its record is flushed, so the first check sees it.
const FIRST_RECHECK: Duration = Duration::from_millis(1);
/// The longest wait between checks (a commit held by a synchronous standby).
const MAX_RECHECK: Duration = Duration::from_millis(50);
/// At most one snapshot per this interval. Each is a query the server runs
/// (about 50 µs of its processor time here): unbounded, a write storm of 7,000
/// commits/s would cost a core's sixth on two. Bounded, a commit that arrives
/// within it waits for the next check (with the commits after it), and one
/// query serves them all. A lone commit after a quiet spell is checked at once.
const MIN_SNAPSHOT_GAP: Duration = Duration::from_millis(1);

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Held {
    queue: VecDeque<Committed>,
    /// The newest snapshot taken: it answers for every xid it saw finished.
    seen: Option<Snapshot>,
    /// A keepalive's position that waits for the queue to drain.
    keepalive: Option<Lsn>,
    /// When to ask again while the head is invisible; the wait after that.
    recheck_at: Option<Instant>,
    wait: Duration,
    /// When the last snapshot was taken.
    snapshot_at: Option<Instant>,
}

impl Held {
    pub(crate) fn push(&mut self, committed: Committed) {
        self.queue.push_back(committed);
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The end of the newest held transaction.
    pub(crate) fn last_end(&self) -> Option<Lsn> {
        self.queue.back().map(Committed::end_lsn)
    }

    /// Defers a keepalive's position until everything held is published.
    pub(crate) fn defer_keepalive(&mut self, lsn: Lsn) {
        self.keepalive = self.keepalive.max(Some(lsn));
    }

    /// The deferred keepalive position, once nothing is held.
    pub(crate) fn take_keepalive(&mut self) -> Option<Lsn> {
        if self.queue.is_empty() {
            self.keepalive.take()
        } else {
            None
        }
    }

    /// When to try releasing: now if the head is known visible; otherwise the
    /// scheduled re-check, and no sooner than [`MIN_SNAPSHOT_GAP`] after the
    /// last snapshot. `None` when nothing is held.
    pub(crate) fn due(&self) -> Option<Instant> {
        let head = self.queue.front()?;
        let now = Instant::now();
        if self.visible(head) {
            return Some(now);
        }
        let after_last = self.snapshot_at.map_or(now, |at| at + MIN_SNAPSHOT_GAP);
        Some(self.recheck_at.unwrap_or(now).max(after_last))
    }

    fn visible(&self, committed: &Committed) -> bool {
        !committed.affects_caches() || self.seen.as_ref().is_some_and(|s| s.sees(committed.xid()))
    }

    /// Whether releasing needs a new snapshot: something held changes caches
    /// and the last snapshot does not see it.
    pub(crate) fn needs_snapshot(&self) -> bool {
        self.queue.iter().any(|c| !self.visible(c))
    }

    /// Records a snapshot taken (at `at`) after every held transaction was received.
    pub(crate) fn saw(&mut self, snapshot: Snapshot, at: Instant) {
        self.seen = Some(snapshot);
        self.snapshot_at = Some(at);
    }

    /// The next held transaction, if it and all before it are visible.
    pub(crate) fn pop_visible(&mut self) -> Option<Committed> {
        let head = self.queue.front()?;
        if !self.visible(head) {
            return None;
        }
        self.queue.pop_front()
    }

    /// After a release: if the head is still invisible, schedules the next
    /// check (backing off) and returns `true` the first time it waits.
    pub(crate) fn schedule(&mut self, now: Instant) -> bool {
        if self.queue.is_empty() {
            self.recheck_at = None;
            self.wait = Duration::ZERO;
            return false;
        }
        let first = self.wait.is_zero();
        self.wait = if first {
            FIRST_RECHECK
        } else {
            (self.wait * 2).min(MAX_RECHECK)
        };
        self.recheck_at = Some(now + self.wait);
        first
    }

    /// Forgets everything: the session ended, and the slot replays what was
    /// not published.
    pub(crate) fn clear(&mut self) {
        *self = Held::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(xid: u32, end: u64, events: bool) -> Committed {
        let events = if events {
            vec![pgcachewatch_core::Event::new(
                "slot",
                pgcachewatch_core::Operation::Update,
                "public",
                "t",
            )]
        } else {
            Vec::new()
        };
        Committed::Events {
            end_lsn: Lsn(end),
            xid,
            events,
            degraded: 0,
        }
    }

    fn snap(text: &str) -> Snapshot {
        Snapshot::parse(text).unwrap().normalized()
    }

    impl Held {
        fn saw_now(&mut self, snapshot: Snapshot) {
            self.saw(snapshot, Instant::now());
        }
    }

    #[test]
    fn only_the_visible_prefix_is_released_in_commit_order() {
        let mut held = Held::default();
        held.push(tx(10, 100, true));
        held.push(tx(11, 200, false)); // no event: needs no check, keeps its place
        held.push(tx(12, 300, true));
        assert!(held.needs_snapshot());
        // 10 still in progress: nothing goes, not even the event-less 11.
        held.saw_now(snap("10:13:10"));
        assert!(held.pop_visible().is_none());
        assert!(held.schedule(Instant::now()), "first wait");
        assert!(!held.schedule(Instant::now()), "already waiting");
        // 10 finished, 12 not yet.
        held.saw_now(snap("12:13:12"));
        assert_eq!(held.pop_visible().map(|c| c.end_lsn()), Some(Lsn(100)));
        assert_eq!(held.pop_visible().map(|c| c.end_lsn()), Some(Lsn(200)));
        assert!(held.pop_visible().is_none());
        held.saw_now(snap("13:13:"));
        assert_eq!(held.pop_visible().map(|c| c.end_lsn()), Some(Lsn(300)));
        assert!(!held.schedule(Instant::now()));
        assert!(held.due().is_none());
    }

    #[test]
    fn snapshots_are_at_least_the_gap_apart_and_a_seen_head_goes_at_once() {
        let mut held = Held::default();
        let t0 = Instant::now();
        held.saw(snap("5:5:"), t0);
        held.push(tx(4, 100, true));
        assert!(held.due().unwrap() <= Instant::now(), "seen finished: now");
        assert!(held.pop_visible().is_some());
        held.push(tx(5, 200, true));
        assert!(
            held.due().unwrap() >= t0 + MIN_SNAPSHOT_GAP,
            "needs a new snapshot"
        );
    }

    #[test]
    fn a_keepalive_waits_for_the_queue_to_drain() {
        let mut held = Held::default();
        held.push(tx(5, 100, true));
        held.defer_keepalive(Lsn(150));
        held.defer_keepalive(Lsn(120));
        assert_eq!(held.take_keepalive(), None);
        held.saw_now(snap("6:6:"));
        assert!(held.pop_visible().is_some());
        assert_eq!(held.take_keepalive(), Some(Lsn(150)));
    }

    #[test]
    fn an_old_snapshot_is_not_trusted_for_a_newer_commit() {
        let mut held = Held::default();
        held.saw_now(snap("10:10:"));
        held.push(tx(10, 100, true));
        assert!(held.needs_snapshot(), "taken before 10 finished");
        held.push(tx(9, 50, true));
        held.saw_now(snap("11:11:"));
        assert!(!held.needs_snapshot());
    }
}
