//! The replication source next to the LISTEN source, in one run:
//!
//! 1. **write → fresh read** through the cache, p50 / p99: a single-row `UPDATE`
//!    issued → the source's event → the dispatcher invalidates → `get_or_load`
//!    reads the new row; for [`PgReplicationSource`], for [`PgListenerSource`]
//!    (pgcachewatch's triggers), and the floor: a raw sqlx `PgListener` `recv`
//!    plus one `SELECT`. Rounds alternate between the three.
//! 2. **a killed connection**: `pg_terminate_backend` on each source's backend
//!    (the walsender; the LISTEN connection) with 1,000 warm entries cached and a
//!    write committed while it is down: the time until the cache is trusted
//!    again, the fraction of the warm entries still cached after recovery (a
//!    LISTEN reconnect must flush them all; a slot loses nothing, so only the
//!    written row goes), and whether that write was seen.
//!
//! `cargo run --release -p pgcachewatch-bench --bin replication [-- --rounds 300 --kills 5]`
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`; needs
//! `wal_level = logical`).

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use pgcachewatch::postgres::{Installer, PgListenerSource, TableName};
use pgcachewatch::replication::PgReplicationSource;
use pgcachewatch::strategies::Keyed;
use pgcachewatch::{Cache, Dispatcher, Event, EventSource, RowKey, Signal, Subscription};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;

#[derive(Parser, Debug)]
#[command(
    about = "replication source vs LISTEN source vs raw floor; the cost of a killed connection"
)]
struct Args {
    /// Measured rounds per side.
    #[arg(long, default_value_t = 300)]
    rounds: usize,
    /// Killed connections per source.
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// PostgreSQL to use.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
}

const TABLE: &str = "pgcw_bench_repl";
const SLOT: &str = "pgcw_bench_repl";
const CHANNEL: &str = "pgcw_bench_repl";
const ROWS: i64 = 1000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL")?;
    setup(&pool).await?;
    let result = run(&args, &pool).await;
    teardown(&pool).await?;
    result
}

async fn setup(pool: &PgPool) -> anyhow::Result<()> {
    teardown(pool).await?;
    sqlx::query(&format!(
        "CREATE TABLE public.{TABLE} (id bigint PRIMARY KEY, v bigint NOT NULL)"
    ))
    .execute(pool)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO public.{TABLE} SELECT g, 0 FROM generate_series(1, {ROWS}) g"
    ))
    .execute(pool)
    .await?;
    Installer::new()
        .channel(CHANNEL)
        .row_keys(true)
        .install(pool, &[TableName::new("public", TABLE)?])
        .await?;
    sqlx::query(&format!(
        "CREATE PUBLICATION {SLOT} FOR TABLE public.{TABLE}"
    ))
    .execute(pool)
    .await?;
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(SLOT)
        .execute(pool)
        .await?;
    Ok(())
}

async fn teardown(pool: &PgPool) -> anyhow::Result<()> {
    let _ = sqlx::query(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
         WHERE slot_name = $1 AND active_pid IS NOT NULL",
    )
    .bind(SLOT)
    .execute(pool)
    .await;
    for _ in 0..50 {
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND NOT active",
        )
        .bind(SLOT)
        .execute(pool)
        .await;
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1")
                .bind(SLOT)
                .fetch_one(pool)
                .await?;
        if dropped.is_ok() && left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sqlx::query(&format!("DROP PUBLICATION IF EXISTS {SLOT}"))
        .execute(pool)
        .await?;
    sqlx::query(&format!("DROP TABLE IF EXISTS public.{TABLE} CASCADE"))
        .execute(pool)
        .await?;
    Ok(())
}

/// The row key the triggers and the replication source both send: `{"id": n}`.
fn row_id(_: &Event, key: &RowKey) -> Option<i64> {
    key.get("id").and_then(|v| v.as_i64())
}

async fn read(cache: &Cache<i64, i64>, pool: &PgPool, id: i64) -> anyhow::Result<i64> {
    let sql = format!("SELECT v FROM public.{TABLE} WHERE id = $1");
    Ok(cache
        .get_or_load(id, || async {
            sqlx::query_scalar::<_, i64>(&sql)
                .bind(id)
                .fetch_one(pool)
                .await
        })
        .await?)
}

async fn write(pool: &PgPool, id: i64, v: i64) -> anyhow::Result<()> {
    sqlx::query(&format!("UPDATE public.{TABLE} SET v = $2 WHERE id = $1"))
        .bind(id)
        .bind(v)
        .execute(pool)
        .await?;
    Ok(())
}

/// Drops whatever the subscription has buffered.
fn drain(sub: &mut Subscription) {
    while sub.try_recv().is_ok() {}
}

/// Waits for the next event on `sub`.
async fn next_event(sub: &mut Subscription) -> anyhow::Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), sub.recv()).await {
            Ok(Some(Signal::Event(_))) => return Ok(()),
            Ok(Some(_)) => continue,
            Ok(None) => anyhow::bail!("the source ended"),
            Err(_) => anyhow::bail!("no event within 10 s"),
        }
    }
}

async fn run(args: &Args, pool: &PgPool) -> anyhow::Result<()> {
    let listen = PgListenerSource::from_pool(pool)
        .channel(CHANNEL)
        .connect()
        .await?;
    let repl = PgReplicationSource::from_pool(pool)
        .slot(SLOT)
        .publication(SLOT)
        .connect()
        .await?;
    let listen_cache: Cache<i64, i64> = Cache::new(10_000);
    let repl_cache: Cache<i64, i64> = Cache::new(10_000);
    let _d_listen = Dispatcher::new()
        .attach(Keyed::new(row_id), listen_cache.clone())
        .spawn(&listen);
    let _d_repl = Dispatcher::new()
        .attach(Keyed::new(row_id), repl_cache.clone())
        .spawn(&repl);
    let mut raw = PgListener::connect_with(pool).await?;
    raw.listen(CHANNEL).await?;
    let raw_sql = format!("SELECT v FROM public.{TABLE} WHERE id = 1");

    // 1. Write → fresh read.
    let mut sub_listen = listen.subscribe();
    let mut sub_repl = repl.subscribe();
    let (mut t_listen, mut t_repl, mut t_raw) = (Vec::new(), Vec::new(), Vec::new());
    let warmup = 20;
    let mut v = 0i64;
    for round in 0..args.rounds + warmup {
        for side in 0..3 {
            v += 1;
            drain(&mut sub_listen);
            drain(&mut sub_repl);
            while raw.next_buffered().is_some() {}
            let (cache, sub) = match side {
                0 => (&listen_cache, &mut sub_listen),
                1 => (&repl_cache, &mut sub_repl),
                _ => (&listen_cache, &mut sub_listen), // unused for the floor
            };
            if side < 2 {
                read(cache, pool, 1).await?; // the old value is cached
            }
            let t0 = Instant::now();
            write(pool, 1, v).await?;
            if side < 2 {
                loop {
                    next_event(sub).await?;
                    if read(cache, pool, 1).await? == v {
                        break;
                    }
                }
            } else {
                tokio::time::timeout(Duration::from_secs(10), raw.recv())
                    .await
                    .context("no notification within 10 s")??;
                let seen: i64 = sqlx::query_scalar(&raw_sql).fetch_one(pool).await?;
                anyhow::ensure!(seen == v, "the floor read an old value");
            }
            if round >= warmup {
                [&mut t_listen, &mut t_repl, &mut t_raw][side].push(t0.elapsed());
            }
        }
    }
    drop((sub_listen, sub_repl));
    let floor = summary(&mut t_raw);
    println!(
        "1. write → fresh read through the cache ({} rounds each, interleaved; µs)",
        args.rounds
    );
    for (name, samples) in [
        ("replication source", &mut t_repl),
        ("LISTEN source (row-key triggers)", &mut t_listen),
    ] {
        let s = summary(samples);
        println!(
            "   {name:<34} p50 {:>6.0}  p99 {:>6.0}   ({:.2} x / {:.2} x the floor)",
            s.0,
            s.1,
            s.0 / floor.0,
            s.1 / floor.1
        );
    }
    println!(
        "   floor: raw sqlx LISTEN recv + SELECT  p50 {:>6.0}  p99 {:>6.0}",
        floor.0, floor.1
    );

    // 2. A killed connection, a write while it is down, and the warm entries.
    println!(
        "\n2. pg_terminate_backend on the source's connection, {ROWS} warm entries, one write while down ({} kills each)",
        args.kills
    );
    for (name, cache, is_repl) in [
        ("replication source", &repl_cache, true),
        ("LISTEN source", &listen_cache, false),
    ] {
        let (mut resumed, mut kept, mut seen) = (Vec::new(), Vec::new(), 0usize);
        for k in 0..args.kills {
            for id in 1..=ROWS {
                read(cache, pool, id).await?;
            }
            let pid = if is_repl {
                repl.stats().backend_pid
            } else {
                listen.stats().backend_pid
            }
            .context("no backend to kill")?;
            let t0 = Instant::now();
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(i32::try_from(pid)?)
                .execute(pool)
                .await?;
            // The written row: 2 + k, so it differs from the warm value.
            let id = 2 + k as i64;
            v += 1;
            write(pool, id, v).await?;
            // Until the loss is noticed, the cache may still say healthy.
            while cache.is_healthy() && t0.elapsed() < Duration::from_secs(5) {
                let current = if is_repl {
                    repl.stats().backend_pid
                } else {
                    listen.stats().backend_pid
                };
                if current != Some(pid) && current.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            while !cache.is_healthy() {
                anyhow::ensure!(
                    t0.elapsed() < Duration::from_secs(30),
                    "{name}: not healthy 30 s after a kill"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            resumed.push(t0.elapsed());
            // Everything written before recovery is applied now (lossless) or
            // flushed (LISTEN): a read of the written row must be fresh.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let still = (1..=ROWS).filter(|id| cache.contains_key(id)).count();
            kept.push(still as f64 / ROWS as f64);
            if read(cache, pool, id).await? == v {
                seen += 1;
            }
        }
        let mut ms: Vec<f64> = resumed.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let kept_avg = kept.iter().sum::<f64>() / kept.len().max(1) as f64;
        println!(
            "   {name:<20} caching resumes after p50 {:>6.1} ms (max {:>6.1} ms); warm entries still cached: {:>5.1} %; the write made while down read fresh: {seen}/{}",
            ms[ms.len() / 2],
            ms[ms.len() - 1],
            kept_avg * 100.0,
            args.kills
        );
    }
    listen.shutdown().await;
    repl.shutdown().await;
    Ok(())
}

/// (p50, p99) in µs.
fn summary(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e6
    };
    (at(0.5), at(0.99))
}
