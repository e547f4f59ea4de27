//! Ways around the staleness guarantee found in review, each closed: a stopped or
//! panicking dispatcher, a replaced flight, schema-qualified tags, attaching,
//! two sources, a lagging subscription, a panicking `Clone`, TTL and joining.
//!
//! Each test asserts the guarantee itself — no stale value served, the cache
//! unhealthy when nothing can vouch for it — against the real cache, dispatcher
//! and in-memory source.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcachewatch::memory::{InMemoryHandle, InMemorySource};
use pgcachewatch::source_kit::{SignalHub, MAX_HUB_CAPACITY};
use pgcachewatch::strategies::Greedy;
use pgcachewatch::{
    Cache, Decision, Dispatcher, Event, EventSource, InvalidationStrategy, InvalidationTarget,
    Operation, Signal, TableRef, WhileUnhealthy,
};
use tokio::sync::oneshot;

/// A one-row "table": its current value, and a write that commits and notifies.
#[derive(Clone, Default)]
struct Row(Arc<AtomicU32>);

impl Row {
    fn value(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }

    /// Commits a new value and publishes its notification.
    fn write(&self, source: &InMemoryHandle, table: &str) -> u32 {
        let v = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        source.publish(Event::new("ch", Operation::Update, "public", table));
        v
    }

    async fn read(&self, cache: &Cache<u32, u32>) -> u32 {
        let row = self.clone();
        cache
            .get_or_load(1, || async move { Ok::<_, std::io::Error>(row.value()) })
            .await
            .expect("the loader cannot fail")
    }
}

/// Gives the runtime a chance to run every ready task (aborts, dispatcher tasks).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

// ---- 1: a dropped task-mode handle ---------------------------------------------

#[tokio::test]
async fn dropping_a_subscribed_dispatcher_handle_makes_its_caches_bypass() {
    let (source, handle) = InMemorySource::pair();
    let cache: Cache<u32, u32> = Cache::new(16);
    let row = Row::default();
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn_subscribed(&source);
    dispatcher.sync().await;
    assert_eq!(row.read(&cache).await, 0);
    assert_eq!(cache.get(&1), Some(0), "cached while fed");

    drop(dispatcher);
    // No yield: the caches must distrust their entries the moment the handle goes.
    assert!(
        !cache.is_healthy(),
        "a cache nothing feeds still says it is healthy"
    );
    row.write(&handle, "t");
    settle().await;
    assert_eq!(
        row.read(&cache).await,
        1,
        "stale value served after the dispatcher stopped"
    );
    assert_eq!(cache.stats().stopped_dispatchers, 1);
}

// ---- 2: a panicking strategy ----------------------------------------------------

/// Greedy, except that it panics on events about table `boom`.
#[derive(Debug)]
struct PanicsOnBoom;

impl InvalidationStrategy<u32> for PanicsOnBoom {
    fn on_event(&mut self, event: &Event, _now: std::time::Instant) -> Decision<u32> {
        assert!(event.table != "boom", "strategy bug on table boom");
        Decision::All
    }
}

async fn panicking_strategy_is_contained(inline: bool) {
    let (source, handle) = InMemorySource::pair();
    let cache: Cache<u32, u32> = Cache::new(16);
    let row = Row::default();
    let builder = Dispatcher::new().attach(PanicsOnBoom, cache.clone());
    let dispatcher = if inline {
        builder.spawn(&source)
    } else {
        builder.spawn_subscribed(&source)
    };
    let mut watcher = source.subscribe();
    dispatcher.sync().await;
    assert_eq!(row.read(&cache).await, 0);

    // The strategy panics on this write's event: the cache is flushed and bypasses.
    row.write(&handle, "boom");
    dispatcher.sync().await;
    assert_eq!(dispatcher.stats().strategy_panics, 1);
    assert!(
        !cache.is_healthy(),
        "a cache whose strategy panicked is trusted"
    );
    assert_eq!(
        row.read(&cache).await,
        1,
        "stale value after a strategy panic"
    );
    assert!(!dispatcher.is_finished(), "one panic ended dispatching");

    // The source goes on (in inline mode the panic happened in its own task).
    assert!(matches!(watcher.recv().await, Some(Signal::Health(_))));
    assert!(matches!(watcher.recv().await, Some(Signal::Event(_))));

    // The next event is handled: the cache trusts its entries again, and later
    // writes are still applied.
    row.write(&handle, "t");
    dispatcher.sync().await;
    assert!(
        cache.is_healthy(),
        "the cache never recovered after the strategy did"
    );
    assert_eq!(row.read(&cache).await, 2);
    assert_eq!(cache.get(&1), Some(2), "caching did not resume");
    row.write(&handle, "t");
    dispatcher.sync().await;
    assert_eq!(
        row.read(&cache).await,
        3,
        "writes after the recovery are not applied"
    );
}

