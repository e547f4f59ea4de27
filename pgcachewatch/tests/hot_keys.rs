//! Hot keys stay warm (issue 22), against the real PostgreSQL: row-mode
//! triggers, the LISTEN source and `Keyed`, with a cache that refreshes keys
//! on invalidation, warms after a flush and (opt-in) serves the previous value
//! within a bound.
//!
//! Staleness is judged from what the test itself observes: a write counts as
//! invalidated once `DispatcherHandle::wait_for_txid` has returned for it (the
//! dispatcher applied its event by then, so this is no earlier than the
//! cache's own invalidation). A read that *started* after that must not return
//! an older version, or, with `serve_stale_within(d)`, must have started at
//! most `d` after it. Measured that way the check is never stricter than the
//! guarantee (it can only be looser by the time `wait_for_txid` takes to
//! notice).
#![cfg(feature = "postgres")]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgcachewatch::postgres::{Installer, PgListenerSource, TableName};
use pgcachewatch::strategies::Keyed;
use pgcachewatch::{Cache, Dispatcher, DispatcherHandle, Event, Refresh, RowKey};
use pgcachewatch_testkit::env::{database_url, unique_name};
use sqlx::PgPool;

const PATIENCE: Duration = Duration::from_secs(20);

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A table `(id bigint primary key, v bigint)` with `rows` rows at version 0,
/// watched in row mode, and the LISTEN source on its channel.
struct Fixture {
    db: PgPool,
    table: String,
    source: PgListenerSource,
}

impl Fixture {
    async fn new(rows: i64) -> Fixture {
        let db = PgPool::connect(&database_url())
            .await
            .expect("PostgreSQL at DATABASE_URL");
        let table = unique_name("pgcw_hot");
        let channel = unique_name("pgcw_hot_ch");
        sqlx::raw_sql(&format!(
            "CREATE TABLE public.{table} (id bigint PRIMARY KEY, v bigint NOT NULL);
             INSERT INTO public.{table} SELECT g, 0 FROM generate_series(1, {rows}) g;"
        ))
        .execute(&db)
        .await
        .expect("create table");
        let tables = [TableName::new("public", &table).expect("valid name")];
        Installer::new()
            .channel(&channel)
            .row_keys(true)
            .install(&db, &tables)
            .await
            .expect("install");
        let source = PgListenerSource::builder(database_url())
            .channel(&channel)
            .connect()
            .await
            .expect("listen");
        Fixture { db, table, source }
    }

    /// The row's version, read now.
    fn loader(&self) -> impl Fn(i64) -> LoadFuture + Send + Sync + Clone + 'static {
        let db = self.db.clone();
        let sql = format!("SELECT v FROM public.{} WHERE id = $1", self.table);
        move |id| {
            let (db, sql) = (db.clone(), sql.clone());
            Box::pin(async move {
                sqlx::query_scalar::<_, i64>(&sql)
                    .bind(id)
                    .fetch_one(&db)
                    .await
            })
        }
    }

    /// Bumps row `id`'s version; returns the new version and the writing
    /// transaction.
    async fn write(&self, id: i64) -> (i64, i64) {
        sqlx::query_as::<_, (i64, i64)>(&format!(
            "UPDATE public.{} SET v = v + 1 WHERE id = $1 RETURNING v, txid_current()::bigint",
            self.table
        ))
        .bind(id)
        .fetch_one(&self.db)
        .await
        .expect("update")
    }

    fn attach(&self, cache: &Cache<i64, i64>) -> DispatcherHandle {
        let by_id = Keyed::new(|_: &Event, row: &RowKey| row.get("id").and_then(|v| v.as_i64()));
        Dispatcher::new()
            .attach(by_id, cache.clone())
            .spawn(&self.source)
    }
}

type LoadFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, sqlx::Error>> + Send>>;

/// One read: when it started, what it returned.
#[derive(Debug, Clone, Copy)]
struct Read {
    started: Instant,
    version: i64,
}

