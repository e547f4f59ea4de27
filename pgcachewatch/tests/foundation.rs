//! The foundation's promises, end to end on the in-memory source:
//! fan-out, the stale-set race, single-flight, lag → gap → flush, bypass while unhealthy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgcachewatch::memory::InMemorySource;
use pgcachewatch::strategies::Greedy;
use pgcachewatch::{
    Cache, Decision, Dispatcher, Error, Event, EventSource, GapReason, Health, InvalidationTarget,
    Operation, Signal, TableRef,
};
use pgcachewatch_testkit::scenarios::{self, LoadGate};
use tokio::sync::oneshot;

fn update(table: &str) -> Event {
    Event::new("pgcachewatch", Operation::Update, "public", table)
}

async fn load(cache: &Cache<u32, String>, key: u32, value: &str) -> String {
    let value = value.to_owned();
    cache
        .get_or_load(key, || async move { Ok::<_, std::io::Error>(value) })
        .await
        .expect("loader cannot fail")
}

/// Starts `get_or_load_tagged(key, ["users"])` whose loader returns `value` once
/// `release` is sent; returns when the load is running.
async fn start_gated_load(
    cache: &Cache<u32, String>,
    key: u32,
    value: &'static str,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<String, Error>>,
) {
    let (release, gate) = oneshot::channel::<()>();
    let loading = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load_tagged(key, &["users"], || async move {
                    let _ = gate.await;
                    Ok::<_, std::io::Error>(value.to_string())
                })
                .await
        })
    };
    while cache.stats().loads == 0 {
        tokio::task::yield_now().await;
    }
    (release, loading)
}

/// A read through `get_or_load_tagged(key, ["users"])` whose loader is `gate`'s:
/// the reader the shared scenarios drive (the `#[cached]` tests drive theirs).
fn tagged_reader(
    cache: &Cache<u32, String>,
    gate: &LoadGate,
) -> impl Fn(u32) -> futures::future::BoxFuture<'static, Result<String, Error>> {
    let (cache, gate) = (cache.clone(), gate.clone());
    move |key| {
        let (cache, gate) = (cache.clone(), gate.clone());
        Box::pin(async move {
            cache
                .get_or_load_tagged(key, &["users"], || async move { gate.load().await })
                .await
        })
    }
}

#[tokio::test]
async fn two_caches_on_one_source_both_invalidate_on_one_event() {
    let (source, handle) = InMemorySource::pair();
    let a: Cache<u32, String> = Cache::new(100);
    let b: Cache<u32, String> = Cache::new(100);
    let c: Cache<u32, String> = Cache::new(100);
    // Two caches on one (inline) dispatcher, and a third on a dispatcher of its
    // own reading a subscription.
    let d1 = Dispatcher::new()
        .attach(Greedy::new(), a.clone())
        .attach(Greedy::new(), b.clone())
        .spawn(&source);
    let d2 = Dispatcher::new()
        .attach(Greedy::new(), c.clone())
        .spawn_subscribed(&source);
    assert!(d1.is_inline() && !d2.is_inline());
    for cache in [&a, &b, &c] {
        load(cache, 1, "old").await;
        assert_eq!(cache.get(&1).as_deref(), Some("old"));
    }
    assert!(handle.publish(update("users")));
    d1.sync().await;
    d2.sync().await;
    for cache in [&a, &b, &c] {
        assert_eq!(
            cache.get(&1),
            None,
            "a cache kept its entry after the event"
        );
        assert_eq!(load(cache, 1, "new").await, "new");
    }
    assert_eq!((handle.inline_count(), handle.subscriber_count()), (1, 1));
    d1.shutdown().await;
    d2.shutdown().await;
    assert_eq!(
        (handle.inline_count(), handle.subscriber_count()),
        (0, 0),
        "dispatchers leaked"
    );
}

/// A load starts, an invalidation arrives, the load finishes: the loader's caller
/// gets its value, but it is not stored and the next read reloads.
#[tokio::test]
async fn stale_set_race_is_closed_for_key_table_and_all_invalidations() {
    let invalidations: [(&str, Decision<u32>); 4] = [
        ("key", Decision::keys([7])),
        (
            "table",
            Decision::tables([TableRef::new("public", "users")]),
        ),
        ("all", Decision::All),
        (
            "key and table",
            Decision::keys([7]).merge(Decision::tables([TableRef::unqualified("users")])),
        ),
    ];
    let cache: Cache<u32, String> = Cache::new(100);
    let gate = LoadGate::new();
    let read = tagged_reader(&cache, &gate);
    for (_name, decision) in invalidations {
        scenarios::stale_set_race(&cache, &gate, &read, decision).await;
    }
}

