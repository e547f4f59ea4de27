//! The PostgreSQL LISTEN source against the real local PostgreSQL
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`).
//!
//! Every test uses its own channel (and table) names, so test binaries may run in
//! parallel against one database. Conditions are awaited with bounded polling,
//! never with a sleep followed by an assertion.
#![cfg(feature = "postgres")]

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgcachewatch_backends::postgres::listener::{MalformedPolicy, PgListenerSource};
use pgcachewatch_core::{
    Cache, Dispatcher, Error, EventSource, GapReason, Health, Operation, Signal, Subscription,
};
use pgcachewatch_strategies::Greedy;
use pgcachewatch_testkit::env::{database_url, eventually_within, unique_name as unique};
use pgcachewatch_testkit::proxy::FaultProxy;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

const PATIENCE: Duration = Duration::from_secs(10);

async fn admin() -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .connect(&database_url())
        .await
        .expect("PostgreSQL must be running at DATABASE_URL")
}

async fn notify(db: &PgPool, channel: &str, payload: &str) {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(db)
        .await
        .unwrap();
}

/// The next signal, failing the test if none comes within [`PATIENCE`].
async fn next(sub: &mut Subscription) -> Signal {
    tokio::time::timeout(PATIENCE, sub.recv())
        .await
        .expect("no signal within 10 s")
        .expect("the subscription ended")
}

/// Receives until a signal matches, returning everything seen on the way.
async fn until(sub: &mut Subscription, mut pred: impl FnMut(&Signal) -> bool) -> Vec<Signal> {
    let mut seen = Vec::new();
    loop {
        let s = next(sub).await;
        let done = pred(&s);
        seen.push(s);
        if done {
            return seen;
        }
    }
}

#[track_caller]
fn assert_gap(s: Signal, reason: GapReason) {
    assert!(
        matches!(&s, Signal::Gap(r) if *r == reason),
        "expected Gap({reason:?}), got {s:?}"
    );
}

fn is_health(s: &Signal, h: Health) -> bool {
    matches!(s, Signal::Health(x) if *x == h)
}

/// Sends PostgreSQL's notification for an update of `table`, as the trigger would.
const OUR_PAYLOAD: &str = "json_build_object('operation', 'update', 'schema', 'public', \
     'table', $2::text, 'sent_at', clock_timestamp(), 'txid', txid_current())::text";

#[tokio::test]
async fn events_from_pg_notify_arrive_parsed_in_both_payload_shapes() {
    let db = admin().await;
    let (a, b) = (unique("pgcw_l_events_a"), unique("pgcw_l_events_b"));
    let source = PgListenerSource::builder(database_url())
        .channels([a.clone(), b.clone()])
        .heartbeat_interval(Duration::from_millis(50))
        .connect()
        .await
        .unwrap();
    assert_eq!(source.health(), Health::Healthy);
    assert!(source.stats().backend_pid.is_some());
    let mut sub = source.subscribe();
    assert!(is_health(&next(&mut sub).await, Health::Healthy));

    // pgcachewatch's payload, built the way the trigger builds it.
    let txid: i64 = sqlx::query_scalar(&format!(
        "SELECT txid_current() FROM (SELECT pg_notify($1, {OUR_PAYLOAD})) n"
    ))
    .bind(&a)
    .bind("orders")
    .fetch_one(&db)
    .await
    .unwrap();
    let Signal::Event(e) = next(&mut sub).await else {
        panic!("expected an event")
    };
    assert_eq!(e.channel, a);
    assert_eq!(e.operation, Operation::Update);
    assert_eq!(e.schema.as_deref(), Some("public"));
    assert_eq!(e.table, "orders");
    assert_eq!(e.txid, Some(txid));
    assert!(e.sent_at.is_some_and(|t| t <= e.received_at));

    // PGCacheWatch's payload, unchanged, on the second channel.
    notify(
        &db,
        &b,
        r#"{"operation":"insert","table":"users","sent_at":"2024-05-01 10:00:00.123456+00"}"#,
    )
    .await;
    let Signal::Event(e) = next(&mut sub).await else {
        panic!("expected an event")
    };
    assert_eq!(
        (
            e.channel.as_str(),
            e.operation,
            e.table.as_str(),
            e.schema.as_deref()
        ),
        (b.as_str(), Operation::Insert, "users", None)
    );

    // Heartbeats keep flowing but are never events.
    let beats = source.stats().heartbeats;
    eventually_within(PATIENCE, "two more heartbeats are answered", || {
        source.stats().heartbeats >= beats + 2
    })
    .await;
    assert!(source.stats().last_heartbeat_rtt.is_some());
    assert!(
        sub.try_recv().is_err(),
        "heartbeats must not reach subscribers"
    );
    let stats = source.stats();
    assert_eq!((stats.events, stats.malformed, stats.gaps), (2, 0, 0));
    assert!(stats.last_event_at.is_some());

    let usage = source.queue_usage().await.unwrap();
    assert!((0.0..=1.0).contains(&usage), "{usage}");
    source.shutdown().await;
}

#[tokio::test]
async fn one_source_fans_out_to_two_subscribers_and_two_caches() {
    let db = admin().await;
    let channel = unique("pgcw_l_fanout");
    let source = PgListenerSource::builder(database_url())
        .channel(&channel)
        .connect()
        .await
        .unwrap();
    let users: Cache<u32, &str> = Cache::new(10);
    let orders: Cache<u32, &str> = Cache::new(10);
    let d1 = Dispatcher::new()
        .attach(Greedy::new(), users.clone())
        .spawn(&source);
    let d2 = Dispatcher::new()
        .attach(Greedy::new(), orders.clone())
        .spawn(&source);
    let (mut s1, mut s2) = (source.subscribe(), source.subscribe());
    for c in [&users, &orders] {
        c.get_or_load(1, || async { Ok::<_, Error>("old") })
            .await
            .unwrap();
        assert_eq!(c.get(&1), Some("old"));
    }

    notify(&db, &channel, r#"{"operation":"update","table":"t"}"#).await;
    for sub in [&mut s1, &mut s2] {
        let seen = until(sub, |s| s.as_event().is_some()).await;
        assert_eq!(seen.len(), 2, "health, then the event: {seen:?}");
    }
    eventually_within(PATIENCE, "both caches dropped the entry", || {
        users.get(&1).is_none() && orders.get(&1).is_none()
    })
    .await;
    assert_eq!((d1.stats().events, d2.stats().events), (1, 1));
    d1.shutdown().await;
    d2.shutdown().await;
    source.shutdown().await;
}

/// A table with one row `(id 1, v)`, dropped when the test ends.
struct Row {
    db: PgPool,
    table: String,
}

impl Row {
    async fn create(db: &PgPool, prefix: &str) -> Row {
        let table = unique(prefix);
        sqlx::query(&format!(
            "CREATE TABLE public.{table} (id int PRIMARY KEY, v bigint NOT NULL)"
        ))
        .execute(db)
        .await
        .unwrap();
        sqlx::query(&format!("INSERT INTO public.{table} VALUES (1, 0)"))
            .execute(db)
            .await
            .unwrap();
        Row {
            db: db.clone(),
            table,
        }
    }

    async fn read(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(&format!("SELECT v FROM public.{} WHERE id = 1", self.table))
            .fetch_one(&self.db)
            .await
    }

    /// Commits `v` and its notification in one transaction; returns the txid.
    async fn write(&self, channel: &str, v: i64) -> i64 {
        let mut tx = self.db.begin().await.unwrap();
        sqlx::query(&format!(
            "UPDATE public.{} SET v = $1 WHERE id = 1",
            self.table
        ))
        .bind(v)
        .execute(&mut *tx)
        .await
        .unwrap();
        let txid: i64 = sqlx::query_scalar(&format!(
            "SELECT txid_current() FROM (SELECT pg_notify($1, {OUR_PAYLOAD})) n"
        ))
        .bind(channel)
        .bind(&self.table)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        txid
    }

    async fn drop_table(self) {
        sqlx::query(&format!("DROP TABLE IF EXISTS public.{}", self.table))
            .execute(&self.db)
            .await
            .unwrap();
    }
}

/// Everything a writer needs to know when its write has been processed.
struct Processed<'a> {
    sub: Subscription,
    dispatcher: &'a pgcachewatch_core::DispatcherHandle,
    source: &'a PgListenerSource,
    /// Gaps this subscription has seen (it was made before the source's first).
    gaps_seen: u64,
}

impl Processed<'_> {
    /// Forget what was emitted so far (call before a write).
    fn forget(&mut self) {
        while let Ok(s) = self.sub.try_recv() {
            self.gaps_seen += u64::from(s.is_gap());
        }
    }

    /// The source's gap count, read right after a write committed: only a gap
    /// counted beyond it was emitted after the commit, and so covers the write.
    fn gaps_now(&self) -> u64 {
        self.source.stats().gaps
    }

    /// Waits until the source delivered the write's event, or a gap emitted after
    /// the write committed (after which the dispatcher flushes), and the
    /// dispatcher applied it.
    async fn wait(&mut self, txid: i64, gaps_at_commit: u64) {
        let gaps_seen = &mut self.gaps_seen;
        until(&mut self.sub, |s| match s {
            Signal::Event(e) => e.txid == Some(txid),
            Signal::Gap(_) => {
                *gaps_seen += 1;
                *gaps_seen > gaps_at_commit
            }
            _ => false,
        })
        .await;
        self.dispatcher.sync().await;
    }
}

/// Reads `key 1` through the cache until told to stop; panics on a stale read:
/// one older than the newest value whose notification was already processed
/// when the read began.
fn spawn_reader(
    cache: Cache<i32, i64>,
    row: Arc<Row>,
    processed: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Acquire) {
            let floor = processed.load(Ordering::SeqCst);
            let row = row.clone();
            let v = cache
                .get_or_load(1, || async move { row.read().await })
                .await
                .unwrap();
            assert!(
                v >= floor,
                "stale read: got {v}, but {floor} was committed and processed before the read began"
            );
            reads.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_gap_flush_reconnect_and_no_stale_read_meanwhile() {
    let db = admin().await;
    let row = Arc::new(Row::create(&db, "pgcw_l_kill").await);
    let channel = unique("pgcw_l_kill");
    let source = PgListenerSource::builder(database_url())
        .channel(&channel)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let cache: Cache<i32, i64> = Cache::new(16);
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    let mut processed_wait = Processed {
        sub: source.subscribe(),
        dispatcher: &dispatcher,
        source: &source,
        gaps_seen: 0,
    };
    let mut observer = source.subscribe();
    assert!(is_health(&next(&mut observer).await, Health::Healthy));
    let processed = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = spawn_reader(
        cache.clone(),
        row.clone(),
        processed.clone(),
        stop.clone(),
        reads.clone(),
    );

    let mut version = 0;
    const KILLS: u64 = 4;
    for round in 0..KILLS {
        // Normal operation: every write is noticed.
        for _ in 0..5 {
            version += 1;
            processed_wait.forget();
            let txid = row.write(&channel, version).await;
            let gaps = processed_wait.gaps_now();
            processed_wait.wait(txid, gaps).await;
            processed.store(version, Ordering::SeqCst);
        }
        let hits = cache.stats().hits;
        eventually_within(PATIENCE, "the reader hits the cache", || {
            cache.stats().hits > hits
        })
        .await;

        // Kill the listening backend, and keep writing while it is down.
        let pid = source.stats().backend_pid.expect("connected");
        let flushes = cache.stats().flushes;
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(i32::try_from(pid).unwrap())
            .fetch_one(&db)
            .await
            .unwrap();
        assert!(killed, "round {round}: backend {pid} not terminated");
        for _ in 0..3 {
            version += 1;
            processed_wait.forget();
            let txid = row.write(&channel, version).await;
            let gaps = processed_wait.gaps_now();
            processed_wait.wait(txid, gaps).await;
            processed.store(version, Ordering::SeqCst);
        }

        // The source saw the loss, flushed the cache, reconnected, in that order.
        until(&mut observer, |s| is_health(s, Health::Unhealthy)).await;
        let seen = until(&mut observer, |s| is_health(s, Health::Healthy)).await;
        let seen: Vec<&Signal> = seen.iter().filter(|s| s.as_event().is_none()).collect();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            matches!(seen[0], Signal::Gap(GapReason::ConnectionLost { .. })),
            "{seen:?}"
        );
        assert!(
            matches!(seen[1], Signal::Gap(GapReason::Reconnected)),
            "{seen:?}"
        );
        assert!(is_health(seen[2], Health::Healthy), "{seen:?}");
        assert_eq!(source.stats().reconnects, round + 1);
        assert_ne!(source.stats().backend_pid, Some(pid));
        dispatcher.sync().await;
        assert!(cache.stats().flushes >= flushes + 2, "gaps flush the cache");

        // Caching resumes, and events flow on the new connection.
        let hits = cache.stats().hits;
        eventually_within(PATIENCE, "caching resumes after reconnect", || {
            cache.stats().hits > hits
        })
        .await;
        version += 1;
        processed_wait.forget();
        let txid = row.write(&channel, version).await;
        let gaps = processed_wait.gaps_now();
        until(&mut observer, |s| {
            s.as_event().is_some_and(|e| e.txid == Some(txid))
        })
        .await;
        processed_wait.wait(txid, gaps).await;
        processed.store(version, Ordering::SeqCst);
    }

    stop.store(true, Ordering::Release);
    reader.await.expect("the reader saw a stale read");
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert!(source.stats().gaps >= 2 * KILLS);
    dispatcher.shutdown().await;
    source.shutdown().await;
    Arc::into_inner(row).unwrap().drop_table().await;
}

/// Connect options that reach PostgreSQL through `proxy`.
fn through(proxy: &FaultProxy) -> PgConnectOptions {
    PgConnectOptions::from_str(&database_url())
        .unwrap()
        .host("127.0.0.1")
        .port(proxy.addr().port())
}

async fn proxy_to_postgres() -> FaultProxy {
    let options = PgConnectOptions::from_str(&database_url()).unwrap();
    let upstream = tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    FaultProxy::start(upstream).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connection_is_found_by_the_heartbeat() {
    let db = admin().await;
    let row = Row::create(&db, "pgcw_l_halfopen").await;
    let channel = unique("pgcw_l_halfopen");
    let proxy = proxy_to_postgres().await;
    let source = PgListenerSource::builder_with_options(through(&proxy))
        .channel(&channel)
        .heartbeat_interval(Duration::from_millis(200))
        .heartbeat_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_secs(2))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let cache: Cache<i32, i64> = Cache::new(16);
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    let mut sub = source.subscribe();
    assert!(is_health(&next(&mut sub).await, Health::Healthy));
    let load = || cache.get_or_load(1, || row.read());
    assert_eq!(load().await.unwrap(), 0);
    assert_eq!(load().await.unwrap(), 0);
    assert_eq!(cache.stats().hits, 1, "cached while healthy");

    // The network goes silent; TCP on both ends still believes all is well.
    proxy.pause();
    assert!(is_health(&next(&mut sub).await, Health::Unhealthy));
    assert_gap(next(&mut sub).await, GapReason::HeartbeatTimeout);
    assert_eq!(source.health(), Health::Unhealthy);
    assert!(source.stats().heartbeat_timeouts >= 1);
    dispatcher.sync().await;

    // Meanwhile a write happens; its notification cannot reach the listener.
    let txid = row.write(&channel, 1).await;
    let bypasses = cache.stats().bypasses;
    assert_eq!(load().await.unwrap(), 1, "no stale read while unhealthy");
    assert_eq!(cache.stats().bypasses, bypasses + 1, "the cache bypasses");

    proxy.resume();
    assert_gap(next(&mut sub).await, GapReason::Reconnected);
    assert!(is_health(&next(&mut sub).await, Health::Healthy));
    dispatcher.sync().await;
    assert_eq!(load().await.unwrap(), 1);
    let hits = cache.stats().hits;
    assert_eq!(load().await.unwrap(), 1);
    assert_eq!(cache.stats().hits, hits + 1, "caching resumes");
    assert!(source.stats().reconnects >= 1);

    // And events flow again through the proxy.
    let txid2 = row.write(&channel, 2).await;
    assert_ne!(txid, txid2);
    let seen = until(&mut sub, |s| s.as_event().is_some()).await;
    assert_eq!(seen.last().unwrap().as_event().unwrap().txid, Some(txid2));
    dispatcher.sync().await;
    assert_eq!(load().await.unwrap(), 2);

    dispatcher.shutdown().await;
    source.shutdown().await;
    row.drop_table().await;
}

#[tokio::test]
async fn cut_connection_reports_loss_then_reconnects_in_contract_order() {
    let proxy = proxy_to_postgres().await;
    let source = PgListenerSource::builder_with_options(through(&proxy))
        .channel(unique("pgcw_l_cut"))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let mut sub = source.subscribe();
    assert!(is_health(&next(&mut sub).await, Health::Healthy));
    for round in 1..=3 {
        proxy.cut();
        assert!(is_health(&next(&mut sub).await, Health::Unhealthy));
        assert!(matches!(
            next(&mut sub).await,
            Signal::Gap(GapReason::ConnectionLost { .. })
        ));
        assert_gap(next(&mut sub).await, GapReason::Reconnected);
        assert!(is_health(&next(&mut sub).await, Health::Healthy));
        assert_eq!(source.stats().reconnects, round);
    }
    source.shutdown().await;
}

#[tokio::test]
async fn malformed_payloads_are_counted_and_ignored_by_default() {
    let db = admin().await;
    let channel = unique("pgcw_l_malformed");
    let source = PgListenerSource::builder(database_url())
        .channel(&channel)
        .connect()
        .await
        .unwrap();
    let mut sub = source.subscribe();
    assert!(is_health(&next(&mut sub).await, Health::Healthy));
    let huge = "x".repeat(7999);
    let bad = [
        "garbage",
        "",
        "[]",
        r#"{"operation":"update"}"#,
        r#"{"operation":"upsert","table":"t"}"#,
        r#"{"operation":"insert","table":""}"#,
        "null",
        huge.as_str(),
        "{\"operation\": \"insert\", \"table\": \"t\"",
    ];
    for p in bad {
        notify(&db, &channel, p).await;
    }
    notify(&db, &channel, r#"{"operation":"delete","table":"good"}"#).await;
    let Signal::Event(e) = next(&mut sub).await else {
        panic!("the good event must come right after the ignored ones")
    };
    assert_eq!(e.table, "good");
    let stats = source.stats();
    assert_eq!(
        (stats.malformed, stats.events, stats.gaps),
        (bad.len() as u64, 1, 0)
    );
    assert_eq!(source.health(), Health::Healthy);
    source.shutdown().await;
}

#[tokio::test]
async fn malformed_payloads_are_gaps_when_so_configured() {
    let db = admin().await;
    let channel = unique("pgcw_l_malformed_gap");
    let source = PgListenerSource::builder(database_url())
        .channel(&channel)
        .on_malformed(MalformedPolicy::Gap)
        .connect()
        .await
        .unwrap();
    let cache: Cache<u8, u8> = Cache::new(4);
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    cache
        .get_or_load(1, || async { Ok::<_, Error>(1) })
        .await
        .unwrap();
    let mut sub = source.subscribe();
    assert!(is_health(&next(&mut sub).await, Health::Healthy));
    notify(&db, &channel, "{not json").await;
    assert_gap(next(&mut sub).await, GapReason::MalformedPayload);
    dispatcher.sync().await;
    assert_eq!(cache.get(&1), None, "the gap flushed the cache");
    notify(&db, &channel, r#"{"operation":"truncate","table":"t"}"#).await;
    assert!(next(&mut sub).await.as_event().is_some());
    let stats = source.stats();
    assert_eq!((stats.malformed, stats.events, stats.gaps), (1, 1, 1));
    assert_eq!(source.health(), Health::Healthy);
    dispatcher.shutdown().await;
    source.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_that_does_not_read_gets_a_lagged_gap() {
    let db = admin().await;
    let channel = unique("pgcw_l_lag");
    let source = PgListenerSource::builder(database_url())
        .channel(&channel)
        .buffer(2)
        .connect()
        .await
        .unwrap();
    let mut slow = source.subscribe();
    for i in 0..10 {
        notify(
            &db,
            &channel,
            &format!(r#"{{"operation":"insert","table":"t{i}"}}"#),
        )
        .await;
    }
    eventually_within(PATIENCE, "all ten events are received", || {
        source.stats().events == 10
    })
    .await;
    assert!(is_health(&next(&mut slow).await, Health::Healthy));
    assert!(
        matches!(next(&mut slow).await, Signal::Gap(GapReason::Lagged { missed }) if missed > 0),
        "a lagging subscriber sees a gap, not silence"
    );
    // Then the source's current health: a health change may have been missed.
    assert!(is_health(&next(&mut slow).await, Health::Healthy));
    // What is left in its buffer is the newest events.
    let Signal::Event(e) = next(&mut slow).await else {
        panic!("expected an event after the gap")
    };
    assert!(e.table.starts_with('t'));
    source.shutdown().await;
}

#[tokio::test]
async fn bad_configuration_fails_loudly_at_connect() {
    let err = PgListenerSource::connect("definitely not a url")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Config(ref m) if m.contains("DATABASE_URL")),
        "{err}"
    );

    // Nothing listens on a port we just released.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = PgListenerSource::connect(format!("postgres://postgres@127.0.0.1:{port}/test"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Connection {
                temporary: true,
                ..
            }
        ),
        "{err:?}"
    );
    eprintln!("refused: {err}");
    assert!(err.to_string().contains("could not connect"), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );

    let missing = unique("pgcw_no_such_db");
    let mut options = PgConnectOptions::from_str(&database_url()).unwrap();
    options = options.database(&missing);
    let err = PgListenerSource::builder_with_options(options)
        .connect()
        .await
        .unwrap_err();
    eprintln!("missing database: {err}");
    assert!(
        !err.is_temporary(),
        "a missing database is permanent: {err:?}"
    );
    assert!(err.to_string().contains(&missing), "{err}");

    let err = PgListenerSource::builder(database_url())
        .channel("x".repeat(64))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
}

async fn backend_alive(db: &PgPool, pid: u32) -> bool {
    sqlx::query_scalar("SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1")
        .bind(i32::try_from(pid).unwrap())
        .fetch_one(db)
        .await
        .unwrap()
}

async fn wait_backend_gone(db: &PgPool, pid: u32) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while backend_alive(db, pid).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend {pid} still connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn shutdown_ends_subscriptions_and_closes_the_connection() {
    let db = admin().await;
    let source = PgListenerSource::builder(database_url())
        .channel(unique("pgcw_l_shutdown"))
        .connect()
        .await
        .unwrap();
    let pid = source.stats().backend_pid.unwrap();
    assert!(backend_alive(&db, pid).await);
    let mut sub = source.subscribe();
    let clone = source.clone();
    source.shutdown().await;
    // The subscription ends (recv returns None) rather than waiting forever.
    let ended =
        tokio::time::timeout(PATIENCE, async { while sub_recv_some(&mut sub).await {} }).await;
    assert!(ended.is_ok(), "subscription did not end");
    assert_eq!(clone.health(), Health::Unhealthy);
    assert!(matches!(clone.queue_usage().await, Err(Error::Closed)));
    assert!(clone.subscribe().recv().await.is_none());
    clone.shutdown().await; // twice is fine
    wait_backend_gone(&db, pid).await;
}

async fn sub_recv_some(sub: &mut Subscription) -> bool {
    sub.recv().await.is_some()
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_task() {
    let db = admin().await;
    let source = PgListenerSource::builder(database_url())
        .channel(unique("pgcw_l_drop"))
        .connect()
        .await
        .unwrap();
    let pid = source.stats().backend_pid.unwrap();
    let sub = source.subscribe();
    let clone = source.clone();
    drop(source);
    assert!(backend_alive(&db, pid).await, "a clone keeps it running");
    drop(clone);
    assert!(
        backend_alive(&db, pid).await,
        "a subscription keeps it running"
    );
    drop(sub);
    wait_backend_gone(&db, pid).await;
}
