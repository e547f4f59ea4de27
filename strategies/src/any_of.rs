//! [`AnyOf`]: several strategies, one cache.

use std::fmt;
use std::time::Instant;

use pgcachewatch_core::{Decision, Event, GapReason, InvalidationStrategy};

/// A boxed strategy, as held by the combinators.
pub type BoxedStrategy<K> = Box<dyn InvalidationStrategy<K>>;

/// Ticks the children whose deadline has come and merges their decisions.
pub(crate) fn tick_due<'a, K: 'static>(
    children: impl Iterator<Item = &'a mut BoxedStrategy<K>>,
    now: Instant,
) -> Decision<K> {
    children
        .filter(|c| c.next_deadline().is_some_and(|d| d <= now))
        .fold(Decision::Nothing, |acc, c| acc.merge(c.on_tick(now)))
}

/// Feeds every input to all its children and drops what any of them wants
/// dropped: decisions are combined with [`Decision::merge`], and the deadline is
/// the earliest of the children's.
///
/// Use it to combine policies without writing a strategy: row-level invalidation
/// plus a periodic safety net, or a [`Sequence`](crate::Sequence) plus a
/// [`Timed`](crate::Timed) bound.
///
/// ```text
/// AnyOf(Keyed, Timed(I))
///
/// events:        u1      u2   u3
/// Keyed drops:   k1      k2   k3
/// Timed flushes: ▼       |<- I ->▼
/// merged:        All     k2   k3 All
/// ```
///
/// A gap goes to every child; the merge is [`Decision::All`] unless every child
/// overrides its gap answer (with no children at all it is `All`, the trait's
/// default). On a tick only the children whose deadline has come are ticked.
///
/// # Example
///
/// ```
/// use std::time::{Duration, Instant};
/// use pgcachewatch::{Decision, Event, InvalidationStrategy, Operation, RowKey};
/// use pgcachewatch::strategies::{AnyOf, Keyed, Sequence};
///
/// let mut s = AnyOf::new()
///     .with(Keyed::new(|_: &Event, row: &RowKey| row.get("id").and_then(|v| v.as_i64())))
///     .with(Sequence::new([Operation::Delete, Operation::Delete]));
/// let now = Instant::now();
/// let delete = |id: i64| Event::new("ch", Operation::Delete, "public", "t")
///     .with_keys(vec![RowKey::single("id", id)]);
/// assert_eq!(s.on_event(&delete(1), now), Decision::keys([1]));
/// assert_eq!(s.on_event(&delete(2), now), Decision::All); // Sequence matched
/// ```
pub struct AnyOf<K> {
    children: Vec<BoxedStrategy<K>>,
}

impl<K: 'static> AnyOf<K> {
    /// No children yet.
    pub fn new() -> Self {
        AnyOf {
            children: Vec::new(),
        }
    }

    /// Adds a child (builder style).
    pub fn with(mut self, strategy: impl InvalidationStrategy<K>) -> Self {
        self.push(strategy);
        self
    }

    /// Adds a child.
    pub fn push(&mut self, strategy: impl InvalidationStrategy<K>) {
        self.children.push(Box::new(strategy));
    }

    /// How many children.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether there are no children.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }
}

impl<K: 'static> Default for AnyOf<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K> FromIterator<BoxedStrategy<K>> for AnyOf<K> {
    fn from_iter<I: IntoIterator<Item = BoxedStrategy<K>>>(iter: I) -> Self {
        AnyOf {
            children: iter.into_iter().collect(),
        }
    }
}

impl<K> fmt::Debug for AnyOf<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.children).finish()
    }
}

impl<K: 'static> InvalidationStrategy<K> for AnyOf<K> {
    fn on_event(&mut self, event: &Event, now: Instant) -> Decision<K> {
        self.children.iter_mut().fold(Decision::Nothing, |acc, c| {
            acc.merge(c.on_event(event, now))
        })
    }

    fn on_gap(&mut self, reason: &GapReason, now: Instant) -> Decision<K> {
        if self.children.is_empty() {
            return Decision::All;
        }
        self.children
            .iter_mut()
            .fold(Decision::Nothing, |acc, c| acc.merge(c.on_gap(reason, now)))
    }

    fn on_tick(&mut self, now: Instant) -> Decision<K> {
        tick_due(self.children.iter_mut(), now)
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.children.iter().filter_map(|c| c.next_deadline()).min()
    }

    fn reads_clock(&self) -> bool {
        self.children.iter().any(|c| c.reads_clock())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{Greedy, Timed, Windowed};
    use pgcachewatch_core::Operation;

    #[test]
    fn empty_any_of_keeps_on_events_and_flushes_on_gaps() {
        let mut s: AnyOf<u32> = AnyOf::new();
        let now = Instant::now();
        assert!(s.is_empty());
        assert_eq!(
            s.on_event(&Event::new("ch", Operation::Insert, "public", "t"), now),
            Decision::Nothing
        );
        assert_eq!(s.on_gap(&GapReason::Reconnected, now), Decision::All);
    }

    #[test]
    fn deadline_is_the_earliest_and_only_due_children_tick() {
        let t0 = Instant::now();
        let mut s: AnyOf<u32> = AnyOf::new()
            .with(Windowed::new(10, Duration::from_millis(50)))
            .with(Timed::new(Duration::from_millis(20)));
        let e = Event::new("ch", Operation::Insert, "public", "t");
        assert_eq!(
            s.on_event(&e, t0),
            Decision::All,
            "Timed fires on the first event"
        );
        assert_eq!(
            s.on_event(&e, t0 + Duration::from_millis(5)),
            Decision::Nothing
        );
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_millis(20)));
        assert_eq!(s.on_tick(t0 + Duration::from_millis(20)), Decision::All);
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_millis(50)));
        assert_eq!(s.on_tick(t0 + Duration::from_millis(50)), Decision::All);
        assert_eq!(s.next_deadline(), None);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn collects_from_boxes() {
        let s: AnyOf<u32> = [Box::new(Greedy::new()) as BoxedStrategy<u32>]
            .into_iter()
            .collect();
        assert_eq!(s.len(), 1);
    }
}
