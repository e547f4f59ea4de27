//! The `metrics` feature: each cache and source operation moves exactly the
//! series it should. Every test records into its own `DebuggingRecorder`,
//! installed only while the cache or source is built (`with_local_recorder`):
//! the handles registered then keep reporting to it, so tests running in
//! parallel never share a recorder.
#![cfg(feature = "metrics")]

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use pgcachewatch::memory::InMemorySource;
use pgcachewatch::strategies::Greedy;
use pgcachewatch::{Cache, Dispatcher, Event, GapReason, Operation, TableRef};
use pgcachewatch_core::telemetry::{self as t, HIT_BATCH};

/// A recorder (`metrics-util`'s atomic registry) whose reads reset nothing:
/// counters and gauges as they stand, histograms as their sample count.
#[derive(Clone)]
struct Recorded(Arc<Registry<Key, AtomicStorage>>);

impl Recorder for Recorded {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

type Series = Vec<(String, Vec<(String, String)>, f64)>;

fn labels_of(key: &Key) -> (String, Vec<(String, String)>) {
    let mut labels: Vec<(String, String)> = key
        .labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect();
    labels.sort();
    (key.name().to_owned(), labels)
}

/// Every series as `(name, sorted labels, value)`.
fn read(rec: &Recorded) -> Series {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = Vec::new();
    for (key, c) in rec.0.get_counter_handles() {
        let (n, l) = labels_of(&key);
        out.push((n, l, c.load(Relaxed) as f64));
    }
    for (key, g) in rec.0.get_gauge_handles() {
        let (n, l) = labels_of(&key);
        out.push((n, l, f64::from_bits(g.load(Relaxed))));
    }
    for (key, h) in rec.0.get_histogram_handles() {
        let (n, l) = labels_of(&key);
        out.push((n, l, h.data().len() as f64));
    }
    out
}

/// The series `name` with exactly `labels`; 0 if absent.
fn value(series: &Series, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    want.sort();
    series
        .iter()
        .find(|(n, l, _)| n == name && *l == want)
        .map_or(0.0, |(.., v)| *v)
}

/// The non-zero series, for exact comparisons of "what moved".
fn moved(series: &Series) -> Vec<String> {
    let mut out: Vec<String> = series
        .iter()
        .filter(|(.., v)| *v != 0.0)
        .map(|(n, l, v)| {
            let labels: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{n}{{{}}}={v}", labels.join(","))
        })
        .collect();
    out.sort();
    out
}

/// Builds with a fresh recorder installed (only for this thread, only meanwhile):
/// the handles registered keep reporting to it.
fn recorded<T>(build: impl FnOnce() -> T) -> (T, Recorded) {
    let recorder = Recorded(Arc::new(Registry::atomic()));
    let built = metrics::with_local_recorder(&recorder, build);
    (built, recorder)
}

const USERS: &[(&str, &str)] = &[("cache", "users")];

#[tokio::test]
async fn each_cache_operation_moves_exactly_its_series() {
    let (cache, snap): (Cache<u32, String>, _) =
        recorded(|| Cache::builder().name("users").build());
    assert!(moved(&read(&snap)).is_empty(), "nothing moved yet");

    // A miss.
    assert_eq!(cache.get(&1), None);
    assert_eq!(
        moved(&read(&snap)),
        [format!("{}{{cache=users}}=1", t::CACHE_MISSES)]
    );

    // A load: one more miss, one load, its duration, one entry.
    cache
        .get_or_load(1, || async { Ok::<_, std::io::Error>("ann".to_string()) })
        .await
        .unwrap();
    let s = read(&snap);
    assert_eq!(value(&s, t::CACHE_MISSES, USERS), 2.0);
    assert_eq!(value(&s, t::CACHE_LOADS, USERS), 1.0);
    assert_eq!(value(&s, t::CACHE_LOAD_DURATION, USERS), 1.0);
    assert_eq!(value(&s, t::CACHE_ENTRIES, USERS), 1.0);
    assert_eq!(value(&s, t::CACHE_LOAD_ERRORS, USERS), 0.0);

    // A hit is exported with the next miss (or batch, or stats()).
    assert!(cache.get(&1).is_some());
    assert_eq!(value(&read(&snap), t::CACHE_HITS, USERS), 0.0, "batched");
    assert_eq!(cache.get(&2), None);
    let s = read(&snap);
    assert_eq!(value(&s, t::CACHE_HITS, USERS), 1.0);
    assert_eq!(value(&s, t::CACHE_MISSES, USERS), 3.0);

    // A failed load: a miss, a load, an error, a duration; nothing stored.
    let err = cache
        .try_get_with(3, || async {
            Err::<String, _>(std::io::Error::other("down"))
        })
        .await;
    assert!(err.is_err());
    let s = read(&snap);
    assert_eq!(value(&s, t::CACHE_MISSES, USERS), 4.0);
    assert_eq!(value(&s, t::CACHE_LOADS, USERS), 2.0);
    assert_eq!(value(&s, t::CACHE_LOAD_ERRORS, USERS), 1.0);
    assert_eq!(
        value(&s, t::CACHE_LOAD_DURATION, USERS),
        2.0,
        "failed loads are timed too"
    );
    assert_eq!(value(&s, t::CACHE_ENTRIES, USERS), 1.0);

    // Invalidations, by kind.
    let before = moved(&read(&snap));
    cache.invalidate(&1);
    cache.invalidate_tables(&[TableRef::new("public", "users")]);
    cache.invalidate_all();
    let s = read(&snap);
    let kind = |k| {
        value(
            &s,
            t::CACHE_INVALIDATIONS,
            &[("cache", "users"), ("kind", k)],
        )
    };
    assert_eq!(
        (kind("key"), kind("table"), kind("all"), kind("expired")),
        (1.0, 1.0, 1.0, 0.0)
    );
    assert_eq!(value(&s, t::CACHE_ENTRIES, USERS), 0.0);
    // Nothing else moved.
    let after: Vec<String> = moved(&s)
        .into_iter()
        .filter(|m| !m.starts_with(t::CACHE_INVALIDATIONS))
        .collect();
    let before: Vec<String> = before
        .into_iter()
        .filter(|m| !m.starts_with(t::CACHE_ENTRIES))
        .collect();
    assert_eq!(after, before);

    // stats() and the series agree.
    let stats = cache.stats();
    let s = read(&snap);
    assert_eq!(value(&s, t::CACHE_HITS, USERS), stats.hits as f64);
    assert_eq!(value(&s, t::CACHE_MISSES, USERS), stats.misses as f64);
    assert_eq!(value(&s, t::CACHE_LOADS, USERS), stats.loads as f64);
    assert_eq!(
        value(&s, t::CACHE_LOAD_ERRORS, USERS),
        stats.load_errors as f64
    );
}

#[test]
fn hits_are_exported_every_batch_without_a_miss() {
    let (cache, snap): (Cache<u32, u32>, _) = recorded(|| Cache::builder().name("hot").build());
    cache.insert(1, 1);
    for _ in 0..HIT_BATCH - 1 {
        assert_eq!(cache.get(&1), Some(1));
    }
    assert_eq!(value(&read(&snap), t::CACHE_HITS, &[("cache", "hot")]), 0.0);
    assert_eq!(cache.get(&1), Some(1));
    assert_eq!(
        value(&read(&snap), t::CACHE_HITS, &[("cache", "hot")]),
        HIT_BATCH as f64
    );
}

#[test]
fn hits_from_many_threads_are_all_exported_once() {
    let (cache, snap): (Cache<u32, u32>, _) = recorded(|| Cache::builder().name("hot").build());
    cache.insert(1, 1);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..5_000 {
                    assert_eq!(cache.get(&1), Some(1));
                }
            });
        }
    });
    let stats = cache.stats(); // exports the rest
    assert_eq!(stats.hits, 40_000);
    assert_eq!(
        value(&read(&snap), t::CACHE_HITS, &[("cache", "hot")]),
        40_000.0
    );
}

