//! [`Windowed`]: batch invalidations, by count or by time.

use std::fmt;
use std::time::{Duration, Instant};

use pgcachewatch_core::{Decision, Event, GapReason, InvalidationStrategy};

/// Drops the whole cache once per batch of matching events: after `max_events`
/// of them, or once `window` has passed since the first of them, whichever comes
/// first. This is what PGCacheWatch's documentation describes for its `Windowed`
/// strategy (its code does something else, offered here as
/// [`Sequence`](crate::Sequence)).
///
/// Use it for write-heavy tables whose readers tolerate a bounded delay: a storm
/// of N writes costs one reload instead of N.
///
/// ```text
/// max_events = 3, window = W
///
/// events:   e1  e2  e3      e4              e5
///           |<-- count 3 -->|<----- W ----->|
/// flushes:          ▼                      ▼ (on_tick at e4 + W)
/// ```
///
/// # Guarantee
///
/// Every matching event is covered by a flush issued no later than `window` after
/// it (given that `on_tick` is called at [`next_deadline`](InvalidationStrategy::next_deadline)),
/// and no later than the `max_events`-th matching event counted from it. Any event
/// (matching or not) arriving after the deadline flushes at once, so a late tick
/// never delays a flush past the next event.
///
/// A gap answers [`Decision::All`] and forgets the pending batch (the flush covers it).
///
/// # Example
///
/// ```
/// use std::time::{Duration, Instant};
/// use pgcachewatch::{Decision, Event, InvalidationStrategy, Operation};
/// use pgcachewatch::strategies::Windowed;
///
/// let mut w = Windowed::new(3, Duration::from_secs(1));
/// let t0 = Instant::now();
/// let e = Event::new("ch", Operation::Update, "public", "users");
/// let mut on_event = |at| InvalidationStrategy::<u32>::on_event(&mut w, &e, at);
/// assert_eq!(on_event(t0), Decision::Nothing);
/// assert_eq!(on_event(t0), Decision::Nothing);
/// assert_eq!(on_event(t0), Decision::All); // third event: count reached
///
/// // One event, then the window closes:
/// assert_eq!(InvalidationStrategy::<u32>::on_event(&mut w, &e, t0), Decision::Nothing);
/// let deadline = InvalidationStrategy::<u32>::next_deadline(&w).unwrap();
/// assert_eq!(deadline, t0 + Duration::from_secs(1));
/// assert_eq!(InvalidationStrategy::<u32>::on_tick(&mut w, deadline), Decision::All);
/// assert_eq!(InvalidationStrategy::<u32>::next_deadline(&w), None);
/// ```
pub struct Windowed<P = fn(&Event) -> bool> {
    max_events: usize,
    window: Duration,
    predicate: P,
    pending: Option<Batch>,
}

/// The matching events not yet covered by a flush.
#[derive(Debug, Clone, Copy)]
struct Batch {
    /// When the window closes (`None`: never, the window overflowed `Instant`).
    closes_at: Option<Instant>,
    count: usize,
}

fn every_event(_: &Event) -> bool {
    true
}

impl Windowed {
    /// Flushes after `max_events` events or `window` after the first unflushed
    /// one. A `max_events` of 0 is taken as 1 (flush on every event).
    pub fn new(max_events: usize, window: Duration) -> Self {
        Self::with_predicate(max_events, window, every_event)
    }
}

impl<P> Windowed<P>
where
    P: Fn(&Event) -> bool + Send + 'static,
{
    /// Like [`Windowed::new`], counting only events for which `predicate` is true
    /// (for example a [`TableFilter`](crate::TableFilter)'s
    /// [`into_predicate`](crate::TableFilter::into_predicate)).
    pub fn with_predicate(max_events: usize, window: Duration, predicate: P) -> Self {
        Windowed {
            max_events: max_events.max(1),
            window,
            predicate,
            pending: None,
        }
    }

    /// The count that triggers a flush.
    pub fn max_events(&self) -> usize {
        self.max_events
    }

    /// The longest an event waits for its flush.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// How many matching events are waiting for a flush.
    pub fn pending(&self) -> usize {
        self.pending.map_or(0, |b| b.count)
    }

    fn overdue(&self, now: Instant) -> bool {
        self.pending
            .and_then(|b| b.closes_at)
            .is_some_and(|closes_at| closes_at <= now)
    }

    fn flush<K>(&mut self) -> Decision<K> {
        self.pending = None;
        Decision::All
    }
}

impl<P> fmt::Debug for Windowed<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Windowed")
            .field("max_events", &self.max_events)
            .field("window", &self.window)
            .field("pending", &self.pending.map_or(0, |b| b.count))
            .finish_non_exhaustive()
    }
}

