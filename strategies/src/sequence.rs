//! [`Sequence`]: flush when the latest operations form a given pattern.

use std::collections::VecDeque;
use std::time::Instant;

use pgcachewatch_core::{Decision, Event, GapReason, InvalidationStrategy, Operation};

/// Drops the whole cache whenever the most recent operations, oldest first,
/// equal `pattern` exactly (for example `[Insert, Update, Delete]`).
///
/// This is what PGCacheWatch's `Windowed` strategy actually does (its docs
/// describe [`Windowed`](crate::Windowed)). The history slides: after a match the
/// next event is compared again with the last `pattern.len()` operations, so with
/// pattern `[Update, Update]` three updates in a row flush twice. An empty pattern
/// matches after every event.
///
/// **Events outside the pattern never flush**, so a cache behind a `Sequence` alone
/// can stay stale indefinitely. Use it for workflows known to end in a given
/// sequence, or next to a safety net in [`AnyOf`](crate::AnyOf) (for example a
/// [`Timed`](crate::Timed) with a long interval).
///
/// ```text
/// pattern = [insert, update, delete]
///
/// events:   insert  update  insert  update  delete  delete
/// flushes:                                  ▼
/// ```
///
/// A gap answers [`Decision::All`] and forgets the history.
///
/// # Example
///
/// ```
/// use std::time::Instant;
/// use pgcachewatch::{Decision, Event, InvalidationStrategy, Operation::*};
/// use pgcachewatch::strategies::Sequence;
///
/// let mut s = Sequence::new([Insert, Update, Delete]);
/// let now = Instant::now();
/// let decisions: Vec<Decision<u32>> = [Insert, Update, Insert, Update, Delete]
///     .into_iter()
///     .map(|op| s.on_event(&Event::new("ch", op, "public", "jobs"), now))
///     .collect();
/// assert_eq!(decisions.last(), Some(&Decision::All));
/// assert!(decisions[..4].iter().all(Decision::is_nothing));
/// ```
#[derive(Debug, Clone)]
pub struct Sequence {
    pattern: Vec<Operation>,
    recent: VecDeque<Operation>,
}

impl Sequence {
    /// Flushes whenever the latest operations equal `pattern`.
    pub fn new(pattern: impl IntoIterator<Item = Operation>) -> Self {
        let pattern: Vec<Operation> = pattern.into_iter().collect();
        let recent = VecDeque::with_capacity(pattern.len() + 1);
        Sequence { pattern, recent }
    }

    /// The pattern this strategy waits for.
    pub fn pattern(&self) -> &[Operation] {
        &self.pattern
    }
}

impl<K> InvalidationStrategy<K> for Sequence {
    fn on_event(&mut self, event: &Event, _now: Instant) -> Decision<K> {
        if self.pattern.is_empty() {
            return Decision::All;
        }
        if self.recent.len() == self.pattern.len() {
            self.recent.pop_front();
        }
        self.recent.push_back(event.operation);
        Decision::all_if(self.recent.iter().eq(self.pattern.iter()))
    }

    fn on_gap(&mut self, _reason: &GapReason, _now: Instant) -> Decision<K> {
        self.recent.clear();
        Decision::All
    }

    fn reads_clock(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Operation::*;

    fn feed(s: &mut Sequence, ops: &[Operation]) -> Vec<bool> {
        let now = Instant::now();
        ops.iter()
            .map(|&op| {
                let d: Decision<u32> = s.on_event(&Event::new("ch", op, "public", "t"), now);
                d == Decision::All
            })
            .collect()
    }

    #[test]
    fn fires_only_on_the_exact_suffix() {
        let mut s = Sequence::new([Insert, Update, Delete]);
        assert_eq!(
            feed(
                &mut s,
                &[Insert, Update, Update, Delete, Insert, Update, Delete]
            ),
            [false, false, false, false, false, false, true]
        );
    }

    #[test]
    fn history_slides_after_a_match() {
        let mut s = Sequence::new([Update, Update]);
        assert_eq!(
            feed(&mut s, &[Update, Update, Update, Insert, Update]),
            [false, true, true, false, false]
        );
    }

    #[test]
    fn gap_flushes_and_forgets_history() {
        let mut s = Sequence::new([Insert, Delete]);
        feed(&mut s, &[Insert]);
        let d: Decision<u32> = s.on_gap(&GapReason::Reconnected, Instant::now());
        assert_eq!(d, Decision::All);
        assert_eq!(feed(&mut s, &[Delete]), [false]);
    }

    #[test]
    fn empty_pattern_matches_every_event() {
        let mut s = Sequence::new([]);
        assert_eq!(feed(&mut s, &[Insert, Truncate]), [true, true]);
    }
}
