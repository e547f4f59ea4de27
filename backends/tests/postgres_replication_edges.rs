//! [`PgReplicationSource`] at its edges, against real PostgreSQL: a commit
//! streamed before other sessions can see it, a slot consumed or replaced while
//! the source was away, keys from the primary key (not the replica identity),
//! partitions named by their root.
//!
//! The held-commit test starts a throw-away cluster of its own (a synchronous
//! standby that never connects holds the writer between its commit record and
//! its visibility); the others use the shared server, each with its own schema,
//! publication and slots. Nothing here is timed.
#![cfg(feature = "replication")]

#[path = "support/replication.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use pgcachewatch_backends::replication::PgReplicationSource;
use pgcachewatch_core::{
    Cache, Dispatcher, Event, EventSource, GapReason, Health, Operation, RowKey, Signal,
    Subscription,
};
use pgcachewatch_strategies::Greedy;
use pgcachewatch_testkit::cluster::OwnPostgres;
use pgcachewatch_testkit::env::database_url;
use pgcachewatch_testkit::proxy::FaultProxy;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::Connection;
use support::Fixture;

const WAIT: Duration = Duration::from_secs(30);

/// The next signal other than `Progress`, within [`WAIT`].
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

async fn healthy(sub: &mut Subscription) {
    while !matches!(next(sub).await, Signal::Health(Health::Healthy)) {}
}

/// Events until one of `table` arrives (gaps and health skipped).
async fn event_of(sub: &mut Subscription, table: &str) -> Arc<Event> {
    loop {
        if let Signal::Event(e) = next(sub).await {
            if e.table == table {
                return e;
            }
        }
    }
}

/// Signals received within `d` (`Progress` left out).
async fn drain_for(sub: &mut Subscription, d: Duration) -> Vec<Signal> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(Some(s)) = tokio::time::timeout_at(deadline, sub.recv()).await {
        if !matches!(s, Signal::Progress(_)) {
            out.push(s);
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LoadError(String);

/// `v` of row 1, read by a new snapshot of another session.
async fn load_v(pool: &sqlx::PgPool) -> Result<String, LoadError> {
    sqlx::query_scalar("SELECT v FROM t WHERE id = 1")
        .fetch_one(pool)
        .await
        .map_err(|e| LoadError(e.to_string()))
}

/// Item 1: a writer held between its commit record and its visibility (a
/// synchronous standby that never answers) while another session loads
/// through the cache. The event must not come before the row is visible: if
/// it did, the load in the window would store the old row after the
/// invalidation, and the cache would serve it after the release, healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_announced_only_once_other_sessions_can_see_it() {
    let pg = OwnPostgres::start(&[
        "synchronous_standby_names = 'never_connects'",
        // Everyone but the held writer commits without waiting for it.
        "synchronous_commit = local",
    ])
    .expect("a throw-away cluster starts");
    let url = pg.url("postgres");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .expect("connect");
    for sql in [
        "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)",
        "INSERT INTO t VALUES (1, 'old')",
        "CREATE PUBLICATION p FOR TABLE t",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
    let source = PgReplicationSource::builder(&url)
        .slot("held")
        .publication("p")
        .create_slot_if_missing(true)
        .connect()
        .await
        .expect("replication source connects");
    let mut sub = source.subscribe();
    let cache: Cache<i32, String> = Cache::new(10);
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    healthy(&mut sub).await;
    let read = || cache.try_get_with(1, || load_v(&pool));
    assert_eq!(*read().await.unwrap(), *"old");

    // The writer: its commit record is flushed, then it waits for the standby.
    let mut writer = PgConnection::connect(&url).await.expect("writer connects");
    let writer_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut writer)
        .await
        .unwrap();
    sqlx::query("SET synchronous_commit = on")
        .execute(&mut writer)
        .await
        .unwrap();
    let update = tokio::spawn(async move {
        sqlx::query("UPDATE t SET v = 'new' WHERE id = 1")
            .execute(&mut writer)
            .await
            .map(|_| ())
    });
    let mut waiting = false;
    for _ in 0..1000 {
        waiting = sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
             WHERE pid = $1 AND wait_event = 'SyncRep')",
        )
        .bind(writer_pid)
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        waiting,
        "the writer never waited for its standby:\n{}",
        pg.log()
    );
    // The commit is in the WAL, and streamed; loads in this window read the
    // old row (it is not visible) and may store it.
    let during = drain_for(&mut sub, Duration::from_millis(1000)).await;
    for _ in 0..20 {
        assert_eq!(*read().await.unwrap(), *"old", "not visible yet");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Release the writer: its commit stays committed and becomes visible.
    sqlx::query("SELECT pg_cancel_backend($1)")
        .bind(writer_pid)
        .execute(&pool)
        .await
        .unwrap();
    let _ = update.await;
    assert_eq!(
        load_v(&pool).await.unwrap(),
        "new",
        "a new snapshot sees it"
    );
    for _ in 0..200 {
        if *read().await.unwrap() == *"new" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        *read().await.unwrap(),
        *"new",
        "the cache serves the old row after the commit became visible (health {:?}, \
         signals during the hold: {during:?})",
        source.health()
    );
    assert!(
        !during.iter().any(|s| matches!(s, Signal::Event(_))),
        "an event before its commit is visible: {during:?}"
    );
    let event = event_of(&mut sub, "t").await;
    assert_eq!(event.operation, Operation::Update);
    assert!(source.stats().visibility_waits >= 1, "{:?}", source.stats());
    dispatcher.shutdown().await;
    source.shutdown().await;
}

