//! The pgcachewatch demo: the Rust counterpart of PGCacheWatch's FastAPI example.
//!
//! ```text
//! cargo run -p pgcachewatch-examples --bin demo                     # drive, then serve until Ctrl-C
//! cargo run -p pgcachewatch-examples --bin demo -- --drive-and-exit # drive, print, exit (CI)
//! cargo run -p pgcachewatch-examples --bin demo -- --keep           # leave the table and triggers behind
//! ```
//!
//! An axum app whose `GET /users/{id}` returns a row through `user_by_id`, an
//! async fn declared `#[pgcachewatch::cached(strategy = Greedy::with_predicate(…))]`.
//! The cache is kept fresh by the database itself: triggers on the table NOTIFY, a
//! [`PgListenerSource`] receives, and [`cached::attach`] feeds every declared
//! cache from it through its strategy (here: drop everything on every change of
//! the table). On start the demo creates its
//! table if missing and installs its triggers, then drives itself (reads and writes
//! over HTTP and through the cache) and prints hits, misses and the write →
//! fresh-read latency; then it serves on 127.0.0.1 until Ctrl-C. On exit (also after
//! a failure) it removes its triggers and drops its table, unless `--keep`.
//!
//! Connection: `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`.

#[path = "../demo/app.rs"]
mod app;
#[path = "../demo/drive.rs"]
mod drive;
#[path = "../demo/setup.rs"]
mod setup;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::Parser;
use pgcachewatch::cached;
use pgcachewatch::postgres::listener::PgListenerSource;

use app::{AppState, TABLE};

/// pgcachewatch demo: an axum app whose cache PostgreSQL keeps fresh.
#[derive(Debug, Parser)]
#[command(name = "demo")]
struct Args {
    /// PostgreSQL to use.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test",
        hide_env_values = true
    )]
    database_url: String,
    /// Port to serve on, on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Drive the demo, print the figures, and exit instead of serving until Ctrl-C.
    #[arg(long)]
    drive_and_exit: bool,
    /// Write → fresh-read rounds to measure.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// NOTIFY channel for the demo table's triggers.
    #[arg(long, default_value = "pgcachewatch_demo")]
    channel: String,
    /// Keep the demo's table and triggers on exit (by default they are removed).
    #[arg(long)]
    keep: bool,
    /// Accepted for compatibility: cleaning up on exit is the default now.
    #[arg(long, hide = true)]
    cleanup: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain, without causes the message already repeats (sqlx does).
            let mut text = String::new();
            for cause in e.chain().map(ToString::to_string) {
                if !text.contains(&cause) {
                    text.push_str(if text.is_empty() { "" } else { ": " });
                    text.push_str(&cause);
                }
            }
            eprintln!("error: {text}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    // The recorder first: caches and sources register their series when built.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let db = setup::connect(&args.database_url).await?;
    let _ = args.cleanup; // the default now; see --keep
    let prepared = setup::prepare(&db, &args.channel).await;
    let result = match &prepared {
        Ok(table) => serve(&args, &db, table, metrics).await,
        Err(_) => Ok(()),
    };
    // Clean up whatever happened, unless asked to keep: the table may exist even
    // if installing its triggers failed.
    let cleaned = if args.keep {
        if prepared.is_ok() {
            println!("kept the demo table {TABLE} and its triggers (--keep)");
        }
        Ok(())
    } else {
        let table = pgcachewatch::postgres::TableName::new("public", TABLE)?;
        let cleaned = setup::cleanup(&db, &args.channel, &table).await;
        if cleaned.is_ok() {
            println!("removed the demo triggers and table (--keep keeps them)");
        }
        cleaned
    };
    db.close().await;
    prepared?;
    result?;
    cleaned
}

async fn serve(
    args: &Args,
    db: &sqlx::PgPool,
    table: &pgcachewatch::postgres::TableName,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> Result<()> {
    // The source, and every `#[cached]` function's cache attached to it through
    // the strategy declared with the function. The listener connects where the
    // pool connects.
    let source = Arc::new(
        PgListenerSource::from_pool(db)
            .channel(&args.channel)
            .connect()
            .await
            .context("starting the LISTEN connection")?,
    );
    let caches = cached::attach(source.clone());
    let state = AppState {
        db: db.clone(),
        source: source.clone(),
        caches: Arc::new(caches),
        metrics,
    };

    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, args.port))
        .await
        .with_context(|| {
            format!(
                "could not listen on 127.0.0.1:{}; is another program using it? try --port 0",
                args.port
            )
        })?;
    let addr: SocketAddr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = app::router(state.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });

    println!("pgcachewatch demo");
    println!("  database: {}", setup::redact(&args.database_url));
    println!(
        "  table:    {table} ({} rows), triggers installed, channel {:?}",
        setup::USERS,
        args.channel
    );
    println!("  strategy: Greedy (any change of the table drops the cache)");
    println!("  serving:  http://{addr}");
    println!();

    let driven = drive::drive(&state, addr, args.rounds).await;
    if driven.is_ok() && !args.drive_and_exit {
        println!();
        println!("Serving http://{addr} until Ctrl-C. Try:");
        println!("  curl -i http://{addr}/users/1        # x-cache: miss, then hit");
        println!(
            "  curl -X PUT -H 'content-type: application/json' -d '{{\"name\":\"ann\"}}' http://{addr}/users/1"
        );
        println!("  curl -i http://{addr}/users/1        # x-cache: miss, and the new name");
        println!("  curl http://{addr}/stats");
        println!("  curl http://{addr}/metrics              # Prometheus");
        println!(
            "  psql {} -c \"UPDATE {TABLE} SET name = 'bob' WHERE id = 1\"   # any writer works",
            setup::redact(&args.database_url)
        );
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        println!("stopping");
    }

    let _ = stop_tx.send(());
    server.await.context("the HTTP server task")??;
    let AppState { caches, .. } = state;
    if let Ok(caches) = Arc::try_unwrap(caches) {
        caches.shutdown().await;
    }
    source.shutdown().await;
    driven
}
