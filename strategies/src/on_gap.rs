//! [`OnGap`]: override how a strategy answers a gap.

use std::fmt;
use std::time::Instant;

use pgcachewatch_core::{Decision, Event, GapReason, InvalidationStrategy};

/// Keeps the cache on some or all gaps instead of flushing it, for applications
/// that deliberately accept stale data after lost events.
///
/// Every built-in strategy answers a gap with [`Decision::All`], because after a
/// gap any row may have changed unnoticed. `OnGap` changes that: a gap its
/// predicate selects is **not forwarded** to the inner strategy (whose pending
/// state is kept, and still fires) and answers [`Decision::Nothing`]; other gaps
/// are forwarded as usual. For anything more specific, implement
/// [`InvalidationStrategy::on_gap`] on your own strategy.
///
/// ```text
/// OnGap::keep_if(Greedy, malformed payload)
///
/// signals:  e1   gap(malformed)   gap(reconnected)
/// flushes:  ▼                     ▼
/// ```
///
/// # Example
///
/// ```
/// use std::time::Instant;
/// use pgcachewatch::{Decision, GapReason, InvalidationStrategy};
/// use pgcachewatch::strategies::{Greedy, OnGap};
///
/// let mut s = OnGap::keep_if(Greedy::new(), |r: &GapReason| matches!(r, GapReason::MalformedPayload));
/// let now = Instant::now();
/// assert_eq!(InvalidationStrategy::<u32>::on_gap(&mut s, &GapReason::MalformedPayload, now), Decision::Nothing);
/// assert_eq!(InvalidationStrategy::<u32>::on_gap(&mut s, &GapReason::Reconnected, now), Decision::All);
///
/// let mut never_flush = OnGap::keep(Greedy::new());
/// assert_eq!(InvalidationStrategy::<u32>::on_gap(&mut never_flush, &GapReason::Reconnected, now), Decision::Nothing);
/// ```
pub struct OnGap<S, P = fn(&GapReason) -> bool> {
    inner: S,
    keep: P,
}

fn every_gap(_: &GapReason) -> bool {
    true
}

impl<S> OnGap<S> {
    /// Keeps the cache on every gap. Reads may then stay stale indefinitely after
    /// a lost event: use only where that is acceptable.
    pub fn keep(inner: S) -> Self {
        OnGap {
            inner,
            keep: every_gap,
        }
    }
}

impl<S, P> OnGap<S, P>
where
    P: Fn(&GapReason) -> bool + Send + 'static,
{
    /// Keeps the cache on the gaps for which `keep` returns `true`; forwards the others.
    pub fn keep_if(inner: S, keep: P) -> Self {
        OnGap { inner, keep }
    }

    /// The wrapped strategy.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: fmt::Debug, P> fmt::Debug for OnGap<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnGap")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<K, S, P> InvalidationStrategy<K> for OnGap<S, P>
where
    S: InvalidationStrategy<K>,
    P: Fn(&GapReason) -> bool + Send + 'static,
{
    #[inline]
    fn on_event(&mut self, event: &Event, now: Instant) -> Decision<K> {
        self.inner.on_event(event, now)
    }

    fn on_gap(&mut self, reason: &GapReason, now: Instant) -> Decision<K> {
        if (self.keep)(reason) {
            Decision::Nothing
        } else {
            self.inner.on_gap(reason, now)
        }
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
    use std::time::Duration;

    use super::*;
    use crate::Windowed;
    use pgcachewatch_core::Operation;

    #[test]
    fn a_kept_gap_leaves_pending_work_in_place() {
        let t0 = Instant::now();
        let mut s = OnGap::keep(Windowed::new(5, Duration::from_secs(1)));
        let e = Event::new("ch", Operation::Insert, "public", "t");
        assert_eq!(
            InvalidationStrategy::<u32>::on_event(&mut s, &e, t0),
            Decision::Nothing
        );
        assert_eq!(
            InvalidationStrategy::<u32>::on_gap(&mut s, &GapReason::Reconnected, t0),
            Decision::Nothing
        );
        let deadline = InvalidationStrategy::<u32>::next_deadline(&s);
        assert_eq!(deadline, Some(t0 + Duration::from_secs(1)));
        assert_eq!(
            InvalidationStrategy::<u32>::on_tick(&mut s, t0 + Duration::from_secs(1)),
            Decision::All
        );
    }
}