/// The source streams through a proxy the test can cut and hold shut.
async fn proxied_source(f: &Fixture, slot: &str, proxy: &FaultProxy) -> PgReplicationSource {
    let url = database_url();
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("DATABASE_URL");
    let options = options
        .host(&proxy.addr().ip().to_string())
        .port(proxy.addr().port());
    PgReplicationSource::builder_with_options(options)
        .slot(slot)
        .publication(&f.publication)
        .create_slot_if_missing(true)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        // Also the side connection's query timeout: long enough for a loaded
        // machine, short enough that attempts through the paused proxy fail.
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("replication source connects through the proxy")
}

/// What replaces the slot's history while the source is away.
#[derive(Clone, Copy, Debug)]
enum Meddle {
    /// `pg_replication_slot_advance` to the current WAL position.
    Advance,
    /// Dropped and created anew under the same name.
    Recreate,
}

/// Items 2: the slot moves on while the source is disconnected; writes in
/// between never reach it. It must say `Gap`, not resume silently.
async fn slot_changed_while_away_is_a_gap(meddle: Meddle) {
    let f = Fixture::new("pgcw_rslot").await;
    let items = f.table("items");
    f.exec(&format!("CREATE TABLE {items} (id int PRIMARY KEY, v int)"))
        .await;
    let slot = f.slot();
    let options: sqlx::postgres::PgConnectOptions = database_url().parse().expect("DATABASE_URL");
    let upstream =
        tokio::net::lookup_host(format!("{}:{}", options.get_host(), options.get_port()))
            .await
            .unwrap()
            .next()
            .unwrap();
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let source = proxied_source(&f, &slot, &proxy).await;
    let mut sub = source.subscribe();
    healthy(&mut sub).await;
    f.exec(&format!("INSERT INTO {items} VALUES (1, 1)")).await;
    event_of(&mut sub, "items").await;

    // Away: the stream is cut and reconnecting fails until the proxy resumes.
    proxy.pause();
    proxy.cut();
    let reconnects_before = source.stats().reconnects;
    support::wait_slot_released(&f.db, &slot).await;
    f.exec(&format!("INSERT INTO {items} VALUES (2, 2)")).await;
    match meddle {
        Meddle::Advance => {
            f.exec(&format!(
                "SELECT pg_replication_slot_advance('{slot}', pg_current_wal_lsn())"
            ))
            .await
        }
        Meddle::Recreate => {
            f.exec(&format!("SELECT pg_drop_replication_slot('{slot}')"))
                .await;
            f.exec(&format!(
                "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
            ))
            .await;
        }
    }
    proxy.resume();

    // Until healthy again after the reconnect that follows the meddling (a
    // Healthy still queued from before the cut does not count).
    let mut seen = Vec::new();
    loop {
        let s = next(&mut sub).await;
        let done = matches!(s, Signal::Health(Health::Healthy))
            && source.stats().reconnects > reconnects_before;
        seen.push(s);
        if done {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|s| matches!(s, Signal::Gap(GapReason::SlotLost { .. }))),
        "{meddle:?}: the write made while away is gone, and no gap said so: {seen:?}"
    );
    // Caching resumes: later writes arrive.
    f.exec(&format!("INSERT INTO {items} VALUES (3, 3)")).await;
    let e = event_of(&mut sub, "items").await;
    assert_eq!(e.keys, Some(vec![RowKey::single("id", 3)]));
    source.shutdown().await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_advanced_by_someone_else_while_away_is_a_gap() {
    slot_changed_while_away_is_a_gap(Meddle::Advance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_and_recreated_while_away_is_a_gap() {
    slot_changed_while_away_is_a_gap(Meddle::Recreate).await;
}

async fn source(f: &Fixture, slot: &str) -> PgReplicationSource {
    PgReplicationSource::builder(database_url())
        .slot(slot)
        .publication(&f.publication)
        .create_slot_if_missing(true)
        .connect()
        .await
        .expect("replication source connects")
}

/// Item 4: keys are the primary key whatever the replica identity says; a key
/// that cannot be known is a table-level event, never another column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_the_primary_key_whatever_the_replica_identity() {
    let f = Fixture::new("pgcw_rident").await;
    let by_email = f.table("by_email");
    let full = f.table("full_rows");
    f.exec(&format!(
        "CREATE TABLE {by_email} (id int PRIMARY KEY, email text NOT NULL UNIQUE)"
    ))
    .await;
    f.exec(&format!(
        "ALTER TABLE {by_email} REPLICA IDENTITY USING INDEX by_email_email_key"
    ))
    .await;
    f.exec(&format!(
        "CREATE TABLE {full} (id int PRIMARY KEY, body text NOT NULL)"
    ))
    .await;
    f.exec(&format!("ALTER TABLE {full} REPLICA IDENTITY FULL"))
        .await;
    let slot = f.slot();
    let source = source(&f, &slot).await;
    let mut sub = source.subscribe();
    healthy(&mut sub).await;

    f.exec(&format!("INSERT INTO {by_email} VALUES (1, 'a@x')"))
        .await;
    let e = event_of(&mut sub, "by_email").await;
    assert_eq!(e.keys, Some(vec![RowKey::single("id", 1)]));
    // The id may change without the identity (email) changing: no old key is
    // sent, so the event must cover the table.
    f.exec(&format!("UPDATE {by_email} SET id = 2 WHERE id = 1"))
        .await;
    let e = event_of(&mut sub, "by_email").await;
    assert_eq!(e.keys, None, "an unknowable old key is table-level: {e:?}");
    f.exec(&format!("DELETE FROM {by_email} WHERE id = 2"))
        .await;
    let e = event_of(&mut sub, "by_email").await;
    assert!(
        e.keys.iter().flatten().all(|k| k.get("email").is_none()),
        "never the identity's column: {e:?}"
    );

    // FULL: the old row comes whole; keys stay the primary key, old and new.
    let big = "x".repeat(100_000);
    f.exec(&format!(
        "INSERT INTO {full} SELECT g, '{big}' FROM generate_series(1, 20) g"
    ))
    .await;
    event_of(&mut sub, "full_rows").await;
    f.exec(&format!("UPDATE {full} SET id = id + 100")).await;
    let e = event_of(&mut sub, "full_rows").await;
    let mut ids: Vec<i64> = e
        .keys
        .iter()
        .flatten()
        .map(|k| {
            assert_eq!(k.0.len(), 1, "only the key column: {k:?}");
            k.get("id").and_then(|v| v.as_i64()).expect("id")
        })
        .collect();
    ids.sort_unstable();
    let expected: Vec<i64> = (1..=20).chain(101..=120).collect();
    assert_eq!(ids, expected);
    source.shutdown().await;
    f.cleanup().await;
}

/// Item 6: a write through a partition is an event of the partitioned table
/// the user watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_write_names_the_partitioned_table() {
    let f = Fixture::new("pgcw_rpart").await;
    let orders = f.table("orders");
    let eu = f.table("orders_eu");
    f.exec(&format!(
        "CREATE TABLE {orders} (id int, region text, PRIMARY KEY (id, region)) \
         PARTITION BY LIST (region)"
    ))
    .await;
    f.exec(&format!(
        "CREATE TABLE {eu} PARTITION OF {orders} FOR VALUES IN ('eu')"
    ))
    .await;
    let slot = f.slot();
    let source = source(&f, &slot).await;
    let mut sub = source.subscribe();
    healthy(&mut sub).await;
    f.exec(&format!("INSERT INTO {orders} VALUES (7, 'eu')"))
        .await;
    f.exec(&format!("UPDATE {eu} SET id = 8 WHERE id = 7"))
        .await;
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Signal::Event(e) = next(&mut sub).await {
            got.push((e.table.to_string(), e.operation, e.keys.clone()));
        }
    }
    let key = |id: i64| {
        let mut k = RowKey::single("id", id);
        k.0.insert("region".into(), "eu".into());
        k
    };
    assert_eq!(
        got,
        vec![
            ("orders".to_owned(), Operation::Insert, Some(vec![key(7)])),
            (
                "orders".to_owned(),
                Operation::Update,
                Some(vec![key(8), key(7)])
            ),
        ]
    );
    source.shutdown().await;
    f.cleanup().await;
}

