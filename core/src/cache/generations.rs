//! Generation counters: the mechanism behind the staleness guarantee.
//!
//! Every load is stamped with the generations current when it *started*. An
//! invalidation bumps generations. An entry or an in-flight load whose stamp is
//! older than a current generation it depends on is stale: a miss, never served.
//! Invalidate-all is a single atomic increment.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::event::TableRef;

/// The generation counters of one cache.
#[derive(Debug, Default)]
pub(crate) struct Generations {
    /// Bumped by invalidate-all.
    all: AtomicU64,
    /// Bumped by invalidate-all and by every table invalidation: entries loaded
    /// without tags depend on every table.
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

/// A table's counter and its value when a load started.
type TableStamp = (Arc<AtomicU64>, u64);

/// The generations a load depended on when it started.
#[derive(Debug, Clone)]
pub(crate) struct Stamp {
    /// `untagged` for untagged loads, `all` for tagged ones.
    gen: u64,
    /// `all` when the load started (tells a flush from an invalidation).
    all: u64,
    /// For tagged loads: each table's counter and its value at the start.
    tags: Option<Arc<[TableStamp]>>,
}

impl Generations {
    /// Stamps a load that starts now and depends on `tags` (none: every table).
    pub(crate) fn stamp(&self, tags: &[TableRef]) -> Stamp {
        if tags.is_empty() {
            // `untagged` first: a flush bumps `all` before `untagged`, so this order
            // never pairs a new `untagged` with an old `all`.
            let gen = self.untagged.load(Ordering::Acquire);
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
        match &stamp.tags {
            None => stamp.gen == self.untagged.load(Ordering::Acquire),
            Some(tags) => {
                stamp.gen == self.all.load(Ordering::Acquire)
                    && tags.iter().all(|(c, v)| c.load(Ordering::Acquire) == *v)
            }
        }
    }

    /// Whether a stamp that is no longer current died in a flush (rather than in
    /// an invalidation of its key's tables).
    pub(crate) fn flushed_since(&self, stamp: &Stamp) -> bool {
        stamp.all != self.all.load(Ordering::Acquire)
    }

    /// Invalidates everything.
    pub(crate) fn bump_all(&self) {
        self.all.fetch_add(1, Ordering::AcqRel);
        self.untagged.fetch_add(1, Ordering::AcqRel);
    }

    /// Invalidates entries depending on any of `tables` (and every untagged entry).
    pub(crate) fn bump_tables(&self, tables: &[TableRef]) {
        self.untagged.fetch_add(1, Ordering::AcqRel);
        let map = self.tables.read();
        for t in tables {
            if let Some(c) = map.get(&t.table) {
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
        let g = Generations::default();
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
    fn untagged_stamps_die_on_any_invalidation() {
        let g = Generations::default();
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
        let g = Generations::default();
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
