//! [`Timed`]: at most one invalidation per interval, and none lost.

use std::fmt;
use std::time::{Duration, Instant};

use pgcachewatch_core::{Decision, Event, GapReason, InvalidationStrategy};

/// Drops the whole cache at most once per `interval`, without ever losing an event.
///
/// On a matching event: if no flush happened within the last `interval`, flush now
/// and start a new interval; otherwise remember the event and flush when the
/// interval ends (through [`next_deadline`](InvalidationStrategy::next_deadline) and
/// [`on_tick`](InvalidationStrategy::on_tick)). A flush at the interval's end starts
/// the next interval.
///
/// PGCacheWatch's `Timed` drops an event that arrives inside the interval, so the
/// cache can stay stale until the next write, however late that comes. Here such
/// an event is deferred, not dropped.
///
/// ```text
/// interval = I
///
/// events:   e1   e2  e3              e4
///           |<---- I ---->|<---- I ---->|
/// flushes:  ▼             ▼             ▼
///           (e1 at once)  (e2, e3 at the interval's end)
///                                       (e4 at the next interval's end)
/// ```
///
/// # Guarantees
///
/// * Every matching event is covered by a flush no later than `interval` after it
///   (given that `on_tick` is called at `next_deadline`; any event arriving after a
///   missed deadline flushes at once).
/// * Two flushes caused by events or ticks are never closer than `interval`. A gap
///   flushes at once regardless, and counts as the interval's flush.
///
/// # Example
///
/// ```
/// use std::time::{Duration, Instant};
/// use pgcachewatch::{Decision, Event, InvalidationStrategy, Operation};
/// use pgcachewatch::strategies::Timed;
///
/// let second = Duration::from_secs(1);
/// let mut t = Timed::new(second);
/// let e = Event::new("ch", Operation::Update, "public", "users");
/// let t0 = Instant::now();
/// assert_eq!(InvalidationStrategy::<u32>::on_event(&mut t, &e, t0), Decision::All);
/// // Inside the interval: deferred to its end, not dropped.
/// let t1 = t0 + Duration::from_millis(200);
/// assert_eq!(InvalidationStrategy::<u32>::on_event(&mut t, &e, t1), Decision::Nothing);
/// assert_eq!(InvalidationStrategy::<u32>::next_deadline(&t), Some(t0 + second));
/// assert_eq!(InvalidationStrategy::<u32>::on_tick(&mut t, t0 + second), Decision::All);
/// assert_eq!(InvalidationStrategy::<u32>::next_deadline(&t), None);
/// ```
pub struct Timed<P = fn(&Event) -> bool> {
    interval: Duration,
    predicate: P,
    last_flush: Option<Instant>,
    pending: bool,
}

fn every_event(_: &Event) -> bool {
    true
}

impl Timed {
    /// Flushes at most once per `interval`, deferring events inside it to its end.
    pub fn new(interval: Duration) -> Self {
        Self::with_predicate(interval, every_event)
    }
}

impl<P> Timed<P>
where
    P: Fn(&Event) -> bool + Send + 'static,
{
    /// Like [`Timed::new`], reacting only to events for which `predicate` is true.
    pub fn with_predicate(interval: Duration, predicate: P) -> Self {
        Timed {
            interval,
            predicate,
            last_flush: None,
            pending: false,
        }
    }

    /// The minimum time between two flushes.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Whether an event is waiting for the end of the interval.
    pub fn is_pending(&self) -> bool {
        self.pending
    }

    /// When the current interval ends (`None`: no interval running, or it never ends).
    fn interval_end(&self) -> Option<Instant> {
        self.last_flush.and_then(|t| t.checked_add(self.interval))
    }

    fn interval_over(&self, now: Instant) -> bool {
        match self.last_flush {
            None => true,
            Some(_) => self.interval_end().is_some_and(|end| end <= now),
        }
    }

    fn flush<K>(&mut self, now: Instant) -> Decision<K> {
        self.last_flush = Some(now);
        self.pending = false;
        Decision::All
    }
}

impl<P> fmt::Debug for Timed<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timed")
            .field("interval", &self.interval)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl<K, P> InvalidationStrategy<K> for Timed<P>
