//! The [`InvalidationStrategy`] trait and the [`Decision`] it returns.

use std::fmt;
use std::time::Instant;

use crate::event::{Event, TableRef};
use crate::signal::GapReason;

/// What to drop from a cache.
///
/// Over-invalidation is always safe (it costs a reload); under-invalidation is a
/// stale read. When unsure, a strategy returns [`Decision::All`].
///
/// ```
/// use pgcachewatch::{Decision, TableRef};
/// let d: Decision<u32> = Decision::keys([1, 2]).merge(Decision::tables([TableRef::unqualified("users")]));
/// assert_eq!(d.targets().unwrap().keys, vec![1, 2]);
/// assert_eq!(Decision::<u32>::Nothing.merge(Decision::All), Decision::All);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Decision<K> {
    /// Keep everything.
    #[default]
    Nothing,
    /// Drop everything (O(1) in [`Cache`](crate::Cache)).
    All,
    /// Drop the entries that depend on these tables, and these keys.
    Invalidate(Targets<K>),
}

/// The tables and keys of a [`Decision::Invalidate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets<K> {
    /// Entries that depend on any of these tables are dropped. A cache entry loaded
    /// without table tags depends on every table.
    pub tables: Vec<TableRef>,
    /// Entries with these keys are dropped.
    pub keys: Vec<K>,
}

impl<K> Decision<K> {
    /// Drop these keys (or nothing, if the list is empty).
    pub fn keys(keys: impl IntoIterator<Item = K>) -> Self {
        Self::targets_of(Vec::new(), keys.into_iter().collect())
    }

    /// Drop entries depending on these tables (or nothing, if the list is empty).
    pub fn tables(tables: impl IntoIterator<Item = TableRef>) -> Self {
        Self::targets_of(tables.into_iter().collect(), Vec::new())
    }

    fn targets_of(tables: Vec<TableRef>, keys: Vec<K>) -> Self {
        if tables.is_empty() && keys.is_empty() {
            Decision::Nothing
        } else {
            Decision::Invalidate(Targets { tables, keys })
        }
    }

    /// `All` if `cond`, else `Nothing`.
    pub fn all_if(cond: bool) -> Self {
        if cond {
            Decision::All
        } else {
            Decision::Nothing
        }
    }

    /// Whether this decision drops nothing.
    pub fn is_nothing(&self) -> bool {
        matches!(self, Decision::Nothing)
    }

    /// The targets, for [`Decision::Invalidate`].
    pub fn targets(&self) -> Option<&Targets<K>> {
        match self {
            Decision::Invalidate(t) => Some(t),
            _ => None,
        }
    }

    /// The union of two decisions: `All` absorbs everything, targets concatenate.
    pub fn merge(self, other: Decision<K>) -> Decision<K> {
        match (self, other) {
            (Decision::All, _) | (_, Decision::All) => Decision::All,
            (Decision::Nothing, d) | (d, Decision::Nothing) => d,
            (Decision::Invalidate(mut a), Decision::Invalidate(b)) => {
                a.tables.extend(b.tables);
                a.keys.extend(b.keys);
                Decision::Invalidate(a)
            }
        }
    }

    /// Maps the keys to another key type.
    pub fn map_keys<L>(self, f: impl FnMut(K) -> L) -> Decision<L> {
        match self {
            Decision::Nothing => Decision::Nothing,
            Decision::All => Decision::All,
            Decision::Invalidate(t) => Decision::Invalidate(Targets {
                tables: t.tables,
                keys: t.keys.into_iter().map(f).collect(),
            }),
        }
    }
}

