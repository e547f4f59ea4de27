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
//! the table). `GET /users/{id}/card` reads the same row through a cached
//! query (`pgcachewatch::query::CachedQuery`): no strategy written, its
//! dependencies derived from its SQL (row-level by `id`: a write drops only the
//! rows it wrote; the triggers send row keys). On start the demo creates its
//! table (named for this run, `pgcachewatch_demo_users_<pid>_<hex>`, so that two
//! runs on one database do not clash) and installs its triggers, then drives
//! itself (reads and writes over HTTP and through the cache) and prints hits,
//! misses and the write → fresh-read latency; then it serves on 127.0.0.1 until Ctrl-C. On exit it removes its
//! triggers and drops its table, unless `--keep`: after a failure too, and after
//! Ctrl-C at any point (a second Ctrl-C during the clean-up gives up on it and
//! says what is left). Interrupted before it was serving, it exits with 130.
//!
//! Connection: `DATABASE_URL`. Without it the demo tries
//! `postgres://postgres@127.0.0.1:5432/test`, and if that cannot be used (nothing
//! answers, a password is required, no database `test`) it starts a throw-away
//! cluster of its own (`initdb` in a temporary directory; removed on exit) and
//! says so; `--own-postgres` always does.

/// `println!` that does not panic when stdout is gone (`demo | head`): what
/// follows it, the clean-up, must still run.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that does not panic when stderr is gone.
macro_rules! tell {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

#[path = "../demo/app.rs"]
mod app;
#[path = "../demo/database.rs"]
mod database;
#[path = "../demo/drive.rs"]
mod drive;
#[path = "../demo/setup.rs"]
mod setup;
#[path = "../demo/stop.rs"]
mod stop;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use clap::parser::ValueSource;
use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use pgcachewatch::cached;
use pgcachewatch::postgres::PgListenerSource;

use app::AppState;
use database::{Choice, Database};
use stop::Stop;

/// pgcachewatch demo: an axum app whose cache PostgreSQL keeps fresh.
#[derive(Debug, Parser)]
#[command(name = "demo")]
struct Args {
    /// PostgreSQL to use. Without it: postgres://postgres@127.0.0.1:5432/test if
    /// that can be used, else a throw-away cluster of the demo's own.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Start a throw-away PostgreSQL cluster for the demo (initdb in a temporary
    /// directory, removed on exit) instead of using DATABASE_URL or the default.
    /// Needs PostgreSQL's server binaries (Debian: apt-get install postgresql).
    #[arg(long)]
    own_postgres: bool,
    /// The URL tried when DATABASE_URL is not set (tests point it elsewhere).
    #[arg(long, hide = true, default_value = database::DEFAULT_URL)]
    default_database_url: String,
    /// Port to serve on, on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Drive the demo, print the figures, and exit instead of serving until Ctrl-C.
    #[arg(long)]
    drive_and_exit: bool,
    /// Write → fresh-read rounds to measure.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// NOTIFY channel for the demo table's triggers (default: this run's own,
    /// `pgcachewatch_demo_<pid>_<hex>`).
    #[arg(long)]
    channel: Option<String>,
    /// Keep the demo's table and triggers on exit (by default they are removed);
    /// with a throw-away cluster, keep the cluster running.
    #[arg(long)]
    keep: bool,
    /// Accepted for compatibility: cleaning up on exit is the default now.
    #[arg(long, hide = true)]
    cleanup: bool,
}

/// How a run that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Driven and exited, or served until Ctrl-C.
    Done,
    /// A signal arrived before it was serving: cleaned up, exit 130.
    Interrupted,
}

