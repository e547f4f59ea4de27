//! [`InvalidationTarget`]: what a dispatcher applies decisions and health to,
//! and the cache's implementation of it.

use std::hash::Hash;

use super::Cache;
#[cfg(doc)]
use crate::health::HealthBoard;
use crate::health::HealthVote;
use crate::strategy::Decision;

/// Anything a dispatcher can apply [`Decision`]s and health to.
///
/// [`Cache`] implements it; implement it to drive another store from a strategy.
///
/// # Contract
///
/// * [`apply`](Self::apply) drops at least what the decision says (more is safe).
/// * [`health_vote`](Self::health_vote) is called once per dispatcher that feeds
///   the target, when it attaches; the dispatcher flushes the target right after
///   (attaching is a gap: writes before it went unseen) and sets the vote from its
///   source's health. While any vote is unhealthy, or a feeding dispatcher has
///   stopped, the target must not serve what it holds — a [`HealthBoard`] keeps
///   that rule for you.
///
/// ```
/// use std::sync::Arc;
/// use pgcachewatch_core::{Decision, HealthBoard, HealthVote, InvalidationTarget};
///
/// #[derive(Default)]
/// struct Counter { flushes: std::sync::atomic::AtomicU64, board: Arc<HealthBoard> }
///
/// impl InvalidationTarget<u32> for Counter {
///     fn apply(&self, decision: &Decision<u32>) {
///         if *decision == Decision::All {
///             self.flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         }
///     }
///     fn health_vote(&self) -> HealthVote {
///         HealthVote::new(self.board.clone())
///     }
/// }
/// ```
pub trait InvalidationTarget<K>: Send + Sync + 'static {
    /// Drops what the decision says.
    fn apply(&self, decision: &Decision<K>);
    /// A new vote on the target's health, for one feeding dispatcher (see the
    /// contract above).
    fn health_vote(&self) -> HealthVote;
}

impl<K, V> InvalidationTarget<K> for Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn apply(&self, decision: &Decision<K>) {
        match decision {
            Decision::Nothing => {}
            Decision::All => self.invalidate_all(),
            Decision::Invalidate(targets) => {
                self.invalidate_tables(&targets.tables);
                for key in &targets.keys {
                    self.invalidate(key);
                }
            }
        }
    }

    fn health_vote(&self) -> HealthVote {
        HealthVote::new(self.inner.clone())
    }
}
