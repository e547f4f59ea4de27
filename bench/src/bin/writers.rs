//! What watching costs the writers: pgbench throughput of single-row `UPDATE`s
//! on a 10,000-row table, with 16, 8 and 2 clients, under four set-ups measured
//! in the same run, interleaved per client count:
//!
//! * **(a) none**: nothing watches the table (the ceiling);
//! * **(b) notify**: pgcachewatch's statement-level NOTIFY triggers ([`Installer`]),
//!   with a [`PgListenerSource`] consuming;
//! * **(c) replication**: a publication and a pgoutput slot ([`ReplicationSetup`]),
//!   with a [`PgReplicationSource`] consuming into a cache through a dispatcher;
//! * **(d) pg_recvlogical**: the same publication and a pgoutput slot consumed by
//!   PostgreSQL's own `pg_recvlogical` (the floor for any logical consumer).
//!
//! It prints tps per set-up and the ratios (targets at 16 clients: (c) ≥ 0.95 × (d),
//! (c) ≥ 3 × (b)).
//!
//! `cargo run --release -p pgcachewatch-bench --bin writers [-- --seconds 10 --clients 16,8,2]`
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`; needs
//! `pgbench` and `pg_recvlogical` on the PATH and `wal_level = logical`).
//! `--figures DIR` also writes the table and a bar chart into DIR, as writers.md
//! and writers.svg.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use pgcachewatch::postgres::{Installer, PgListenerSource, TableName};
use pgcachewatch::replication::{PgReplicationSource, ReplicationSetup};
use pgcachewatch::strategies::Greedy;
use pgcachewatch::{Cache, Dispatcher};
use pgcachewatch_bench::figures::{Bars, Chart, Figure, Figures, Table};
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use tokio::process::Command;

#[derive(Parser, Debug)]
#[command(
    about = "writer throughput: no watching vs NOTIFY triggers vs replication vs pg_recvlogical"
)]
struct Args {
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Client counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "16,8,2")]
    clients: Vec<u32>,
    /// PostgreSQL to use.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    /// Also write the table and a bar chart into DIR, as writers.md and writers.svg.
    #[arg(long, value_name = "DIR")]
    figures: Option<PathBuf>,
}

const TABLE: &str = "pgcw_bench_writers";
const SLOT: &str = "pgcw_bench_writers";
const CHANNEL: &str = "pgcw_bench_writers";
const ROWS: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
    Notify,
    Replication,
    RecvLogical,
}

const MODES: [Mode; 4] = [
    Mode::None,
    Mode::Notify,
    Mode::Replication,
    Mode::RecvLogical,
];

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::None => "(a) none",
            Mode::Notify => "(b) notify",
            Mode::Replication => "(c) replication",
            Mode::RecvLogical => "(d) pg_recvlogical",
        }
    }
}

/// What a mode keeps running while pgbench writes.
enum Watcher {
    None,
    Listener(PgListenerSource),
    Replication(PgReplicationSource, pgcachewatch::DispatcherHandle),
    RecvLogical(tokio::process::Child),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let figures = args.figures.as_ref().map(Figures::new);
    let mut conn = PgConnection::connect(&args.database_url)
        .await
        .context("connecting to DATABASE_URL")?;
    prepare(&mut conn).await?;
    let script = std::env::temp_dir().join("pgcw_bench_writers.sql");
    std::fs::write(
        &script,
        format!("\\set id random(1, {ROWS})\nUPDATE {TABLE} SET v = v + 1 WHERE id = :id;\n"),
    )?;
    println!(
        "pgbench, single-row UPDATEs on a {ROWS}-row table, {} s per run (tps, excluding connection time)\n",
        args.seconds
    );
    println!(
        "{:>7}  {:>10}  {:>10}  {:>15}  {:>18}  {:>7}  {:>7}  {:>7}",
        "clients",
        "(a) none",
        "(b) notify",
        "(c) replication",
        "(d) pg_recvlogical",
        "c / d",
        "c / b",
        "c / a"
    );
    let mut all = Vec::new();
    for &clients in &args.clients {
        let mut tps = [0.0f64; 4];
        for (i, mode) in MODES.into_iter().enumerate() {
            for sql in [format!("VACUUM {TABLE}"), "CHECKPOINT".to_owned()] {
                sqlx::raw_sql(&sql).execute(&mut conn).await?;
            }
            let watcher = start(mode, &mut conn, &args.database_url).await?;
            let result = pgbench(&args, clients, &script).await;
            stop(watcher, &mut conn).await?;
            tps[i] = result.with_context(|| format!("pgbench, {}", mode.label()))?;
        }
        println!(
            "{clients:>7}  {:>10.0}  {:>10.0}  {:>15.0}  {:>18.0}  {:>7.3}  {:>7.2}  {:>7.3}",
            tps[0],
            tps[1],
            tps[2],
            tps[3],
            tps[2] / tps[3],
            tps[2] / tps[1],
            tps[2] / tps[0]
        );
        all.push((clients, tps));
    }
    let mut targets = None;
    if let Some((_, tps)) = all.iter().find(|(c, _)| *c == 16) {
        let line = format!(
            "targets at 16 clients: (c) ≥ 0.95 × (d): {:.3} {}; (c) ≥ 3 × (b): {:.2} {}",
            tps[2] / tps[3],
            if tps[2] >= 0.95 * tps[3] {
                "met"
            } else {
                "NOT met"
            },
            tps[2] / tps[1],
            if tps[2] >= 3.0 * tps[1] {
                "met"
            } else {
                "NOT met"
            },
        );
        println!("\n{line}");
        targets = Some(line);
    }
    if let Some(figures) = &figures {
        let version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&mut conn)
            .await?;
        figures.write(&figure(&args, &all, targets, &version))?;
    }
    sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {TABLE}"))
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// The table and a bar chart of `all` (tps per mode, per client count).
fn figure(args: &Args, all: &[(u32, [f64; 4])], targets: Option<String>, version: &str) -> Figure {
    let mut table = Table::new(&[
        "clients",
        "(a) none",
        "(b) notify",
        "(c) replication",
        "(d) pg_recvlogical",
        "c / d",
        "c / b",
        "c / a",
    ]);
    for (clients, tps) in all {
        table.row(&[
            clients.to_string(),
            format!("{:.0}", tps[0]),
            format!("{:.0}", tps[1]),
            format!("{:.0}", tps[2]),
            format!("{:.0}", tps[3]),
            format!("{:.3}", tps[2] / tps[3]),
            format!("{:.2}", tps[2] / tps[1]),
            format!("{:.3}", tps[2] / tps[0]),
        ]);
    }
    let series = [
        "(a) none: nothing watches",
        "(b) notify: pgcachewatch NOTIFY triggers",
        "(c) replication: pgcachewatch slot",
        "(d) pg_recvlogical (floor for a slot)",
    ];
    let chart = Bars {
        x_label: format!(
            "pgbench clients (single-row UPDATEs on a {ROWS}-row table, {} s per run)",
            args.seconds
        ),
        y_label: "writer tps (higher is better)".to_owned(),
        groups: all.iter().map(|(c, _)| format!("{c} clients")).collect(),
        series: series
            .iter()
            .enumerate()
            .map(|(i, name)| {
                (
                    (*name).to_owned(),
                    all.iter().map(|(_, t)| Some(t[i])).collect(),
                )
            })
            .collect(),
        decimals: 0,
    };
    let mut figure = Figure::new(
        "writers",
        "Writer throughput with and without watching",
        Chart::Bars(chart),
    )
    .context(format!("PostgreSQL {version}"))
    .table(
        Some(&format!(
            "pgbench tps, {} s per run, excluding connection time",
            args.seconds
        )),
        table,
    );
    if let Some(line) = targets {
        figure = figure.note(line);
    }
    figure
}

/// The table, fresh, and nothing left from an earlier run.
async fn prepare(conn: &mut PgConnection) -> anyhow::Result<()> {
    let _ = ReplicationSetup::new()
        .slot(SLOT)
        .publication(SLOT)
        .teardown(conn)
        .await;
    for sql in [
        format!("DROP TABLE IF EXISTS {TABLE}"),
        format!("CREATE TABLE {TABLE} (id int PRIMARY KEY, v bigint NOT NULL DEFAULT 0)"),
        format!("INSERT INTO {TABLE} (id) SELECT g FROM generate_series(1, {ROWS}) g"),
        format!("VACUUM ANALYZE {TABLE}"),
    ] {
        sqlx::raw_sql(&sql).execute(&mut *conn).await?;
    }
    Ok(())
}

fn table() -> anyhow::Result<TableName> {
    Ok(TableName::new("public", TABLE)?)
}

async fn start(mode: Mode, conn: &mut PgConnection, url: &str) -> anyhow::Result<Watcher> {
    Ok(match mode {
        Mode::None => Watcher::None,
        Mode::Notify => {
            Installer::new()
                .channel(CHANNEL)
                .install(&mut *conn, &[table()?])
                .await?;
            let source = PgListenerSource::builder(url)
                .channel(CHANNEL)
                .connect()
                .await?;
            Watcher::Listener(source)
        }
        Mode::Replication => {
            let setup = ReplicationSetup::new().slot(SLOT).publication(SLOT);
            setup.setup(&mut *conn, &[table()?]).await?;
            let source = PgReplicationSource::builder(url)
                .slot(SLOT)
                .publication(SLOT)
                .connect()
                .await?;
            let cache: Cache<i32, i64> = Cache::new(10_000);
            let dispatcher = Dispatcher::new()
                .attach(Greedy::new(), cache)
                .spawn(&source);
            Watcher::Replication(source, dispatcher)
        }
        Mode::RecvLogical => {
            let setup = ReplicationSetup::new().slot(SLOT).publication(SLOT);
            setup.setup(&mut *conn, &[table()?]).await?;
            let child = Command::new("pg_recvlogical")
                .args(["-d", url, "--slot", SLOT, "--start", "-f", "/dev/null"])
                .args(["-o", "proto_version=1", "-o"])
                .arg(format!("publication_names={SLOT}"))
                .stdout(Stdio::null())
                .spawn()
                .context("starting pg_recvlogical")?;
            // Let it connect before the writers start.
            tokio::time::sleep(Duration::from_millis(500)).await;
            Watcher::RecvLogical(child)
        }
    })
}

async fn stop(watcher: Watcher, conn: &mut PgConnection) -> anyhow::Result<()> {
    match watcher {
        Watcher::None => {}
        Watcher::Listener(source) => {
            source.shutdown().await;
            Installer::new()
                .channel(CHANNEL)
                .uninstall(&mut *conn, &[table()?])
                .await?;
        }
        Watcher::Replication(source, dispatcher) => {
            dispatcher.shutdown().await;
            let s = source.stats();
            eprintln!(
                "  (c) replication: {} transactions, {} visibility snapshots ({:.2} per transaction), {} waits",
                s.transactions,
                s.visibility_checks,
                s.visibility_checks as f64 / s.transactions.max(1) as f64,
                s.visibility_waits
            );
            source.shutdown().await;
            teardown(conn).await?;
        }
        Watcher::RecvLogical(mut child) => {
            child.kill().await.ok();
            teardown(conn).await?;
        }
    }
    Ok(())
}

/// Drops the slot once its consumer has let go of it.
async fn teardown(conn: &mut PgConnection) -> anyhow::Result<()> {
    let setup = ReplicationSetup::new().slot(SLOT).publication(SLOT);
    for _ in 0..200 {
        if setup.teardown(&mut *conn).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("could not drop slot {SLOT}")
}

/// Runs pgbench; its tps excluding connection time.
async fn pgbench(args: &Args, clients: u32, script: &std::path::Path) -> anyhow::Result<f64> {
    let out = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-T"])
        .arg(args.seconds.to_string())
        .arg("-c")
        .arg(clients.to_string())
        .arg("-j")
        .arg(clients.min(2).to_string())
        .arg("-f")
        .arg(script)
        .arg(&args.database_url)
        .output()
        .await
        .context("running pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    text.lines()
        .find(|l| l.starts_with("tps = ") && l.contains("without initial connection"))
        .or_else(|| text.lines().find(|l| l.starts_with("tps = ")))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no tps in pgbench's output: {text}"))
}