/// Decides, event by event, what a cache must drop.
///
/// `K` is the key type of the cache the decisions are applied to; strategies that
/// only ever drop everything or whole tables implement the trait for every `K`.
///
/// # Contract
///
/// * **Pure and deterministic.** The result depends only on the strategy's state,
///   the input and `now`. No I/O, no clocks, no runtime: the caller passes `now`.
///   That is what lets the testkit replay a recorded log at any speed and let
///   proptest shrink a failure to a few events.
/// * **Gaps flush.** [`on_gap`](Self::on_gap) returns [`Decision::All`] (the
///   default) and resets any pending state, unless the application deliberately
///   accepts stale data.
/// * **Deadlines are honest.** A strategy that defers work returns the instant it
///   wants [`on_tick`](Self::on_tick) from [`next_deadline`](Self::next_deadline); the
///   dispatcher calls `on_tick` at or after that instant. `on_tick` before the
///   deadline must be harmless.
///
/// # Example
///
/// A strategy that drops everything on deletes only:
///
/// ```
/// use std::time::Instant;
/// use pgcachewatch::{Decision, Event, InvalidationStrategy, Operation};
///
/// #[derive(Debug)]
/// struct OnDelete;
///
/// impl<K> InvalidationStrategy<K> for OnDelete {
///     fn on_event(&mut self, event: &Event, _now: Instant) -> Decision<K> {
///         Decision::all_if(event.operation == Operation::Delete)
///     }
/// }
///
/// let mut s = OnDelete;
/// let e = Event::new("ch", Operation::Delete, "public", "t");
/// assert_eq!(InvalidationStrategy::<u32>::on_event(&mut s, &e, Instant::now()), Decision::All);
/// ```
pub trait InvalidationStrategy<K>: Send + fmt::Debug + 'static {
    /// Called for every event, in order.
    fn on_event(&mut self, event: &Event, now: Instant) -> Decision<K>;

    /// Called when events may have been lost. Default: drop everything.
    fn on_gap(&mut self, reason: &GapReason, now: Instant) -> Decision<K> {
        let _ = (reason, now);
        Decision::All
    }

    /// Called at or after [`next_deadline`](Self::next_deadline). Default: nothing.
    fn on_tick(&mut self, now: Instant) -> Decision<K> {
        let _ = now;
        Decision::Nothing
    }

    /// When the strategy next wants [`on_tick`](Self::on_tick), if ever.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    /// Whether the strategy reads the `now` it is given or has deadlines.
    /// Default: `true`.
    ///
    /// A strategy that never looks at the time and never sets a deadline may
    /// return `false` (and must keep returning it). A dispatcher none of whose
    /// strategies reads the clock then does not read it for every event: it
    /// passes the instant of an earlier reading instead (a clock read is a
    /// measurable part of applying an event during a burst).
    ///
    /// ```
    /// use std::time::Instant;
    /// use pgcachewatch::{Decision, Event, InvalidationStrategy};
    ///
    /// #[derive(Debug)]
    /// struct DropAll;
    ///
    /// impl<K> InvalidationStrategy<K> for DropAll {
    ///     fn on_event(&mut self, _: &Event, _: Instant) -> Decision<K> {
    ///         Decision::All
    ///     }
    ///     fn reads_clock(&self) -> bool {
    ///         false
    ///     }
    /// }
    /// assert!(!InvalidationStrategy::<u32>::reads_clock(&DropAll));
    /// ```
    fn reads_clock(&self) -> bool {
        true
    }
}

impl<K, S: InvalidationStrategy<K> + ?Sized> InvalidationStrategy<K> for Box<S> {
    fn on_event(&mut self, event: &Event, now: Instant) -> Decision<K> {
        (**self).on_event(event, now)
    }
    fn on_gap(&mut self, reason: &GapReason, now: Instant) -> Decision<K> {
        (**self).on_gap(reason, now)
    }
    fn on_tick(&mut self, now: Instant) -> Decision<K> {
        (**self).on_tick(now)
    }
    fn next_deadline(&self) -> Option<Instant> {
        (**self).next_deadline()
    }
    fn reads_clock(&self) -> bool {
        (**self).reads_clock()
    }
}
