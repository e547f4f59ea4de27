//! A relay over the logical-replication source, killed (aborted, as a crash
//! would) and restarted 10 times while writes commit: lossless end to end.
//! Every committed write reaches every subscriber through NATS, no subscriber
//! gets a `Gap` or flushes its cache, and readers that wait for a write's
//! position before reading through their cache never see an older value.
//! Real PostgreSQL (`DATABASE_URL`, `wal_level = logical`) and real NATS
//! (`NATS_URL`).
#![cfg(all(feature = "nats", feature = "replication"))]

#[path = "support/replication.rs"]
mod replication_support;
mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pgcachewatch_backends::nats::{NatsConnect, NatsSource, Relay, RelayHandle, StreamSettings};
use pgcachewatch_backends::replication::PgReplicationSource;
use pgcachewatch_core::{
    Cache, Dispatcher, DispatcherHandle, Event, EventSource, Health, Lsn, RowKey, Signal,
};
use pgcachewatch_strategies::Keyed;
use pgcachewatch_testkit::env::{database_url, nats_url};
use replication_support::{wait_slot_released, Fixture};

const SUBSCRIBERS: usize = 3;
const RESTARTS: usize = 10;
const ROWS: i64 = 10;

/// Starts the replication source and a relay over it; whether the slot resumed.
async fn start_relay(
    f: &Fixture,
    slot: &str,
    stream: &StreamSettings,
) -> (RelayHandle, PgReplicationSource, bool) {
    let start = PgReplicationSource::builder(database_url())
        .slot(slot)
        .publication(&f.publication)
        .create_slot_if_missing(true)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(300))
        .connect_durable()
        .await
        .expect("replication source connects");
    let resumed = start.resumed();
    let (relay, source) = Relay::builder(NatsConnect::new(nats_url()))
        .stream(stream.clone())
        .heartbeat_interval(Duration::from_millis(100))
        .start_durable(start)
        .await
        .expect("relay starts");
    (relay, source, resumed)
}

/// One subscribing service: a `NatsSource`, a cache of `items.v` by id kept by
/// a dispatcher, and everything its subscription saw.
struct Subscriber {
    source: NatsSource,
    cache: Cache<i64, i64>,
    dispatcher: DispatcherHandle,
    log_ids: Arc<Mutex<HashSet<i64>>>,
    gaps: Arc<Mutex<Vec<String>>>,
    flushes_at_start: u64,
}

async fn subscriber(stream: &StreamSettings, items_ref: &str) -> Subscriber {
    let source = NatsSource::builder(NatsConnect::new(nats_url()))
        .stream(stream.clone())
        .heartbeat_timeout(Duration::from_secs(3))
        .buffer(1 << 16)
        .connect()
        .await
        .expect("NatsSource connects");
    let cache: Cache<i64, i64> = Cache::new(100);
    let dispatcher = Dispatcher::new()
        .attach(
            Keyed::per_table().table(items_ref, |_: &Event, row: &RowKey| {
                row.get("id").and_then(|v| v.as_i64())
            }),
            cache.clone(),
        )
        .spawn(&source);
    let mut sub = source.subscribe();
    let log_ids: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let gaps: Arc<Mutex<Vec<String>>> = Arc::default();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), sub.recv()).await {
            Ok(Some(Signal::Health(Health::Healthy))) => break,
            Ok(Some(_)) => {}
            other => panic!("subscriber never became healthy: {other:?}"),
        }
    }
    {
        let (log_ids, gaps) = (log_ids.clone(), gaps.clone());
        tokio::spawn(async move {
            while let Some(signal) = sub.recv().await {
                match signal {
                    Signal::Event(e) if e.table == "log" => {
                        let mut ids = log_ids.lock();
                        for k in e.keys.iter().flatten() {
                            if let Some(id) = k.get("id").and_then(|v| v.as_i64()) {
                                ids.insert(id);
                            }
                        }
                    }
                    Signal::Gap(g) => gaps.lock().push(g.to_string()),
                    _ => {}
                }
            }
        });
    }
    // Attaching flushed once; no other flush may follow.
    let flushes_at_start = cache.stats().flushes;
    Subscriber {
        source,
        cache,
        dispatcher,
        log_ids,
        gaps,
        flushes_at_start,
    }
}

/// The last committed value of each row, and the WAL position after it.
#[derive(Default)]
struct Committed {
    value: Vec<i64>,
    position: Vec<Lsn>,
}

