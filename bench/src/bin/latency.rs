//! Write issued → fresh value read through the cache, next to its floor.
//!
//! Over `--updates` (default 500) single-row UPDATEs per side, interleaved, in one
//! run, each side on its own one-row table with pgcachewatch's triggers (installed
//! by [`Installer`], table-level payload with `clock_timestamp()`) on its own channel:
//!
//! * **pgcachewatch, reader polls**: `UPDATE` issued → trigger → [`PgListenerSource`]
//!   → [`Dispatcher`] → [`Greedy`] → [`Cache`]; after the `UPDATE` returns, the
//!   reader loops `get_or_load` (a hit on the old value until the invalidation
//!   lands, then one `SELECT`), yielding between reads, until it sees the new value.
//! * **pgcachewatch, reader woken**: the same pipeline, but the reader first awaits
//!   the event on a subscription of the source (as the floor awaits `recv`), then
//!   loops `get_or_load` until fresh. Without a reader spinning on one of the two
//!   cores, this shows the pipeline's own cost.
//! * **floor**: a raw sqlx `PgListener` awaited directly (`UPDATE` issued →
//!   `recv()` returns), plus one uncached `SELECT`. Nothing can invalidate faster.
//!
//! It prints p50 / p99 / max and the ratios to the floor (targets: p50 ≤ 1.1 ×,
//! p99 ≤ 1.25 ×), plus a breakdown.
//!
//! `--runtime current` runs everything on one thread: the listener, dispatcher and
//! reader then never wait for the OS to schedule another thread, which is where the
//! tail comes from on a small, busy machine (the source's own delivery matches the
//! raw listener at p99; see "breakdown").
//!
//! `cargo run --release -p pgcachewatch-bench --bin latency [-- --updates 5000 --runtime current]`
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`).
//! `--figures DIR` also writes the table and the distributions' chart into DIR,
//! as latency.md and latency.svg.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use pgcachewatch::postgres::{Installer, PgListenerSource, TableName};
use pgcachewatch::strategies::Greedy;
use pgcachewatch::{Cache, Dispatcher, DispatcherHandle, EventSource, Signal};
use pgcachewatch_bench::figures::{Cdf, Chart, Figure, Figures, Table};
use sqlx::postgres::{PgConnection, PgListener};
use sqlx::{Connection, Executor};

#[derive(Parser, Debug)]
#[command(about = "write issued → fresh read latency: pgcachewatch next to raw LISTEN + SELECT")]
struct Args {
    /// Measured updates per side.
    #[arg(long, default_value_t = 500)]
    updates: usize,
    /// Unmeasured updates per side first.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Tokio runtime: `multi` (the default, as most servers run) or `current`
    /// (one thread: the listener, the dispatcher and the reader never wake another thread).
    #[arg(long, default_value = "multi")]
    runtime: RuntimeKind,
    /// PostgreSQL to use.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    /// Also write the table and a chart of the distributions into DIR, as
    /// latency.md and latency.svg.
    #[arg(long, value_name = "DIR")]
    figures: Option<PathBuf>,
}

/// A one-row table with pgcachewatch's own triggers (the installer's), notifying `channel`.
struct Watched {
    table: String,
    channel: String,
}

impl Watched {
    fn installer(&self) -> Installer {
        Installer::new().channel(&self.channel)
    }

    fn name(&self) -> anyhow::Result<TableName> {
        Ok(TableName::new("public", &self.table)?)
    }

    async fn create(conn: &mut PgConnection, name: &str) -> anyhow::Result<Watched> {
        let w = Watched {
            table: name.to_owned(),
            channel: format!("{name}_ch"),
        };
        let t = &w.table;
        conn.execute(
            format!(
                "DROP TABLE IF EXISTS public.{t};
                 CREATE TABLE public.{t} (id int PRIMARY KEY, v bigint NOT NULL);
                 INSERT INTO public.{t} VALUES (1, 0);"
            )
            .as_str(),
        )
        .await
        .with_context(|| format!("creating table {t}"))?;
        w.installer()
            .install(&mut *conn, &[w.name()?])
            .await
            .with_context(|| format!("installing the triggers on {t}"))?;
        Ok(w)
    }

    fn update_sql(&self) -> String {
        format!("UPDATE public.{} SET v = $1 WHERE id = 1", self.table)
    }

    fn select_sql(&self) -> String {
        format!("SELECT v FROM public.{} WHERE id = 1", self.table)
    }

    async fn drop(&self, conn: &mut PgConnection) -> anyhow::Result<()> {
        self.installer()
            .uninstall(&mut *conn, &[self.name()?])
            .await?;
        conn.execute(format!("DROP TABLE IF EXISTS public.{}", self.table).as_str())
            .await?;
        Ok(())
    }
}

#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    fn micros(&self) -> Vec<f64> {
        self.0.iter().map(|d| us(*d)).collect()
    }

    fn row(&self, name: &str) -> String {
        format!(
            "{name:<44} p50 {:>7.0} µs   p99 {:>7.0} µs   max {:>7.0} µs",
            us(self.percentile(50.0)),
            us(self.percentile(99.0)),
            us(self.percentile(100.0)),
        )
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum RuntimeKind {
    Multi,
    Current,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let figures = args.figures.as_ref().map(Figures::new);
    let mut runtime = match args.runtime {
        RuntimeKind::Multi => tokio::runtime::Builder::new_multi_thread(),
        RuntimeKind::Current => tokio::runtime::Builder::new_current_thread(),
    };
    runtime
        .enable_all()
        .build()?
        .block_on(bench(args, figures.as_ref()))
}

async fn bench(args: Args, figures: Option<&Figures>) -> anyhow::Result<()> {
    let suffix = format!("pgcw_bench_lat_{}", std::process::id());
    let mut admin = PgConnection::connect(&args.database_url)
        .await
        .context("connecting to DATABASE_URL")?;
    let polled = Watched::create(&mut admin, &format!("{suffix}_a")).await?;
    let woken = Watched::create(&mut admin, &format!("{suffix}_b")).await?;
    let raw = Watched::create(&mut admin, &format!("{suffix}_c")).await?;

    let result = run(&args, figures, &polled, &woken, &raw).await;

    for w in [&polled, &woken, &raw] {
        w.drop(&mut admin).await?;
    }
    result
}

/// One pgcachewatch pipeline: listener → dispatcher → Greedy → cache, on one table.
struct Pipeline {
    source: PgListenerSource,
    cache: Cache<i32, i64>,
    dispatcher: DispatcherHandle,
    update: String,
    select: String,
}

impl Pipeline {
    async fn start(url: &str, watched: &Watched) -> anyhow::Result<Pipeline> {
        let source = PgListenerSource::builder(url)
            .channel(&watched.channel)
            .connect()
            .await?;
        let cache = Cache::new(16);
        let dispatcher = Dispatcher::new()
            .attach(Greedy::new(), cache.clone())
            .spawn(&source);
        Ok(Pipeline {
            source,
            cache,
            dispatcher,
            update: watched.update_sql(),
            select: watched.select_sql(),
        })
    }

    /// Reads through the cache; a miss runs one SELECT on `reader`.
    async fn read(&self, reader: &Reader) -> anyhow::Result<i64> {
        let v = self
            .cache
            .get_or_load(1, || async {
                let mut conn = reader.lock().await;
                sqlx::query_scalar::<_, i64>(&self.select)
                    .fetch_one(&mut *conn)
                    .await
            })
            .await?;
        Ok(v)
    }

    /// Loads the current value `v - 1` into the cache and checks it is cached.
    async fn warm(&self, reader: &Reader, v: i64) -> anyhow::Result<()> {
        let before = self.read(reader).await?;
        anyhow::ensure!(before == v - 1, "cache served {before}, expected {}", v - 1);
        anyhow::ensure!(self.cache.get(&1) == Some(v - 1), "value not cached");
        Ok(())
    }

    /// Loops reads until the fresh value `v` comes back; returns the stale hits seen.
    async fn read_until(&self, reader: &Reader, v: i64) -> anyhow::Result<u64> {
        let mut stale = 0;
        while self.read(reader).await? != v {
            stale += 1;
            tokio::task::yield_now().await;
        }
        Ok(stale)
    }

    async fn shutdown(self) -> String {
        let s = self.source.stats();
        let d = self.dispatcher.stats();
        self.dispatcher.shutdown().await;
        self.source.shutdown().await;
        format!(
            "{} events, {} gaps, {} heartbeats (last rtt {:?}); dispatcher applied {} events",
            s.events, s.gaps, s.heartbeats, s.last_heartbeat_rtt, d.events
        )
    }
}

type Reader = tokio::sync::Mutex<PgConnection>;

async fn run(
    args: &Args,
    figures: Option<&Figures>,
    polled: &Watched,
    woken: &Watched,
    raw: &Watched,
) -> anyhow::Result<()> {
    let url = args.database_url.as_str();
    let polled = Pipeline::start(url, polled).await?;
    let woken = Pipeline::start(url, woken).await?;
    let mut woken_sub = woken.source.subscribe();

    // The floor: a raw listener on the third table's channel.
    let mut raw_listener = PgListener::connect(url).await?;
    raw_listener.listen(&raw.channel).await?;
    let (raw_update, raw_select) = (raw.update_sql(), raw.select_sql());

    // One writer connection and one reader connection, shared by every side.
    let mut writer = PgConnection::connect(url).await?;
    let reader: Reader = tokio::sync::Mutex::new(PgConnection::connect(url).await?);

    let mut ours_polled = Samples::default();
    let mut ours_woken = Samples::default();
    let mut woken_event = Samples::default();
    let mut floor = Samples::default();
    let mut floor_notify = Samples::default();
    let mut stale_polled = 0u64;
    let mut stale_woken = 0u64;

    for i in 1..=(args.warmup + args.updates) {
        let v = i64::try_from(i)?;
        let measured = i > args.warmup;

        // pgcachewatch, reader polling: write, then read until fresh.
        polled.warm(&reader, v).await?;
        let t0 = Instant::now();
        sqlx::query(&polled.update)
            .bind(v)
            .execute(&mut writer)
            .await?;
        stale_polled += polled.read_until(&reader, v).await?;
        let fresh = t0.elapsed();
        if measured {
            ours_polled.push(fresh);
        }

        // pgcachewatch, reader woken by the event (as the floor is woken by recv).
        woken.warm(&reader, v).await?;
        while woken_sub.try_recv().is_ok() {}
        let t0 = Instant::now();
        sqlx::query(&woken.update)
            .bind(v)
            .execute(&mut writer)
            .await?;
        loop {
            match woken_sub.recv().await {
                Some(Signal::Event(_)) => break,
                Some(_) => continue,
                None => anyhow::bail!("source ended"),
            }
        }
        let event = t0.elapsed();
        stale_woken += woken.read_until(&reader, v).await?;
        let fresh = t0.elapsed();
        if measured {
            ours_woken.push(fresh);
            woken_event.push(event);
        }

        // The floor: same write, raw LISTEN, one SELECT.
        let t0 = Instant::now();
        sqlx::query(&raw_update)
            .bind(v)
            .execute(&mut writer)
            .await?;
        let n = raw_listener.recv().await?;
        let notified = t0.elapsed();
        anyhow::ensure!(n.channel() == raw.channel, "unexpected channel");
        let got: i64 = {
            let mut conn = reader.lock().await;
            sqlx::query_scalar(&raw_select)
                .fetch_one(&mut *conn)
                .await?
        };
        let total = t0.elapsed();
        anyhow::ensure!(got == v, "raw read {got}, expected {v}");
        if measured {
            floor.push(total);
            floor_notify.push(notified);
        }
    }

    drop(woken_sub);
    let polled_stats = polled.shutdown().await;
    let woken_stats = woken.shutdown().await;
    let rounds = (args.warmup + args.updates) as f64;

    println!(
        "write issued → fresh value read, {} updates per side (after {} warm-up), interleaved, {:?} runtime",
        args.updates, args.warmup, args.runtime
    );
    println!();
    println!("{}", floor.row(FLOOR));
    println!("{}", ours_polled.row(POLLED));
    println!("{}", ours_woken.row(WOKEN));
    println!();
    for (name, ours) in [
        ("reader polls", &ours_polled),
        ("reader woken", &ours_woken),
    ] {
        let ratio = |p| us(ours.percentile(p)) / us(floor.percentile(p));
        let (r50, r99) = (ratio(50.0), ratio(99.0));
        let verdict = |r: f64, t: f64| if r <= t { "met" } else { "MISSED" };
        println!(
            "{name:<13} ratio p50 {r50:.3}× (target ≤ 1.10×: {})   p99 {r99:.3}× (target ≤ 1.25×: {})",
            verdict(r50, 1.10),
            verdict(r99, 1.25)
        );
    }
    println!();
    println!("breakdown:");
    println!(
        "{}",
        floor_notify.row("  write → raw PgListener::recv returns")
    );
    println!(
        "{}",
        woken_event.row("  write → event at a pgcachewatch subscriber")
    );
    println!(
        "  stale hits before the fresh read, per update: polled {:.1}, woken {:.2}",
        stale_polled as f64 / rounds,
        stale_woken as f64 / rounds
    );
    println!("  polled source: {polled_stats}");
    println!("  woken source:  {woken_stats}");

    if let Some(figures) = figures {
        let version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&mut writer)
            .await?;
        let mut table = Table::new(&[
            "write issued → fresh value read",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "max µs",
            "p50 / floor",
            "p99 / floor",
        ]);
        let rows = [
            (FLOOR, &floor),
            (POLLED, &ours_polled),
            (WOKEN, &ours_woken),
        ];
        for (name, samples) in rows {
            let at = |p| us(samples.percentile(p));
            table.row(&[
                name.to_owned(),
                format!("{:.0}", at(50.0)),
                format!("{:.0}", at(90.0)),
                format!("{:.0}", at(99.0)),
                format!("{:.0}", at(100.0)),
                format!("{:.3}", at(50.0) / us(floor.percentile(50.0))),
                format!("{:.3}", at(99.0) / us(floor.percentile(99.0))),
            ]);
        }
        let mut breakdown = Table::new(&["breakdown", "p50 µs", "p99 µs", "max µs"]);
        for (name, samples) in [
            ("write → raw PgListener::recv returns", &floor_notify),
            ("write → event at a pgcachewatch subscriber", &woken_event),
        ] {
            let at = |p| format!("{:.0}", us(samples.percentile(p)));
            breakdown.row(&[name.to_owned(), at(50.0), at(99.0), at(100.0)]);
        }
        let chart = Cdf {
            x_label: format!(
                "write issued → fresh value read (µs, log scale); {} updates per side, {:?} runtime",
                args.updates, args.runtime
            ),
            series: rows
                .iter()
                .map(|(name, samples)| ((*name).to_owned(), samples.micros()))
                .collect(),
        };
        let figure = Figure::new(
            "latency",
            "Write → fresh read: pgcachewatch next to the raw LISTEN floor",
            Chart::Cdf(chart),
        )
        .context(format!("PostgreSQL {version}"))
        .table(None, table)
        .table(None, breakdown)
        .note(format!(
            "{} updates per side (after {} warm-up), interleaved, {:?} runtime; targets: p50 ≤ 1.10 × floor, p99 ≤ 1.25 × floor. \
             Stale hits before the fresh read, per update: polled {:.1}, woken {:.2}.",
            args.updates,
            args.warmup,
            args.runtime,
            stale_polled as f64 / rounds,
            stale_woken as f64 / rounds
        ));
        figures.write(&figure)?;
    }
    Ok(())
}

const FLOOR: &str = "floor: raw sqlx PgListener recv + 1 SELECT";
const POLLED: &str = "pgcachewatch, reader polls get_or_load";
const WOKEN: &str = "pgcachewatch, reader woken by the event";
