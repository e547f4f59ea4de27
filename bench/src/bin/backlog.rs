//! Replication backlog decode: [`PgReplicationSource`] next to PostgreSQL's own
//! `pg_recvlogical` reading the same backlog, in one run.
//!
//! Each round writes `--transactions` single-row `UPDATE` transactions while
//! nobody reads (two fresh pgoutput slots on one publication hold them), then
//! times, one after the other (alternating which goes first):
//!
//! * **pgcachewatch**: a `PgReplicationSource` on the first slot, connect →
//!   the event of the last transaction published to a subscriber (events are
//!   counted as they arrive: one per transaction, each decoded, assembled, held
//!   until visible, and published);
//! * **pg_recvlogical**: `pg_recvlogical --start --endpos <end of the backlog>
//!   -f /dev/null` on the second slot, with the same plugin options; its
//!   events are the same transactions, written out as pgoutput bytes.
//!
//! Both read the same WAL through the same walsender code, so the server's
//! decoding bounds both; the ratio is what the client adds. It prints events/s
//! per side per round and the median ratio (target ≥ 0.9), plus the source's
//! visibility snapshots per transaction (its visibility step's share).
//!
//! `cargo run --release -p pgcachewatch-bench --bin backlog [-- --transactions 20000 --rounds 3]`
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`; needs
//! `pg_recvlogical` and `wal_level = logical`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use pgcachewatch::replication::PgReplicationSource;
use pgcachewatch::{EventSource, Signal};
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use tokio::process::Command;

#[derive(Parser, Debug)]
#[command(about = "replication backlog decode: PgReplicationSource vs pg_recvlogical")]
struct Args {
    /// Transactions in each round's backlog.
    #[arg(long, default_value_t = 20_000)]
    transactions: u64,
    /// Rounds (a fresh backlog each).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// PostgreSQL to use.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
}

const SCHEMA: &str = "pgcw_bench_backlog";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut conn = PgConnection::connect(&args.database_url)
        .await
        .context("connecting to DATABASE_URL")?;
    let result = run(&args, &mut conn).await;
    cleanup(&mut conn).await;
    result
}

async fn cleanup(conn: &mut PgConnection) {
    for slot in ["pgcw_bench_backlog_a", "pgcw_bench_backlog_b"] {
        let _ = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND NOT active",
        )
        .bind(slot)
        .execute(&mut *conn)
        .await;
    }
    let _ = sqlx::raw_sql(&format!(
        "DROP PUBLICATION IF EXISTS {SCHEMA}; DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"
    ))
    .execute(&mut *conn)
    .await;
}

async fn run(args: &Args, conn: &mut PgConnection) -> anyhow::Result<()> {
    cleanup(conn).await;
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA {SCHEMA};
         CREATE TABLE {SCHEMA}.t (id int PRIMARY KEY, v bigint NOT NULL);
         INSERT INTO {SCHEMA}.t SELECT g, 0 FROM generate_series(1, 1000) g;
         CREATE PUBLICATION {SCHEMA} FOR TABLE {SCHEMA}.t;"
    ))
    .execute(&mut *conn)
    .await?;
    println!(
        "replication backlog of {} single-row UPDATE transactions, read from a fresh slot (events/s)\n",
        args.transactions
    );
    println!(
        "{:>5}  {:>14}  {:>16}  {:>7}  {:>22}",
        "round", "pgcachewatch", "pg_recvlogical", "ratio", "snapshots / transaction"
    );
    let mut ratios = Vec::new();
    for round in 0..args.rounds {
        for slot in ["pgcw_bench_backlog_a", "pgcw_bench_backlog_b"] {
            sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
                .bind(slot)
                .execute(&mut *conn)
                .await?;
        }
        sqlx::raw_sql(&format!(
            "DO $$ BEGIN FOR i IN 1..{} LOOP \
               UPDATE {SCHEMA}.t SET v = v + 1 WHERE id = 1 + i % 1000; COMMIT; \
             END LOOP; END $$",
            args.transactions
        ))
        .execute(&mut *conn)
        .await?;
        let end: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&mut *conn)
            .await?;
        let (ours, snapshots, theirs) = if round % 2 == 0 {
            let (o, s) = ours(args).await?;
            (o, s, recvlogical(args, &end).await?)
        } else {
            let t = recvlogical(args, &end).await?;
            let (o, s) = ours(args).await?;
            (o, s, t)
        };
        let n = args.transactions as f64;
        let ratio = theirs.as_secs_f64() / ours.as_secs_f64();
        ratios.push(ratio);
        println!(
            "{round:>5}  {:>14.0}  {:>16.0}  {ratio:>7.3}  {:>22.3}",
            n / ours.as_secs_f64(),
            n / theirs.as_secs_f64(),
            snapshots as f64 / n
        );
        cleanup_slots(conn).await?;
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!(
        "\nmedian pgcachewatch ÷ pg_recvlogical: {median:.3} (target ≥ 0.9: {})",
        if median >= 0.9 { "met" } else { "NOT met" }
    );
    Ok(())
}

async fn cleanup_slots(conn: &mut PgConnection) -> anyhow::Result<()> {
    for slot in ["pgcw_bench_backlog_a", "pgcw_bench_backlog_b"] {
        for _ in 0..100 {
            let dropped = sqlx::query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND NOT active",
            )
            .bind(slot)
            .execute(&mut *conn)
            .await?;
            if dropped.rows_affected() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Connect → the last transaction's event at a subscriber; and the
/// visibility snapshots taken.
async fn ours(args: &Args) -> anyhow::Result<(Duration, u64)> {
    let t0 = Instant::now();
    let source = PgReplicationSource::builder(&args.database_url)
        .slot("pgcw_bench_backlog_a")
        .publication(SCHEMA)
        .buffer(65_536)
        .connect()
        .await?;
    let mut sub = source.subscribe();
    let mut events = 0u64;
    while events < args.transactions {
        match tokio::time::timeout(Duration::from_secs(120), sub.recv()).await {
            Ok(Some(Signal::Event(_))) => events += 1,
            Ok(Some(Signal::Gap(g))) => bail!("gap while draining: {g}"),
            Ok(Some(_)) => {}
            Ok(None) => bail!("the source ended"),
            Err(_) => bail!("stalled after {events} events"),
        }
    }
    let elapsed = t0.elapsed();
    let snapshots = source.stats().visibility_checks;
    drop(sub);
    source.shutdown().await;
    Ok((elapsed, snapshots))
}

/// `pg_recvlogical` reading the backlog to `/dev/null`, up to `end`.
async fn recvlogical(args: &Args, end: &str) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let status = Command::new("pg_recvlogical")
        .args([
            "--dbname",
            &args.database_url,
            "--slot",
            "pgcw_bench_backlog_b",
            "--start",
            "--endpos",
            end,
            "--no-loop",
            "-o",
            "proto_version=1",
            "-o",
            &format!("publication_names={SCHEMA}"),
            "-f",
            "/dev/null",
        ])
        .stdout(Stdio::null())
        .status()
        .await
        .context("running pg_recvlogical (is it on the PATH? `pg_config --bindir`)")?;
    if !status.success() {
        bail!("pg_recvlogical failed: {status}");
    }
    Ok(t0.elapsed())
}
