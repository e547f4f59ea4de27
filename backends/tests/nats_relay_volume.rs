//! What a relay over the replication source stores in its stream while no
//! event is published: an idle database, then a steady load of commits to
//! tables outside the publication (issue 18, item 4). Prints messages written
//! (stream sequence numbers used) and messages kept (the stream's count) per
//! minute, and what the stream holds by subject. A measurement, not a check:
//! ignored by default, run with
//!
//! ```sh
//! cargo test -p pgcachewatch-backends --all-features --test nats_relay_volume -- --ignored --nocapture
//! ```
//!
//! `PGCW_VOLUME_SECS` sets each phase's length (default 60 s) and
//! `PGCW_VOLUME_RATE` the unrelated commits per second (default 300).
//! Real PostgreSQL (`DATABASE_URL`, `wal_level = logical`) and NATS (`NATS_URL`).
#![cfg(all(feature = "nats", feature = "replication"))]

#[path = "support/replication.rs"]
mod replication_support;
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::TryStreamExt;
use pgcachewatch_backends::nats::{NatsConnect, Relay, StreamSettings};
use pgcachewatch_backends::replication::PgReplicationSource;
use pgcachewatch_testkit::env::{database_url, nats_url};
use replication_support::Fixture;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The stream's last sequence and message count.
async fn counts(js: &jetstream::Context, stream: &StreamSettings) -> (u64, u64) {
    let mut s = js.get_stream(stream.name()).await.expect("stream");
    let info = s.info().await.expect("stream info");
    (info.state.last_sequence, info.state.messages)
}

/// How many messages the stream keeps per subject.
async fn by_subject(js: &jetstream::Context, stream: &StreamSettings) -> Vec<(String, usize)> {
    let s = js.get_stream(stream.name()).await.expect("stream");
    let mut subjects: Vec<(String, usize)> = s
        .info_with_subjects(format!("{}.>", stream.prefix()))
        .await
        .expect("subjects")
        .try_collect()
        .await
        .expect("subjects");
    subjects.sort();
    subjects
}

async fn phase(
    what: &str,
    js: &jetstream::Context,
    stream: &StreamSettings,
    secs: u64,
    commits: &AtomicU64,
) {
    let (seq0, kept0) = counts(js, stream).await;
    let c0 = commits.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let (seq1, kept1) = counts(js, stream).await;
    let c1 = commits.load(Ordering::Relaxed);
    let per_min = |n: u64| n as f64 * 60.0 / elapsed;
    println!(
        "{what}: {:.0} unrelated commits/s; per minute {:.0} messages written, {:.0} kept (stream holds {kept1})",
        (c1 - c0) as f64 / elapsed,
        per_min(seq1 - seq0),
        per_min(kept1.saturating_sub(kept0)),
    );
    println!("  by subject: {:?}", by_subject(js, stream).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints stored messages per minute (see the module docs)"]
async fn relay_stream_volume_idle_and_under_unrelated_commits() {
    let secs = env_u64("PGCW_VOLUME_SECS", 60);
    let rate = env_u64("PGCW_VOLUME_RATE", 300).max(1);
    let f = Fixture::new("pgcw_rvol").await;
    // Published (never written) and unpublished (the load) tables.
    f.exec(&format!(
        "CREATE TABLE {} (id bigint PRIMARY KEY)",
        f.table("watched")
    ))
    .await;
    let other = format!("{}_x", f.schema);
    f.exec(&format!("CREATE SCHEMA \"{other}\"")).await;
    f.exec(&format!(
        "CREATE TABLE \"{other}\".load (id bigserial PRIMARY KEY, v bigint)"
    ))
    .await;
    let slot = f.slot();
    let stream = support::fresh_stream().memory(false);
    let start = PgReplicationSource::builder(database_url())
        .slot(&slot)
        .publication(&f.publication)
        .create_slot_if_missing(true)
        .connect_durable()
        .await
        .expect("replication source");
    let (relay, source) = Relay::builder(NatsConnect::new(nats_url()))
        .stream(stream.clone())
        .start_durable(start)
        .await
        .expect("relay");
    let js = jetstream::new(NatsConnect::new(nats_url()).connect().await.expect("NATS"));
    // Let the relay's start (gap marker, first record) settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let commits = Arc::new(AtomicU64::new(0));
    phase("idle relay", &js, &stream, secs, &commits).await;

    // Three writers, each a third of the rate (one connection alone does
    // not keep 300 commits/s on a busy 2-core machine).
    const WRITERS: u64 = 3;
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..WRITERS {
        let (db, stop, commits) = (f.db.clone(), stop.clone(), commits.clone());
        let sql = format!("INSERT INTO \"{other}\".load (v) VALUES (1)");
        load.push(tokio::spawn(async move {
            let every = Duration::from_secs_f64(WRITERS as f64 / rate as f64);
            let mut next = tokio::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                sqlx::query(&sql).execute(&db).await.expect("insert");
                commits.fetch_add(1, Ordering::Relaxed);
                next += every;
                tokio::time::sleep_until(next).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    phase("relay under load", &js, &stream, secs, &commits).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.expect("load");
    }
    println!("relay: {:?}", relay.status());

    relay.shutdown().await;
    source.shutdown().await;
    support::delete_stream(&nats_url(), &stream).await;
    f.exec(&format!("DROP SCHEMA \"{other}\" CASCADE")).await;
    f.cleanup().await;
}