/// The keys of `n` events of `table` from `sub`, as sorted JSON texts per event.
async fn keys_of(sub: &mut Subscription, tables: &[String], n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        if let Signal::Event(e) = next(sub).await {
            if !tables.iter().any(|t| *t == *e.table) {
                continue;
            }
            let mut keys: Vec<String> = e
                .keys
                .iter()
                .flatten()
                .map(|k| serde_json::to_string(&k.0).expect("json"))
                .collect();
            keys.sort();
            out.push((format!("{} {}", e.table, e.operation), keys.join(" ")));
        }
    }
    out.sort();
    out
}

/// Item 5: a `Keyed` mapper written for one source maps the same rows on the
/// other: the LISTEN triggers and the replication stream give identical keys
/// for every common key type, whatever the writer's time zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sources_give_identical_keys_for_every_common_key_type() {
    use pgcachewatch_backends::postgres::install::{Installer, TableName};
    use pgcachewatch_backends::postgres::PgListenerSource;

    let f = Fixture::new("pgcw_rkeys").await;
    // (table, key columns, two key values as SQL; the first row's key is
    // changed to the second's by the update).
    let cases: [(&str, &str, &str, &str); 10] = [
        ("k_int2", "k int2", "7", "-3"),
        ("k_int4", "k int4", "2147483647", "-2147483648"),
        ("k_int8", "k int8", "9007199254740993", "-1"),
        (
            "k_numeric",
            "k numeric",
            "1.50",
            "123456789012345678901234.5",
        ),
        (
            "k_text",
            "k text",
            r#"E'it''s "quoted" \\ ünïcødé ✓'"#,
            "'plain'",
        ),
        (
            "k_uuid",
            "k uuid",
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
            "'00000000-0000-0000-0000-000000000000'",
        ),
        ("k_bool", "k bool", "true", "false"),
        ("k_date", "k date", "'2024-02-29'", "'1999-12-31'"),
        (
            "k_tstz",
            "k timestamptz",
            "'2024-05-01 10:00:00.123+02'",
            "'2024-05-01 23:59:59.999999-07:30'",
        ),
        ("k_pair", "k int, k2 text", "1, 'a'", "2, 'b'"),
    ];
    let channel = support::unique("pgcw_keys");
    let mut tables = Vec::new();
    for (table, columns, _, _) in &cases {
        let keys = columns
            .split(", ")
            .map(|c| c.split(' ').next().unwrap_or(c))
            .collect::<Vec<_>>()
            .join(", ");
        f.exec(&format!(
            "CREATE TABLE {} ({columns}, v int, PRIMARY KEY ({keys}))",
            f.table(table)
        ))
        .await;
        tables.push(TableName::new(&f.schema, *table).expect("name"));
    }
    Installer::new()
        .channel(&channel)
        .row_keys(true)
        .function_schema(&f.schema)
        .install(&f.db, &tables)
        .await
        .expect("triggers install");
    let listen = PgListenerSource::builder(database_url())
        .channel(&channel)
        .connect()
        .await
        .expect("listener connects");
    let slot = f.slot();
    let replication = source(&f, &slot).await;
    let (mut from_listen, mut from_slot) = (listen.subscribe(), replication.subscribe());
    healthy(&mut from_listen).await;
    healthy(&mut from_slot).await;

    // A writer far from UTC: timestamptz keys must not depend on it.
    let mut writer = PgConnection::connect(&database_url()).await.unwrap();
    sqlx::query("SET TimeZone = 'Asia/Kathmandu'")
        .execute(&mut writer)
        .await
        .unwrap();
    let names: Vec<String> = cases.iter().map(|c| c.0.to_owned()).collect();
    for (table, columns, a, b) in &cases {
        let t = f.table(table);
        let keys: Vec<&str> = columns
            .split(", ")
            .map(|c| c.split(' ').next().unwrap_or(c))
            .collect();
        for sql in [
            format!("INSERT INTO {t} VALUES ({a}, 1)"),
            // The (only) row's key changes: old and new key.
            format!("UPDATE {t} SET ({}) = ROW({b})", keys.join(", ")),
            format!("DELETE FROM {t}"),
        ] {
            sqlx::query(&sql)
                .execute(&mut writer)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
    let n = cases.len() * 3;
    let listened = keys_of(&mut from_listen, &names, n).await;
    let streamed = keys_of(&mut from_slot, &names, n).await;
    for (l, s) in listened.iter().zip(&streamed) {
        assert_eq!(l, s, "LISTEN (left) and replication (right) disagree");
    }
    assert_eq!(listened.len(), streamed.len());
    listen.shutdown().await;
    replication.shutdown().await;
    f.cleanup().await;
}

/// Readers in other sessions under 2 writers, 4 readers, 1,000 keys and killed
/// walsenders: a read that starts after the event of version `v` was applied
/// never returns an older version. Before commits were held until visible,
/// a load in the window between a commit's record and its visibility stored
/// the old row on a healthy cache (stale hits in about half of such runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_in_other_sessions_never_read_stale_under_writers_and_kills() {
    use std::collections::{HashMap, HashSet};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use parking_lot::Mutex;
    use pgcachewatch_strategies::Keyed;

    const KEYS: i64 = 1_000;
    let f = Fixture::new("pgcw_rstress").await;
    let items = f.table("items");
    f.exec(&format!(
        "CREATE TABLE {items} (id bigint PRIMARY KEY, v bigint NOT NULL)"
    ))
    .await;
    f.exec(&format!(
        "INSERT INTO {items} SELECT g, 0 FROM generate_series(0, {}) g",
        KEYS - 1
    ))
    .await;
    let slot = f.slot();
    let source = PgReplicationSource::builder(database_url())
        .slot(&slot)
        .publication(&f.publication)
        .create_slot_if_missing(true)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect()
        .await
        .expect("replication source connects");
    let cache: Cache<i64, i64> = Cache::new(2 * KEYS as usize);
    let table = format!("{}.items", f.schema);
    let dispatcher = Dispatcher::new()
        .attach(
            Keyed::per_table().table(table.as_str(), |_: &Event, row: &RowKey| {
                row.get("id").and_then(|v| v.as_i64())
            }),
            cache.clone(),
        )
        .spawn(&source);
    // Transactions applied, seen inline after the dispatcher applied them.
    let applied = Arc::new(Mutex::new(HashSet::<i64>::new()));
    let seen = applied.clone();
    let _collector = source
        .attach_inline(Box::new(move |signal: &Signal| {
            if let Signal::Event(e) = signal {
                if let Some(t) = e.txid {
                    seen.lock().insert(t);
                }
            }
        }))
        .expect("inline");
    let mut sub = source.subscribe();
    healthy(&mut sub).await;
    drop(sub);

    // Committed versions per key, with their (32-bit) transaction ids.
    let writes = Arc::new(Mutex::new(HashMap::<i64, Vec<(i64, i64)>>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..2i64 {
        let (db, stop, writes, items) = (f.db.clone(), stop.clone(), writes.clone(), items.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = w;
            while !stop.load(Ordering::Relaxed) {
                n = (n * 7919 + 17) % KEYS;
                let (v, xid): (i64, i64) = sqlx::query_as(&format!(
                    "UPDATE {items} SET v = v + 1 WHERE id = $1 \
                     RETURNING v, (txid_current() % 4294967296)"
                ))
                .bind(n)
                .fetch_one(&db)
                .await
                .unwrap();
                writes.lock().entry(n).or_default().push((v, xid));
            }
        }));
    }
    let (stale, reads) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    for r in 0..4i64 {
        let (db, stop, writes, applied, cache, items, stale, reads) = (
            f.db.clone(),
            stop.clone(),
            writes.clone(),
            applied.clone(),
            cache.clone(),
            items.clone(),
            stale.clone(),
            reads.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = r;
            let sql = format!("SELECT v FROM {items} WHERE id = $1");
            while !stop.load(Ordering::Relaxed) {
                n = (n * 31 + 7) % KEYS;
                let floor = {
                    let applied = applied.lock();
                    writes.lock().get(&n).map_or(0, |versions| {
                        versions
                            .iter()
                            .filter(|(_, xid)| applied.contains(xid))
                            .map(|(v, _)| *v)
                            .max()
                            .unwrap_or(0)
                    })
                };
                let v = cache
                    .get_or_load(n, || async {
                        sqlx::query_scalar::<_, i64>(&sql)
                            .bind(n)
                            .fetch_one(&db)
                            .await
                    })
                    .await
                    .unwrap();
                reads.fetch_add(1, Ordering::Relaxed);
                if v < floor {
                    stale.fetch_add(1, Ordering::Relaxed);
                }
                // A hit never yields: let the source and the writers run.
                tokio::task::yield_now().await;
            }
        }));
    }
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        support::kill_walsender(&f.db, &slot).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let written: Vec<i64> = writes
        .lock()
        .values()
        .flatten()
        .map(|(_, xid)| *xid)
        .collect();
    let mut lost = written.len();
    for _ in 0..1200 {
        lost = {
            let applied = applied.lock();
            written.iter().filter(|x| !applied.contains(x)).count()
        };
        if lost == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = source.stats();
    assert_eq!(
        stale.load(Ordering::Relaxed),
        0,
        "stale reads among {} ({stats:?})",
        reads.load(Ordering::Relaxed)
    );
    assert_eq!(lost, 0, "committed writes never delivered ({stats:?})");
    assert_eq!(stats.gaps, 0, "nothing was lost, so no gap");
    assert!(written.len() > 100 && reads.load(Ordering::Relaxed) > 1000);
    assert!(cache.stats().hits > 0, "caching resumed");
    dispatcher.shutdown().await;
    source.shutdown().await;
    f.cleanup().await;
}
