//! A hot-key write storm, with and without refresh on invalidation, in one run.
//!
//! 8 readers each read one of 10 hot keys 1 000 times a second through a
//! `Cache` (`get_or_load`, a `SELECT` on a miss) while 1 writer updates the
//! 10 rows 100 times a second (row-mode triggers → LISTEN → `Keyed`). Each
//! side has its own cache, dispatcher and count of database loads (the readers'
//! `SELECT`s plus the refresher's); the sides take turns, round by round, on
//! the same table, source and connections:
//!
//! * **plain**: the default cache: a write drops the key, the next reader
//!   waits for its load;
//! * **refresh**: `refresh_on_invalidation` (at most 4 at once): the key is
//!   reloaded as soon as its invalidation is applied;
//! * **refresh + stale ≤ 50 ms**: also `serve_stale_within(50 ms)`: readers get
//!   the previous value while the refresh runs.
//!
//! It prints database loads per second and the readers' latency percentiles
//! (p50, p99, p99.9, max) per side, and the caches' counters.
//!
//! `cargo run --release -p pgcachewatch-bench --bin hotkeys [-- --seconds 10 --rounds 2]`
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`).
//!
//! `hotkeys instructions MODE N` runs N hits of MODE inside a function named
//! `measure_…`, for callgrind (as `bench/instructions.sh` does for `Cache::get`):
//! `plain-hit` (a default cache) or `refresh-hit` (a cache that refreshes on
//! invalidation, whose hits sample recency):
//!
//! ```sh
//! valgrind --tool=callgrind --toggle-collect='hotkeys::measure_*' \
//!     target/release/hotkeys instructions refresh-hit 1000000
//! ```

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use pgcachewatch::postgres::{Installer, PgListenerSource, TableName};
use pgcachewatch::strategies::Keyed;
use pgcachewatch::{Cache, CacheStats, Dispatcher, DispatcherHandle, Event, Refresh, RowKey};
use sqlx::PgPool;

#[derive(Parser, Debug)]
#[command(
    about = "hot-key write storm: loads per second and reader latency, with and without refresh on invalidation"
)]
struct Args {
    /// Measured seconds per side and round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds (the sides take turns in each).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Readers.
    #[arg(long, default_value_t = 8)]
    readers: usize,
    /// Reads per second of each reader.
    #[arg(long, default_value_t = 1_000)]
    reads_per_second: u64,
    /// Hot keys (rows).
    #[arg(long, default_value_t = 10)]
    keys: i64,
    /// Writes per second (one writer, round robin over the keys).
    #[arg(long, default_value_t = 100)]
    writes_per_second: u64,
    /// PostgreSQL to use.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    /// `instructions MODE N`: count hits under callgrind (see the module docs).
    #[arg(trailing_var_arg = true, hide = true)]
    rest: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rest.first().map(String::as_str) == Some("instructions") {
        return instructions(&args.rest[1..]);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(storm(args))
}

// ---- instructions per hit ------------------------------------------------------

const HIT_KEYS: u64 = 1000;

fn instructions(rest: &[String]) -> anyhow::Result<()> {
    let mode = rest.first().map(String::as_str).unwrap_or_default();
    let n: u64 = rest
        .get(1)
        .context("usage: hotkeys instructions MODE N")?
        .parse()
        .context("N: a number of hits")?;
    let cache: Cache<u64, Arc<String>> = match mode {
        "plain-hit" => Cache::new(10_000),
        "refresh-hit" => Cache::builder()
            .capacity(10_000)
            .refresh_on_invalidation(Refresh::new(|k: u64| async move {
                Ok::<_, std::io::Error>(Arc::new(format!("value of {k}")))
            }))
            .build(),
        _ => bail!("unknown mode {mode:?}: plain-hit or refresh-hit"),
    };
    for k in 0..HIT_KEYS {
        cache.insert(k, Arc::new(format!("value of {k}")));
    }
    match mode {
        "plain-hit" => measure_plain_hit(&cache, n),
        _ => measure_refresh_hit(&cache, n),
    }
    if cache.stats().hits != n {
        bail!("measured misses, not hits: {:?}", cache.stats());
    }
    Ok(())
}

#[inline(never)]
fn measure_plain_hit(cache: &Cache<u64, Arc<String>>, n: u64) {
    for i in 0..n {
        black_box(cache.get(&(i % HIT_KEYS)));
    }
}

#[inline(never)]
fn measure_refresh_hit(cache: &Cache<u64, Arc<String>>, n: u64) {
    for i in 0..n {
        black_box(cache.get(&(i % HIT_KEYS)));
    }
}

// ---- the write storm -----------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Plain,
    Refresh,
    RefreshStale,
}

