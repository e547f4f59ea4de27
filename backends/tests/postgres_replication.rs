//! [`PgReplicationSource`] against the real local PostgreSQL: losing nothing
//! across killed walsenders, aborted transactions, the key cap, a dropped slot,
//! and the source outliving its handle while a dispatcher is attached.
//!
//! Each test has its own schema, publication and slots, dropped at the end, so
//! the tests run in parallel. Nothing here is timed.
#![cfg(feature = "replication")]

#[path = "support/replication.rs"]
mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pgcachewatch_backends::replication::PgReplicationSource;
use pgcachewatch_core::{
    Cache, Dispatcher, Event, EventSource, GapReason, Health, Operation, RowKey, Signal,
    Subscription,
};
use pgcachewatch_strategies::Keyed;
use pgcachewatch_testkit::env::{database_url, eventually_within};
use support::{drop_slot, kill_walsender, Fixture};

const WAIT: Duration = Duration::from_secs(60);

async fn source(f: &Fixture, slot: &str) -> PgReplicationSource {
    PgReplicationSource::builder(database_url())
        .slot(slot)
        .publication(&f.publication)
        .create_slot_if_missing(true)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(300))
        .connect()
        .await
        .expect("replication source connects")
}

/// The next signal other than `Progress`.
async fn next(sub: &mut Subscription) -> Signal {
    loop {
        match tokio::time::timeout(WAIT, sub.recv()).await {
            Ok(Some(Signal::Progress(_))) => continue,
            Ok(Some(s)) => return s,
            Ok(None) => panic!("subscription ended"),
            Err(_) => panic!("no signal within {WAIT:?}"),
        }
    }
}

