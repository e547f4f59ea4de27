//! Refresh on invalidation, warming after a flush and bounded stale serving,
//! on the real cache with refreshes run by hand (a spawner that queues them)
//! and a clock moved by hand.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::{Cache, Refresh, RefreshTask};
use crate::InvalidationTarget;

/// A versioned table of keys, refreshes queued by the spawner, and a clock.
#[derive(Clone, Default)]
struct World {
    /// Each key's version (0 before any write).
    table: Arc<Mutex<HashMap<u32, u64>>>,
    /// Refresh tasks spawned and not yet finished.
    tasks: Arc<Mutex<Vec<RefreshTask>>>,
    /// Refreshes may return only once this is at least their number.
    released: Arc<AtomicU64>,
    /// Refresher runs (database loads).
    loads: Arc<AtomicU64>,
    /// Nanoseconds of virtual time.
    now: Arc<AtomicU64>,
}

/// Ready once `released` reaches `n`.
struct Release(Arc<AtomicU64>, u64);

impl Future for Release {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if self.0.load(Ordering::SeqCst) >= self.1 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl World {
    fn version(&self, key: u32) -> u64 {
        self.table.lock().unwrap().get(&key).copied().unwrap_or(0)
    }

    fn write(&self, key: u32) -> u64 {
        let mut t = self.table.lock().unwrap();
        let v = t.entry(key).or_default();
        *v += 1;
        *v
    }

    fn cache(&self, stale: Option<Duration>, max_concurrent: usize) -> Cache<u32, u64> {
        let world = self.clone();
        let tasks = self.tasks.clone();
        let refresh = Refresh::new(move |key: u32| {
            // Reads the table when first polled, returns when released.
            let world = world.clone();
            async move {
                let n = world.loads.fetch_add(1, Ordering::SeqCst) + 1;
                let v = world.version(key);
                Release(world.released.clone(), n).await;
                Ok::<_, std::io::Error>(v)
            }
        })
        .max_concurrent(max_concurrent)
        .spawner(move |task| tasks.lock().unwrap().push(task));
        let base = Instant::now();
        let now = self.now.clone();
        let mut builder = Cache::builder()
            .capacity(64)
            .refresh_on_invalidation(refresh)
            .stale_clock(move || base + Duration::from_nanos(now.load(Ordering::SeqCst)));
        if let Some(d) = stale {
            builder = builder.serve_stale_within(d);
        }
        builder.build()
    }

    /// Polls every queued refresh once; keeps the unfinished.
    fn poll_refreshes(&self) {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        tasks.retain_mut(|t| t.as_mut().poll(&mut cx).is_pending());
        self.tasks.lock().unwrap().extend(tasks);
    }
}

/// Reads `key` through `get_or_load` with a loader that reads the table at
/// once; `None` if the read waits (it joined a refresh in flight).
fn read(cache: &Cache<u32, u64>, world: &World, key: u32) -> Option<u64> {
    let v = world.version(key);
    let mut fut =
        std::pin::pin!(cache.get_or_load(key, || async move { Ok::<_, std::io::Error>(v) }));
    let waker = futures::task::noop_waker();
    match fut.as_mut().poll(&mut Context::from_waker(&waker)) {
        Poll::Ready(r) => Some(r.expect("the loader never fails")),
        Poll::Pending => None,
    }
}

#[test]
fn a_hot_key_is_refreshed_after_its_invalidation_and_the_next_read_hits() {
    let world = World::default();
    let cache = world.cache(None, 4);
    assert_eq!(read(&cache, &world, 1), Some(0)); // a miss marks it read
    world.write(1);
    cache.invalidate(&1);
    assert_eq!(cache.stats().refreshes_started, 1);
    world.released.store(u64::MAX, Ordering::SeqCst);
    world.poll_refreshes();
    let before = cache.stats();
    assert_eq!(cache.get(&1), Some(1), "the refreshed value is served");
    let after = cache.stats();
    assert_eq!(after.hits, before.hits + 1);
    assert_eq!((after.refreshes_served, after.refreshes_discarded), (1, 0));
}

#[test]
fn a_key_not_read_since_its_last_invalidation_is_not_refreshed() {
    let world = World::default();
    let cache = world.cache(None, 4);
    cache.insert(1, 0); // stored, never read
    cache.invalidate(&1);
    assert_eq!(cache.stats().refreshes_started, 0);
    read(&cache, &world, 1);
    cache.invalidate(&1);
    cache.invalidate(&1); // no read in between: one refresh, not two
    assert_eq!(cache.stats().refreshes_started, 1);
}

#[test]
fn a_refresh_racing_a_second_write_is_discarded() {
    let world = World::default();
    let cache = world.cache(None, 4);
    read(&cache, &world, 1);
    world.write(1);
    cache.invalidate(&1);
    world.poll_refreshes(); // the refresh reads v1 ...
    world.write(1); // ... v2 is written and its invalidation applied ...
    cache.invalidate(&1);
    world.released.store(u64::MAX, Ordering::SeqCst);
    world.poll_refreshes(); // ... then the refresh returns v1.
    let stats = cache.stats();
    assert_eq!(
        (stats.refreshes_discarded, stats.refreshes_served),
        (1, 0),
        "{stats:?}"
    );
    assert_eq!(cache.get(&1), None, "v1 was stored after v2's invalidation");
    assert_eq!(read(&cache, &world, 1), Some(2));
}

#[test]
fn a_flush_racing_a_refresh_discards_it() {
    let world = World::default();
    let cache = world.cache(None, 4);
    read(&cache, &world, 1);
    cache.invalidate(&1);
    world.poll_refreshes();
    cache.apply(&crate::Decision::All);
    world.released.store(u64::MAX, Ordering::SeqCst);
    world.poll_refreshes();
    assert_eq!(cache.stats().refreshes_discarded, 1);
    assert_eq!(cache.get(&1), None);
}

#[test]
fn refreshes_beyond_the_bound_are_skipped_and_errors_are_dropped() {
    let world = World::default();
    let cache = world.cache(None, 1);
    read(&cache, &world, 1);
    read(&cache, &world, 2);
    cache.invalidate(&1);
    cache.invalidate(&2);
    let stats = cache.stats();
    assert_eq!((stats.refreshes_started, stats.refreshes_skipped), (1, 1));

    let failing: Cache<u32, u64> = Cache::builder()
        .refresh_on_invalidation(
            Refresh::new(|_: u32| async { Err::<u64, _>(std::io::Error::other("down")) }).spawner(
                {
                    let tasks = world.tasks.clone();
                    move |t| tasks.lock().unwrap().push(t)
                },
            ),
        )
        .build();
    failing.insert(1, 0);
    assert_eq!(failing.get(&1), Some(0));
    for _ in 0..64 {
        failing.get(&1); // sampled hits mark it read
    }
    failing.invalidate(&1);
    assert_eq!(failing.stats().refreshes_started, 1);
    // A reader joins the refresh, which fails: the reader loads for itself.
    let mut reader =
        std::pin::pin!(failing.get_or_load(1, || async { Ok::<_, std::io::Error>(5) }));
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    assert!(reader.as_mut().poll(&mut cx).is_pending());
    world.poll_refreshes();
    match reader.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(v)) => assert_eq!(v, 5),
        other => panic!("the reader did not load for itself: {other:?}"),
    }
    let stats = failing.stats();
    assert_eq!((stats.refreshes_failed, stats.refreshes_served), (1, 0));
    assert_eq!(failing.get(&1), Some(5), "the reader's own value is cached");
}

