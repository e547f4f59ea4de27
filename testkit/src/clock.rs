//! [`VirtualClock`]: time that moves only when told to.

use std::time::{Duration, Instant};

/// A clock for pure strategies: a fixed base [`Instant`] plus an offset that only
/// [`advance`](Self::advance) and [`advance_to`](Self::advance_to) change.
///
/// Strategies take `now` as an argument (ARCHITECTURE.md, decision 5: pure strategies, injected clock), so a replay or a
/// model checker hands them `clock.now()` and decides itself how fast time flows:
/// a day of recorded traffic replays in milliseconds, and a test is deterministic.
/// The clock never goes backwards.
///
/// ```
/// use std::time::Duration;
/// use pgcachewatch::testkit::clock::VirtualClock;
///
/// let mut clock = VirtualClock::new();
/// let t0 = clock.now();
/// clock.advance(Duration::from_secs(60));
/// assert_eq!(clock.now() - t0, Duration::from_secs(60));
/// clock.advance_to(t0); // the past: ignored
/// assert_eq!(clock.elapsed(), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtualClock {
    base: Instant,
    offset: Duration,
}

impl Default for VirtualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtualClock {
    /// A clock whose base is the real `Instant::now()`, at offset zero.
    pub fn new() -> Self {
        Self::starting_at(Instant::now())
    }

    /// A clock whose base is `base`, at offset zero.
    pub fn starting_at(base: Instant) -> Self {
        VirtualClock {
            base,
            offset: Duration::ZERO,
        }
    }

    /// The base instant (offset zero).
    pub fn base(&self) -> Instant {
        self.base
    }

    /// The current virtual instant: base + offset.
    pub fn now(&self) -> Instant {
        self.base + self.offset
    }

    /// The offset from the base.
    pub fn elapsed(&self) -> Duration {
        self.offset
    }

    /// Moves time forward by `by`.
    pub fn advance(&mut self, by: Duration) {
        self.offset += by;
    }

    /// Moves time forward to `at`; an instant in the past changes nothing.
    pub fn advance_to(&mut self, at: Instant) {
        let offset = at.saturating_duration_since(self.base);
        self.offset = self.offset.max(offset);
    }

    /// Moves time forward to `offset` from the base; an earlier offset changes nothing.
    pub fn advance_to_offset(&mut self, offset: Duration) {
        self.offset = self.offset.max(offset);
    }
}
