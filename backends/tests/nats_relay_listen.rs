//! A relay over the PostgreSQL `LISTEN` source, killed and restarted 10 times
//! while writes commit: every committed write reaches every subscriber, or the
//! subscriber gets a `Gap` (each restart loses continuity: NOTIFY is not
//! durable). Real PostgreSQL (`DATABASE_URL`) and real NATS (`NATS_URL`).
#![cfg(all(feature = "nats", feature = "postgres"))]

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgcachewatch_backends::nats::{NatsConnect, NatsSource, Relay};
use pgcachewatch_backends::postgres::listener::PgListenerSource;
use pgcachewatch_core::{EventSource, Health, Signal};
use pgcachewatch_testkit::env::{database_url, nats_url, unique_name};
use support::check_no_silent_loss;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_and_restarted_ten_times_never_loses_silently() {
    let db = sqlx::PgPool::connect(&database_url())
        .await
        .expect("PostgreSQL");
    let channel = unique_name("pgcw_relay");
    let stream = support::fresh_stream();
    let connect = NatsConnect::new(nats_url());
    let start_relay = || async {
        let listener = PgListenerSource::builder(database_url())
            .channel(&channel)
            .connect()
            .await
            .expect("listener");
        let relay = Relay::builder(connect.clone())
            .stream(stream.clone())
            .heartbeat_interval(Duration::from_millis(100))
            .start(&listener)
            .await
            .expect("relay");
        (listener, relay)
    };
    let mut current = Some(start_relay().await);
    let mut subs = Vec::new();
    let mut sources = Vec::new();
    for _ in 0..4 {
        let source = NatsSource::builder(connect.clone())
            .stream(stream.clone())
            .heartbeat_timeout(Duration::from_secs(2))
            .buffer(1 << 16)
            .connect()
            .await
            .expect("source");
        subs.push(source.subscribe());
        sources.push(source);
    }
    // Wait until every subscriber is healthy.
    for sub in &mut subs {
        loop {
            let s = tokio::time::timeout(Duration::from_secs(30), sub.recv()).await;
            if matches!(s, Ok(Some(Signal::Health(Health::Healthy)))) {
                break;
            }
            assert!(s.is_ok(), "subscriber never became healthy");
        }
    }
    let written = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, channel, written, stop) =
            (db.clone(), channel.clone(), written.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Acquire) {
                sqlx::query(
                    "SELECT pg_notify($1, json_build_object('operation', 'update', 'schema', 'public', 'table', $2::text)::text)",
                )
                .bind(&channel)
                .bind(format!("e{i}"))
                .execute(&db)
                .await
                .expect("write");
                i += 1;
                written.store(i, Ordering::Release);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if let Some((listener, relay)) = current.take() {
            relay.abort();
            listener.shutdown().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        current = Some(start_relay().await);
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, Ordering::Release);
    writer.await.expect("writer");
    let total = written.load(Ordering::Acquire);
    // A marker after the last write: once it arrives, everything before it has.
    sqlx::query("SELECT pg_notify($1, json_build_object('operation', 'update', 'schema', 'public', 'table', 'end')::text)")
        .bind(&channel)
        .execute(&db)
        .await
        .expect("end marker");
    for (n, sub) in subs.iter_mut().enumerate() {
        let mut seen = Vec::new();
        loop {
            let s = tokio::time::timeout(Duration::from_secs(30), sub.recv())
                .await
                .expect("the end marker arrives")
                .expect("subscription alive");
            let end = s.as_event().is_some_and(|e| e.table == "end");
            seen.push(s);
            if end {
                break;
            }
        }
        let (received, gaps) = check_no_silent_loss(&seen, total);
        assert!(
            gaps >= 10,
            "subscriber {n}: every restart is a gap, saw {gaps}"
        );
        eprintln!("subscriber {n}: {received}/{total} writes, {gaps} gaps over 10 relay restarts");
    }
    if let Some((listener, relay)) = current.take() {
        relay.shutdown().await;
        listener.shutdown().await;
    }
    support::delete_stream(&nats_url(), &stream).await;
}
