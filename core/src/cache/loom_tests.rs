//! Interleaving model tests (loom) of the load / invalidate / store protocol
//! (see `load.rs`), on the real cache code: flight shards, detached and replaced
//! flights, generations. Run them as `crate::sync` says.
//!
//! Each model has a loader thread that leads a load — it reads a one-row table,
//! then publishes — racing a writer that commits a new version and applies its
//! invalidation. Whatever the interleaving, once both are done, a read through
//! the cache must not return the old version. A planted bug (publishing without
//! the protocol's checks) proves the models can fail.

use std::sync::Arc;

use loom::sync::atomic::{AtomicU64, Ordering};

use super::load::Role;
use super::Cache;
use crate::strategy::Decision;
use crate::InvalidationTarget;

/// How the writer's invalidation arrives.
#[derive(Clone, Copy, Debug)]
enum Invalidation {
    Key,
    All,
}

/// Leads a load of key 1 reading `table`, then publishes it — through the real
/// protocol, or (`planted`) storing without its checks.
fn load(cache: &Cache<u32, u64>, table: &AtomicU64, may_join: bool, planted: bool) {
    let Role::Lead(flight) = cache.join_or_lead(&1, &[], may_join, true) else {
        return; // a hit, or joined another load: nothing to publish
    };
    let value = table.load(Ordering::SeqCst);
    if planted {
        let entry = cache.new_entry(value, flight.stamp.clone(), flight.started_at);
        cache.store_entry(1, entry);
        flight.finish(Ok(value));
    } else {
        cache.finish(&1, &flight, Ok(value));
    }
}

fn write(cache: &Cache<u32, u64>, table: &AtomicU64, how: Invalidation) {
    table.store(1, Ordering::SeqCst);
    match how {
        Invalidation::Key => cache.apply(&Decision::keys([1])),
        Invalidation::All => cache.apply(&Decision::All),
    }
}

fn model(how: Invalidation, second_loader: bool, planted: bool) {
    loom::model(move || {
        let cache: Cache<u32, u64> = Cache::new(8);
        let table = Arc::new(AtomicU64::new(0));
        let loader = {
            let (cache, table) = (cache.clone(), table.clone());
            loom::thread::spawn(move || load(&cache, &table, true, planted))
        };
        let second = second_loader.then(|| {
            let (cache, table) = (cache.clone(), table.clone());
            // May not join: it replaces the first flight in the table.
            loom::thread::spawn(move || load(&cache, &table, false, planted))
        });
        write(&cache, &table, how);
        loader.join().expect("loader");
        if let Some(second) = second {
            second.join().expect("second loader");
        }
        let seen = cache.get(&1);
        assert!(
            seen != Some(0),
            "stale: v0 served after v1's invalidation ({how:?})"
        );
    });
}

#[test]
fn loom_a_key_invalidation_racing_a_load_never_leaves_it_stale() {
    model(Invalidation::Key, false, false);
}

#[test]
fn loom_a_flush_racing_a_load_never_leaves_it_stale() {
    model(Invalidation::All, false, false);
}

#[test]
fn loom_a_replaced_flight_never_stores_after_a_key_invalidation() {
    model(Invalidation::Key, true, false);
}

#[test]
fn loom_catches_the_planted_unchecked_store() {
    let caught = std::panic::catch_unwind(|| model(Invalidation::Key, false, true));
    assert!(
        caught.is_err(),
        "the model did not catch a store that skips the protocol's checks"
    );
}
