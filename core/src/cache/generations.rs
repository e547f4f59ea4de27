//! Generation counters: the mechanism behind the staleness guarantee.
//!
//! Every load is stamped with the generations current when it *started*. An
//! invalidation bumps generations. An entry or an in-flight load whose stamp is
//! older than a current generation it depends on is stale: a miss, never served.
//! Invalidate-all is a single atomic increment.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::event::TableRef;
use crate::sync::AtomicU64;

/// The generation counters of one cache.
#[derive(Debug)]
pub(crate) struct Generations {
    /// Bumped by invalidate-all.
    all: AtomicU64,
    /// Bumped by invalidate-all and by every table invalidation: entries loaded
    /// without tags depend on every table. Kept as one [`gate`](Self::gate)
    /// word, the generation and the cache's health together.
    untagged: AtomicU64,
    /// One counter per tagged table name (schema ignored: over-invalidation is
    /// safe). Bounded by [`MAX_TAGGED_TABLES`].
    tables: RwLock<HashMap<String, Arc<AtomicU64>>>,
}

/// The most distinct table names a cache keeps counters for. Tags are table
/// names, so real schemas stay far below it; past it (tags built from arbitrary
/// strings) the map is cleared together with an invalidate-all, which keeps every
/// existing stamp honest: they all become stale at once.
pub(crate) const MAX_TAGGED_TABLES: usize = 4096;

/// The low bits of the `untagged` word while the cache is healthy; a plain
/// entry's packed stamp ends in the same bits (see [`plain_word`]).
const HEALTHY: u64 = 0b01;
/// The low bits of the `untagged` word while the cache is unhealthy: no entry's
/// word ends in them (a plain entry's ends in `01`, a pointer's in `00`).
const UNHEALTHY: u64 = 0b11;
/// One generation in the `untagged` word.
const STEP: u64 = 1 << 2;

/// The word an entry without tags, times or identity is packed into: equal to
/// [`Generations::gate`] exactly while its generation is current and the cache
/// is healthy. A generation needs 62 bits: at a billion invalidations a second
/// they last 146 years.
#[inline]
pub(crate) const fn plain_word(gen: u64) -> u64 {
    (gen << 2) | HEALTHY
}

/// The generation a [`plain_word`] (or the `untagged` word) holds.
#[inline]
pub(crate) const fn generation_of(word: u64) -> u64 {
    word >> 2
}

/// A table's counter and its value when a load started.
pub(crate) type TableStamp = (Arc<AtomicU64>, u64);

/// The generations a load depended on when it started.
#[derive(Debug, Clone)]
pub(crate) struct Stamp {
    /// `untagged` for untagged loads, `all` for tagged ones.
    pub(crate) gen: u64,
    /// `all` when the load started (tells a flush from an invalidation).
    pub(crate) all: u64,
    /// For tagged loads: each table's counter and its value at the start.
    pub(crate) tags: Option<Arc<[TableStamp]>>,
}

impl Generations {
    /// Counters at generation zero, for a cache that starts `healthy` or not.
    pub(crate) fn new(healthy: bool) -> Self {
        Generations {
            all: AtomicU64::new(0),
            untagged: AtomicU64::new(if healthy { HEALTHY } else { UNHEALTHY }),
            tables: RwLock::default(),
        }
    }

    /// The hit path's one check: an entry whose packed word equals this is
    /// current and may be served, because the cache is healthy (see
    /// [`plain_word`]). Any other entry takes the full checks.
    #[inline]
    pub(crate) fn gate(&self) -> u64 {
        self.untagged.load(Ordering::Acquire)
    }

    /// Opens (`true`) or closes the [`gate`](Self::gate) as the cache's health
    /// changes. Never moves the generation, so a health flip kills no entry.
    pub(crate) fn set_healthy(&self, healthy: bool) {
        if healthy {
            self.untagged
                .fetch_and(!(UNHEALTHY ^ HEALTHY), Ordering::AcqRel);
        } else {
            self.untagged.fetch_or(UNHEALTHY, Ordering::AcqRel);
        }
    }

    fn untagged_generation(&self) -> u64 {
        generation_of(self.untagged.load(Ordering::Acquire))
    }

    /// Stamps a load that starts now and depends on `tags` (none: every table).
    pub(crate) fn stamp(&self, tags: &[TableRef]) -> Stamp {
        if tags.is_empty() {
            // `untagged` first: a flush bumps `all` before `untagged`, so this order
            // never pairs a new `untagged` with an old `all`.
            let gen = self.untagged_generation();
            return Stamp {
                gen,
                all: self.all.load(Ordering::Acquire),
                tags: None,
            };
        }
        let counters: Vec<TableStamp> = tags
            .iter()
            .map(|t| {
                let counter = self.table_counter(&t.table);
                let value = counter.load(Ordering::Acquire);
                (counter, value)
            })
            .collect();
        let all = self.all.load(Ordering::Acquire);
        Stamp {
            gen: all,
            all,
            tags: Some(counters.into()),
        }
    }

    /// Whether nothing the stamp depends on was invalidated since it was taken.
    #[inline]
    pub(crate) fn is_current(&self, stamp: &Stamp) -> bool {
        self.is_current_parts(stamp.gen, stamp.tags.as_deref())
    }

