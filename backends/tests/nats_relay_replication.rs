//! A relay over the logical-replication source, killed (aborted, as a crash
//! would) and restarted 10 times while writes commit: lossless end to end.
//! Every committed write reaches every subscriber through NATS, no subscriber
//! gets a `Gap` or flushes its cache, and readers that wait for a write's
//! position before reading through their cache never see an older value.
//! And the other side: a slot advanced while no relay read it loses the writes
//! in between, so the next relay must not continue the stream's epoch.
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
use replication_support::{wait_slot_released, wal_position, Fixture};

const SUBSCRIBERS: usize = 3;
const RESTARTS: usize = 10;
const ROWS: i64 = 10;

/// Starts the replication source and a relay over it; whether the slot resumed.
async fn start_relay(
    f: &Fixture,
    slot: &str,
    stream: &StreamSettings,
) -> (RelayHandle, PgReplicationSource, bool) {
    start_relay_at(f, slot, stream, &nats_url()).await
}

/// [`start_relay`] with the relay connecting to NATS at `url`.
async fn start_relay_at(
    f: &Fixture,
    slot: &str,
    stream: &StreamSettings,
    url: &str,
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
    let (relay, source) = Relay::builder(NatsConnect::new(url))
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
            "subscriber {n}: {}/{} writes, 0 gaps, 0 flushes over {RESTARTS} relay kills; {} late copies delivered",
            written.len(),
            written.len(),
            s.source.stats().late
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

/// Waits for the event of `log` row `id` (or panics after 30 s); everything seen.
async fn until_row(sub: &mut pgcachewatch_core::Subscription, id: i64) -> Vec<Signal> {
    support::until(sub, &format!("log row {id}"), |s| {
        s.as_event().is_some_and(|e| {
            e.table == "log"
                && e.keys
                    .iter()
                    .flatten()
                    .any(|k| k.get("id").and_then(|v| v.as_i64()) == Some(id))
        })
    })
    .await
}

/// The relay stops; meanwhile a write commits and someone advances the slot
/// past it (`pg_replication_slot_advance`, as a second consumer of the slot
/// would). That write never reaches the stream: the next relay must start a
/// new epoch, so every subscriber gets a gap (and flushes what that write made
/// stale) instead of carrying on as if nothing was missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_advanced_while_no_relay_read_it_is_a_new_epoch() {
    let f = Fixture::new("pgcw_radv").await;
    let log = f.table("log");
    f.exec(&format!("CREATE TABLE {log} (id bigint PRIMARY KEY)"))
        .await;
    let slot = f.slot();
    let stream = support::fresh_stream();
    let (relay, source, _) = start_relay(&f, &slot, &stream).await;
    let nats = NatsSource::builder(NatsConnect::new(nats_url()))
        .stream(stream.clone())
        .heartbeat_timeout(Duration::from_secs(60))
        .connect()
        .await
        .expect("NatsSource connects");
    let mut sub = nats.subscribe();
    f.exec(&format!("INSERT INTO {log} VALUES (1)")).await;
    until_row(&mut sub, 1).await;
    let epoch = relay.status().epoch;
    relay.shutdown().await;
    source.shutdown().await;
    wait_slot_released(&f.db, &slot).await;

    f.exec(&format!("INSERT INTO {log} VALUES (2)")).await;
    sqlx::query("SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())")
        .bind(&slot)
        .execute(&f.db)
        .await
        .expect("advance the slot");

    let (relay, source, resumed) = start_relay(&f, &slot, &stream).await;
    assert!(resumed, "the slot existed");
    f.exec(&format!("INSERT INTO {log} VALUES (3)")).await;
    let seen = until_row(&mut sub, 3).await;
    assert!(
        seen.iter().any(Signal::is_gap),
        "row 2 was written and skipped while no relay read the slot, and the subscriber got no gap: {seen:?}"
    );
    assert_ne!(relay.status().epoch, epoch, "a new epoch");
    relay.shutdown().await;
    source.shutdown().await;
    nats.shutdown().await;
    support::delete_stream(&nats_url(), &stream).await;
    f.cleanup().await;
}

