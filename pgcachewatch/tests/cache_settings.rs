//! Capacity, time-to-live, the unhealthy policies and statistics.

use std::time::Duration;

use pgcachewatch::{Cache, InvalidationTarget, WhileUnhealthy};

async fn load(cache: &Cache<u32, u32>, key: u32, value: u32) -> u32 {
    cache
        .get_or_load(key, || async move { Ok::<_, std::io::Error>(value) })
        .await
        .expect("loader cannot fail")
}

#[tokio::test]
async fn capacity_bounds_the_number_of_entries() {
    let cache: Cache<u32, u32> = Cache::new(100);
    for k in 0..10_000 {
        load(&cache, k, k).await;
    }
    let entries = cache.stats().entries;
    assert!(entries <= 100, "{entries} entries in a cache of 100");
    assert!(entries > 0);
}

#[tokio::test]
async fn entries_older_than_the_ttl_are_reloaded() {
    let cache: Cache<u32, u32> = Cache::builder()
        .time_to_live(Duration::from_millis(30))
        .build();
    load(&cache, 1, 1).await;
    assert_eq!(cache.get(&1), Some(1));
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(cache.get(&1), None, "an expired entry was served");
    assert_eq!(load(&cache, 1, 2).await, 2);
}

#[tokio::test]
async fn serve_within_bound_serves_recent_entries_while_unhealthy() {
    let cache: Cache<u32, u32> = Cache::builder()
        .while_unhealthy(WhileUnhealthy::ServeWithin(Duration::from_millis(40)))
        .build();
    load(&cache, 1, 1).await;
    // A feeding dispatcher's vote says the source is unhealthy.
    let vote = cache.health_vote();
    vote.set(false);
    assert_eq!(
        cache.get(&1),
        Some(1),
        "a fresh entry within the bound is served"
    );
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(
        cache.get(&1),
        None,
        "an entry older than the bound was served while unhealthy"
    );
    // A miss while unhealthy loads (and may store: the reconnect flush drops it).
    assert_eq!(load(&cache, 1, 2).await, 2);
    assert_eq!(cache.get(&1), Some(2));
    assert_eq!(cache.stats().bypasses, 0);
}

#[tokio::test]
async fn bypass_stores_nothing_while_unhealthy() {
    let cache: Cache<u32, u32> = Cache::new(10);
    let vote = cache.health_vote();
    vote.set(false);
    assert_eq!(load(&cache, 1, 1).await, 1);
    assert_eq!(cache.stats().entries, 0);
    vote.set(true);
    assert_eq!(cache.get(&1), None);
}

#[tokio::test]
async fn statistics_count_what_happened() {
    let cache: Cache<u32, u32> = Cache::new(10);
    load(&cache, 1, 1).await; // miss + load
    load(&cache, 1, 1).await; // hit
    cache.invalidate(&1);
    cache.invalidate_all();
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.loads), (1, 1, 1));
    assert_eq!((s.invalidations, s.flushes), (1, 1));
}