impl Side {
    const ALL: [Side; 3] = [Side::Plain, Side::Refresh, Side::RefreshStale];

    fn name(self) -> &'static str {
        match self {
            Side::Plain => "plain (no refresh)",
            Side::Refresh => "refresh on invalidation",
            Side::RefreshStale => "refresh + stale <= 50 ms",
        }
    }
}

/// One side: its cache, its dispatcher, its database loads, its latencies.
struct Arm {
    side: Side,
    cache: Cache<i64, i64>,
    _dispatcher: DispatcherHandle,
    loads: Arc<AtomicU64>,
    latencies: Vec<Duration>,
    measured: Duration,
    loads_measured: u64,
    writes: u64,
}

type LoadFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, sqlx::Error>> + Send>>;

fn loader(
    db: &PgPool,
    table: &str,
    loads: &Arc<AtomicU64>,
) -> impl Fn(i64) -> LoadFuture + Send + Sync + Clone + 'static {
    let db = db.clone();
    let loads = loads.clone();
    let sql = format!("SELECT v FROM public.{table} WHERE id = $1");
    move |id| {
        loads.fetch_add(1, Ordering::Relaxed);
        let (db, sql) = (db.clone(), sql.clone());
        Box::pin(async move {
            sqlx::query_scalar::<_, i64>(&sql)
                .bind(id)
                .fetch_one(&db)
                .await
        })
    }
}

