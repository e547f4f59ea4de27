//! The strategies behind the real dispatcher, the real cache and the in-memory
//! source: decisions reach the cache as documented, deadlines are honoured.

use std::time::Duration;

use pgcachewatch_backends::InMemorySource;
use pgcachewatch_core::{Cache, Dispatcher, Event, Operation, RowKey};
use pgcachewatch_strategies::{Keyed, OtherTables, Route, Timed};

async fn load(cache: &Cache<u32, String>, key: u32, table: &str) {
    let value = format!("{table}:{key}");
    cache
        .get_or_load_tagged(
            key,
            &[table],
            || async move { Ok::<_, std::io::Error>(value) },
        )
        .await
        .expect("the loader cannot fail");
}

fn row_ids(_: &Event, row: &RowKey) -> Option<u32> {
    row.get("id").and_then(|v| v.as_u64()).map(|id| id as u32)
}

#[tokio::test]
async fn keyed_drops_only_the_changed_rows_then_the_table_then_everything() {
    let (source, handle) = InMemorySource::pair();
    let cache: Cache<u32, String> = Cache::new(100);
    let strategy = Keyed::per_table()
        .table("public.users", row_ids)
        .other_tables(OtherTables::Table);
    let dispatcher = Dispatcher::new()
        .attach(strategy, cache.clone())
        .spawn(&source);

    for id in [1, 2] {
        load(&cache, id, "users").await;
    }
    load(&cache, 50, "orders").await;

    let update = Event::new("ch", Operation::Update, "public", "users")
        .with_keys(vec![RowKey::single("id", 1)]);
    handle.publish(update);
    dispatcher.sync().await;
    assert_eq!(cache.get(&1), None, "the updated row's entry is dropped");
    assert_eq!(cache.get(&2).as_deref(), Some("users:2"), "other rows stay");
    assert_eq!(cache.get(&50).as_deref(), Some("orders:50"));

    // A table without a mapper, no keys: the entries tagged with it go.
    handle.publish(Event::new("ch", Operation::Delete, "public", "orders"));
    dispatcher.sync().await;
    assert_eq!(cache.get(&50), None);
    assert_eq!(cache.get(&2).as_deref(), Some("users:2"));

    // PGCacheWatch's payload carries no keys: the whole users table goes.
    load(&cache, 1, "users").await;
    let mut legacy = Event::new("ch", Operation::Update, "", "users");
    legacy.schema = None;
    handle.publish(legacy);
    dispatcher.sync().await;
    assert_eq!((cache.get(&1), cache.get(&2)), (None, None));

    // A lost connection is a gap: everything goes.
    load(&cache, 2, "users").await;
    handle.disconnect("test");
    handle.reconnect();
    dispatcher.sync().await;
    assert_eq!(cache.get(&2), None);
    dispatcher.shutdown().await;
}

#[tokio::test]
async fn a_deferred_timed_flush_reaches_the_cache_without_further_events() {
    let (source, handle) = InMemorySource::pair();
    let cache: Cache<u32, String> = Cache::new(100);
    let strategy: Route<u32> =
        Route::new().table("public.users", Timed::new(Duration::from_millis(200)));
    let dispatcher = Dispatcher::new()
        .attach(strategy, cache.clone())
        .spawn(&source);

    let users = || Event::new("ch", Operation::Update, "public", "users");
    handle.publish(users()); // opens the interval
    dispatcher.sync().await;
    load(&cache, 1, "users").await;
    handle.publish(users()); // inside the interval (or just after it, on a slow machine)
    dispatcher.sync().await;

    // No other event comes: the flush must arrive through the deadline alone.
    // Bounded wait, no timing assertion: it must happen, not within a given time.
    let mut gone = false;
    for _ in 0..200 {
        if cache.get(&1).is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(gone, "the deferred event was never flushed");
    assert!(dispatcher.stats().events >= 2);
    dispatcher.shutdown().await;
}