#[tokio::test]
async fn a_panicking_strategy_flushes_and_bypasses_until_it_recovers_inline() {
    panicking_strategy_is_contained(true).await;
}

#[tokio::test]
async fn a_panicking_strategy_flushes_and_bypasses_until_it_recovers_in_a_task() {
    panicking_strategy_is_contained(false).await;
}

// ---- 3: a replaced flight -------------------------------------------------------

/// A `get_or_load(1)` whose loader reads `row` at once and returns once released.
fn gated_load(
    cache: &Cache<u32, u32>,
    row: &Row,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<u32>,
    Arc<AtomicBool>,
) {
    let (release, gate) = oneshot::channel::<()>();
    let started = Arc::new(AtomicBool::new(false));
    let task = {
        let (cache, row, started) = (cache.clone(), row.clone(), started.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(1, || async move {
                    let v = row.value();
                    started.store(true, Ordering::SeqCst);
                    let _ = gate.await;
                    Ok::<_, std::io::Error>(v)
                })
                .await
                .expect("the loader cannot fail")
        })
    };
    (release, task, started)
}

async fn until(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_replaced_flight_is_never_stored_after_a_key_invalidation() {
    let bound = Duration::from_millis(20);
    let cache: Cache<u32, u32> = Cache::builder()
        .while_unhealthy(WhileUnhealthy::ServeWithin(bound))
        .build();
    let vote = cache.health_vote();
    vote.set(false);
    let row = Row::default();

    // An old load reads v0 and stalls past the bound ...
    let (release_old, old, old_started) = gated_load(&cache, &row);
    until(&old_started).await;
    tokio::time::sleep(bound * 2).await;
    // ... so a new reader may not join it and leads a flight of its own.
    let (release_new, new, new_started) = gated_load(&cache, &row);
    until(&new_started).await;
    // A write, and its per-key invalidation.
    row.0.store(1, Ordering::SeqCst);
    cache.apply(&Decision::keys([1]));
    release_old.send(()).expect("the old load waits");
    assert_eq!(old.await.expect("old load"), 0);
    release_new.send(()).expect("the new load waits");
    new.await.expect("new load");

    vote.set(true);
    assert_ne!(
        cache.get(&1),
        Some(0),
        "a load begun before the invalidation was stored and served"
    );
    assert_eq!(row.read(&cache).await, 1);
}

// ---- 4: schema-qualified tags ---------------------------------------------------

#[tokio::test]
async fn a_schema_qualified_or_capitalised_tag_matches_its_table() {
    let cache: Cache<&str, u32> = Cache::new(16);
    for tag in [
        "public.users",
        "Users",
        "PUBLIC.USERS",
        r#""public"."users""#,
    ] {
        cache
            .get_or_load_tagged("n", &[tag], || async { Ok::<_, std::io::Error>(1) })
            .await
            .expect("loads");
        assert_eq!(cache.get(&"n"), Some(1));
        cache.apply(&Decision::tables([TableRef::new("public", "orders")]));
        assert_eq!(
            cache.get(&"n"),
            Some(1),
            "tag {tag}: another table dropped it"
        );
        cache.apply(&Decision::tables([TableRef::new("public", "users")]));
        assert_eq!(
            cache.get(&"n"),
            None,
            "tag {tag} survived a write to its table"
        );
    }
    // A tag that is not a table name depends on every table, never on none.
    cache
        .get_or_load_tagged("n", &["a.b.c"], || async { Ok::<_, std::io::Error>(2) })
        .await
        .expect("loads");
    cache.apply(&Decision::tables([TableRef::new("public", "orders")]));
    assert_eq!(
        cache.get(&"n"),
        None,
        "an invalid tag made the entry immortal"
    );
}

// ---- 5: attaching is a gap ------------------------------------------------------

#[tokio::test]
async fn attaching_a_dispatcher_flushes_what_was_loaded_without_one() {
    let (source, handle) = InMemorySource::pair();
    let cache: Cache<u32, u32> = Cache::builder()
        .while_unhealthy(WhileUnhealthy::ServeWithin(Duration::from_secs(3600)))
        .build();
    let row = Row::default();
    let first = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    first.shutdown().await;
    // Nothing feeds the cache: loads are stored (within the bound) but writes go unseen.
    assert_eq!(row.read(&cache).await, 0);
    row.write(&handle, "t");
    let second = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    assert!(cache.is_healthy());
    assert_eq!(
        row.read(&cache).await,
        1,
        "a value loaded while nothing watched was trusted after attaching"
    );
    drop(second);
}

#[tokio::test]
async fn attaching_flushes_a_standalone_cache_too() {
    let (source, _handle) = InMemorySource::pair();
    let cache: Cache<u32, u32> = Cache::new(16);
    let row = Row::default();
    assert_eq!(row.read(&cache).await, 0);
    row.0.store(5, Ordering::SeqCst); // a write nobody was watching for
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    assert_eq!(row.read(&cache).await, 5);
    drop(dispatcher);
}

// ---- 6: one cache, two sources --------------------------------------------------

#[tokio::test]
async fn a_cache_on_two_sources_is_healthy_only_while_both_are() {
    let (a, a_handle) = InMemorySource::pair();
    let (b, b_handle) = InMemorySource::pair();
    let cache: Cache<u32, u32> = Cache::new(16);
    let row = Row::default();
    let on_a = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&a);
    a_handle.disconnect("simulated");
    // B attaches after A went down: B's health must not overrule A's.
    let on_b = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&b);
    assert!(!cache.is_healthy(), "B's dispatcher overruled A's outage");
    assert_eq!(row.read(&cache).await, 0);
    row.write(&a_handle, "t"); // lost: A is down
    assert_eq!(
        row.read(&cache).await,
        1,
        "stale value while source A is down"
    );

    a_handle.reconnect();
    assert!(cache.is_healthy());
    assert_eq!(row.read(&cache).await, 1);
    assert_eq!(
        cache.get(&1),
        Some(1),
        "caching resumes once both are healthy"
    );

    // One of the two dispatchers stops: the cache bypasses, although B is healthy.
    drop(on_a);
    assert!(!cache.is_healthy());
    row.write(&a_handle, "t");
    assert_eq!(row.read(&cache).await, 2);
    // Attaching to A again takes the stopped one's place.
    let on_a = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&a);
    assert!(cache.is_healthy());
    assert_eq!(cache.stats().dispatchers, 2);
    drop((on_a, on_b, b_handle));
}