impl<K, P> InvalidationStrategy<K> for Windowed<P>
where
    P: Fn(&Event) -> bool + Send + 'static,
{
    fn on_event(&mut self, event: &Event, now: Instant) -> Decision<K> {
        if self.overdue(now) {
            // The tick came late; this flush also covers `event`.
            return self.flush();
        }
        if !(self.predicate)(event) {
            return Decision::Nothing;
        }
        let batch = self.pending.get_or_insert(Batch {
            closes_at: now.checked_add(self.window),
            count: 0,
        });
        batch.count += 1;
        if batch.count >= self.max_events || batch.closes_at.is_some_and(|c| c <= now) {
            self.flush()
        } else {
            Decision::Nothing
        }
    }

    fn on_gap(&mut self, _reason: &GapReason, _now: Instant) -> Decision<K> {
        self.flush()
    }

    fn on_tick(&mut self, now: Instant) -> Decision<K> {
        if self.overdue(now) {
            self.flush()
        } else {
            Decision::Nothing
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.pending.and_then(|b| b.closes_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgcachewatch_core::Operation;

    fn ev(op: Operation) -> Event {
        Event::new("ch", op, "public", "t")
    }

    fn on_event<P>(w: &mut Windowed<P>, op: Operation, at: Instant) -> Decision<u32>
    where
        P: Fn(&Event) -> bool + Send + 'static,
    {
        w.on_event(&ev(op), at)
    }

    #[test]
    fn flushes_after_max_events_then_starts_a_new_batch() {
        let t0 = Instant::now();
        let mut w = Windowed::new(2, Duration::from_secs(10));
        assert_eq!(on_event(&mut w, Operation::Insert, t0), Decision::Nothing);
        assert_eq!(w.pending(), 1);
        assert_eq!(on_event(&mut w, Operation::Insert, t0), Decision::All);
        assert_eq!(w.pending(), 0);
        assert_eq!(InvalidationStrategy::<u32>::next_deadline(&w), None);
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(on_event(&mut w, Operation::Insert, t1), Decision::Nothing);
        assert_eq!(
            InvalidationStrategy::<u32>::next_deadline(&w),
            Some(t1 + Duration::from_secs(10)),
            "the window starts at the first unflushed event"
        );
    }

    #[test]
    fn window_expiry_fires_on_tick_not_before() {
        let t0 = Instant::now();
        let win = Duration::from_millis(100);
        let mut w = Windowed::new(100, win);
        on_event(&mut w, Operation::Update, t0);
        on_event(&mut w, Operation::Update, t0 + Duration::from_millis(50));
        assert_eq!(
            InvalidationStrategy::<u32>::next_deadline(&w),
            Some(t0 + win),
            "the second event does not move the deadline"
        );
        assert_eq!(
            InvalidationStrategy::<u32>::on_tick(&mut w, t0 + Duration::from_millis(99)),
            Decision::Nothing,
            "an early tick is harmless"
        );
        assert_eq!(w.pending(), 2);
        assert_eq!(
            InvalidationStrategy::<u32>::on_tick(&mut w, t0 + win),
            Decision::All
        );
        assert_eq!(InvalidationStrategy::<u32>::next_deadline(&w), None);
    }

    #[test]
    fn an_event_after_a_missed_deadline_flushes_at_once() {
        let t0 = Instant::now();
        let mut w = Windowed::with_predicate(100, Duration::from_millis(10), |e: &Event| {
            e.operation == Operation::Delete
        });
        on_event(&mut w, Operation::Delete, t0);
        // Not matching, but the window is over: flush now rather than wait for a tick.
        assert_eq!(
            on_event(&mut w, Operation::Insert, t0 + Duration::from_millis(10)),
            Decision::All
        );
        assert_eq!(w.pending(), 0);
    }

    #[test]
    fn non_matching_events_are_not_counted() {
        let t0 = Instant::now();
        let mut w = Windowed::with_predicate(2, Duration::from_secs(1), |e: &Event| {
            e.operation == Operation::Delete
        });
        assert_eq!(on_event(&mut w, Operation::Insert, t0), Decision::Nothing);
        assert_eq!(InvalidationStrategy::<u32>::next_deadline(&w), None);
        assert_eq!(on_event(&mut w, Operation::Delete, t0), Decision::Nothing);
        assert_eq!(on_event(&mut w, Operation::Insert, t0), Decision::Nothing);
        assert_eq!(on_event(&mut w, Operation::Delete, t0), Decision::All);
    }

    #[test]
    fn gap_flushes_and_resets() {
        let t0 = Instant::now();
        let mut w = Windowed::new(3, Duration::from_secs(1));
        on_event(&mut w, Operation::Insert, t0);
        on_event(&mut w, Operation::Insert, t0);
        assert_eq!(
            InvalidationStrategy::<u32>::on_gap(&mut w, &GapReason::Reconnected, t0),
            Decision::All
        );
        assert_eq!(InvalidationStrategy::<u32>::next_deadline(&w), None);
        assert_eq!(on_event(&mut w, Operation::Insert, t0), Decision::Nothing);
        assert_eq!(on_event(&mut w, Operation::Insert, t0), Decision::Nothing);
    }

    #[test]
    fn zero_max_events_and_zero_window_flush_every_event() {
        let t0 = Instant::now();
        let mut w = Windowed::new(0, Duration::from_secs(1));
        assert_eq!(w.max_events(), 1);
        assert_eq!(on_event(&mut w, Operation::Insert, t0), Decision::All);
        let mut w = Windowed::new(5, Duration::ZERO);
        assert_eq!(on_event(&mut w, Operation::Insert, t0), Decision::All);
    }

    #[test]
    fn a_huge_window_never_overflows() {
        let t0 = Instant::now();
        let mut w = Windowed::new(2, Duration::MAX);
        assert_eq!(on_event(&mut w, Operation::Insert, t0), Decision::Nothing);
        assert_eq!(InvalidationStrategy::<u32>::next_deadline(&w), None);
        assert_eq!(on_event(&mut w, Operation::Insert, t0), Decision::All);
    }
}
