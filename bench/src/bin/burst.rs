//! A burst of notifications in one transaction: from `COMMIT` until the last one
//! is handled, pgcachewatch next to raw sqlx, in one run.
//!
//! Each round sends `--notifications` (default 200,000) distinct payloads in
//! pgcachewatch's shape (`json_build_object(...)`) from one transaction, on a
//! channel of its own per side, and times `COMMIT` sent → last one handled:
//!
//! * **raw sqlx**: a `PgListener` awaited with `recv()` in a loop (the floor: it
//!   only decodes the protocol message);
//! * **pgcachewatch inline dispatcher**: [`PgListenerSource`] → `PayloadParser` →
//!   hub → inline [`Dispatcher`] → [`Greedy`] → [`Cache`] (the last one "handled"
//!   when the dispatcher has applied it);
//! * **recorder** (with `--cli`, default: the `pgcachewatch` binary next to this
//!   one): `pgcachewatch record FILE --count N`, COMMIT → the process has written
//!   every event and exited; its events/s is the throughput the recorder sustains.
//!
//! The sides alternate over `--rounds` (default 5); the medians are printed with
//! the ratio to the raw floor (target: the inline dispatcher ≤ 1.1 ×). On Linux
//! it also prints the processor time this process spent from `COMMIT` to the
//! last one handled, per notification: on a machine whose cores PostgreSQL
//! shares, that is what decides the ratio, and it varies less between runs.
//!
//! `cargo build --release -p pgcachewatch-cli && cargo run --release -p pgcachewatch-bench --bin burst`
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use pgcachewatch::postgres::PgListenerSource;
use pgcachewatch::source_kit::{PayloadParser, SignalHub};
use pgcachewatch::strategies::Greedy;
use pgcachewatch::{Cache, Dispatcher, EventSource, Health, Signal};
use pgcachewatch_bench::{emit_batch, parse_batch, BATCH};
use sqlx::postgres::{PgConnection, PgListener};
use sqlx::{Connection, Executor};
use tokio::sync::oneshot;

#[derive(Parser, Debug)]
#[command(about = "a burst of NOTIFYs in one transaction: pgcachewatch next to raw sqlx")]
struct Args {
    /// Notifications per burst.
    #[arg(long, default_value_t = 200_000)]
    notifications: u64,
    /// Rounds per side (the median is printed).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The `pgcachewatch` CLI binary for the recorder's figure (default: next to this
    /// program); `none` skips it.
    #[arg(long)]
    cli: Option<String>,
    /// PostgreSQL to use.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(args))
}

/// One transaction holding `n` distinct notifications on `channel`, all sent
/// but the `COMMIT`; returns the `Instant` the `COMMIT` was sent.
struct Burst {
    conn: PgConnection,
}

impl Burst {
    async fn prepare(url: &str, channel: &str, n: u64) -> anyhow::Result<Burst> {
        let mut conn = PgConnection::connect(url).await?;
        conn.execute("BEGIN").await?;
        sqlx::query(
            "SELECT pg_notify($1, json_build_object('operation', 'update', 'schema', 'public', \
             'table', 'burst', 'sent_at', clock_timestamp(), 'txid', g)::text) \
             FROM generate_series(1, $2) g",
        )
        .bind(channel)
        .bind(i64::try_from(n)?)
        .execute(&mut conn)
        .await?;
        Ok(Burst { conn })
    }

    async fn commit(mut self) -> anyhow::Result<Instant> {
        let at = Instant::now();
        self.conn.execute("COMMIT").await?;
        let _ = self.conn.close().await;
        Ok(at)
    }
}

/// The processor time this process's threads have used so far (Linux:
/// `/proc/self/task/*/schedstat`); `None` elsewhere.
fn cpu_time() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// One side's round: wall time from `COMMIT`, and this process's processor
/// time over it (when known).
struct Round {
    wall: Duration,
    cpu: Option<Duration>,
}