/// A relay cut off from NATS while the database commits more than a
/// subscriber buffer's worth of transactions (issue 18, network faults: a
/// relay partitioned for more than ~20 s lost 5.6k–11k events and started a
/// new epoch). The slot still holds every one of them, so nothing may be lost:
/// the relay's source stops reading the slot while the relay cannot publish
/// (backpressure), the slot is confirmed no further than what JetStream
/// acknowledged, and once NATS is back every write arrives, in the same epoch,
/// with no `Gap`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_from_nats_while_the_slot_fills_loses_nothing_and_keeps_its_epoch() {
    const WRITES: i64 = 8_000;
    let f = Fixture::new("pgcw_rcut").await;
    let log = f.table("log");
    f.exec(&format!("CREATE TABLE {log} (id bigint PRIMARY KEY)"))
        .await;
    let stream = support::fresh_stream();
    let proxy = pgcachewatch_testkit::proxy::FaultProxy::start(support::nats_addr())
        .await
        .expect("proxy");
    let slot = f.slot();
    let (relay, source, _) =
        start_relay_at(&f, &slot, &stream, &format!("nats://{}", proxy.addr())).await;
    let epoch = relay.status().epoch;

    let subscriber = NatsSource::builder(NatsConnect::new(nats_url()))
        .stream(stream.clone())
        .heartbeat_timeout(Duration::from_secs(2))
        .buffer(1 << 16)
        .connect()
        .await
        .expect("NatsSource connects");
    let mut sub = subscriber.subscribe();
    support::until(&mut sub, "healthy", |s| {
        matches!(s, Signal::Health(Health::Healthy))
    })
    .await;

    proxy.pause();
    let cut_at = std::time::Instant::now();
    // One transaction per row: WRITES commits, one event each.
    f.exec(&format!(
        "DO $$ BEGIN FOR i IN 1..{WRITES} LOOP INSERT INTO {log} VALUES (i); COMMIT; END LOOP; END $$"
    ))
    .await;
    let end = wal_position(&f.db).await;
    // Hold the partition until the relay's source has read every write (it
    // does at once without backpressure) or for 15 s (it stops reading).
    let hold_until = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < hold_until
        && source.stats().emitted_lsn.is_none_or(|e| e < end)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let read_while_cut = source.stats().emitted_lsn;
    let slot_confirmed: Option<String> = sqlx::query_scalar(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&slot)
    .fetch_one(&f.db)
    .await
    .expect("slot");
    let slot_confirmed: Lsn = slot_confirmed
        .expect("a confirmed position")
        .parse()
        .expect("an LSN");
    assert!(
        slot_confirmed < end,
        "the slot was confirmed to {slot_confirmed} (writes end at {end}) while JetStream \
         acknowledged nothing"
    );
    let cut_for = cut_at.elapsed();
    proxy.cut();
    proxy.resume();
    let healed_at = std::time::Instant::now();

    // Every write, or a gap and then the relay caught up (the loss to count).
    let mut ids = HashSet::new();
    let mut gaps = Vec::new();
    // Issue 18, network faults 6: the service must not say healthy while the
    // relay's backlog is still on its way.
    let mut health = HealthWatch::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while (ids.len() as i64) < WRITES {
        if !gaps.is_empty() && relay.status().confirmed.is_some_and(|c| c >= end) {
            // Give what the relay stored meanwhile a moment to arrive.
            while let Ok(Some(signal)) =
                tokio::time::timeout(Duration::from_secs(2), sub.recv()).await
            {
                health.saw(&signal, ids.len() as i64 >= WRITES);
                collect(&signal, &mut ids, &mut gaps);
            }
            break;
        }
        match tokio::time::timeout_at(deadline, sub.recv()).await {
            Ok(Some(signal)) => {
                health.saw(&signal, ids.len() as i64 >= WRITES);
                collect(&signal, &mut ids, &mut gaps);
            }
            Ok(None) => panic!("the subscription ended"),
            Err(_) => panic!(
                "timed out: {} of {WRITES} writes arrived, gaps {gaps:?}, relay {:?}",
                ids.len(),
                relay.status()
            ),
        }
    }
    let done_at = std::time::Instant::now();
    let status = relay.status();
    tracing::info!(
        cut_ms = cut_for.as_millis() as u64,
        drain_ms = healed_at.elapsed().as_millis() as u64,
        received = ids.len(),
        lost = WRITES - ids.len() as i64,
        gaps = gaps.len(),
        epochs = status.epochs,
        ?read_while_cut,
        %end,
        "relay cut from NATS while {WRITES} commits arrived"
    );
    println!(
        "relay cut from NATS for {cut_for:?} under {WRITES} commits: {} received, {} lost, \
         {} gaps {gaps:?}, {} epochs; the source read up to {read_while_cut:?} of {end} while cut; \
         drained in {:?}",
        ids.len(),
        WRITES - ids.len() as i64,
        gaps.len(),
        status.epochs,
        healed_at.elapsed()
    );
    assert!(
        gaps.is_empty(),
        "a gap although the slot held everything: {gaps:?}"
    );
    assert_eq!(ids.len() as i64, WRITES, "writes lost");
    assert_eq!(status.epochs, 1, "a new epoch although nothing was lost");
    assert_eq!(status.epoch, epoch);
    println!(
        "the service: unhealthy during the cut: {}; healthy again {:?} after healing, every \
         write delivered {:?} after healing; said healthy with writes missing {} times",
        health.unhealthy_seen,
        health.healthy_at.map(|at| at.duration_since(healed_at)),
        done_at.duration_since(healed_at),
        health.early
    );
    assert!(health.unhealthy_seen, "the service never noticed the cut");
    if health.healthy_at.is_none() {
        // Caching resumes: healthy once the relay is caught up.
        support::until(&mut sub, "healthy again", |s| {
            matches!(s, Signal::Health(Health::Healthy))
        })
        .await;
    }
    assert_eq!(
        health.early, 0,
        "the service said healthy while the relay's backlog was still on its way"
    );

    subscriber.shutdown().await;
    relay.shutdown().await;
    source.shutdown().await;
    wait_slot_released(&f.db, &slot).await;
    support::delete_stream(&nats_url(), &stream).await;
    f.cleanup().await;

    fn collect(signal: &Signal, ids: &mut HashSet<i64>, gaps: &mut Vec<String>) {
        match signal {
            Signal::Event(e) if e.table == "log" => {
                for k in e.keys.iter().flatten() {
                    if let Some(id) = k.get("id").and_then(|v| v.as_i64()) {
                        ids.insert(id);
                    }
                }
            }
            Signal::Gap(g) => gaps.push(g.to_string()),
            _ => {}
        }
    }
}

/// When a subscriber said it was healthy, against what it had received.
#[derive(Default)]
struct HealthWatch {
    unhealthy_seen: bool,
    /// Healthy after being unhealthy while writes were still missing.
    early: usize,
    healthy_at: Option<std::time::Instant>,
}

impl HealthWatch {
    fn saw(&mut self, signal: &Signal, complete: bool) {
        match signal {
            Signal::Health(Health::Unhealthy) => self.unhealthy_seen = true,
            Signal::Health(Health::Healthy) if self.unhealthy_seen => {
                self.healthy_at = Some(std::time::Instant::now());
                if !complete {
                    self.early += 1;
                }
            }
            _ => {}
        }
    }
}
