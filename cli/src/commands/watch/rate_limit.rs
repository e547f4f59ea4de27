//! Lines that may come once per signal, printed at most once a second each,
//! with the count of those left out.

use std::time::{Duration, Instant};

/// How often a rate-limited line may be printed.
const INTERVAL: Duration = Duration::from_secs(1);

/// Lets one line through per [`INTERVAL`] and counts the rest.
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(lines suppressed since the last one printed)` if a line may be printed now.
    pub(crate) fn check(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now.duration_since(t) < INTERVAL) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Lines suppressed since the last one printed (for a summary at the end).
    pub(crate) fn pending(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_with_the_count_left_out() {
        let mut limit = RateLimit::default();
        let t = Instant::now();
        assert_eq!(limit.check(t), Some(0));
        for i in 0..5 {
            assert_eq!(limit.check(t + Duration::from_millis(i * 100)), None);
        }
        assert_eq!(limit.pending(), 5);
        assert_eq!(limit.check(t + INTERVAL), Some(5));
        assert_eq!(limit.pending(), 0);
    }
}