#[test]
fn without_a_runtime_nothing_is_refreshed_and_readers_do_not_hang() {
    let cache: Cache<u32, u64> = Cache::builder()
        .refresh_on_invalidation(Refresh::new(|k: u32| async move {
            Ok::<_, std::io::Error>(u64::from(k))
        }))
        .build();
    let world = World::default();
    read(&cache, &world, 1);
    cache.invalidate(&1);
    let stats = cache.stats();
    assert_eq!((stats.refreshes_started, stats.refreshes_skipped), (1, 1));
    assert_eq!(read(&cache, &world, 1), Some(0), "the reader hung");
}

#[test]
fn the_previous_value_is_served_within_the_bound_and_never_after() {
    let world = World::default();
    let d = Duration::from_millis(10);
    let cache = world.cache(Some(d), 4);
    read(&cache, &world, 1);
    world.write(1);
    cache.invalidate(&1);
    assert_eq!(
        read(&cache, &world, 1),
        Some(0),
        "within the bound: the previous value"
    );
    assert_eq!(cache.get(&1), None, "get answers fresh values only");
    world.now.store(d.as_nanos() as u64, Ordering::SeqCst);
    assert_eq!(read(&cache, &world, 1), Some(0), "at the bound exactly");
    world.now.store(d.as_nanos() as u64 + 1, Ordering::SeqCst);
    assert_eq!(read(&cache, &world, 1), None, "past the bound: waits");
    assert_eq!(cache.stats().stale_served, 2);
}

#[test]
fn stale_serving_is_off_by_default_and_stops_while_unhealthy() {
    let world = World::default();
    let cache = world.cache(None, 4);
    read(&cache, &world, 1);
    cache.invalidate(&1);
    assert_eq!(read(&cache, &world, 1), None, "waits for the refresh");
    assert_eq!(cache.stats().stale_served, 0);

    let cache = world.cache(Some(Duration::from_secs(60)), 4);
    read(&cache, &world, 2);
    world.write(2);
    cache.invalidate(&2);
    let vote = cache.health_vote(); // a dispatcher attaches: unhealthy until told
    assert_eq!(
        read(&cache, &world, 2),
        Some(1),
        "bypassing: loads for itself"
    );
    assert_eq!(
        cache.stats().stale_served,
        0,
        "stale served while unhealthy"
    );
    drop(vote);
}

