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
    sqlx::query(
        "SELECT pg_notify($1, json_build_object('operation', 'insert', 'table', 'burst', \
         'txid', g)::text) FROM generate_series(1, $2) g",
    )
    .bind(channel)
    .bind(n)
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
