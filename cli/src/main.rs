//! `pgcachewatch`: install and remove pgcachewatch's triggers, inspect them, and
//! watch or record the events they send.
//!
//! ```text
//! pgcachewatch install public.users 'app."Orders"'          # checks, prints the SQL, applies nothing
//! pgcachewatch install public.users --row-keys --commit     # applies it, in one transaction
//! pgcachewatch status                                       # triggers, listeners, queue usage
//! pgcachewatch listen                                       # live events with their latency
//! pgcachewatch record events.jsonl --duration 30s           # an event log the testkit replays
//! pgcachewatch relay --nats-url nats://127.0.0.1:4222      # LISTEN → JetStream, for many services
//! pgcachewatch relay --ws-listen 127.0.0.1:8000 --no-nats   # LISTEN → WebSocket, for PGCacheWatch's WSEventQueue
//! pgcachewatch relay status                                 # the relay's heartbeat, stream and lag
//! pgcachewatch uninstall --commit                           # removes what install installed
//! pgcachewatch replication setup public.users --commit      # publication + slot for the replication source
//! pgcachewatch replication status                           # slots, their lag, whether consumed
//! pgcachewatch replication teardown --commit                # drops the slot and the publication
//! ```
//!
//! The connection comes from `--database-url`, else `DATABASE_URL`, else libpq's
//! `PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE` (and `PGSSLMODE`,
//! `PGSSLROOTCERT`). TLS: `?sslmode=require`, or `?sslmode=verify-ca&sslrootcert=ca.pem`.
//!
//! Every failure prints `error: …` on stderr first and exits non-zero (2 for a
//! bad command line). `install` and `uninstall` print their SQL in dry runs, and
//! with `--commit` only when asked (`-v`). A dry run of `install` that can reach
//! the database runs the checks `--commit` would (tables exist, no foreign
//! triggers, no silent switch between row-key and table-level events) and fails
//! as `--commit` would.
//!
//! Dependencies: `clap` (derive) for the command line, `anyhow` for error chains
//! printed to the user, `tracing-subscriber` so `RUST_LOG` shows the library's logs.

mod commands;
mod connect;
mod duration;
mod output;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pgcachewatch::postgres::install::{Installer, DEFAULT_FUNCTION_NAME, DEFAULT_SCHEMA};
use pgcachewatch::postgres::DEFAULT_CHANNEL;
use pgcachewatch::replication::{ReplicationSetup, DEFAULT_PUBLICATION, DEFAULT_SLOT};

/// Keep in-process caches consistent with PostgreSQL: manage the triggers that
/// NOTIFY on writes, and watch what they send.
#[derive(Debug, Parser)]
#[command(name = "pgcachewatch", version, about, long_about = None)]
struct Cli {
    /// PostgreSQL URL, e.g. postgres://user@localhost:5432/app. Without it and
    /// without DATABASE_URL, libpq's PGHOST, PGPORT, PGUSER, PGPASSWORD and
    /// PGDATABASE are used.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print (or with --commit, apply) the SQL that installs the notify function and
    /// the triggers on TABLEs.
    Install {
        /// Tables to watch: `table` (schema public), `schema.table`, or quoted
        /// `"My Schema"."My Table"` (unquoted names fold to lower case).
        #[arg(required = true, value_name = "TABLE")]
        tables: Vec<String>,
        /// The NOTIFY channel the triggers send on.
        #[arg(long, default_value = DEFAULT_CHANNEL, value_parser = channel_name)]
        channel: String,
        /// Send the primary keys of affected rows (row mode: what the Keyed strategy
        /// needs to drop single rows; falls back to table-level events above
        /// PostgreSQL's 8000-byte payload limit). Tables need a primary key.
        #[arg(long)]
        row_keys: bool,
        /// Allow switching tables that already have pgcachewatch's triggers between
        /// row-key and table-level events (without it, install refuses and says
        /// which tables would change).
        #[arg(long)]
        change_mode: bool,
        #[command(flatten)]
        target: TriggerArgs,
    },
    /// Print (or with --commit, apply) the SQL that removes the triggers installed on
    /// TABLEs (on every table if none is named), and the function once unused.
    Uninstall {
        /// Tables to stop watching; all of them if none is given.
        #[arg(value_name = "TABLE")]
        tables: Vec<String>,
        #[command(flatten)]
        target: TriggerArgs,
    },
    /// Show installed functions and triggers, listening sessions, and NOTIFY queue usage.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print events as they arrive, with their notification latency, until Ctrl-C.
    Listen {
        #[command(flatten)]
        channels: ChannelArgs,
        /// Print each event as a JSON line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        stop: StopArgs,
    },
    /// Publish the events of the LISTEN channels to NATS JetStream (one PostgreSQL
    /// connection for every service that subscribes through NATS) and/or, with
    /// --ws-listen, serve them at ws://ADDR/pgpubsub/{channel} to PGCacheWatch's
    /// WSEventQueue (--no-nats: WebSocket only); `relay status` shows the NATS
    /// relay's health and lag.
    Relay(Box<commands::RelayArgs>),
    /// Write received events to FILE as a JSON-lines event log that the testkit replays.
    Record {
        /// Where to write the log (overwritten).
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
        #[command(flatten)]
        channels: ChannelArgs,
        #[command(flatten)]
        stop: StopArgs,
        /// Print the closing summary as JSON on stdout instead of text on stderr.
        #[arg(long)]
        json: bool,
    },
    /// The publication and slot of the logical-replication source: setup, teardown, status.
    Replication {
        #[command(subcommand)]
        command: ReplicationCommand,
    },
}

