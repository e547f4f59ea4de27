//! [`Filter`]: let only some tables and operations reach a strategy.

use std::time::Instant;

use pgcachewatch_core::{Decision, Event, GapReason, InvalidationStrategy, Operation};

use crate::table::{IntoTableRef, TableFilter};

/// Passes to `inner` only the events a [`TableFilter`] accepts; every other event
/// answers [`Decision::Nothing`] and leaves `inner` untouched.
///
/// Gaps **always** reach `inner`: a gap means events of any table may have been
/// lost, including the filtered ones, so it must still flush. Ticks and deadlines
/// are `inner`'s.
///
/// ```text
/// Filter(tables = [users], Greedy)
///
/// signals:  users  orders  users  gap
/// flushes:  ▼              ▼      ▼
/// ```
///
/// # Example
///
/// ```
/// use std::time::{Duration, Instant};
/// use pgcachewatch::{Decision, Event, GapReason, InvalidationStrategy, Operation};
/// use pgcachewatch::strategies::{Filter, Windowed};
///
/// let mut s = Filter::new(Windowed::new(2, Duration::from_secs(1)))
///     .tables(["public.users"])
///     .operations([Operation::Update, Operation::Delete]);
/// let now = Instant::now();
/// let orders = Event::new("ch", Operation::Update, "public", "orders");
/// let users = Event::new("ch", Operation::Update, "public", "users");
/// assert_eq!(InvalidationStrategy::<u32>::on_event(&mut s, &orders, now), Decision::Nothing);
/// assert_eq!(InvalidationStrategy::<u32>::on_event(&mut s, &orders, now), Decision::Nothing);
/// assert_eq!(InvalidationStrategy::<u32>::on_event(&mut s, &users, now), Decision::Nothing);
/// assert_eq!(InvalidationStrategy::<u32>::on_event(&mut s, &users, now), Decision::All);
/// assert_eq!(InvalidationStrategy::<u32>::on_gap(&mut s, &GapReason::Reconnected, now), Decision::All);
/// ```
#[derive(Debug, Clone)]
pub struct Filter<S> {
    filter: TableFilter,
    inner: S,
}

impl<S> Filter<S> {
    /// Wraps `inner` with a filter that, until narrowed, accepts every event.
    pub fn new(inner: S) -> Self {
        Filter {
            filter: TableFilter::new(),
            inner,
        }
    }

    /// Wraps `inner` with a ready-made `filter`.
    pub fn with(filter: TableFilter, inner: S) -> Self {
        Filter { filter, inner }
    }

    /// Accepts these tables too (see [`TableFilter::tables`]).
    pub fn tables<T: IntoTableRef>(mut self, tables: impl IntoIterator<Item = T>) -> Self {
        self.filter = self.filter.tables(tables);
        self
    }

    /// Accepts these operations too (see [`TableFilter::operations`]).
    pub fn operations(mut self, operations: impl IntoIterator<Item = Operation>) -> Self {
        self.filter = self.filter.operations(operations);
        self
    }

    /// The filter.
    pub fn filter(&self) -> &TableFilter {
        &self.filter
    }

    /// The wrapped strategy.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Unwraps the strategy.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<K, S: InvalidationStrategy<K>> InvalidationStrategy<K> for Filter<S> {
    #[inline]
    fn on_event(&mut self, event: &Event, now: Instant) -> Decision<K> {
        if self.filter.matches(event) {
            self.inner.on_event(event, now)
        } else {
            Decision::Nothing
        }
    }

    fn on_gap(&mut self, reason: &GapReason, now: Instant) -> Decision<K> {
        self.inner.on_gap(reason, now)
    }

    fn on_tick(&mut self, now: Instant) -> Decision<K> {
        self.inner.on_tick(now)
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.inner.next_deadline()
    }

    fn reads_clock(&self) -> bool {
        self.inner.reads_clock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Greedy;

    #[test]
    fn non_matching_events_never_reach_inner_but_gaps_do() {
        let mut f = Filter::new(Greedy::new()).tables(["users"]);
        let now = Instant::now();
        let orders = Event::new("ch", Operation::Insert, "public", "orders");
        let users = Event::new("ch", Operation::Insert, "public", "users");
        assert_eq!(
            InvalidationStrategy::<u32>::on_event(&mut f, &orders, now),
            Decision::Nothing
        );
        assert_eq!(
            InvalidationStrategy::<u32>::on_event(&mut f, &users, now),
            Decision::All
        );
        assert_eq!(
            InvalidationStrategy::<u32>::on_gap(&mut f, &GapReason::MalformedPayload, now),
            Decision::All
        );
    }

    #[test]
    fn operations_filter() {
        let mut f = Filter::new(Greedy::new()).operations([Operation::Truncate]);
        let now = Instant::now();
        let upd = Event::new("ch", Operation::Update, "public", "t");
        let trunc = Event::new("ch", Operation::Truncate, "public", "t");
        assert_eq!(
            InvalidationStrategy::<u32>::on_event(&mut f, &upd, now),
            Decision::Nothing
        );
        assert_eq!(
            InvalidationStrategy::<u32>::on_event(&mut f, &trunc, now),
            Decision::All
        );
    }
}
