//! [`Route`]: a strategy per table.

use std::fmt;
use std::time::Instant;

use pgcachewatch_core::{Decision, Event, GapReason, InvalidationStrategy, TableRef};

use crate::any_of::{tick_due, BoxedStrategy};
use crate::table::{event_is_about, IntoTableRef};

/// Sends each event to the strategy of its table, so each table gets its own
/// policy: row-level for `users`, batched for `orders`, greedy for the rest.
///
/// An event goes to **every** route whose table it matches (usually one; an event
/// without a schema matches `"public.users"` and `"audit.users"` alike, and both
/// must hear of it). An event that matches no route goes to the
/// [`otherwise`](Route::otherwise) strategy, or, without one, drops nothing: name
/// every table the cache depends on, or set `otherwise`.
///
/// Gaps go to every strategy (they flush; with no strategy at all the answer is
/// still [`Decision::All`]). Ticks go to the strategies whose deadline has come; the
/// deadline is the earliest of them.
///
/// ```text
/// Route: users -> Greedy, orders -> Windowed(2, W), otherwise -> Nothing
///
/// events:   users  orders  audit  orders  users
/// flushes:  ▼                     ▼       ▼
/// ```
///
/// # Example
///
/// ```
/// use std::time::{Duration, Instant};
/// use pgcachewatch::{Decision, Event, InvalidationStrategy, Operation};
/// use pgcachewatch::strategies::{Greedy, Route, Windowed};
///
/// let mut s: Route<u32> = Route::new()
///     .table("public.users", Greedy::new())
///     .table("orders", Windowed::new(2, Duration::from_secs(1)));
/// let now = Instant::now();
/// let ev = |t: &str| Event::new("ch", Operation::Update, "public", t);
/// assert_eq!(s.on_event(&ev("users"), now), Decision::All);
/// assert_eq!(s.on_event(&ev("orders"), now), Decision::Nothing);
/// assert_eq!(s.on_event(&ev("audit"), now), Decision::Nothing); // no route, no otherwise
/// assert_eq!(s.on_event(&ev("orders"), now), Decision::All);
/// ```
pub struct Route<K> {
    routes: Vec<(TableRef, BoxedStrategy<K>)>,
    otherwise: Option<BoxedStrategy<K>>,
}

impl<K: 'static> Route<K> {
    /// No routes yet.
    pub fn new() -> Self {
        Route {
            routes: Vec::new(),
            otherwise: None,
        }
    }

    /// Sends events about `table` (`"schema.table"`, or `"table"` for any schema)
    /// to `strategy`.
    pub fn table(
        mut self,
        table: impl IntoTableRef,
        strategy: impl InvalidationStrategy<K>,
    ) -> Self {
        self.routes
            .push((table.into_table_ref(), Box::new(strategy)));
        self
    }

    /// Sends events that match no route to `strategy` (replacing any earlier one).
    pub fn otherwise(mut self, strategy: impl InvalidationStrategy<K>) -> Self {
        self.otherwise = Some(Box::new(strategy));
        self
    }

    fn all_mut(&mut self) -> impl Iterator<Item = &mut BoxedStrategy<K>> {
        self.routes
            .iter_mut()
            .map(|(_, s)| s)
            .chain(self.otherwise.as_mut())
    }
}

impl<K: 'static> Default for Route<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K> fmt::Debug for Route<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (table, strategy) in &self.routes {
            map.entry(&format_args!("{table}"), strategy);
        }
        if let Some(otherwise) = &self.otherwise {
            map.entry(&format_args!("otherwise"), otherwise);
        }
        map.finish()
    }
}

impl<K: 'static> InvalidationStrategy<K> for Route<K> {
    fn on_event(&mut self, event: &Event, now: Instant) -> Decision<K> {
        let mut routed = false;
        let mut decision = Decision::Nothing;
        for (table, strategy) in &mut self.routes {
            if event_is_about(event, table) {
                routed = true;
                decision = decision.merge(strategy.on_event(event, now));
            }
        }
        match &mut self.otherwise {
            Some(otherwise) if !routed => otherwise.on_event(event, now),
            _ => decision,
        }
    }

    fn on_gap(&mut self, reason: &GapReason, now: Instant) -> Decision<K> {
        let mut any = false;
        let decision = self.all_mut().fold(Decision::Nothing, |acc, s| {
            any = true;
            acc.merge(s.on_gap(reason, now))
        });
        if any {
            decision
        } else {
            Decision::All
        }
    }

    fn on_tick(&mut self, now: Instant) -> Decision<K> {
        tick_due(self.all_mut(), now)
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.routes
            .iter()
            .map(|(_, s)| s)
            .chain(self.otherwise.as_ref())
            .filter_map(|s| s.next_deadline())
            .min()
    }

    fn reads_clock(&self) -> bool {
        self.routes
            .iter()
            .map(|(_, s)| s)
            .chain(self.otherwise.as_ref())
            .any(|s| s.reads_clock())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{Greedy, Timed};
    use pgcachewatch_core::Operation;

    fn ev(schema: Option<&str>, table: &str) -> Event {
        let mut e = Event::new("ch", Operation::Update, "x", table);
        e.schema = schema.map(Into::into);
        e
    }

    #[test]
    fn unrouted_events_go_to_otherwise() {
        let mut s: Route<u32> = Route::new()
            .table("public.users", Timed::new(Duration::from_secs(1)))
            .otherwise(Greedy::new());
        let now = Instant::now();
        assert_eq!(s.on_event(&ev(Some("public"), "users"), now), Decision::All);
        assert_eq!(
            s.on_event(&ev(Some("public"), "users"), now),
            Decision::Nothing,
            "Timed defers the second"
        );
        assert_eq!(s.on_event(&ev(Some("audit"), "users"), now), Decision::All);
        assert_eq!(s.next_deadline(), Some(now + Duration::from_secs(1)));
        assert_eq!(s.on_tick(now + Duration::from_secs(1)), Decision::All);
    }

    #[test]
    fn a_schemaless_event_reaches_every_matching_route() {
        let mut s: Route<u32> = Route::new()
            .table("public.users", Timed::new(Duration::from_secs(1)))
            .table("audit.users", Timed::new(Duration::from_secs(1)));
        let now = Instant::now();
        assert_eq!(s.on_event(&ev(Some("public"), "users"), now), Decision::All);
        assert_eq!(
            s.on_event(&ev(None, "users"), now),
            Decision::All,
            "audit.users's Timed fires, public.users's defers"
        );
    }

    #[test]
    fn gaps_reach_everyone_and_empty_routes_still_flush() {
        let now = Instant::now();
        let mut s: Route<u32> = Route::new();
        assert_eq!(s.on_gap(&GapReason::Reconnected, now), Decision::All);
        assert_eq!(s.on_event(&ev(None, "t"), now), Decision::Nothing);
        let mut s: Route<u32> = Route::new()
            .table("a", Timed::new(Duration::from_secs(1)))
            .otherwise(Timed::new(Duration::from_secs(1)));
        s.on_event(&ev(None, "a"), now);
        s.on_event(&ev(None, "a"), now);
        s.on_event(&ev(None, "b"), now);
        s.on_event(&ev(None, "b"), now);
        assert!(s.next_deadline().is_some());
        assert_eq!(s.on_gap(&GapReason::Reconnected, now), Decision::All);
        assert_eq!(s.next_deadline(), None, "the gap reset every child");
    }
}