async fn storm(args: Args) -> anyhow::Result<()> {
    let db = PgPool::connect(&args.database_url)
        .await
        .context("connecting to DATABASE_URL")?;
    let table = format!("pgcw_hotkeys_{}", std::process::id());
    let channel = format!("{table}_ch");
    sqlx::raw_sql(&format!(
        "DROP TABLE IF EXISTS public.{table};
         CREATE TABLE public.{table} (id bigint PRIMARY KEY, v bigint NOT NULL);
         INSERT INTO public.{table} SELECT g, 0 FROM generate_series(1, {}) g;",
        args.keys
    ))
    .execute(&db)
    .await?;
    let tables = [TableName::new("public", &table)?];
    let installer = Installer::new().channel(&channel).row_keys(true);
    installer.install(&db, &tables).await?;
    let source = PgListenerSource::builder(&args.database_url)
        .channel(&channel)
        .connect()
        .await?;

    let mut arms: Vec<Arm> = Side::ALL
        .iter()
        .map(|&side| {
            let loads = Arc::new(AtomicU64::new(0));
            let load = loader(&db, &table, &loads);
            let mut builder = Cache::builder().name(side.name()).capacity(1_000);
            if side != Side::Plain {
                builder = builder.refresh_on_invalidation(
                    Refresh::new(move |id: i64| load(id)).max_concurrent(4),
                );
            }
            if side == Side::RefreshStale {
                builder = builder.serve_stale_within(Duration::from_millis(50));
            }
            let cache: Cache<i64, i64> = builder.build();
            let by_id =
                Keyed::new(|_: &Event, row: &RowKey| row.get("id").and_then(|v| v.as_i64()));
            let dispatcher = Dispatcher::new()
                .attach(by_id, cache.clone())
                .spawn(&source);
            Arm {
                side,
                cache,
                _dispatcher: dispatcher,
                loads,
                latencies: Vec::new(),
                measured: Duration::ZERO,
                loads_measured: 0,
                writes: 0,
            }
        })
        .collect();

    println!(
        "hot-key write storm: {} readers x {} reads/s over {} keys, 1 writer at {} writes/s; \
         {} rounds of {} s per side (cores: {})",
        args.readers,
        args.reads_per_second,
        args.keys,
        args.writes_per_second,
        args.rounds,
        args.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for round in 0..args.rounds {
        for arm in arms.iter_mut() {
            run_side(&args, &db, &table, arm).await?;
            println!(
                "  round {} {:<26} done ({} reads so far)",
                round + 1,
                arm.side.name(),
                arm.latencies.len()
            );
        }
    }

    println!();
    println!(
        "{:<26} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "side", "writes/s", "loads/s", "reads/s", "p50", "p99", "p99.9", "max"
    );
    for arm in arms.iter_mut() {
        arm.latencies.sort_unstable();
        let secs = arm.measured.as_secs_f64();
        let q = |p: f64| {
            let l = &arm.latencies;
            l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        println!(
            "{:<26} {:>9.1} {:>10.1} {:>10.0} {:>10} {:>10} {:>10} {:>10}",
            arm.side.name(),
            arm.writes as f64 / secs,
            arm.loads_measured as f64 / secs,
            arm.latencies.len() as f64 / secs,
            us(q(0.50)),
            us(q(0.99)),
            us(q(0.999)),
            us(arm.latencies.last().copied().unwrap_or_default()),
        );
    }
    println!();
    for arm in &arms {
        let s: CacheStats = arm.cache.stats();
        println!(
            "{:<26} misses {}, reader loads {}, refreshes started {} served {} discarded {} \
             skipped {}, stale served {}",
            arm.side.name(),
            s.misses,
            s.loads,
            s.refreshes_started,
            s.refreshes_served,
            s.refreshes_discarded,
            s.refreshes_skipped,
            s.stale_served
        );
    }
    let _ = installer.uninstall(&db, &tables).await;
    sqlx::raw_sql(&format!("DROP TABLE IF EXISTS public.{table}"))
        .execute(&db)
        .await?;
    Ok(())
}

fn us(d: Duration) -> String {
    format!("{:.0} us", d.as_secs_f64() * 1e6)
}

/// Runs one side for `args.seconds`: readers on its cache, the writer on the
/// table (which every side's dispatcher hears; only this side is read).
async fn run_side(args: &Args, db: &PgPool, table: &str, arm: &mut Arm) -> anyhow::Result<()> {
    // Warm the keys first, unmeasured.
    let load = loader(db, table, &arm.loads);
    for k in 1..=args.keys {
        arm.cache.get_or_load(k, || load(k)).await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let loads_before = arm.loads.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut readers = Vec::new();
    for r in 0..args.readers {
        let (cache, load, stop) = (arm.cache.clone(), load.clone(), stop.clone());
        let keys = args.keys;
        let period = Duration::from_nanos(1_000_000_000 / args.reads_per_second.max(1));
        readers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (r as u64 + 1);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let k = (x % keys as u64) as i64 + 1;
                let t = Instant::now();
                if cache.get_or_load(k, || load(k)).await.is_err() {
                    continue;
                }
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let writer = {
        let (db, stop) = (db.clone(), stop.clone());
        let sql = format!("UPDATE public.{table} SET v = v + 1 WHERE id = $1");
        let keys = args.keys;
        let period = Duration::from_nanos(1_000_000_000 / args.writes_per_second.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let (mut k, mut writes) = (0, 0u64);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                k = k % keys + 1;
                sqlx::query(&sql).bind(k).execute(&db).await?;
                writes += 1;
            }
            Ok::<_, sqlx::Error>(writes)
        })
    };
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    arm.measured += started.elapsed();
    arm.loads_measured += arm.loads.load(Ordering::Relaxed) - loads_before;
    for r in readers {
        arm.latencies.extend(r.await?);
    }
    arm.writes += writer.await??;
    // Let the last events land before the next side starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}