/// 8 readers read one hot key through the cache while one writer writes it
/// 1 000 times, waiting for each write's invalidation to be applied (and for
/// some reads after it: the key is hot). Returns every read, when each version
/// was invalidated, and the cache's stats.
async fn write_storm(stale_within: Option<Duration>) -> (Vec<Read>, Vec<Instant>, Cache<i64, i64>) {
    const WRITES: usize = 1_000;
    const READERS: usize = 8;
    let f = Fixture::new(1).await;
    let load = f.loader();
    let mut builder = Cache::builder().capacity(100).refresh_on_invalidation(
        Refresh::new({
            let load = load.clone();
            move |id: i64| load(id)
        })
        .max_concurrent(4),
    );
    if let Some(d) = stale_within {
        builder = builder.serve_stale_within(d);
    }
    let cache: Cache<i64, i64> = builder.build();
    let dispatcher = f.attach(&cache);

    let stop = Arc::new(AtomicBool::new(false));
    let reads_done = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let (cache, load, stop, done) = (
            cache.clone(),
            load.clone(),
            stop.clone(),
            reads_done.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut reads = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let version = cache
                    .get_or_load(1, || load(1))
                    .await
                    .expect("the row is readable");
                reads.push(Read { started, version });
                done.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
            reads
        }));
    }

    // invalidated[v] = when v was invalidated (v + 1's event was applied).
    let mut invalidated = Vec::with_capacity(WRITES);
    for i in 0..WRITES {
        let (version, txid) = f.write(1).await;
        assert_eq!(version as usize, i + 1);
        dispatcher
            .wait_for_txid(txid, PATIENCE)
            .await
            .expect("the write's event is applied");
        invalidated.push(Instant::now());
        // A hot key: read again after each write before the next one.
        let seen = reads_done.load(Ordering::Relaxed);
        wait_until("the readers read after the write", || {
            reads_done.load(Ordering::Relaxed) >= seen + 64
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut reads = Vec::new();
    for r in readers {
        reads.extend(r.await.expect("reader"));
    }
    (reads, invalidated, cache)
}

/// Every read that started after `version`'s invalidation was confirmed:
/// `(read, how long after)`.
fn served_after_invalidation(reads: &[Read], invalidated: &[Instant]) -> Vec<(Read, Duration)> {
    reads
        .iter()
        .filter_map(|r| {
            let at = *invalidated.get(usize::try_from(r.version).ok()?)?;
            (r.started > at).then(|| (*r, r.started - at))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_key_written_1000_times_under_8_readers_is_never_served_stale_without_the_option() {
    let (reads, invalidated, cache) = write_storm(None).await;
    let stale = served_after_invalidation(&reads, &invalidated);
    let stats = cache.stats();
    println!(
        "{} reads, {} refreshes started, {} served, {} discarded, {} skipped; {} loads by readers",
        reads.len(),
        stats.refreshes_started,
        stats.refreshes_served,
        stats.refreshes_discarded,
        stats.refreshes_skipped,
        stats.loads
    );
    assert!(
        stale.is_empty(),
        "{} reads returned a version after its invalidation was applied, first: {:?}",
        stale.len(),
        stale.first()
    );
    assert_eq!(stats.stale_served, 0);
    assert!(
        stats.refreshes_served >= 100,
        "the hot key was rarely refreshed: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_key_written_1000_times_under_8_readers_is_never_served_older_than_d_with_it() {
    let d = Duration::from_millis(50);
    let (reads, invalidated, cache) = write_storm(Some(d)).await;
    let stale = served_after_invalidation(&reads, &invalidated);
    let stats = cache.stats();
    let oldest = stale.iter().map(|(_, age)| *age).max();
    println!(
        "{} reads, {} served a value already invalidated (oldest {oldest:?} after), \
         stale_served {}, {} refreshes served",
        reads.len(),
        stale.len(),
        stats.stale_served,
        stats.refreshes_served
    );
    let past: Vec<_> = stale.iter().filter(|(_, age)| *age > d).collect();
    assert!(
        past.is_empty(),
        "{} reads returned a value more than {d:?} after its invalidation, first: {:?}",
        past.len(),
        past.first()
    );
    assert!(
        stale.len() as u64 <= stats.stale_served,
        "{} stale reads but the cache counted {} (stale_served)",
        stale.len(),
        stats.stale_served
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_racing_a_second_write_is_discarded() {
    let f = Fixture::new(1).await;
    let load = f.loader();
    let read_by_refresh = Arc::new(Mutex::new(Vec::<i64>::new()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let cache: Cache<i64, i64> = Cache::builder()
        .refresh_on_invalidation(Refresh::new({
            let (load, read, gate) = (load.clone(), read_by_refresh.clone(), gate.clone());
            move |id: i64| {
                let (load, read, gate) = (load.clone(), read.clone(), gate.clone());
                async move {
                    let v = load(id).await?;
                    read.lock().unwrap().push(v);
                    // Returns only when the test says.
                    let _permit = gate.acquire().await.expect("gate open");
                    Ok::<_, sqlx::Error>(v)
                }
            }
        }))
        .build();
    let dispatcher = f.attach(&cache);
    wait_until("the cache is healthy", || cache.is_healthy()).await;

    assert_eq!(cache.get_or_load(1, || load(1)).await.unwrap(), 0);
    let (_, txid) = f.write(1).await;
    dispatcher.wait_for_txid(txid, PATIENCE).await.unwrap();
    assert_eq!(cache.stats().refreshes_started, 1, "v0 was read: refreshed");
    wait_until("the refresh read v1", || {
        read_by_refresh.lock().unwrap().as_slice() == [1]
    })
    .await;

    // A second write while the refresh holds v1.
    let (_, txid) = f.write(1).await;
    dispatcher.wait_for_txid(txid, PATIENCE).await.unwrap();
    gate.add_permits(1);
    wait_until("the refresh returned", || {
        let s = cache.stats();
        s.refreshes_discarded + s.refreshes_served >= 1
    })
    .await;
    let stats = cache.stats();
    assert_eq!(
        (stats.refreshes_discarded, stats.refreshes_served),
        (1, 0),
        "{stats:?}"
    );
    assert_eq!(cache.get(&1), None, "v1 was stored after v2's invalidation");
    assert_eq!(cache.get_or_load(1, || load(1)).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flush_with_10000_warm_keys_reloads_at_most_the_configured_rate() {
    const KEYS: i64 = 10_000;
    const PER_SECOND: u32 = 2_000;
    let f = Fixture::new(KEYS).await;
    let load = f.loader();
    let warm_loads: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let cache: Cache<i64, i64> = Cache::builder()
        .capacity(20_000)
        .refresh_on_invalidation(
            Refresh::new({
                let (load, warm_loads) = (load.clone(), warm_loads.clone());
                move |id: i64| {
                    warm_loads.lock().unwrap().push(Instant::now());
                    load(id)
                }
            })
            .max_concurrent(16),
        )
        .warm_after_flush(KEYS as usize, PER_SECOND)
        .build();
    let _dispatcher = f.attach(&cache);
    wait_until("the cache is healthy", || cache.is_healthy()).await;

    // 10 000 keys read (each a miss and a load).
    let mut loading = Vec::new();
    for chunk in 0..16 {
        let (cache, load) = (cache.clone(), load.clone());
        loading.push(tokio::spawn(async move {
            for id in (1..=KEYS).filter(|id| id % 16 == chunk) {
                cache.get_or_load(id, || load(id)).await.expect("row");
            }
        }));
    }
    for l in loading {
        l.await.unwrap();
    }
    assert_eq!(cache.stats().entries, KEYS as u64);
    assert!(warm_loads.lock().unwrap().is_empty());

    // The listening connection dies: a gap flushes the cache, the source
    // reconnects, a second gap, healthy again; warming starts then.
    let flushes = cache.stats().flushes;
    let pid = f.source.stats().backend_pid.expect("connected");
    let flushed_at = Instant::now();
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(i32::try_from(pid).unwrap())
        .fetch_one(&f.db)
        .await
        .unwrap();
    assert!(killed);
    wait_until("the gaps flushed the cache and it is healthy again", || {
        cache.stats().flushes >= flushes + 2 && cache.is_healthy()
    })
    .await;
    wait_until("warming reloads 1 000 keys", || {
        warm_loads.lock().unwrap().len() >= 1_000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let times = warm_loads.lock().unwrap().clone();
    // The k-th reload (from 0) starts no earlier than k / rate after the
    // flush; so by any moment t, at most rate * (t - flush) + 1 have started.
    for (k, at) in times.iter().enumerate() {
        let allowed = (at.duration_since(flushed_at).as_secs_f64() * f64::from(PER_SECOND)).floor()
            as usize
            + 1;
        assert!(
            k < allowed,
            "reload #{k} started {:?} after the flush: more than {PER_SECOND}/s",
            at.duration_since(flushed_at)
        );
    }
    let stats = cache.stats();
    println!(
        "{} keys reloaded in {:?} after the flush ({} warm loads, {} served); rate bound {PER_SECOND}/s",
        times.len(),
        times.last().map(|t| t.duration_since(flushed_at)),
        stats.warm_loads,
        stats.refreshes_served
    );
    assert!(stats.warm_loads as usize >= times.len() && stats.warm_loads <= KEYS as u64);
}
