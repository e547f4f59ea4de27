//! Stale reads under concurrent writes while the listener's connection is killed
//! (`pg_terminate_backend`) or left half-open (a proxy that stops forwarding), and
//! how long caching takes to resume.
//!
//! A writer updates one row without pause; after each commit it waits for the
//! row's event and for the dispatcher to apply it, then publishes the version as
//! *processed*. Readers read through the cache as fast as they can; a read that
//! returns a version older than the one processed when it started is stale (the
//! guarantee in ARCHITECTURE.md). Each fault is measured from its injection to the source
//! reporting healthy again and to the first cache hit after that.
//!
//! `cargo run --release -p pgcachewatch-bench --bin faults [-- --kills 20 --pauses 5]`

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use pgcachewatch::postgres::{Installer, PgListenerSource, TableName};
use pgcachewatch::strategies::Greedy;
use pgcachewatch::testkit::env::{database_url, unique_name};
use pgcachewatch::testkit::proxy::FaultProxy;
use pgcachewatch::{Cache, Dispatcher, DispatcherHandle, EventSource, Signal};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

#[derive(Parser)]
struct Args {
    /// How many times to kill the listener's backend.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// How many times to leave the connection half-open.
    #[arg(long, default_value_t = 5)]
    pauses: usize,
    /// Heartbeat interval and timeout (ms) for the half-open part.
    #[arg(long, default_value_t = 250)]
    heartbeat_ms: u64,
}

struct Rig {
    pool: PgPool,
    table: String,
    source: PgListenerSource,
    cache: Cache<i32, i64>,
    dispatcher: Arc<DispatcherHandle>,
    processed: Arc<AtomicI64>,
    stale: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let url = database_url();
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .with_context(|| format!("connecting to {url} (set DATABASE_URL)"))?;
    let table = unique_name("pgcw_faults");
    let channel = unique_name("pgcw_faults_ch");
    sqlx::raw_sql(&format!(
        "CREATE TABLE public.{table} (id int PRIMARY KEY, v bigint NOT NULL); INSERT INTO public.{table} VALUES (1, 0);"
    ))
    .execute(&pool)
    .await?;
    let installer = Installer::new().channel(&channel);
    installer
        .install(&pool, &[TableName::new("public", &table)?])
        .await?;

    println!(
        "faults: writer + 2 readers through the cache; processed-notification staleness check"
    );
    let kills = {
        let source = PgListenerSource::builder(&url)
            .channel(&channel)
            .connect()
            .await?;
        run_kills(rig(&pool, &table, source), args.kills).await?
    };
    let pauses = {
        let options: PgConnectOptions = url.parse()?;
        let upstream = tokio::net::lookup_host((options.get_host(), options.get_port()))
            .await?
            .next()
            .context("resolving the database host")?;
        let proxy = FaultProxy::start(upstream).await?;
        let via_proxy = options
            .host(&proxy.addr().ip().to_string())
            .port(proxy.addr().port());
        let beat = Duration::from_millis(args.heartbeat_ms);
        let source = PgListenerSource::builder_with_options(via_proxy)
            .channel(&channel)
            .heartbeat_interval(beat)
            .heartbeat_timeout(beat)
            .connect()
            .await?;
        run_pauses(rig(&pool, &table, source), &proxy, args.pauses, beat).await?
    };
    print_report("pg_terminate_backend on the listener", &kills);
    print_report(
        &format!(
            "half-open connection (proxy paused; heartbeat {} ms / timeout {} ms)",
            args.heartbeat_ms, args.heartbeat_ms
        ),
        &pauses,
    );
    println!("target: 0 stale reads, caching resumes within 1 s of a kill");
    println!("baseline: PGCacheWatch 0.4.2 — see `bash bench/python/run.sh` (same machine)");

    installer
        .uninstall(&pool, &[TableName::new("public", &table)?])
        .await?;
    sqlx::raw_sql(&format!("DROP TABLE public.{table}"))
        .execute(&pool)
        .await?;
    Ok(())
}

fn rig(pool: &PgPool, table: &str, source: PgListenerSource) -> Rig {
    let cache: Cache<i32, i64> = Cache::new(16);
    let dispatcher = Arc::new(
        Dispatcher::new()
            .attach(Greedy::new(), cache.clone())
            .spawn(&source),
    );
    Rig {
        pool: pool.clone(),
        table: table.to_owned(),
        source,
        cache,
        dispatcher,
        processed: Arc::default(),
        stale: Arc::default(),
        reads: Arc::default(),
        writes: Arc::default(),
        stop: Arc::default(),
    }
}

/// Figures of one fault kind.
struct Report {
    faults: usize,
    to_healthy: Vec<Duration>,
    to_first_hit: Vec<Duration>,
    reads: u64,
    writes: u64,
    stale: u64,
    bypasses: u64,
}