#[tokio::test(start_paused = true)]
async fn warming_waits_for_health_and_keeps_to_its_rate() {
    let loads = Arc::new(AtomicU64::new(0));
    let cache: Cache<u32, u64> = Cache::builder()
        .refresh_on_invalidation(
            Refresh::new({
                let loads = loads.clone();
                move |k: u32| {
                    loads.fetch_add(1, Ordering::SeqCst);
                    async move { Ok::<_, std::io::Error>(u64::from(k)) }
                }
            })
            .max_concurrent(8),
        )
        .warm_after_flush(100, 10)
        .build();
    for k in 0..100 {
        cache
            .get_or_load(k, || async move { Ok::<_, std::io::Error>(u64::from(k)) })
            .await
            .unwrap();
    }
    let vote = cache.health_vote(); // attaching: unhealthy until the source says
    cache.invalidate_all();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(loads.load(Ordering::SeqCst), 0, "warmed while unhealthy");
    vote.set(true);
    let healthy_at = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let warmed = loads.load(Ordering::SeqCst);
    let elapsed = healthy_at.elapsed();
    let allowed = (elapsed.as_secs_f64() * 10.0).floor() as u64 + 1;
    assert!(
        warmed > 0 && warmed <= allowed,
        "{warmed} warm loads in {elapsed:?} (at most {allowed})"
    );
    // A newer flush restarts warming; what was warmed serves hits.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let stats = cache.stats();
    assert_eq!(stats.warm_loads, 100, "{stats:?}");
    assert_eq!(stats.refreshes_served, 100, "{stats:?}");
    assert!((0..100).all(|k| cache.get(&k).is_some()));
}

// ---- property: refreshes and stale serving never break the rule -------------

#[derive(Debug, Clone)]
enum Op {
    Read(u32),
    Get(u32),
    Write(u32),
    Flush,
    /// Poll every refresh once (new ones read the table).
    Poll,
    /// Let the next refreshes return.
    Release(u8),
    /// Move the clock.
    Advance(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3u32).prop_map(Op::Read),
        2 => (0..3u32).prop_map(Op::Get),
        4 => (0..3u32).prop_map(Op::Write),
        1 => Just(Op::Flush),
        3 => Just(Op::Poll),
        2 => (1..3u8).prop_map(Op::Release),
        2 => (1..8u8).prop_map(Op::Advance),
    ]
}

/// Runs `ops`; every value read is the key's version, or (with a bound) its
/// previous one no later than the bound after the write that outdated it was
/// applied.
fn check(ops: &[Op], stale: Option<Duration>) -> Result<(), TestCaseError> {
    check_with(ops, stale, stale)
}

/// [`check`] of a cache built with `cache_stale` against the bound `stale`.
fn check_with(
    ops: &[Op],
    cache_stale: Option<Duration>,
    stale: Option<Duration>,
) -> Result<(), TestCaseError> {
    let world = World::default();
    let cache = world.cache(cache_stale, 2);
    // When each (key, version)'s invalidation was applied, in virtual nanoseconds.
    let mut invalidated: HashMap<(u32, u64), u64> = HashMap::new();
    let now = |w: &World| w.now.load(Ordering::SeqCst);
    for op in ops {
        let served = match *op {
            Op::Read(k) => read(&cache, &world, k).map(|v| (k, v)),
            Op::Get(k) => cache.get(&k).map(|v| (k, v)),
            Op::Write(k) => {
                let v = world.write(k);
                cache.invalidate(&k);
                invalidated.insert((k, v - 1), now(&world));
                None
            }
            Op::Flush => {
                cache.invalidate_all();
                None
            }
            Op::Poll => {
                world.poll_refreshes();
                None
            }
            Op::Release(n) => {
                world.released.fetch_add(u64::from(n), Ordering::SeqCst);
                world.poll_refreshes();
                None
            }
            Op::Advance(ms) => {
                world
                    .now
                    .fetch_add(u64::from(ms) * 1_000_000, Ordering::SeqCst);
                None
            }
        };
        let Some((k, v)) = served else { continue };
        let current = world.version(k);
        prop_assert!(v <= current, "key {k}: v{v} was never written");
        if v == current {
            continue;
        }
        let Some(bound) = stale else {
            return Err(TestCaseError::fail(format!(
                "key {k}: v{v} served after v{current}'s invalidation (no stale option)"
            )));
        };
        let at = invalidated[&(k, v)];
        let age = Duration::from_nanos(now(&world) - at);
        prop_assert!(
            age <= bound,
            "key {k}: v{v} served {age:?} after its invalidation (bound {bound:?})"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn refreshes_never_serve_an_invalidated_value(ops in proptest::collection::vec(op(), 1..60)) {
        check(&ops, None)?;
    }

    #[test]
    fn stale_serving_never_passes_its_bound(ops in proptest::collection::vec(op(), 1..60)) {
        check(&ops, Some(Duration::from_millis(5)))?;
    }
}

/// The property has teeth: a cache that serves stale values for longer than
/// the check allows (or at all, when the check allows none) is caught.
#[test]
fn the_property_catches_stale_serving_beyond_what_it_checks() {
    let ops = [Op::Read(0), Op::Write(0), Op::Advance(7), Op::Read(0)];
    let longer = Some(Duration::from_millis(10));
    assert!(check_with(&ops, longer, longer).is_ok());
    assert!(check_with(&ops, longer, Some(Duration::from_millis(5))).is_err());
    assert!(check_with(&ops, longer, None).is_err());
}