const INTERRUPTED: u8 = 130;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    // First: from here on Ctrl-C stops the demo through its clean-up.
    let stop = match Stop::install() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("error: could not handle Ctrl-C: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    match run(args, &stop).await {
        Ok(Ended::Done) => ExitCode::SUCCESS,
        Ok(Ended::Interrupted) => {
            tell!("interrupted");
            ExitCode::from(INTERRUPTED)
        }
        Err(e) => {
            tell!("error: {}", chain(&e));
            if stop.count() > 0 {
                ExitCode::from(INTERRUPTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The arguments; `--own-postgres` overrides a `DATABASE_URL` from the
/// environment (saying so) but not a `--database-url` on the command line.
fn parse_args() -> Result<Args, clap::Error> {
    let matches = Args::command().try_get_matches()?;
    let from_env = matches.value_source("database_url") == Some(ValueSource::EnvVariable);
    let mut args = Args::from_arg_matches(&matches)?;
    if args.own_postgres && args.database_url.is_some() {
        if !from_env {
            return Err(Args::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                "--own-postgres starts a cluster of its own: drop --database-url, or --own-postgres",
            ));
        }
        println!("--own-postgres: not using DATABASE_URL");
        args.database_url = None;
    }
    Ok(args)
}

/// The chain, without causes the message already repeats (sqlx does).
fn chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if !text.contains(&cause) {
            text.push_str(if text.is_empty() { "" } else { ": " });
            text.push_str(&cause);
        }
    }
    text
}

async fn run(args: Args, stop: &Stop) -> Result<Ended> {
    // The recorder first: caches and sources register their series when built.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let _ = args.cleanup; // the default now; see --keep
    let channel = args.channel.clone().unwrap_or_else(app::default_channel);
    let choice = Choice::new(
        args.database_url.as_deref(),
        &args.default_database_url,
        args.own_postgres,
    );
    let Some(db) = database::open(choice, stop).await? else {
        return Ok(Ended::Interrupted);
    };

    // Whatever happens from here on, the clean-up runs: after an error, a
    // signal, or a panic.
    let created = setup::Created::default();
    let target = Target {
        pool: &db.pool,
        url: &db.url,
        own: db.is_own(),
    };
    let phases = async {
        match stop
            .race(setup::prepare(&db.pool, &channel, &created))
            .await
        {
            None => Ok(Ended::Interrupted),
            Some(Err(e)) => Err(e),
            Some(Ok(table)) => serve(&args, target, &table, &channel, metrics, stop).await,
        }
    };
    let outcome = match stop::catch_panic(phases).await {
        Ok(outcome) => outcome,
        Err(panic) => Err(anyhow!("the demo stopped unexpectedly: {panic}")),
    };
    let interrupted = outcome.as_ref().is_ok_and(|e| *e == Ended::Interrupted);
    if interrupted && created.table() && !args.keep {
        tell!("interrupted: removing what the demo made (Ctrl-C again to leave it)");
    }
    let cleaned = clean_up(&args, &db, &channel, &created, stop).await;
    db.close(args.keep).await;
    match (outcome, cleaned) {
        (Ok(ended), Ok(())) => Ok(ended),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), cleaned) => {
            if let Err(c) = cleaned {
                tell!("also: {}", chain(&c));
            }
            Err(e)
        }
    }
}

/// Where the demo's phases connect.
#[derive(Clone, Copy)]
struct Target<'a> {
    pool: &'a sqlx::PgPool,
    url: &'a str,
    /// A throw-away cluster of the demo's own.
    own: bool,
}

/// Removes the table and triggers unless `--keep`; a further signal gives up
/// on it, naming what is left.
async fn clean_up(
    args: &Args,
    db: &Database,
    channel: &str,
    created: &setup::Created,
    stop: &Stop,
) -> Result<()> {
    let table = app::table();
    if !created.table() {
        return Ok(());
    }
    if args.keep {
        say!("kept the demo table {table} and its triggers (--keep)");
        return Ok(());
    }
    let seen = stop.count();
    match stop
        .race_beyond(seen, setup::cleanup(&db.pool, channel, created))
        .await
    {
        Some(Ok(())) => {
            say!("removed the demo triggers and table {table} (--keep keeps them)");
            Ok(())
        }
        Some(Err(e)) => Err(e),
        None if db.is_own() => Err(anyhow!("interrupted again during the clean-up")),
        None => Err(anyhow!(
            "interrupted again during the clean-up: the table public.{table} and its triggers \
             may be left; remove them with `DROP TABLE public.{table}`"
        )),
    }
}

