//! The LISTEN source under bursts, against the real local PostgreSQL
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`).
//!
//! Every test uses its own channel, so test binaries may run in parallel against
//! one database. Conditions are awaited with bounded polling.
#![cfg(feature = "postgres")]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcachewatch_backends::postgres::listener::PgListenerSource;
use pgcachewatch_core::{EventSource, Signal};
use pgcachewatch_testkit::env::{database_url, eventually_within, unique_name as unique};
use sqlx::postgres::PgPool;

const PATIENCE: Duration = Duration::from_secs(60);

/// Sends `n` distinct events on `channel` in one transaction.
async fn burst(db: &PgPool, channel: &str, n: i64) {
    notify_range(db, channel, 1, n).await;
}

/// Sends one event for each of `from..=to` (its `txid`) on `channel`, in one
/// transaction.
async fn notify_range(db: &PgPool, channel: &str, from: i64, to: i64) {
    sqlx::query(
        "SELECT pg_notify($1, json_build_object('operation', 'insert', 'table', 'burst', \
         'txid', g)::text) FROM generate_series($2::bigint, $3::bigint) g",
    )
    .bind(channel)
    .bind(from)
    .bind(to)
    .execute(db)
    .await
    .unwrap();
}

/// A burst that keeps the listener busy far longer than the heartbeat timeout
/// (its heartbeat is queued behind the burst) is a backlog, not a half-open
/// connection: no `Gap`, no reconnect, every event seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_longer_than_the_heartbeat_timeout_costs_no_gap() {
    const N: u64 = 20_000;
    let db = PgPool::connect(&database_url())
        .await
        .expect("PostgreSQL must be running at DATABASE_URL");
    let channel = unique("pgcw_b_heartbeat");
    let source = PgListenerSource::builder(database_url())
        .channel(&channel)
        .heartbeat_interval(Duration::from_millis(20))
        .heartbeat_timeout(Duration::from_millis(50))
        .connect()
        .await
        .unwrap();
    let events = Arc::new(AtomicU64::new(0));
    let gaps = Arc::new(AtomicU64::new(0));
    let (e, g) = (events.clone(), gaps.clone());
    // A slow inline handler: 50 µs of work per event, about a second in all.
    let attachment = source
        .attach_inline(Box::new(move |signal: &Signal| match signal {
            Signal::Event(_) => {
                let until = Instant::now() + Duration::from_micros(50);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
                e.fetch_add(1, Ordering::Relaxed);
            }
            Signal::Gap(_) => {
                g.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }))
        .unwrap();
    // Let a few heartbeats go round first.
    eventually_within(PATIENCE, "heartbeats are answered", || {
        source.stats().heartbeats >= 2
    })
    .await;
    burst(&db, &channel, N as i64).await;
    eventually_within(PATIENCE, "every event is seen", || {
        events.load(Ordering::Relaxed) == N || gaps.load(Ordering::Relaxed) > 0
    })
    .await;
    let stats = source.stats();
    assert_eq!(gaps.load(Ordering::Relaxed), 0, "{stats:?}");
    assert_eq!(
        (stats.events, stats.heartbeat_timeouts, stats.reconnects),
        (N, 0, 0)
    );
    drop(attachment);
    source.shutdown().await;
}

/// What an inline handler saw, in order: each event's txid, or a gap (`-1`).
fn recorder(seen: &Arc<std::sync::Mutex<Vec<i64>>>) -> pgcachewatch_core::InlineHandler {
    let seen = seen.clone();
    Box::new(move |signal: &Signal| {
        let entry = match signal {
            Signal::Event(e) => e.txid.expect("every test event carries its txid"),
            Signal::Gap(_) => -1,
            _ => return,
        };
        seen.lock().unwrap().push(entry);
    })
}

/// A source on a channel of its own, and what an inline handler saw of it (see
/// [`recorder`]).
struct Watched {
    db: PgPool,
    channel: String,
    source: PgListenerSource,
    seen: Arc<std::sync::Mutex<Vec<i64>>>,
    _recorder: pgcachewatch_core::InlineAttachment,
}

async fn watched(prefix: &str) -> Watched {
    let db = PgPool::connect(&database_url())
        .await
        .expect("PostgreSQL must be running at DATABASE_URL");
    let channel = unique(prefix);
    let source = PgListenerSource::builder(database_url())
        .channel(&channel)
        .connect()
        .await
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = source.attach_inline(recorder(&seen)).unwrap();
    Watched {
        db,
        channel,
        source,
        seen,
        _recorder: recorder,
    }
}

/// An inline handler that spends `micros` on every event (so a burst takes
/// a while to publish).
fn slow(micros: u64) -> pgcachewatch_core::InlineHandler {
    Box::new(move |signal: &Signal| {
        if matches!(signal, Signal::Event(_)) {
            let until = Instant::now() + Duration::from_micros(micros);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
    })
}

/// Bursts and single notifications mixed: bursts are read and published in
/// batches, single events one by one, so this checks that a notification read
/// after a burst is never published before it: every event, in commit order, no
/// gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_and_single_events_arrive_whole_and_in_commit_order() {
    const BURST: i64 = 2_000;
    const SINGLES: i64 = 50;
    let w = watched("pgcw_b_order").await;
    let (db, channel, source, seen) = (&w.db, w.channel.as_str(), &w.source, &w.seen);
    // The burst takes about 200 ms to publish: the single events, 2 ms apart,
    // arrive meanwhile.
    let slow = source.attach_inline(slow(100)).unwrap();
    notify_range(db, channel, 1, BURST).await;
    for i in 1..=SINGLES {
        notify_range(db, channel, BURST + i, BURST + i).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    notify_range(db, channel, BURST + SINGLES + 1, 2 * BURST + SINGLES).await;
    let total = (2 * BURST + SINGLES) as usize;
    eventually_within(PATIENCE, "every event is seen", || {
        seen.lock().unwrap().len() >= total
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    let expected: Vec<i64> = (1..=total as i64).collect();
    assert!(
        seen == expected,
        "not every event in commit order: {} seen, first difference at index {:?}",
        seen.len(),
        seen.iter().zip(&expected).position(|(a, b)| a != b)
    );
    drop(slow);
    source.shutdown().await;
}

/// A connection killed in the middle of a burst: what was read before the loss
/// is published, in order, before the loss's gap; nothing is published after
/// the gap but what the new connection delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_killed_mid_burst_publishes_what_it_read_before_the_gap() {
    const N: i64 = 20_000;
    let w = watched("pgcw_b_kill").await;
    let (db, channel, source, seen) = (&w.db, w.channel.as_str(), &w.source, &w.seen);
    // Slow the handlers down so that the burst is still being read when the
    // backend is killed.
    let slow = source.attach_inline(slow(20)).unwrap();
    let pid = source.stats().backend_pid.expect("connected");
    burst(db, channel, N).await;
    eventually_within(PATIENCE, "the burst starts arriving", || {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid as i32)
        .fetch_one(db)
        .await
        .unwrap();
    assert!(killed);
    eventually_within(PATIENCE, "the loss is reported", || {
        seen.lock().unwrap().contains(&-1)
    })
    .await;
    eventually_within(PATIENCE, "the source reconnects", || {
        source.stats().reconnects >= 1
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    let first_gap = seen.iter().position(|&t| t == -1).unwrap();
    let before = &seen[..first_gap];
    assert!(
        before.iter().copied().eq(1..=before.len() as i64),
        "the events before the gap are not the burst's first ones in order"
    );
    let late: Vec<i64> = seen[first_gap..]
        .iter()
        .copied()
        .filter(|&t| t != -1)
        .collect();
    assert!(
        late.is_empty(),
        "{} events of the dead connection were published after its gap, the first {:?}",
        late.len(),
        &late[..late.len().min(5)]
    );
    drop(slow);
    source.shutdown().await;
}