/// The hit path checks health and generation in one word: a warm entry must be
/// refused the moment its cache turns unhealthy, before any gap or flush comes
/// (a source says it is unhealthy first, a heartbeat timeout later).
#[tokio::test]
async fn a_warm_entry_is_refused_the_moment_its_cache_turns_unhealthy() {
    let cache: Cache<u32, u32> = Cache::new(16);
    let row = Row::default();
    let vote = cache.health_vote();
    vote.set(true);
    assert_eq!(row.read(&cache).await, 0);
    assert_eq!(cache.get(&1), Some(0), "the entry was not cached");

    vote.set(false);
    assert_eq!(
        cache.get(&1),
        None,
        "a warm entry was served while unhealthy"
    );
    assert!(!cache.contains_key(&1));

    vote.set(true);
    assert_eq!(
        cache.get(&1),
        Some(0),
        "a health flip alone dropped a fresh entry"
    );
    row.0.fetch_add(1, Ordering::SeqCst);
    cache.apply(&Decision::keys([1]));
    assert_eq!(cache.get(&1), None, "an invalidated entry was served");
    assert_eq!(row.read(&cache).await, 1);
    assert_eq!(cache.get(&1), Some(1), "caching did not resume");
}

// ---- 7: a lagging subscription is told the current health -----------------------

