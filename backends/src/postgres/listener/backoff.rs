//! Capped exponential backoff with jitter, for reconnect attempts.

use std::time::Duration;

use rand::Rng;

/// Delays between reconnect attempts: `min · 2ⁿ`, capped at `max`, with "equal
/// jitter" (a random point in the upper half of the delay) so that many
/// processes cut off by the same failure do not reconnect in lock-step.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The delay before the next attempt; each call doubles the next one, up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let jitter_nanos = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rand::thread_rng().gen_range(0..=jitter_nanos))
    }

    /// The un-jittered delay of the next attempt.
    fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_stays_in_the_upper_half() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let mut b = Backoff::new(min, max);
        let ceilings = [100, 200, 400, 800, 1600, 2000, 2000];
        for ms in ceilings {
            let ceiling = Duration::from_millis(ms);
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
        for _ in 0..100 {
            assert!(b.next_delay() <= max);
        }
    }

    #[test]
    fn max_below_min_is_raised_to_min() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_millis(10));
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_millis(50));
        }
    }
}