/// Raw sqlx: `recv()` until `n` notifications arrived.
async fn raw(url: &str, channel: &str, n: u64) -> anyhow::Result<Round> {
    let mut listener = PgListener::connect(url).await?;
    listener.listen(channel).await?;
    let burst = Burst::prepare(url, channel, n).await?;
    let receiver = tokio::spawn(async move {
        for _ in 0..n {
            listener.recv().await?;
        }
        Ok::<_, sqlx::Error>(Instant::now())
    });
    let cpu = cpu_time();
    let committed = burst.commit().await?;
    let done = receiver.await??;
    Ok(Round::since(committed, done, cpu))
}

impl Round {
    /// From `COMMIT` at `committed` until `done`, with the processor time used
    /// since the reading `cpu` taken just before the `COMMIT`.
    fn since(committed: Instant, done: Instant, cpu: Option<Duration>) -> Round {
        Round {
            wall: done - committed,
            cpu: cpu
                .zip(cpu_time())
                .map(|(before, after)| after.saturating_sub(before)),
        }
    }
}

/// pgcachewatch: the inline dispatcher has applied `n` events.
async fn pipeline(url: &str, channel: &str, n: u64) -> anyhow::Result<Round> {
    let source = PgListenerSource::builder(url)
        .channel(channel)
        .connect()
        .await?;
    let cache: Cache<u64, u64> = Cache::new(16);
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    // Attached after the dispatcher, so it runs after it for each signal.
    let (tx, rx) = oneshot::channel();
    let mut tx = Some(tx);
    let seen = Arc::new(AtomicU64::new(0));
    let counted = seen.clone();
    let last = source
        .attach_inline(Box::new(move |signal: &Signal| {
            if matches!(signal, Signal::Event(_))
                && counted.fetch_add(1, Ordering::Relaxed) + 1 == n
            {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Instant::now());
                }
            }
        }))
        .context("inline handlers")?;
    let burst = Burst::prepare(url, channel, n).await?;
    let cpu = cpu_time();
    let committed = burst.commit().await?;
    let done = tokio::time::timeout(Duration::from_secs(120), rx)
        .await
        .context("the burst did not arrive within 120 s")??;
    let round = Round::since(committed, done, cpu);
    let stats = source.stats();
    if stats.gaps > 0 || dispatcher.stats().events != n {
        bail!("lost events: {stats:?}, {:?}", dispatcher.stats());
    }
    drop(last);
    dispatcher.shutdown().await;
    source.shutdown().await;
    Ok(round)
}

/// The CLI's recorder: `record FILE --count n`, COMMIT → exited.
async fn recorder(cli: &PathBuf, url: &str, channel: &str, n: u64) -> anyhow::Result<Duration> {
    let file = std::env::temp_dir().join(format!("{channel}.jsonl"));
    let mut child = Command::new(cli)
        .args(["record", file.to_str().context("temp path")?])
        .args(["--channel", channel, "--count", &n.to_string()])
        .env("DATABASE_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", cli.display()))?;
    let stderr = child.stderr.take().context("stderr")?;
    let (ready_tx, ready_rx) = oneshot::channel();
    let lines = std::thread::spawn(move || {
        let mut ready = Some(ready_tx);
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("recording") {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            }
            all.push(line);
        }
        all
    });
    tokio::time::timeout(Duration::from_secs(30), ready_rx)
        .await
        .context("the recorder never started")??;
    let burst = Burst::prepare(url, channel, n).await?;
    let committed = burst.commit().await?;
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    let exited = Instant::now();
    let stderr = lines.join().unwrap_or_default();
    let text = std::fs::read_to_string(&file)?;
    let _ = std::fs::remove_file(&file);
    let events = text.matches("\"event\"").count() as u64;
    let gaps = text.matches("\"gap\"").count();
    if !status.success() || events != n || gaps > 0 {
        bail!("the recorder lost events ({events} of {n}, {gaps} gaps, {status}): {stderr:?}");
    }
    Ok(exited - committed)
}