    /// [`is_current`](Self::is_current) for a stamp kept in parts (an entry keeps
    /// its tags out of line, so an untagged entry is small to clone).
    #[inline]
    pub(crate) fn is_current_parts(&self, gen: u64, tags: Option<&[TableStamp]>) -> bool {
        match tags {
            None => gen == self.untagged_generation(),
            Some(tags) => {
                gen == self.all.load(Ordering::Acquire)
                    && tags.iter().all(|(c, v)| c.load(Ordering::Acquire) == *v)
            }
        }
    }

    /// Whether a stamp that is no longer current died in a flush (rather than in
    /// an invalidation of its key's tables).
    pub(crate) fn flushed_since(&self, all: u64) -> bool {
        all != self.all.load(Ordering::Acquire)
    }

    /// Invalidates everything.
    pub(crate) fn bump_all(&self) {
        self.all.fetch_add(1, Ordering::AcqRel);
        self.untagged.fetch_add(STEP, Ordering::AcqRel);
    }

    /// Invalidates entries depending on any of `tables` (and every untagged entry).
    pub(crate) fn bump_tables(&self, tables: &[TableRef]) {
        self.untagged.fetch_add(STEP, Ordering::AcqRel);
        let map = self.tables.read();
        for t in tables {
            if let Some(c) = map.get(&*t.table) {
                c.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    fn table_counter(&self, table: &str) -> Arc<AtomicU64> {
        if let Some(c) = self.tables.read().get(table) {
            return c.clone();
        }
        let mut map = self.tables.write();
        if map.len() >= MAX_TAGGED_TABLES && !map.contains_key(table) {
            // Counters dropped from the map are never bumped again, so every stamp
            // holding one must die now: invalidate everything, then start over.
            self.bump_all();
            map.clear();
            tracing::warn!(
                limit = MAX_TAGGED_TABLES,
                "more distinct table tags than the limit: flushed the cache and reset its tag counters"
            );
        }
        map.entry(table.to_owned()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_map_is_bounded_and_clearing_it_kills_old_stamps() {
        let g = Generations::new(true);
        let first = g.stamp(&[TableRef::unqualified("t0")]);
        for i in 1..MAX_TAGGED_TABLES {
            let _ = g.stamp(&[TableRef::unqualified(format!("t{i}"))]);
        }
        assert!(g.is_current(&first));
        let _ = g.stamp(&[TableRef::unqualified("one too many")]);
        assert!(g.tables.read().len() <= MAX_TAGGED_TABLES);
        assert!(
            !g.is_current(&first),
            "a stamp survived the reset of its counter"
        );
        // A write to t0 after the reset reaches new stamps.
        let fresh = g.stamp(&[TableRef::unqualified("t0")]);
        g.bump_tables(&[TableRef::unqualified("t0")]);
        assert!(!g.is_current(&fresh));
    }

    #[test]
    fn the_gate_passes_a_current_plain_entry_only_while_healthy() {
        let g = Generations::new(true);
        let word = plain_word(g.stamp(&[]).gen);
        assert_eq!(g.gate(), word);
        g.set_healthy(false);
        assert_ne!(g.gate(), word, "the gate stayed open while unhealthy");
        assert!(
            g.is_current(&Stamp {
                gen: generation_of(word),
                all: 0,
                tags: None
            }),
            "a health flip invalidated an entry"
        );
        g.set_healthy(false);
        g.set_healthy(true);
        assert_eq!(g.gate(), word, "the gate did not reopen");
        g.bump_tables(&[TableRef::unqualified("t")]);
        assert_ne!(g.gate(), word, "an invalidated entry still passes");
        assert_eq!(g.gate(), plain_word(g.stamp(&[]).gen));
        g.bump_all();
        g.set_healthy(false);
        let closed = g.gate();
        assert_eq!(generation_of(closed), g.stamp(&[]).gen);
        // No entry word ends in the closed gate's bits: a plain entry's ends in
        // 01, a pointer's in 00.
        assert_eq!(closed & 0b11, UNHEALTHY);
        assert_eq!(Generations::new(false).gate() & 0b11, UNHEALTHY);
    }

    #[test]
    fn untagged_stamps_die_on_any_invalidation() {
        let g = Generations::new(true);
        let s = g.stamp(&[]);
        assert!(g.is_current(&s));
        g.bump_tables(&[TableRef::unqualified("other")]);
        assert!(!g.is_current(&s));
        let s = g.stamp(&[]);
        g.bump_all();
        assert!(!g.is_current(&s));
    }

    #[test]
    fn tagged_stamps_die_only_on_their_tables_or_all() {
        let g = Generations::new(true);
        let s = g.stamp(&[TableRef::unqualified("users")]);
        g.bump_tables(&[TableRef::new("public", "orders")]);
        assert!(
            g.is_current(&s),
            "unrelated table invalidated a tagged entry"
        );
        g.bump_tables(&[TableRef::new("public", "users")]);
        assert!(!g.is_current(&s));
        let s = g.stamp(&[
            TableRef::unqualified("users"),
            TableRef::new("public", "orders"),
        ]);
        g.bump_all();
        assert!(!g.is_current(&s));
    }
}
