//! [`HealthBoard`]: whether a cache (or any invalidation target) may trust its
//! entries, decided by one vote per dispatcher that feeds it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// Tracks the health of everything that feeds one invalidation target, so that a
/// target is trusted only while **every** source it listens to is healthy.
///
/// Each dispatcher attachment holds a [`HealthVote`]. The board is healthy when:
///
/// * nothing was ever attached (a standalone cache, invalidated by hand; unless
///   the board was built [awaiting its first attachment](Self::awaiting_attachment)), or
/// * every vote is healthy, and every dispatcher that fed the target and stopped
///   has been replaced by a new attachment.
///
/// A vote starts unhealthy. Dropping a vote (its dispatcher stopped: shut down,
/// dropped, panicked, or its source ended) leaves the board unhealthy — writes on
/// that source now go unseen — and logs one error. Each later attachment takes the
/// place of one stopped dispatcher (the dispatcher flushes the target when it
/// attaches, which covers whatever was missed meanwhile): a cache fed by two
/// sources whose dispatchers both stopped is trusted again only once two are
/// attached again.
///
/// [`Cache`](crate::Cache) embeds one; a custom
/// [`InvalidationTarget`](crate::InvalidationTarget) can hold an `Arc<HealthBoard>`
/// and hand out votes with [`HealthVote::new`].
///
/// ```
/// use std::sync::Arc;
/// use pgcachewatch_core::{HealthBoard, HealthVote};
/// let board = Arc::new(HealthBoard::named("orders"));
/// assert!(board.is_healthy()); // nothing attached: a standalone target
/// let a = HealthVote::new(board.clone());
/// let b = HealthVote::new(board.clone());
/// a.set(true);
/// assert!(!board.is_healthy()); // b has not said it is healthy
/// b.set(true);
/// assert!(board.is_healthy());
/// drop(b); // b's dispatcher stopped: b's source is no longer watched
/// assert!(!board.is_healthy());
/// ```
pub struct HealthBoard {
    name: Option<String>,
    healthy: AtomicBool,
    state: Mutex<Votes>,
}

#[derive(Debug, Default)]
struct Votes {
    next_id: u64,
    /// Live votes: (id, healthy).
    live: Vec<(u64, bool)>,
    /// Votes dropped since the last attachment.
    stopped: u64,
    /// Nothing was attached yet, and the board was told to wait for a first
    /// attachment ([`HealthBoard::awaiting_attachment`]).
    awaiting: bool,
}

impl Votes {
    fn healthy(&self) -> bool {
        !self.awaiting && self.stopped == 0 && self.live.iter().all(|(_, h)| *h)
    }
}

/// A snapshot of a [`HealthBoard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct HealthSummary {
    /// Whether the target trusts its entries now.
    pub healthy: bool,
    /// Dispatchers feeding the target now.
    pub attached: u64,
    /// Of those, how many report an unhealthy source.
    pub unhealthy: u64,
    /// Dispatchers that stopped and were not replaced by a new attachment (each
    /// keeps the target unhealthy: nothing feeds it from their source).
    pub stopped: u64,
}

impl HealthBoard {
    /// A board with nothing attached (healthy).
    pub fn new() -> Self {
        Self::with_name(None)
    }

    /// A board with nothing attached (healthy), whose name appears in logs.
    pub fn named(name: impl Into<String>) -> Self {
        Self::with_name(Some(name.into()))
    }

    pub(crate) fn with_name(name: Option<String>) -> Self {
        HealthBoard {
            name,
            healthy: AtomicBool::new(true),
            state: Mutex::new(Votes::default()),
        }
    }

    /// A board that is unhealthy until its first attachment: for a target that
    /// must never be trusted before something feeds it (a cache declared with a
    /// strategy, whose dispatcher is attached at start-up). After the first
    /// attachment it follows the usual rules.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use pgcachewatch_core::{HealthBoard, HealthVote};
    /// let board = Arc::new(HealthBoard::awaiting_attachment(Some("users".into())));
    /// assert!(!board.is_healthy()); // nothing feeds it yet
    /// let vote = HealthVote::new(board.clone());
    /// vote.set(true);
    /// assert!(board.is_healthy());
    /// ```
    pub fn awaiting_attachment(name: Option<String>) -> Self {
        HealthBoard {
            name,
            healthy: AtomicBool::new(false),
            state: Mutex::new(Votes {
                awaiting: true,
                ..Votes::default()
            }),
        }
    }

    /// Whether the target may trust its entries now. One atomic load.
    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// The votes, now.
    pub fn summary(&self) -> HealthSummary {
        let votes = self.state.lock();
        HealthSummary {
            healthy: self.is_healthy(),
            attached: votes.live.len() as u64,
            unhealthy: votes.live.iter().filter(|(_, h)| !*h).count() as u64,
            stopped: votes.stopped,
        }
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("unnamed")
    }