/// The `replication` subcommands.
#[derive(Debug, Subcommand)]
enum ReplicationCommand {
    /// Check the server, then create the publication for TABLEs and the slot
    /// (pgoutput); prints the SQL, applies it only with --commit.
    Setup {
        /// Tables to publish (schema.table; quote mixed case: 'app."Orders"').
        #[arg(required = true, value_name = "TABLE")]
        tables: Vec<String>,
        #[command(flatten)]
        names: ReplicationNames,
        /// Apply the SQL (without it: a dry run).
        #[arg(long)]
        commit: bool,
    },
    /// Drop the slot and the publication; prints the SQL, applies it only with --commit.
    Teardown {
        #[command(flatten)]
        names: ReplicationNames,
        /// Apply the SQL (without it: a dry run).
        #[arg(long)]
        commit: bool,
    },
    /// Every logical slot: lag in bytes, wal_status, active or not.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct ReplicationNames {
    /// The replication slot.
    #[arg(long, default_value = DEFAULT_SLOT)]
    slot: String,
    /// The publication.
    #[arg(long, default_value = DEFAULT_PUBLICATION)]
    publication: String,
}

impl ReplicationNames {
    fn setup(&self) -> ReplicationSetup {
        ReplicationSetup::new()
            .slot(&self.slot)
            .publication(&self.publication)
    }
}

/// Which notify function the triggers call, and whether to apply.
#[derive(Debug, Args)]
struct TriggerArgs {
    /// Schema of the notify function (must exist).
    #[arg(long, default_value = DEFAULT_SCHEMA)]
    function_schema: String,
    /// Name of the notify function.
    #[arg(long, default_value = DEFAULT_FUNCTION_NAME)]
    function_name: String,
    /// Apply the SQL. Without it nothing is changed: the SQL is only printed.
    #[arg(long)]
    commit: bool,
    /// With --commit, also print the SQL that was applied.
    #[arg(short, long)]
    verbose: bool,
}

impl TriggerArgs {
    fn installer(&self) -> Installer {
        Installer::new()
            .function_schema(&self.function_schema)
            .function_name(&self.function_name)
    }
}

#[derive(Debug, Args)]
struct ChannelArgs {
    /// Channel to listen on; repeat for several.
    #[arg(long = "channel", default_value = DEFAULT_CHANNEL, value_parser = channel_name)]
    channels: Vec<String>,
}

#[derive(Debug, Args, Clone, Copy)]
struct StopArgs {
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long (500ms, 10s, 2m, 1h).
    #[arg(long, value_parser = duration::parse)]
    duration: Option<Duration>,
}

/// PostgreSQL truncates channel names, like every identifier, to 63 bytes.
const MAX_CHANNEL_BYTES: usize = 63;

/// Checks a `--channel` value, in the command line's words.
fn channel_name(value: &str) -> Result<String, String> {
    if value.is_empty() {
        Err("--channel must not be empty (the triggers' default is \"pgcachewatch\")".into())
    } else if value.len() > MAX_CHANNEL_BYTES {
        Err(format!(
            "--channel must be at most {MAX_CHANNEL_BYTES} bytes (PostgreSQL would truncate it)"
        ))
    } else if value.contains('\0') {
        Err("--channel must not contain a NUL character".into())
    } else {
        Ok(value.to_owned())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Two rustls crypto providers are linked (NATS's ring, the replication
    // client's aws-lc-rs): rustls then picks none by itself, and sqlx's
    // verify-ca verifier would panic. Choose one for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", output::describe(&e));
            ExitCode::FAILURE
        }
    }
}