async fn serve(
    args: &Args,
    db: Target<'_>,
    table: &pgcachewatch::postgres::TableName,
    channel: &str,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    stop: &Stop,
) -> Result<Ended> {
    // The source, and every `#[cached]` function's cache attached to it through
    // the strategy declared with the function. The listener connects where the
    // pool connects.
    let source = match stop
        .race(
            PgListenerSource::from_pool(db.pool)
                .channel(channel)
                .connect(),
        )
        .await
    {
        None => return Ok(Ended::Interrupted),
        Some(source) => Arc::new(source.context("starting the LISTEN connection")?),
    };
    let caches = cached::attach(source.clone());
    // The cached query: derived from its SQL on the server, attached to the
    // same source.
    let cards = app::user_card_query();
    let cards_attached = match cards.attach(db.pool, &*source).await {
        Ok(attached) => Arc::new(attached),
        Err(e) => {
            caches.shutdown().await;
            source.shutdown().await;
            return Err(e).context("attaching the cached query of GET /users/{id}/card");
        }
    };
    let state = AppState {
        db: db.pool.clone(),
        source: source.clone(),
        caches: Arc::new(caches),
        cards,
        cards_attached,
        metrics,
    };

    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, args.port))
        .await
        .with_context(|| {
            format!(
                "could not listen on 127.0.0.1:{}; is another program using it? try --port 0",
                args.port
            )
        });
    let listener = match listener {
        Ok(listener) => listener,
        Err(e) => {
            shut_down(state, source).await;
            return Err(e);
        }
    };
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

    let shown = setup::redact(db.url);
    println!("pgcachewatch demo");
    if db.own {
        println!("  database: {shown} (a throw-away cluster of the demo's own)");
    } else {
        println!("  database: {shown}");
    }
    println!(
        "  table:    {table} ({} rows), triggers installed, channel {channel:?}",
        setup::USERS,
    );
    println!("  strategy: Greedy (any change of the table drops the cache)");
    println!(
        "  query:    GET /users/{{id}}/card: {}",
        state.cards.explain().unwrap_or_default()
    );
    println!("  serving:  http://{addr}");
    println!();

    let ended = match stop.race(drive::drive(&state, addr, args.rounds)).await {
        None => Ok(Ended::Interrupted),
        Some(Err(e)) => Err(e),
        Some(Ok(())) if args.drive_and_exit => Ok(Ended::Done),
        Some(Ok(())) => {
            println!();
            println!("Serving http://{addr} until Ctrl-C. Try:");
            println!("  curl -i http://{addr}/users/1        # x-cache: miss, then hit");
            println!(
                "  curl -X PUT -H 'content-type: application/json' -d '{{\"name\":\"ann\"}}' http://{addr}/users/1"
            );
            println!("  curl -i http://{addr}/users/1        # x-cache: miss, and the new name");
            println!("  curl -i http://{addr}/users/1/card   # the cached query: x-dependencies");
            println!("  curl http://{addr}/stats");
            println!("  curl http://{addr}/metrics              # Prometheus");
            println!(
                "  psql {shown} -c \"UPDATE {} SET name = 'bob' WHERE id = 1\"   # any writer works",
                app::table()
            );
            stop.wait().await;
            println!("stopping");
            Ok(Ended::Done)
        }
    };

    let _ = stop_tx.send(());
    let served = match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(joined) => joined.context("the HTTP server task").and_then(|r| Ok(r?)),
        Err(_) => Err(anyhow!("the HTTP server did not stop within 5 s")),
    };
    shut_down(state, source).await;
    let ended = ended?;
    served?;
    Ok(ended)
}

/// Stops the dispatchers and the listener (bounded: a stuck one is left to
/// the process's exit).
async fn shut_down(state: AppState, source: Arc<PgListenerSource>) {
    let stopped = tokio::time::timeout(Duration::from_secs(5), async move {
        let AppState {
            caches,
            cards_attached,
            ..
        } = state;
        if let Ok(caches) = Arc::try_unwrap(caches) {
            caches.shutdown().await;
        }
        if let Ok(cards) = Arc::try_unwrap(cards_attached) {
            cards.shutdown().await;
        }
        source.shutdown().await;
    })
    .await;
    if stopped.is_err() {
        tracing::warn!("the listener did not stop within 5 s");
    }
}