    /// Recomputes the flag under the lock, tells `owner` of a change, and logs
    /// it. The owner closes its own view of health before the board shows
    /// unhealthy and opens it after the board shows healthy, so that view is
    /// never more trusting than the board.
    fn publish(&self, votes: &Votes, owner: &dyn HasHealthBoard) {
        let healthy = votes.healthy();
        // Every store happens under the lock, so this load is the current flag.
        if self.healthy.load(Ordering::Acquire) == healthy {
            return;
        }
        if !healthy {
            owner.health_changed(false);
        }
        self.healthy.store(healthy, Ordering::Release);
        if healthy {
            owner.health_changed(true);
        }
        tracing::info!(cache = self.name(), healthy, "cache health changed");
    }

    fn add_vote(&self, owner: &dyn HasHealthBoard) -> u64 {
        let mut votes = self.state.lock();
        let id = votes.next_id;
        votes.next_id += 1;
        votes.live.push((id, false));
        votes.awaiting = false;
        // The new dispatcher takes the place of one that stopped.
        votes.stopped = votes.stopped.saturating_sub(1);
        self.publish(&votes, owner);
        id
    }

    fn set_vote(&self, id: u64, healthy: bool, owner: &dyn HasHealthBoard) {
        let mut votes = self.state.lock();
        if let Some(v) = votes.live.iter_mut().find(|(i, _)| *i == id) {
            v.1 = healthy;
        }
        self.publish(&votes, owner);
    }

    fn drop_vote(&self, id: u64, deliberate: bool, owner: &dyn HasHealthBoard) {
        let mut votes = self.state.lock();
        votes.live.retain(|(i, _)| *i != id);
        votes.stopped += 1;
        if deliberate {
            tracing::info!(
                cache = self.name(),
                "a dispatcher feeding this cache was shut down: it bypasses until one is attached again"
            );
        } else if votes.live.is_empty() {
            tracing::error!(
                cache = self.name(),
                "nothing feeds this cache any more (its dispatcher stopped or its source \
                 ended): every read bypasses it until a dispatcher is attached again"
            );
        } else {
            tracing::error!(
                cache = self.name(),
                "a dispatcher feeding this cache stopped: writes on its source go unseen, \
                 so the cache bypasses until a dispatcher is attached again"
            );
        }
        self.publish(&votes, owner);
    }
}

impl Default for HealthBoard {
    fn default() -> Self {
        HealthBoard::new()
    }
}

impl fmt::Debug for HealthBoard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthBoard")
            .field("name", &self.name)
            .field("summary", &self.summary())
            .finish()
    }
}

/// Something that owns a [`HealthBoard`] and can be kept alive by the votes on it.
pub trait HasHealthBoard: Send + Sync + 'static {
    /// The board.
    fn health_board(&self) -> &HealthBoard;

    /// Called under the board's lock when its verdict changes: with `false`
    /// just before the board shows unhealthy, with `true` just after it shows
    /// healthy. Lets an owner keep a faster copy of the verdict (a cache folds
    /// it into its hit path's one check). Does nothing by default.
    #[doc(hidden)]
    fn health_changed(&self, _healthy: bool) {}
}

impl HasHealthBoard for HealthBoard {
    fn health_board(&self) -> &HealthBoard {
        self
    }
}

/// One dispatcher's say in a [`HealthBoard`]: starts unhealthy; dropping it marks
/// its dispatcher stopped (the target stays unhealthy until the next attachment).
#[must_use = "dropping a vote at once marks its target unhealthy"]
pub struct HealthVote {
    owner: Arc<dyn HasHealthBoard>,
    id: u64,
    retired: bool,
}

impl HealthVote {
    /// A new (unhealthy) vote on `owner`'s board; clears votes of stopped dispatchers.
    pub fn new(owner: Arc<impl HasHealthBoard>) -> Self {
        let id = owner.health_board().add_vote(&*owner);
        HealthVote {
            owner,
            id,
            retired: false,
        }
    }

    /// Says whether this vote's source is healthy.
    pub fn set(&self, healthy: bool) {
        self.owner
            .health_board()
            .set_vote(self.id, healthy, &*self.owner);
    }

    /// Withdraws the vote because its dispatcher was shut down on purpose: the
    /// same as dropping it (the target stays unhealthy until a new attachment),
    /// logged at `info` instead of `error`.
    pub fn retire(mut self) {
        self.owner
            .health_board()
            .drop_vote(self.id, true, &*self.owner);
        self.retired = true;
    }

    /// Whether the board as a whole is healthy now.
    pub fn board_is_healthy(&self) -> bool {
        self.owner.health_board().is_healthy()
    }
}

impl Drop for HealthVote {
    fn drop(&mut self) {
        if !self.retired {
            self.owner
                .health_board()
                .drop_vote(self.id, false, &*self.owner);
        }
    }
}

impl fmt::Debug for HealthVote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthVote").field("id", &self.id).finish()
    }
}