async fn next_event(sub: &mut Subscription) -> Arc<Event> {
    loop {
        match next(sub).await {
            Signal::Event(e) => return e,
            Signal::Health(_) => continue,
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

async fn healthy(sub: &mut Subscription) {
    loop {
        if let Signal::Health(Health::Healthy) = next(sub).await {
            return;
        }
    }
}

/// What an inline handler saw: keys by table, txids, gaps.
#[derive(Default)]
struct Seen {
    ids: HashSet<i64>,
    txids: HashSet<i64>,
    gaps: Vec<GapReason>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_killed_walsenders_lose_nothing_flush_nothing_and_serve_nothing_stale() {
    let f = Fixture::new("pgcw_rkill").await;
    let log = f.table("log");
    let items = f.table("items");
    f.exec(&format!("CREATE TABLE {log} (id bigserial PRIMARY KEY)"))
        .await;
    f.exec(&format!(
        "CREATE TABLE {items} (id bigint PRIMARY KEY, v bigint NOT NULL)"
    ))
    .await;
    f.exec(&format!(
        "INSERT INTO {items} SELECT g, 0 FROM generate_series(0, 9) g"
    ))
    .await;
    let slot = f.slot();
    let source = source(&f, &slot).await;

    // A cache of items.v by id, invalidated row by row.
    let cache: Cache<i64, i64> = Cache::new(100);
    let items_ref = format!("{}.items", f.schema);
    let dispatcher = Dispatcher::new()
        .attach(
            Keyed::per_table().table(items_ref.as_str(), |_: &Event, row: &RowKey| {
                row.get("id").and_then(|v| v.as_i64())
            }),
            cache.clone(),
        )
        .spawn(&source);
    // Everything delivered, seen inline (in the source's task, like the dispatcher).
    let seen = Arc::new(Mutex::new(Seen::default()));
    let log_seen = seen.clone();
    let _collector = source
        .attach_inline(Box::new(move |signal: &Signal| match signal {
            Signal::Event(e) => {
                let mut s = log_seen.lock();
                if let Some(t) = e.txid {
                    s.txids.insert(t);
                }
                if e.table == "log" {
                    for k in e.keys.iter().flatten() {
                        if let Some(id) = k.get("id").and_then(|v| v.as_i64()) {
                            s.ids.insert(id);
                        }
                    }
                }
            }
            Signal::Gap(g) => log_seen.lock().gaps.push(g.clone()),
            _ => {}
        }))
        .expect("the source attaches inline");
    let mut sub = source.subscribe();
    healthy(&mut sub).await;
    // Attaching flushes once (writes before it went unseen); none may follow.
    let flushes_at_attach = cache.stats().flushes;

    // Writer: inserts into log, and updates items.v with an increasing value;
    // remembers (id, value, xid) of every committed update.
    let stop = Arc::new(AtomicBool::new(false));
    let committed_ids = Arc::new(Mutex::new(Vec::<i64>::new()));
    let writes = Arc::new(Mutex::new(Vec::<(i64, i64, i64)>::new()));
    let writer = {
        let (db, stop, committed_ids, writes) = (
            f.db.clone(),
            stop.clone(),
            committed_ids.clone(),
            writes.clone(),
        );
        let (log, items) = (log.clone(), items.clone());
        tokio::spawn(async move {
            let mut seq = 0i64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let id: i64 =
                    sqlx::query_scalar(&format!("INSERT INTO {log} DEFAULT VALUES RETURNING id"))
                        .fetch_one(&db)
                        .await
                        .unwrap();
                committed_ids.lock().push(id);
                let row = seq % 10;
                let xid: i64 = sqlx::query_scalar(&format!(
                    "UPDATE {items} SET v = $1 WHERE id = $2 RETURNING (txid_current() % 4294967296)"
                ))
                .bind(seq)
                .bind(row)
                .fetch_one(&db)
                .await
                .unwrap();
                writes.lock().push((row, seq, xid));
            }
        })
    };
    // Reader: a read that starts after an update's event was applied must see it.
    let stale = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (db, stop, cache, seen, writes, stale, reads, items) = (
            f.db.clone(),
            stop.clone(),
            cache.clone(),
            seen.clone(),
            writes.clone(),
            stale.clone(),
            reads.clone(),
            items.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = n % 10;
                let floor = {
                    let seen = seen.lock();
                    writes
                        .lock()
                        .iter()
                        .filter(|(row, _, xid)| *row == id && seen.txids.contains(xid))
                        .map(|(_, v, _)| *v)
                        .max()
                        .unwrap_or(0)
                };
                let sql = format!("SELECT v FROM {items} WHERE id = $1");
                let v = cache
                    .get_or_load(id, || async {
                        sqlx::query_scalar::<_, i64>(&sql)
                            .bind(id)
                            .fetch_one(&db)
                            .await
                    })
                    .await
                    .unwrap();
                reads.fetch_add(1, Ordering::Relaxed);
                if v < floor {
                    stale.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    for kill in 0..20u64 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        eventually_within(WAIT, "the walsender to be up", || {
            source.stats().reconnects == kill && source.health().is_healthy()
        })
        .await;
        let start = Instant::now();
        while !kill_walsender(&f.db, &slot).await {
            assert!(start.elapsed() < WAIT, "no walsender to kill");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eventually_within(WAIT, "the source to reconnect", || {
            source.stats().reconnects == kill + 1
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    reader.await.unwrap();

    let committed: Vec<i64> = committed_ids.lock().clone();
    assert!(
        committed.len() > 20,
        "the writer wrote while the walsender was killed"
    );
    eventually_within(WAIT, "every committed write to be delivered", || {
        let seen = seen.lock();
        committed.iter().all(|id| seen.ids.contains(id))
    })
    .await;
    let gaps = seen.lock().gaps.clone();
    assert!(gaps.is_empty(), "gaps: {gaps:?}");
    assert_eq!(
        cache.stats().flushes,
        flushes_at_attach,
        "the cache was flushed after it attached"
    );
    assert_eq!(stale.load(Ordering::Relaxed), 0, "stale reads");
    assert!(reads.load(Ordering::Relaxed) > 0);
    let stats = source.stats();
    assert_eq!(stats.reconnects, 20);
    assert_eq!(stats.gaps, 0);
    assert!(stats.confirmed_lsn.is_some());
    dispatcher.shutdown().await;
    source.shutdown().await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_emit_nothing() {
    let f = Fixture::new("pgcw_rabort").await;
    let (t, marker) = (f.table("t"), f.table("marker"));
    f.exec(&format!("CREATE TABLE {t} (id int PRIMARY KEY)"))
        .await;
    f.exec(&format!("CREATE TABLE {marker} (id int PRIMARY KEY)"))
        .await;
    let slot = f.slot();
    let source = source(&f, &slot).await;
    let mut sub = source.subscribe();
    healthy(&mut sub).await;

    let mut tx = f.db.begin().await.unwrap();
    sqlx::query(&format!("INSERT INTO {t} VALUES (1), (2)"))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    f.exec(&format!("INSERT INTO {marker} VALUES (1)")).await;

    let e = next_event(&mut sub).await;
    assert_eq!(e.table, "marker", "the aborted insert produced {e:?}");
    assert_eq!(e.keys, Some(vec![RowKey::single("id", 1)]));
    assert_eq!(e.channel, slot);
    assert!(e.lsn.is_some() && e.txid.is_some() && e.sent_at.is_some());
    source.shutdown().await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_row_transaction_is_one_table_level_event_within_the_key_cap() {
    let f = Fixture::new("pgcw_rbig").await;
    let (big, small) = (f.table("big"), f.table("small"));
    f.exec(&format!("CREATE TABLE {big} (id int PRIMARY KEY)"))
        .await;
    f.exec(&format!("CREATE TABLE {small} (id int PRIMARY KEY)"))
        .await;
    let slot = f.slot();
    let source = PgReplicationSource::builder(database_url())
        .slot(&slot)
        .publication(&f.publication)
        .create_slot_if_missing(true)
        .key_cap(1_000)
        .connect()
        .await
        .unwrap();
    let mut sub = source.subscribe();
    healthy(&mut sub).await;

    f.exec(&format!(
        "INSERT INTO {big} SELECT g FROM generate_series(1, 100000) g"
    ))
    .await;
    f.exec(&format!("INSERT INTO {small} VALUES (1)")).await;

    let e = next_event(&mut sub).await;
    assert_eq!((e.table.as_str(), e.operation), ("big", Operation::Insert));
    assert_eq!(e.keys, None, "past the key cap: a table-level event");
    let e = next_event(&mut sub).await;
    assert_eq!(e.table, "small");
    assert_eq!(e.keys, Some(vec![RowKey::single("id", 1)]));
    let stats = source.stats();
    assert_eq!(stats.degraded_tables, 1);
    assert_eq!(stats.events, 2);
    source.shutdown().await;
    f.cleanup().await;
}

/// Kills the walsender and drops the slot, retrying until the drop wins the race
/// with the source's reconnect.
async fn drop_active_slot(f: &Fixture, slot: &str) {
    let start = Instant::now();
    loop {
        kill_walsender(&f.db, slot).await;
        let dropped = sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(slot)
            .execute(&f.db)
            .await;
        if dropped.is_ok() {
            return;
        }
        assert!(start.elapsed() < WAIT, "could not drop slot {slot}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_a_gap_and_a_clear_error() {
    let f = Fixture::new("pgcw_rdrop").await;
    let t = f.table("t");
    f.exec(&format!("CREATE TABLE {t} (id int PRIMARY KEY)"))
        .await;

    // 1. Recreating: Unhealthy, Gap(SlotLost), Healthy; then events flow again.
    let slot = f.slot();
    let source = PgReplicationSource::builder(database_url())
        .slot(&slot)
        .publication(&f.publication)
        .create_slot_if_missing(true)
        .reconnect_backoff(Duration::from_millis(200), Duration::from_millis(400))
        .connect()
        .await
        .unwrap();
    let mut sub = source.subscribe();
    healthy(&mut sub).await;
    drop_active_slot(&f, &slot).await;
    assert!(matches!(
        next(&mut sub).await,
        Signal::Health(Health::Unhealthy)
    ));
    match next(&mut sub).await {
        Signal::Gap(GapReason::SlotLost { detail }) => {
            assert!(detail.contains("dropped"), "{detail}")
        }
        other => panic!("expected Gap(SlotLost), got {other:?}"),
    }
    healthy(&mut sub).await;
    f.exec(&format!("INSERT INTO {t} VALUES (1)")).await;
    assert_eq!(
        next_event(&mut sub).await.keys,
        Some(vec![RowKey::single("id", 1)])
    );
    source.shutdown().await;

    // 2. Not recreating: Unhealthy with a clear error until the slot is back,
    //    then a gap (whatever was written meanwhile is gone) and Healthy.
    let slot = f.slot();
    let source = PgReplicationSource::builder(database_url())
        .slot(&slot)
        .publication(&f.publication)
        .create_slot_if_missing(true)
        .connect()
        .await
        .unwrap();
    source.shutdown().await;
    support::wait_slot_released(&f.db, &slot).await;
    let source = PgReplicationSource::builder(database_url())
        .slot(&slot)
        .publication(&f.publication)
        .reconnect_backoff(Duration::from_millis(200), Duration::from_millis(400))
        .connect()
        .await
        .unwrap();
    let mut sub = source.subscribe();
    healthy(&mut sub).await;
    drop_active_slot(&f, &slot).await;
    assert!(matches!(
        next(&mut sub).await,
        Signal::Health(Health::Unhealthy)
    ));
    eventually_within(WAIT, "the error in the stats", || {
        source
            .stats()
            .last_error
            .is_some_and(|e| e.contains("does not exist") && e.contains("create_slot_if_missing"))
    })
    .await;
    assert!(!source.health().is_healthy());
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&slot)
        .execute(&f.db)
        .await
        .unwrap();
    assert!(matches!(
        next(&mut sub).await,
        Signal::Gap(GapReason::SlotLost { .. })
    ));
    healthy(&mut sub).await;
    assert!(source.stats().last_error.is_none());
    source.shutdown().await;
    drop_slot(&f.db, &slot).await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_dispatcher_keeps_the_source_running() {
    let f = Fixture::new("pgcw_rkeep").await;
    let t = f.table("t");
    f.exec(&format!(
        "CREATE TABLE {t} (id bigint PRIMARY KEY, v bigint)"
    ))
    .await;
    f.exec(&format!("INSERT INTO {t} VALUES (1, 1)")).await;
    let slot = f.slot();
    let source = source(&f, &slot).await;
    let cache: Cache<i64, i64> = Cache::new(10);
    let dispatcher = Dispatcher::new()
        .attach(
            Keyed::new(|_: &Event, row: &RowKey| row.get("id").and_then(|v| v.as_i64())),
            cache.clone(),
        )
        .spawn(&source);
    let mut sub = source.subscribe();
    healthy(&mut sub).await;
    drop(sub);
    drop(source); // the dispatcher's attachment keeps the task running
    let sql = format!("SELECT v FROM {t} WHERE id = 1");
    let load = || async { sqlx::query_scalar::<_, i64>(&sql).fetch_one(&f.db).await };
    assert_eq!(cache.get_or_load(1, load).await.unwrap(), 1);
    f.exec(&format!("UPDATE {t} SET v = 2 WHERE id = 1")).await;
    eventually_within(WAIT, "the update to invalidate the entry", || {
        cache.get(&1).is_none()
    })
    .await;
    assert_eq!(cache.get_or_load(1, load).await.unwrap(), 2);
    // The last attachment gone, the task stops and releases the slot.
    dispatcher.shutdown().await;
    let db = f.db.clone();
    let slot2 = slot.clone();
    let start = Instant::now();
    loop {
        let active: bool =
            sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(&slot2)
                .fetch_one(&db)
                .await
                .unwrap();
        if !active {
            break;
        }
        assert!(start.elapsed() < WAIT, "the slot stayed active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.cleanup().await;
}

/// Read-your-writes through the source's positions: after a write, read
/// `pg_current_wal_lsn()`, `wait_for_lsn` on the dispatcher handle, then read
/// through the cache: the new value, every time. Every third round the write
/// goes to an unwatched table too, so the wait must end on a keepalive's
/// `Progress`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_then_a_wait_for_its_position_then_a_read_sees_it_every_time() {
    let f = Fixture::new("pgcw_rryw").await;
    let t = f.table("t");
    f.exec(&format!(
        "CREATE TABLE {t} (id bigint PRIMARY KEY, v bigint NOT NULL)"
    ))
    .await;
    f.exec(&format!("INSERT INTO {t} VALUES (1, 0)")).await;
    // Not in the publication's schema: its writes produce no event.
    let other = support::unique("pgcw_rryw_other");
    f.exec(&format!("CREATE TABLE public.{other} (v bigint)"))
        .await;
    let slot = f.slot();
    let source = source(&f, &slot).await;
    let cache: Cache<i64, i64> = Cache::new(10);
    let dispatcher = Dispatcher::new()
        .attach(
            Keyed::new(|_: &Event, row: &RowKey| row.get("id").and_then(|v| v.as_i64())),
            cache.clone(),
        )
        .spawn(&source);
    let mut sub = source.subscribe();
    healthy(&mut sub).await;
    drop(sub);

    let sql = format!("SELECT v FROM {t} WHERE id = 1");
    for i in 1..=150i64 {
        if i % 3 == 0 {
            f.exec(&format!("INSERT INTO public.{other} VALUES ({i})"))
                .await;
        }
        f.exec(&format!("UPDATE {t} SET v = {i} WHERE id = 1"))
            .await;
        if i % 3 == 0 {
            f.exec(&format!("INSERT INTO public.{other} VALUES ({i})"))
                .await;
        }
        let position: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&f.db)
            .await
            .unwrap();
        let position: pgcachewatch_core::Lsn = position.parse().unwrap();
        dispatcher
            .wait_for_lsn(position, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("round {i}: {e}"));
        let v = cache
            .get_or_load(1, || async {
                sqlx::query_scalar::<_, i64>(&sql).fetch_one(&f.db).await
            })
            .await
            .unwrap();
        assert_eq!(v, i, "round {i}: a read after the wait saw an older value");
    }
    dispatcher.shutdown().await;
    source.shutdown().await;
    f.exec(&format!("DROP TABLE public.{other}")).await;
    f.cleanup().await;
}