where
    P: Fn(&Event) -> bool + Send + 'static,
{
    fn on_event(&mut self, event: &Event, now: Instant) -> Decision<K> {
        let matching = (self.predicate)(event);
        if !matching && !self.pending {
            return Decision::Nothing;
        }
        if self.interval_over(now) {
            // A matching event with no recent flush, or a pending one whose tick came late.
            self.flush(now)
        } else {
            self.pending = true;
            Decision::Nothing
        }
    }

    fn on_gap(&mut self, _reason: &GapReason, now: Instant) -> Decision<K> {
        self.flush(now)
    }

    fn on_tick(&mut self, now: Instant) -> Decision<K> {
        if self.pending && self.interval_over(now) {
            self.flush(now)
        } else {
            Decision::Nothing
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        if self.pending {
            self.interval_end()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgcachewatch_core::Operation;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn on_event<P>(t: &mut Timed<P>, op: Operation, at: Instant) -> Decision<u32>
    where
        P: Fn(&Event) -> bool + Send + 'static,
    {
        t.on_event(&Event::new("ch", op, "public", "t"), at)
    }

    #[test]
    fn first_event_fires_at_once() {
        let t0 = Instant::now();
        let mut t = Timed::new(ms(100));
        assert_eq!(on_event(&mut t, Operation::Insert, t0), Decision::All);
        assert!(!t.is_pending());
    }

    #[test]
    fn an_event_inside_the_interval_fires_at_its_end() {
        let t0 = Instant::now();
        let mut t = Timed::new(ms(100));
        on_event(&mut t, Operation::Insert, t0);
        assert_eq!(
            on_event(&mut t, Operation::Update, t0 + ms(10)),
            Decision::Nothing
        );
        assert_eq!(
            on_event(&mut t, Operation::Update, t0 + ms(20)),
            Decision::Nothing
        );
        assert!(t.is_pending());
        assert_eq!(
            InvalidationStrategy::<u32>::next_deadline(&t),
            Some(t0 + ms(100))
        );
        assert_eq!(
            InvalidationStrategy::<u32>::on_tick(&mut t, t0 + ms(99)),
            Decision::Nothing,
            "early tick is harmless"
        );
        assert_eq!(
            InvalidationStrategy::<u32>::on_tick(&mut t, t0 + ms(100)),
            Decision::All
        );
        // The deferred flush started a new interval.
        assert_eq!(
            on_event(&mut t, Operation::Update, t0 + ms(150)),
            Decision::Nothing
        );
        assert_eq!(
            InvalidationStrategy::<u32>::next_deadline(&t),
            Some(t0 + ms(200))
        );
    }

    #[test]
    fn an_event_after_the_interval_fires_at_once() {
        let t0 = Instant::now();
        let mut t = Timed::new(ms(100));
        on_event(&mut t, Operation::Insert, t0);
        assert_eq!(
            on_event(&mut t, Operation::Insert, t0 + ms(100)),
            Decision::All
        );
        assert_eq!(InvalidationStrategy::<u32>::next_deadline(&t), None);
    }

    #[test]
    fn a_late_tick_is_overtaken_by_the_next_event() {
        let t0 = Instant::now();
        let mut t = Timed::with_predicate(ms(100), |e: &Event| e.operation == Operation::Delete);
        on_event(&mut t, Operation::Delete, t0);
        on_event(&mut t, Operation::Delete, t0 + ms(50));
        // The tick at t0+100 was missed; a non-matching event at t0+130 still flushes.
        assert_eq!(
            on_event(&mut t, Operation::Insert, t0 + ms(130)),
            Decision::All
        );
        assert!(!t.is_pending());
        assert_eq!(
            on_event(&mut t, Operation::Insert, t0 + ms(300)),
            Decision::Nothing,
            "non-matching events alone never flush"
        );
    }

    #[test]
    fn gap_flushes_clears_pending_and_counts_as_the_flush() {
        let t0 = Instant::now();
        let mut t = Timed::new(ms(100));
        on_event(&mut t, Operation::Insert, t0);
        on_event(&mut t, Operation::Insert, t0 + ms(10));
        assert_eq!(
            InvalidationStrategy::<u32>::on_gap(&mut t, &GapReason::HeartbeatTimeout, t0 + ms(20)),
            Decision::All
        );
        assert!(!t.is_pending());
        assert_eq!(InvalidationStrategy::<u32>::next_deadline(&t), None);
        assert_eq!(
            on_event(&mut t, Operation::Insert, t0 + ms(30)),
            Decision::Nothing
        );
        assert_eq!(
            InvalidationStrategy::<u32>::next_deadline(&t),
            Some(t0 + ms(120))
        );
    }
}
