//! When a simulated source announces a committed write: the visibility window.

/// When the checker's sources announce a write, relative to its two moments.
///
/// A committed write has two moments in PostgreSQL: its **commit record** is
/// written (a logical-replication walsender may decode and stream the
/// transaction from then on), and later it becomes **visible** to a new snapshot
/// (the committing backend leaves the proc array). Between the two, a load in
/// another session still reads the old row. The checker's loads read the table
/// as such a new snapshot would, so the order of "event applied" and "write
/// visible" decides whether a load that starts *after* the invalidation can read
/// (and the cache store) the old row: the generation check cannot reject it,
/// since that load started after the bump. Nothing later invalidates the entry,
/// so a healthy cache would serve the old row for ever.
///
/// Only the steps that separate the two moments ([`Op::Commit`] then
/// [`Op::BecomeVisible`]) tell the modes apart: an [`Op::Write`] commits and
/// becomes visible in one step, so schedules written before the window existed
/// mean the same in both.
///
/// The default is [`AnnounceWhenVisible`](Self::AnnounceWhenVisible), the one the
/// guarantee holds under.
///
/// ```
/// use pgcachewatch::testkit::checker::{ModelChecker, Op, Schedule, SourceDelivery};
///
/// let window = Schedule::new(vec![
///     Op::Commit { row: 0 },             // v1's commit record is written ...
///     Op::Deliver { source: 0 },         // ... its event may be applied already ...
///     Op::StartRead { slot: 0, row: 0 }, // ... while a new snapshot still reads v0.
///     Op::FinishLoad { slot: 0 },
/// ]);
/// let on_receipt = ModelChecker::new().delivery(SourceDelivery::AnnounceOnReceipt);
/// let stale = on_receipt.run(&window).unwrap_err();
/// assert!(stale.message.contains("STALE"), "{stale}");
/// // Announced no earlier than visible, the event was not there to apply.
/// assert!(ModelChecker::new().run(&window).is_ok());
/// ```
///
/// [`Op::Commit`]: super::Op::Commit
/// [`Op::BecomeVisible`]: super::Op::BecomeVisible
/// [`Op::Write`]: super::Op::Write
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SourceDelivery {
    /// The event is queued when the commit record is written, so it can reach the
    /// caches while the write is not yet visible: what a replication source that
    /// invalidates on receipt of the commit does. The guarantee does **not** hold:
    /// the checker finds stale reads in this mode.
    AnnounceOnReceipt,
    /// The event is queued when the write becomes visible to a new snapshot, so it
    /// is delivered no earlier than that: what LISTEN/NOTIFY does (a listener
    /// skips notifications of transactions still in progress for its snapshot),
    /// and what a replication source does once it holds each transaction until it
    /// is visible.
    #[default]
    AnnounceWhenVisible,
}

impl SourceDelivery {
    /// Whether the source announces a write at its commit record (`true`) or only
    /// once it is visible (`false`).
    ///
    /// ```
    /// use pgcachewatch::testkit::checker::SourceDelivery;
    /// assert!(SourceDelivery::AnnounceOnReceipt.announces_on_commit());
    /// assert!(!SourceDelivery::default().announces_on_commit());
    /// ```
    pub fn announces_on_commit(self) -> bool {
        matches!(self, SourceDelivery::AnnounceOnReceipt)
    }
}