/// Where the pipeline's time goes, in process (no network): the core's share,
/// the listener's steps after sqlx decoded a notification, batch by batch
/// (parsed with one parser for the stream, emitted into the hub, which runs
/// the inline dispatcher, the events recycled).
fn breakdown(n: u64, floor: Duration) {
    let payloads = pgcachewatch_bench::burst_payloads(n);
    let received_at = chrono::Utc::now();
    let hub = SignalHub::with_health(4096, Health::Healthy);
    let cache: Cache<u64, u64> = Cache::new(16);
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&hub);
    let mut parser = PayloadParser::new();
    let mut batch = Vec::with_capacity(BATCH);
    let (mut parse, mut dispatch) = (Duration::ZERO, Duration::ZERO);
    for chunk in payloads.chunks(BATCH) {
        let started = Instant::now();
        parse_batch(&mut parser, chunk, received_at, &mut batch);
        let parsed = Instant::now();
        emit_batch(&hub, &mut parser, &mut batch, true);
        parse += parsed - started;
        dispatch += parsed.elapsed();
    }
    drop(dispatcher);
    let per = |d: Duration| d.as_secs_f64() * 1e9 / n as f64;
    println!(
        "  breakdown, in process: PayloadParser::parse_shared {:.0} ns/event ({:.1} ms, {:.2} × the floor); \
         hub → inline dispatcher → Greedy → cache, recycled {:.0} ns/event ({:.1} ms, {:.2} ×); \
         the floor is {:.0} ns/notification",
        per(parse),
        ms(parse),
        parse.as_secs_f64() / floor.as_secs_f64(),
        per(dispatch),
        ms(dispatch),
        dispatch.as_secs_f64() / floor.as_secs_f64(),
        per(floor)
    );
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let n = args.notifications;
    let url = args.database_url.as_str();
    let cli = match args.cli.as_deref() {
        Some("none") => None,
        Some(path) => Some(PathBuf::from(path)),
        None => std::env::current_exe()?
            .parent()
            .map(|dir| dir.join("pgcachewatch"))
            .filter(|p| p.exists()),
    };
    let channel = |side: &str, round: usize| {
        format!("pgcw_bench_burst_{side}_{}_{round}", std::process::id())
    };
    println!(
        "{n} notifications in one transaction, COMMIT → last one handled; median of {} rounds",
        args.rounds
    );
    let (mut raws, mut pipes, mut recs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut raw_cpu, mut pipe_cpu) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let r = raw(url, &channel("raw", round), n).await?;
        raws.push(r.wall);
        raw_cpu.extend(r.cpu);
        let p = pipeline(url, &channel("pipe", round), n).await?;
        pipes.push(p.wall);
        pipe_cpu.extend(p.cpu);
        if let Some(cli) = &cli {
            recs.push(recorder(cli, url, &channel("rec", round), n).await?);
        }
    }
    let floor = median(&mut raws);
    let row = |name: &str, d: Duration| {
        println!(
            "{name:<46} {:>8.1} ms  {:>6.2} ×  {:>6.2} M events/s",
            ms(d),
            d.as_secs_f64() / floor.as_secs_f64(),
            n as f64 / d.as_secs_f64() / 1e6
        );
    };
    row("raw sqlx PgListener::recv (floor)", floor);
    row(
        "pgcachewatch: listener → inline dispatcher",
        median(&mut pipes),
    );
    if raw_cpu.len() == args.rounds && pipe_cpu.len() == args.rounds {
        let per = |d: Duration| d.as_secs_f64() * 1e9 / n as f64;
        let (raw_cpu, pipe_cpu) = (median(&mut raw_cpu), median(&mut pipe_cpu));
        println!(
            "  processor time of this process, COMMIT → last one handled (median): raw sqlx \
             {:.0} ns/notification, pgcachewatch {:.0} ns/notification ({:.2} ×, +{:.0} ns)",
            per(raw_cpu),
            per(pipe_cpu),
            pipe_cpu.as_secs_f64() / raw_cpu.as_secs_f64(),
            per(pipe_cpu) - per(raw_cpu)
        );
    }
    breakdown(n, floor);
    match &cli {
        Some(_) => row(
            "pgcachewatch record (CLI, to a file, exited)",
            median(&mut recs),
        ),
        None => println!(
            "recorder: skipped (build the CLI first: cargo build --release -p pgcachewatch-cli)"
        ),
    }
    Ok(())
}
