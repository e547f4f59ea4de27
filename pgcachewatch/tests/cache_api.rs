//! The cache API users expect from moka / quick_cache — typed loader errors,
//! `Option` loads, insert / remove / contains_key / entry_count, time-to-idle, a
//! weigher and an eviction listener — each keeping the generation guarantee.
//! (The stale-set race through every loading method and through insert / remove
//! is the property in `stale_set_property.rs`.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgcachewatch::{Cache, Decision, InvalidationTarget, RemovalCause, TableRef};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error, PartialEq)]
enum AppError {
    #[error("row {0} not found")]
    NotFound(u32),
}

#[tokio::test]
async fn try_get_with_shares_one_typed_error_and_caches_nothing() {
    let cache: Cache<u32, String> = Cache::new(16);
    let runs = Arc::new(AtomicUsize::new(0));
    let (release, gate) = tokio::sync::watch::channel(false);
    let mut callers = Vec::new();
    for _ in 0..4 {
        let (cache, runs, mut gate) = (cache.clone(), runs.clone(), gate.clone());
        callers.push(tokio::spawn(async move {
            cache
                .try_get_with(9, || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.wait_for(|open| *open).await;
                    Err::<String, _>(AppError::NotFound(9))
                })
                .await
        }));
    }
    while runs.load(Ordering::SeqCst) == 0 || cache.stats().misses < 4 {
        tokio::task::yield_now().await;
    }
    release.send(true).expect("callers wait");
    let mut errors = Vec::new();
    for c in callers {
        errors.push(c.await.expect("task").expect_err("the loader fails"));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "single flight");
    assert!(errors.iter().all(|e| **e == AppError::NotFound(9)));
    assert!(
        errors.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])),
        "every waiter gets the same Arc<E>"
    );
    assert_eq!(cache.get(&9), None, "an error was cached");
    assert_eq!(cache.stats().load_errors, 1);
}

#[tokio::test]
async fn optionally_get_with_caches_nothing_on_none() {
    let cache: Cache<u32, String> = Cache::new(16);
    assert_eq!(cache.optionally_get_with(1, || async { None }).await, None);
    assert!(!cache.contains_key(&1));
    assert_eq!(cache.entry_count(), 0);
    let v = cache
        .optionally_get_with(1, || async { Some("ann".to_string()) })
        .await;
    assert_eq!(v.as_deref(), Some("ann"));
    assert_eq!(cache.get(&1).as_deref(), Some("ann"));
}

#[tokio::test]
async fn insert_detaches_an_older_load_in_flight() {
    let cache: Cache<u32, u32> = Cache::new(16);
    let (release, gate) = oneshot::channel::<()>();
    let old = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load(1, || async move {
                    let _ = gate.await;
                    Ok::<_, std::io::Error>(1) // read before the write below
                })
                .await
        })
    };
    while cache.stats().loads == 0 {
        tokio::task::yield_now().await;
    }
    cache.insert(1, 2); // the writer's fresh value
    release.send(()).expect("the load waits");
    assert_eq!(old.await.expect("task").expect("loads"), 1);
    assert_eq!(
        cache.get(&1),
        Some(2),
        "the older load overwrote the insert"
    );
}

#[tokio::test]
async fn remove_returns_fresh_values_only() {
    let cache: Cache<u32, u32> = Cache::new(16);
    cache.insert(1, 10);
    assert_eq!(cache.entry_count(), 1);
    assert_eq!(cache.remove(&1), Some(10));
    assert_eq!(cache.remove(&1), None);
    cache.insert(2, 20);
    cache.invalidate_all();
    assert!(!cache.contains_key(&2));
    assert_eq!(
        cache.remove(&2),
        None,
        "a flushed value came back from remove"
    );
}

#[tokio::test]
async fn time_to_idle_drops_entries_nobody_reads() {
    let tti = Duration::from_millis(60);
    let cache: Cache<u32, u32> = Cache::builder().time_to_idle(tti).build();
    cache.insert(1, 1);
    cache.insert(2, 2);
    // Key 1 is read more often than the idle time; key 2 is not.
    for _ in 0..6 {
        tokio::time::sleep(tti / 3).await;
        assert_eq!(
            cache.get(&1),
            Some(1),
            "a key read within its idle time expired"
        );
    }
    assert_eq!(cache.get(&2), None, "an idle key was served");
}

#[tokio::test]
async fn a_weigher_bounds_the_total_weight() {
    let cache: Cache<u32, Vec<u8>> = Cache::builder()
        .capacity(100)
        .weigher(1_000, |_k: &u32, v: &Vec<u8>| v.len() as u64)
        .build();
    for k in 0..50 {
        cache.insert(k, vec![0; 100]);
    }
    assert!(cache.weighted_size() <= 1_000, "{}", cache.weighted_size());
    assert!(cache.entry_count() <= 10);
}

#[tokio::test]
async fn the_eviction_listener_is_told_why() {
    let seen: Arc<Mutex<Vec<(u32, u32, RemovalCause)>>> = Arc::default();
    let log = seen.clone();
    let cache: Cache<u32, u32> = Cache::builder()
        .capacity(100)
        .time_to_live(Duration::from_millis(30))
        .eviction_listener(move |k: &u32, v, cause| log.lock().unwrap().push((*k, v, cause)))
        .build();
    let take = || std::mem::take(&mut *seen.lock().unwrap());

    cache.insert(1, 10);
    cache.insert(1, 11);
    assert_eq!(take(), vec![(1, 10, RemovalCause::Replaced)]);

    cache.apply(&Decision::keys([1]));
    assert_eq!(take(), vec![(1, 11, RemovalCause::Invalidated)]);

    cache.insert(2, 20);
    cache.apply(&Decision::tables([TableRef::new("public", "t")]));
    assert_eq!(
        take(),
        vec![],
        "table invalidations are O(1): told on the next lookup"
    );
    assert_eq!(cache.get(&2), None);
    assert_eq!(take(), vec![(2, 20, RemovalCause::Invalidated)]);

    cache.insert(3, 30);
    cache.apply(&Decision::All);
    assert_eq!(cache.get(&3), None);
    assert_eq!(take(), vec![(3, 30, RemovalCause::Flushed)]);

    cache.insert(4, 40);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(cache.get(&4), None);
    assert_eq!(take(), vec![(4, 40, RemovalCause::Expired)]);

    cache.insert(5, 50);
    assert_eq!(cache.remove(&5), Some(50));
    assert_eq!(take(), vec![(5, 50, RemovalCause::Explicit)]);
}

#[tokio::test]
async fn the_eviction_listener_hears_size_evictions() {
    let evicted = Arc::new(AtomicUsize::new(0));
    let count = evicted.clone();
    let cache: Cache<u32, u32> = Cache::builder()
        .capacity(10)
        .eviction_listener(move |_k: &u32, _v, cause| {
            if cause == RemovalCause::Size {
                count.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build();
    for k in 0..100 {
        cache.insert(k, k);
    }
    assert!(cache.entry_count() <= 10);
    assert!(
        evicted.load(Ordering::SeqCst) >= 80,
        "{}",
        evicted.load(Ordering::SeqCst)
    );
}