#[tokio::test]
async fn invalidating_another_key_or_table_keeps_a_load_in_flight() {
    let cache: Cache<u32, String> = Cache::new(100);
    let (release, loading) = start_gated_load(&cache, 7, "v").await;
    cache.apply(&Decision::keys([8]));
    cache.apply(&Decision::tables([TableRef::new("public", "orders")]));
    release.send(()).expect("loader is waiting");
    loading.await.expect("no panic").expect("loader ok");
    assert_eq!(cache.get(&7).as_deref(), Some("v"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_flight_runs_the_loader_once_for_concurrent_misses() {
    let cache: Cache<u32, String> = Cache::new(100);
    let gate = LoadGate::new();
    scenarios::single_flight(&cache, &gate, &tagged_reader(&cache, &gate), 64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_error_reaches_every_waiter_and_is_not_cached() {
    let cache: Cache<u32, String> = Cache::new(100);
    let gate = LoadGate::new();
    let read = tagged_reader(&cache, &gate);
    scenarios::error_shared_not_cached(&cache, &gate, &read, 32).await;
    // `get_or_load` shares the loader's own error inside `Error::Load`.
    gate.reset("unused");
    gate.set_outcome(Err("still down"));
    gate.set_open(true);
    cache.invalidate_all();
    let err = read(scenarios::KEY).await.expect_err("the loader fails");
    let own = err
        .load_error()
        .and_then(|e| e.downcast_ref::<scenarios::GateError>())
        .expect("the loader's own error type");
    assert_eq!(own.0, "still down");
}

#[tokio::test]
async fn a_cancelled_leader_hands_the_load_to_a_waiter() {
    let cache: Cache<u32, String> = Cache::new(100);
    let leader = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load(1, || async {
                    std::future::pending::<()>().await;
                    Ok::<_, std::io::Error>("never".to_string())
                })
                .await
        })
    };
    while cache.stats().loads == 0 {
        tokio::task::yield_now().await;
    }
    let waiter = {
        let cache = cache.clone();
        tokio::spawn(async move { load(&cache, 1, "from the waiter").await })
    };
    while cache.stats().misses < 2 {
        tokio::task::yield_now().await;
    }
    leader.abort();
    assert_eq!(waiter.await.expect("no panic"), "from the waiter");
    assert_eq!(cache.get(&1).as_deref(), Some("from the waiter"));
}

/// A dispatcher on a subscription, on one thread so it cannot read while we
/// publish: it must lag. (An inline dispatcher cannot lag.)
#[tokio::test(flavor = "current_thread")]
async fn a_lagging_subscriber_gets_a_gap_and_its_cache_is_flushed() {
    let (source, handle) = InMemorySource::with_capacity(16);
    let cache: Cache<u32, String> = Cache::new(100);
    // A strategy that never invalidates on events: only the gap can flush.
    let never = Greedy::with_predicate(|_: &Event| false);
    let dispatcher = Dispatcher::new()
        .attach(never, cache.clone())
        .spawn_subscribed(&source);
    load(&cache, 1, "cached").await;
    dispatcher.sync().await;
    for _ in 0..1_000 {
        handle.publish(update("users"));
    }
    dispatcher.sync().await;
    assert_eq!(cache.get(&1), None, "lag must flush");
    assert!(dispatcher.stats().gaps >= 1);
    assert!(cache.stats().flushes >= 1);
    // And caching resumes.
    load(&cache, 1, "fresh").await;
    assert_eq!(cache.get(&1).as_deref(), Some("fresh"));
    dispatcher.shutdown().await;
}

/// Nobody reads a subscription while 1 M events go by: the source keeps at most
/// `capacity` of them, and the reader is told exactly how many it missed.
#[tokio::test(flavor = "current_thread")]
async fn memory_stays_bounded_while_nobody_reads() {
    const CAPACITY: usize = 1024;
    const EVENTS: u64 = 1_000_000;
    let (source, handle) = InMemorySource::with_capacity(CAPACITY);
    let mut idle = source.subscribe();
    let event = update("users");
    for _ in 0..EVENTS {
        handle.publish(event.clone());
    }
    assert!(matches!(
        idle.recv().await,
        Some(Signal::Health(Health::Healthy))
    ));
    match idle.recv().await {
        Some(Signal::Gap(GapReason::Lagged { missed })) => {
            assert_eq!(
                missed,
                EVENTS - CAPACITY as u64,
                "buffer held more than its capacity"
            );
        }
        other => panic!("expected a lag gap, got {other:?}"),
    }
    // After a lag, the subscriber is told the current health (it may have missed a change).
    assert!(matches!(
        idle.try_recv(),
        Ok(Signal::Health(Health::Healthy))
    ));
    let mut buffered = 0;
    while idle.try_recv().is_ok() {
        buffered += 1;
    }
    assert_eq!(buffered, CAPACITY);
}

#[tokio::test]
async fn an_unhealthy_source_makes_reads_bypass_until_reconnect_and_flush() {
    let (source, handle) = InMemorySource::pair();
    let cache: Cache<u32, String> = Cache::new(100);
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    load(&cache, 1, "before").await;
    assert_eq!(cache.get(&1).as_deref(), Some("before"));

    handle.disconnect("test cut the connection");
    dispatcher.sync().await;
    assert!(!cache.is_healthy());
    let runs = Arc::new(AtomicUsize::new(0));
    for i in 0..3 {
        let runs = runs.clone();
        let v = cache
            .get_or_load(1, || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(format!("during {i}"))
            })
            .await
            .expect("loader ok");
        assert_eq!(
            v,
            format!("during {i}"),
            "served from the cache while unhealthy"
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "every read must reach the loader"
    );
    assert_eq!(cache.stats().bypasses, 3);
    // A write while disconnected is lost, as with PostgreSQL...
    assert!(!handle.publish(update("users")));

    handle.reconnect();
    dispatcher.sync().await;
    assert!(cache.is_healthy());
    // ...but the reconnect gap flushed what was cached before the outage.
    assert_eq!(cache.get(&1), None);
    load(&cache, 1, "after").await;
    assert_eq!(cache.get(&1).as_deref(), Some("after"), "caching resumes");
    dispatcher.shutdown().await;
}

#[tokio::test]
async fn a_cache_bypasses_once_its_dispatcher_stops() {
    let (source, handle) = InMemorySource::pair();
    let cache: Cache<u32, String> = Cache::new(100);
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    load(&cache, 1, "cached").await;
    handle.close();
    // The source ended: nobody will invalidate this cache any more.
    while !dispatcher.is_finished() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(!cache.is_healthy());
    assert_eq!(cache.get(&1), None);
}

#[tokio::test]
async fn boxed_and_shared_sources_drive_dispatchers_too() {
    let (source, handle) = InMemorySource::pair();
    let boxed: Box<dyn EventSource> = Box::new(source.clone());
    let shared: Arc<dyn EventSource> = Arc::new(source);
    let a: Cache<u32, String> = Cache::new(10);
    let b: Cache<u32, String> = Cache::new(10);
    let da = Dispatcher::new()
        .attach(Greedy::new(), a.clone())
        .spawn(&boxed);
    let db = Dispatcher::new()
        .attach(Greedy::new(), b.clone())
        .spawn(&shared);
    load(&a, 1, "x").await;
    load(&b, 1, "x").await;
    handle.publish(update("t"));
    da.sync().await;
    db.sync().await;
    assert_eq!((a.get(&1), b.get(&1)), (None, None));
}

/// Inline dispatch: the cache is invalidated by the time `publish` returns, before
/// any subscriber has even seen the event.
#[tokio::test]
async fn an_inline_dispatcher_invalidates_before_publish_returns() {
    let (source, handle) = InMemorySource::pair();
    let cache: Cache<u32, String> = Cache::new(10);
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    assert!(dispatcher.is_inline());
    load(&cache, 1, "old").await;
    handle.publish(update("users"));
    assert_eq!(
        cache.get(&1),
        None,
        "no sync, no yield: already invalidated"
    );
    handle.disconnect("cut");
    assert!(!cache.is_healthy(), "health is applied inline too");
    handle.reconnect();
    assert!(cache.is_healthy());
    drop(dispatcher);
    assert!(
        !cache.is_healthy(),
        "a dropped dispatcher leaves its cache bypassing"
    );
    assert_eq!(handle.inline_count(), 0);
}