async fn wal_position(db: &sqlx::PgPool) -> Lsn {
    let text: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(db)
        .await
        .expect("pg_current_wal_lsn");
    text.parse().expect("an LSN")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_over_replication_killed_ten_times_loses_nothing_flushes_nothing_serves_nothing_stale(
) {
    let f = Fixture::new("pgcw_rrelay").await;
    let log = f.table("log");
    let items = f.table("items");
    f.exec(&format!("CREATE TABLE {log} (id bigserial PRIMARY KEY)"))
        .await;
    f.exec(&format!(
        "CREATE TABLE {items} (id bigint PRIMARY KEY, v bigint NOT NULL)"
    ))
    .await;
    f.exec(&format!(
        "INSERT INTO {items} SELECT g, 0 FROM generate_series(0, {}) g",
        ROWS - 1
    ))
    .await;
    let slot = f.slot();
    let stream = support::fresh_stream();
    let (relay, source, resumed) = start_relay(&f, &slot, &stream).await;
    assert!(!resumed, "the slot was created by this start");
    let epoch = relay.status().epoch;
    let mut current = Some((relay, source));

    let items_ref = format!("{}.items", f.schema);
    let mut subs = Vec::new();
    for _ in 0..SUBSCRIBERS {
        subs.push(subscriber(&stream, &items_ref).await);
    }
    let subs = Arc::new(subs);

    // Writer: a log row and an update of one item per round; remembers every
    // committed log id, and per item the last value and the position after it.
    let stop = Arc::new(AtomicBool::new(false));
    let written_ids = Arc::new(Mutex::new(Vec::<i64>::new()));
    let committed = Arc::new(Mutex::new(Committed {
        value: vec![0; ROWS as usize],
        position: vec![Lsn::ZERO; ROWS as usize],
    }));
    let writer = {
        let (db, stop, written_ids, committed) = (
            f.db.clone(),
            stop.clone(),
            written_ids.clone(),
            committed.clone(),
        );
        let (log, items) = (log.clone(), items.clone());
        tokio::spawn(async move {
            let mut seq = 0i64;
            while !stop.load(Ordering::Acquire) {
                seq += 1;
                let id: i64 =
                    sqlx::query_scalar(&format!("INSERT INTO {log} DEFAULT VALUES RETURNING id"))
                        .fetch_one(&db)
                        .await
                        .expect("insert");
                written_ids.lock().push(id);
                let row = seq % ROWS;
                sqlx::query(&format!("UPDATE {items} SET v = $1 WHERE id = $2"))
                    .bind(seq)
                    .bind(row)
                    .execute(&db)
                    .await
                    .expect("update");
                let position = wal_position(&db).await;
                {
                    let mut c = committed.lock();
                    c.value[row as usize] = seq;
                    c.position[row as usize] = position;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    // Readers, one per subscriber: wait for the position of a row's last
    // committed write, then read the row through the cache.
    let reads = Arc::new(AtomicU64::new(0));
    let stale = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut readers = Vec::new();
    for n in 0..SUBSCRIBERS {
        let (db, stop, committed, subs, reads, stale) = (
            f.db.clone(),
            stop.clone(),
            committed.clone(),
            subs.clone(),
            reads.clone(),
            stale.clone(),
        );
        let sql = format!("SELECT v FROM {items} WHERE id = $1");
        readers.push(tokio::spawn(async move {
            let s = &subs[n];
            let mut round = 0i64;
            while !stop.load(Ordering::Acquire) {
                round += 1;
                let row = round % ROWS;
                let (known, position) = {
                    let c = committed.lock();
                    (c.value[row as usize], c.position[row as usize])
                };
                if let Err(e) = s
                    .dispatcher
                    .wait_for_lsn(position, Duration::from_secs(30))
                    .await
                {
                    panic!("subscriber {n}: waiting for {position}: {e}");
                }
                let got = s
                    .cache
                    .get_or_load(row, || async {
                        sqlx::query_scalar::<_, i64>(&sql)
                            .bind(row)
                            .fetch_one(&db)
                            .await
                    })
                    .await
                    .expect("read");
                reads.fetch_add(1, Ordering::Relaxed);
                if got < known {
                    stale.lock().push(format!(
                        "subscriber {n}: row {row} read {got}, {known} was committed"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }

    for restart in 0..RESTARTS {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (relay, source) = current.take().expect("a relay runs");
        relay.abort();
        source.shutdown().await;
        wait_slot_released(&f.db, &slot).await;
        let (relay, source, resumed) = start_relay(&f, &slot, &stream).await;
        assert!(resumed, "restart {restart}: the slot resumes");
        assert_eq!(
            relay.status().epoch,
            epoch,
            "restart {restart}: the relay continues the stream's epoch"
        );
        current = Some((relay, source));
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    stop.store(true, Ordering::Release);
    writer.await.expect("writer");
    for r in readers {
        r.await.expect("reader");
    }

    // Every committed write reaches every subscriber: wait for the position
    // after the last one.
    let last = wal_position(&f.db).await;
    let written: HashSet<i64> = written_ids.lock().iter().copied().collect();
    for (n, s) in subs.iter().enumerate() {
        s.dispatcher
            .wait_for_lsn(last, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("subscriber {n}: the last write never arrived: {e}"));
        let seen = s.log_ids.lock().clone();
        let missing: Vec<_> = written.difference(&seen).copied().collect();
        assert!(
            missing.is_empty(),
            "subscriber {n}: {} of {} committed writes never arrived (first: {:?})",
            missing.len(),
            written.len(),
            missing.iter().min()
        );
        assert!(
            s.gaps.lock().is_empty(),
            "subscriber {n}: a lossless relay restart produced gaps: {:?}",
            s.gaps.lock()
        );
        assert_eq!(
            s.cache.stats().flushes,
            s.flushes_at_start,
            "subscriber {n}: the cache was flushed"
        );
        eprintln!(
            "subscriber {n}: {}/{} writes, 0 gaps, 0 flushes over {RESTARTS} relay kills; {} copies skipped",
            written.len(),
            written.len(),
            s.source.stats().duplicates
        );
    }
    let stale = stale.lock().clone();
    let reads = reads.load(Ordering::Relaxed);
    assert!(reads > 0, "the readers read nothing");
    assert!(
        stale.is_empty(),
        "{} stale reads of {reads}: {stale:?}",
        stale.len()
    );
    eprintln!("{reads} reads through the caches, 0 stale");

    if let Some((relay, source)) = current.take() {
        relay.shutdown().await;
        source.shutdown().await;
    }
    for s in subs.iter() {
        s.source.shutdown().await;
    }
    support::delete_stream(&nats_url(), &stream).await;
    f.cleanup().await;
}