fn print_report(name: &str, r: &Report) {
    let pct = |v: &[Duration], p: f64| {
        let mut v = v.to_vec();
        v.sort();
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    println!("\n{name}: {} faults", r.faults);
    println!(
        "   reads {}, writes {}, bypassed reads {}, STALE reads {}",
        r.reads, r.writes, r.bypasses, r.stale
    );
    println!(
        "   fault → source healthy again:  p50 {:>7.1} ms   max {:>7.1} ms",
        pct(&r.to_healthy, 0.5).as_secs_f64() * 1e3,
        pct(&r.to_healthy, 1.0).as_secs_f64() * 1e3
    );
    println!(
        "   fault → caching resumed (hit): p50 {:>7.1} ms   max {:>7.1} ms",
        pct(&r.to_first_hit, 0.5).as_secs_f64() * 1e3,
        pct(&r.to_first_hit, 1.0).as_secs_f64() * 1e3
    );
}

/// Starts the writer and two readers; returns their join handles.
fn start_load(rig: &Rig) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let mut tasks = Vec::new();
    {
        let (pool, table) = (rig.pool.clone(), rig.table.clone());
        let (processed, writes, stop) =
            (rig.processed.clone(), rig.writes.clone(), rig.stop.clone());
        let dispatcher = rig.dispatcher.clone();
        let mut events = rig.source.subscribe();
        tasks.push(tokio::spawn(async move {
            let update = format!("UPDATE public.{table} SET v = v + 1 WHERE id = 1 RETURNING v");
            while !stop.load(Ordering::Relaxed) {
                let v: i64 = sqlx::query_scalar(&update).fetch_one(&pool).await?;
                writes.fetch_add(1, Ordering::Relaxed);
                // Wait for this write's event (lost if the connection is down).
                let arrived = tokio::time::timeout(Duration::from_millis(300), async {
                    loop {
                        match events.recv().await {
                            Some(Signal::Event(_)) => return true,
                            Some(_) => continue,
                            None => return false,
                        }
                    }
                })
                .await
                .unwrap_or(false);
                if arrived {
                    dispatcher.sync().await;
                    processed.fetch_max(v, Ordering::SeqCst);
                }
            }
            Ok(())
        }));
    }
    for _ in 0..2 {
        let (pool, table, cache) = (rig.pool.clone(), rig.table.clone(), rig.cache.clone());
        let (processed, stale, reads, stop) = (
            rig.processed.clone(),
            rig.stale.clone(),
            rig.reads.clone(),
            rig.stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let select = format!("SELECT v FROM public.{table} WHERE id = 1");
            while !stop.load(Ordering::Relaxed) {
                let must_see = processed.load(Ordering::SeqCst);
                let got = cache
                    .get_or_load(1, || sqlx::query_scalar::<_, i64>(&select).fetch_one(&pool))
                    .await?;
                reads.fetch_add(1, Ordering::Relaxed);
                if got < must_see {
                    stale.fetch_add(1, Ordering::Relaxed);
                    eprintln!("STALE: read v{got} after v{must_see} was processed");
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            Ok(())
        }));
    }
    tasks
}

/// Waits until the source is healthy and the cache has served a hit since `t0`.
async fn time_recovery(rig: &Rig, t0: Instant, hits_before: u64) -> (Duration, Duration) {
    let limit = Duration::from_secs(30);
    let mut healthy_at = None;
    loop {
        if healthy_at.is_none() && rig.source.health().is_healthy() && rig.cache.is_healthy() {
            healthy_at = Some(t0.elapsed());
        }
        if let Some(h) = healthy_at {
            if rig.cache.stats().hits > hits_before {
                return (h, t0.elapsed());
            }
        }
        if t0.elapsed() > limit {
            return (healthy_at.unwrap_or(limit), limit);
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

async fn finish(
    rig: Rig,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    faults: usize,
    to_healthy: Vec<Duration>,
    to_first_hit: Vec<Duration>,
) -> anyhow::Result<Report> {
    rig.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let report = Report {
        faults,
        to_healthy,
        to_first_hit,
        reads: rig.reads.load(Ordering::Relaxed),
        writes: rig.writes.load(Ordering::Relaxed),
        stale: rig.stale.load(Ordering::Relaxed),
        bypasses: rig.cache.stats().bypasses,
    };
    rig.source.shutdown().await;
    Ok(report)
}

async fn run_kills(rig: Rig, kills: usize) -> anyhow::Result<Report> {
    let tasks = start_load(&rig);
    let (mut to_healthy, mut to_first_hit) = (Vec::new(), Vec::new());
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pid = rig
            .source
            .stats()
            .backend_pid
            .context("the listener has no backend")?;
        let hits_before = rig.cache.stats().hits;
        let t0 = Instant::now();
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(i32::try_from(pid)?)
            .fetch_one(&rig.pool)
            .await?;
        anyhow::ensure!(killed, "backend {pid} was not terminated");
        // Wait until the loss is noticed before timing the recovery.
        while rig.source.stats().backend_pid == Some(pid) && t0.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let (h, hit) = time_recovery(&rig, t0, hits_before).await;
        to_healthy.push(h);
        to_first_hit.push(hit);
    }
    finish(rig, tasks, kills, to_healthy, to_first_hit).await
}

async fn run_pauses(
    rig: Rig,
    proxy: &FaultProxy,
    pauses: usize,
    beat: Duration,
) -> anyhow::Result<Report> {
    let tasks = start_load(&rig);
    let (mut to_healthy, mut to_first_hit) = (Vec::new(), Vec::new());
    for _ in 0..pauses {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let hits_before = rig.cache.stats().hits;
        let t0 = Instant::now();
        proxy.pause();
        // Until the heartbeat notices, the connection looks fine; then resume the
        // proxy so the reconnect can get through.
        while rig.source.health().is_healthy() && t0.elapsed() < beat * 20 {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        proxy.resume();
        let (h, hit) = time_recovery(&rig, t0, hits_before).await;
        to_healthy.push(h);
        to_first_hit.push(hit);
    }
    finish(rig, tasks, pauses, to_healthy, to_first_hit).await
}
