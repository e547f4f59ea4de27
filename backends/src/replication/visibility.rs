//! When a streamed commit is visible to other sessions. No I/O.
//!
//! PostgreSQL writes and flushes a commit record, and a logical walsender may
//! decode and stream it, *before* the committing backend leaves the proc array.
//! Until it does, a new snapshot in any other session still sees the old rows.
//! A source that invalidated on receipt would let a load that starts after the
//! invalidation read the old row and store it, and the cache's generation check
//! cannot tell (the load started after the bump). So the source holds each
//! commit until a snapshot taken after its receipt shows it as visible.
//!
//! A [`Snapshot`] is the text of `pg_current_snapshot()` (`xmin:xmax:xip,…`,
//! 64-bit transaction ids). pgoutput's `Begin` carries the 32-bit xid; it is
//! widened against the snapshot's `xmax` (PostgreSQL keeps every live xid
//! within 2³¹ of the next one, so the nearest 64-bit id with those low bits is
//! the one). Visibility is monotonic: once one snapshot sees a transaction, every
//! later snapshot does, so a snapshot that saw it answers for good.

use std::fmt;

/// A parsed `pg_current_snapshot()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// Every transaction below it is finished.
    xmin: u64,
    /// No transaction at or above it is finished.
    xmax: u64,
    /// Transactions in between still in progress.
    xip: Vec<u64>,
}

/// A snapshot text PostgreSQL would not print.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable pg_current_snapshot() text {0:?}: expected xmin:xmax:xip,…")]
pub(crate) struct BadSnapshot(pub(crate) String);

impl Snapshot {
    /// Parses `xmin:xmax:xip1,xip2,…` (the list may be empty).
    pub(crate) fn parse(text: &str) -> Result<Snapshot, BadSnapshot> {
        let bad = || BadSnapshot(text.chars().take(200).collect());
        let mut parts = text.trim().splitn(3, ':');
        let number = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok()).ok_or_else(bad);
        let xmin = number(parts.next())?;
        let xmax = number(parts.next())?;
        let list = parts.next().ok_or_else(bad)?;
        let xip = if list.is_empty() {
            Vec::new()
        } else {
            list.split(',')
                .map(|x| x.parse::<u64>().map_err(|_| bad()))
                .collect::<Result<Vec<_>, _>>()?
        };
        if xmin > xmax || xip.iter().any(|x| *x < xmin || *x >= xmax) {
            return Err(bad());
        }
        Ok(Snapshot { xmin, xmax, xip })
    }

    /// The 64-bit id of the 32-bit `xid`, near this snapshot's `xmax`.
    pub(crate) fn widen(&self, xid: u32) -> u64 {
        // Truncation intended: the low 32 bits of xmax, and the signed distance.
        let delta = i64::from(xid.wrapping_sub(self.xmax as u32) as i32);
        self.xmax.saturating_add_signed(delta)
    }

    /// Whether a transaction with 32-bit id `xid` is visible to this snapshot
    /// (`pg_visible_in_snapshot`), i.e. finished when it was taken.
    pub(crate) fn sees(&self, xid: u32) -> bool {
        let full = self.widen(xid);
        full < self.xmin || (full < self.xmax && self.xip.binary_search(&full).is_err())
    }

    /// Sorts the in-progress list (PostgreSQL prints it sorted; this makes
    /// [`sees`](Self::sees) independent of that).
    pub(crate) fn normalized(mut self) -> Snapshot {
        self.xip.sort_unstable();
        self.xip.dedup();
        self
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, x) in self.xip.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn snap(text: &str) -> Snapshot {
        Snapshot::parse(text).unwrap().normalized()
    }

    #[test]
    fn in_progress_and_future_transactions_are_not_visible() {
        let s = snap("100:105:100,103");
        assert!(s.sees(99), "below xmin: finished");
        assert!(!s.sees(100), "in progress");
        assert!(s.sees(101));
        assert!(s.sees(102));
        assert!(!s.sees(103), "in progress");
        assert!(s.sees(104));
        assert!(!s.sees(105), "at xmax: not finished when taken");
        assert!(!s.sees(106), "above xmax");
    }

    #[test]
    fn xids_are_widened_across_an_epoch_boundary() {
        // xmax in epoch 1 just after the wrap; an xid of epoch 0's end.
        let base = 1u64 << 32;
        let s = snap(&format!("{}:{}:", base - 10, base + 5));
        assert_eq!(s.widen(u32::MAX - 2), base - 3);
        assert!(s.sees(u32::MAX - 2));
        assert_eq!(s.widen(7), base + 7);
        assert!(!s.sees(7), "just above xmax, in the new epoch");
        assert!(s.sees(4));
    }

    #[test]
    fn text_postgres_would_not_print_is_refused() {
        for bad in ["", "1", "1:2", "x:2:", "5:4:", "1:5:7", "1:5:0", "1:5:a"] {
            assert!(Snapshot::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(snap("3:9:4,6").to_string(), "3:9:4,6");
    }

    proptest! {
        /// Against the definition on 64-bit ids: widening the low 32 bits of
        /// any xid within 2^31 of xmax gives it back, and `sees` agrees with
        /// "finished before xmax and not listed".
        #[test]
        fn sees_matches_the_definition(
            xmin in 0u64..(1u64 << 40),
            span in 0u64..1000,
            offsets in proptest::collection::vec(0u64..1000, 0..8),
            probe in -3000i64..3000,
        ) {
            let xmax = xmin + span;
            let xip: Vec<u64> = offsets.iter().map(|o| xmin + o % span.max(1)).filter(|x| *x < xmax).collect();
            let text = format!(
                "{xmin}:{xmax}:{}",
                xip.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
            );
            let s = Snapshot::parse(&text).unwrap().normalized();
            let full = xmax.saturating_add_signed(probe);
            prop_assume!(full > 0);
            let xid = full as u32;
            prop_assert_eq!(s.widen(xid), full);
            let expected = full < xmin || (full < xmax && !xip.contains(&full));
            prop_assert_eq!(s.sees(xid), expected, "snapshot {} xid {}", text, full);
        }
    }
}
