//! [`Greedy`]: drop everything on every matching event.

use std::fmt;
use std::time::Instant;

use pgcachewatch_core::{Decision, Event, InvalidationStrategy};

/// Drops the whole cache on every event that matches its predicate (all events by
/// default). The simplest policy, and the right one for small, hot caches.
///
/// ```text
/// signals:  e1    e2(no match)   e3    gap
/// flushes:  ▼                    ▼     ▼
/// ```
///
/// It holds no state and never asks for a tick; a gap answers [`Decision::All`].
/// A [`TableFilter`](crate::TableFilter) makes a predicate from tables and
/// operations: `Greedy::with_predicate(filter.into_predicate())`.
///
/// ```
/// use std::time::Instant;
/// use pgcachewatch::{Decision, Event, InvalidationStrategy, Operation};
/// use pgcachewatch::strategies::Greedy;
///
/// let mut on_deletes = Greedy::with_predicate(|e: &Event| e.operation == Operation::Delete);
/// let now = Instant::now();
/// let update = Event::new("ch", Operation::Update, "public", "users");
/// let delete = Event::new("ch", Operation::Delete, "public", "users");
/// assert_eq!(InvalidationStrategy::<u32>::on_event(&mut on_deletes, &update, now), Decision::Nothing);
/// assert_eq!(InvalidationStrategy::<u32>::on_event(&mut on_deletes, &delete, now), Decision::All);
/// ```
pub struct Greedy<P = fn(&Event) -> bool> {
    predicate: P,
}

fn every_event(_: &Event) -> bool {
    true
}

impl Greedy {
    /// Flushes on every event.
    pub fn new() -> Self {
        Greedy {
            predicate: every_event,
        }
    }
}

impl Default for Greedy {
    fn default() -> Self {
        Self::new()
    }
}

impl<P> Greedy<P>
where
    P: Fn(&Event) -> bool + Send + 'static,
{
    /// Flushes on every event for which `predicate` returns `true`.
    pub fn with_predicate(predicate: P) -> Self {
        Greedy { predicate }
    }
}

impl<P> fmt::Debug for Greedy<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Greedy").finish_non_exhaustive()
    }
}

impl<K, P> InvalidationStrategy<K> for Greedy<P>
where
    P: Fn(&Event) -> bool + Send + 'static,
{
    #[inline]
    fn on_event(&mut self, event: &Event, _now: Instant) -> Decision<K> {
        Decision::all_if((self.predicate)(event))
    }

    fn reads_clock(&self) -> bool {
        false
    }
}