#[tokio::test]
async fn unhealthy_reads_count_bypasses_and_expiry_counts_expired() {
    let (cache, snap): (Cache<u32, String>, _) =
        recorded(|| Cache::builder().unhealthy_until_attached().build());
    cache
        .get_or_load(1, || async { Ok::<_, std::io::Error>("ann".to_string()) })
        .await
        .unwrap();
    let s = read(&snap);
    let unnamed = &[("cache", t::UNNAMED)];
    assert_eq!(value(&s, t::CACHE_BYPASSES, unnamed), 1.0);
    assert_eq!(
        value(&s, t::CACHE_LOADS, unnamed),
        0.0,
        "a bypass is not a cache load"
    );

    let (timed, snap): (Cache<u32, u32>, _) = recorded(|| {
        Cache::builder()
            .name("timed")
            .time_to_live(Duration::from_millis(1))
            .build()
    });
    timed.insert(1, 1);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(timed.get(&1), None);
    let s = read(&snap);
    assert_eq!(
        value(
            &s,
            t::CACHE_INVALIDATIONS,
            &[("cache", "timed"), ("kind", "expired")]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_source_counts_events_gaps_and_health_and_the_dispatcher_latency() {
    let cache: Cache<u32, String> = Cache::builder().name("users").build();
    let ((source, handle, dispatcher), snap) = recorded(|| {
        let (source, handle) = InMemorySource::pair();
        let dispatcher = Dispatcher::new()
            .attach(Greedy::new(), cache.clone())
            .spawn(&source);
        (source, handle, dispatcher)
    });
    let memory = &[("source", "memory")];
    let s = read(&snap);
    assert_eq!(value(&s, t::SOURCE_HEALTHY, memory), 1.0);
    assert_eq!(value(&s, t::SOURCE_EVENTS, memory), 0.0);

    let mut event = Event::new("ch", Operation::Update, "public", "users");
    event.sent_at = Some(event.received_at - Duration::from_millis(20));
    handle.publish(event);
    handle.publish(Event::new("ch", Operation::Update, "public", "users")); // no sent_at
    dispatcher.sync().await;
    let s = read(&snap);
    assert_eq!(value(&s, t::SOURCE_EVENTS, memory), 2.0);
    assert_eq!(
        value(&s, t::SOURCE_EVENT_LATENCY, memory),
        1.0,
        "only events with sent_at"
    );

    handle.disconnect("test");
    let s = read(&snap);
    assert_eq!(value(&s, t::SOURCE_HEALTHY, memory), 0.0);
    let gaps = |s: &Series, reason| {
        value(
            s,
            t::SOURCE_GAPS,
            &[("source", "memory"), ("reason", reason)],
        )
    };
    assert_eq!(gaps(&s, "connection_lost"), 1.0);
    assert_eq!(gaps(&s, "reconnected"), 0.0);

    handle.reconnect();
    handle.gap(GapReason::Injected {
        detail: "test".into(),
    });
    let s = read(&snap);
    assert_eq!(value(&s, t::SOURCE_HEALTHY, memory), 1.0);
    assert_eq!(gaps(&s, "connection_lost"), 1.0);
    assert_eq!(gaps(&s, "reconnected"), 1.0);
    assert_eq!(gaps(&s, "injected"), 1.0);
    assert_eq!(value(&s, t::SOURCE_EVENTS, memory), 2.0);
    drop((dispatcher, source));
}