#[tokio::test(flavor = "current_thread")]
async fn a_lagging_subscriber_learns_the_source_is_healthy_again() {
    let (source, handle) = InMemorySource::with_capacity(2);
    let cache: Cache<u32, u32> = Cache::new(16);
    let row = Row::default();
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn_subscribed(&source);
    handle.disconnect("simulated");
    dispatcher.sync().await;
    assert!(!cache.is_healthy());
    // Reconnect and flood without yielding: the dispatcher's task falls behind and
    // loses the `Healthy` among what it missed.
    handle.reconnect();
    for _ in 0..10 {
        row.write(&handle, "t");
    }
    dispatcher.sync().await;
    assert!(dispatcher.stats().gaps >= 2, "the dispatcher did not lag");
    assert!(
        cache.is_healthy(),
        "the lag swallowed `Healthy`: bypassing for ever"
    );
    assert_eq!(row.read(&cache).await, 10);
    assert_eq!(cache.get(&1), Some(10));
}

// ---- 9: a panicking Clone, TTL and joining, hub capacity ------------------------

/// A value whose next clone panics once `PANIC_ON_CLONE` is set.
#[derive(Debug)]
struct Fragile(u32);

static PANIC_ON_CLONE: AtomicBool = AtomicBool::new(false);

impl Clone for Fragile {
    fn clone(&self) -> Self {
        assert!(
            !PANIC_ON_CLONE.swap(false, Ordering::SeqCst),
            "clone failed"
        );
        Fragile(self.0)
    }
}

#[tokio::test]
async fn waiters_do_not_hang_when_the_leaders_clone_panics() {
    let cache: Cache<u32, Fragile> = Cache::new(16);
    let (release, gate) = oneshot::channel::<()>();
    let leader = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load(1, || async move {
                    let _ = gate.await;
                    PANIC_ON_CLONE.store(true, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(Fragile(7))
                })
                .await
                .map(|v| v.0)
        })
    };
    while cache.stats().loads == 0 {
        tokio::task::yield_now().await;
    }
    let waiter = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load(1, || async move { Ok::<_, std::io::Error>(Fragile(8)) })
                .await
                .map(|v| v.0)
        })
    };
    settle().await;
    release.send(()).expect("the leader waits");
    assert!(
        leader.await.is_err(),
        "the leader's clone should have panicked"
    );
    let waited = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("a waiter hung after its leader panicked")
        .expect("waiter task");
    assert_eq!(
        waited.expect("loads"),
        8,
        "the waiter retried as the leader"
    );
}

#[tokio::test]
async fn a_read_does_not_join_a_load_older_than_the_ttl() {
    let ttl = Duration::from_millis(20);
    let cache: Cache<u32, u32> = Cache::builder().time_to_live(ttl).build();
    let row = Row::default();
    let (release, old, old_started) = gated_load(&cache, &row);
    until(&old_started).await;
    tokio::time::sleep(ttl * 2).await;
    row.0.store(1, Ordering::SeqCst);
    let started = Instant::now();
    let runs = Arc::new(AtomicUsize::new(0));
    let fresh = {
        let (row, runs) = (row.clone(), runs.clone());
        cache
            .get_or_load(1, || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(row.value())
            })
            .await
            .expect("loads")
    };
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "joined a load older than the TTL"
    );
    assert_eq!(fresh, 1);
    let _ = started;
    release.send(()).expect("the old load waits");
    assert_eq!(old.await.expect("old load"), 0);
}

#[test]
fn hub_capacities_are_clamped_or_rejected_with_a_clear_error() {
    let hub = SignalHub::new(usize::MAX); // used to panic inside tokio
    drop(hub);
    let err = SignalHub::check_capacity(usize::MAX).expect_err("too large");
    assert!(
        err.to_string().contains(&MAX_HUB_CAPACITY.to_string()),
        "{err}"
    );
    assert!(SignalHub::check_capacity(0).is_err());
}
