//! `pgcachewatch`: install and remove pgcachewatch's triggers, inspect them, and
//! watch or record the events they send.
//!
//! ```text
//! pgcachewatch install public.users 'app."Orders"'          # checks, prints the SQL, applies nothing
//! pgcachewatch install public.users --row-keys --commit     # applies it, in one transaction
//! pgcachewatch install public.users --pgcachewatch-compat --commit  # for PGCacheWatch (Python) listeners
//! pgcachewatch status                                       # triggers, listeners, queue usage
//! pgcachewatch listen                                       # live events with their latency
//! pgcachewatch record events.jsonl --duration 30s           # an event log the testkit replays (--force replaces one)
//! pgcachewatch relay --nats-url nats://127.0.0.1:4222      # replication slot → JetStream, for many services
//! pgcachewatch relay --ws-listen 127.0.0.1:8000 --no-nats   # LISTEN → WebSocket, for PGCacheWatch's WSEventQueue
//! pgcachewatch relay status                                 # the relay's heartbeat, stream and lag
//! pgcachewatch uninstall public.users --commit              # removes what install installed
//! pgcachewatch uninstall --all --commit                     # … from every table
//! pgcachewatch replication setup public.users --commit      # publication + slot for the replication source
//! pgcachewatch replication setup public.logs --replica-identity-full  # a table without a primary key
//! pgcachewatch replication status                           # slots, their lag, whether consumed
//! pgcachewatch replication teardown --commit                # drops the slot and the publication
//! pgcachewatch explain 'SELECT * FROM users WHERE id = $1'  # row-level on public.users(id) from $1
//! pgcachewatch explain --strict 'SELECT …'                  # exits non-zero on a fall-back to table-level
//! ```
//!
//! The connection comes from `--database-url`, else `DATABASE_URL`, else libpq's
//! `PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE` (and `PGSSLMODE`,
//! `PGSSLROOTCERT`). TLS: `?sslmode=require`, or `?sslmode=verify-ca&sslrootcert=ca.pem`.
//! Connection errors say which setting came from where (the URL, or a variable)
//! and what to change; `--connect-timeout` bounds each connection attempt.
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
use pgcachewatch::postgres::DEFAULT_CHANNEL;
use pgcachewatch::postgres::{Installer, DEFAULT_FUNCTION_NAME, DEFAULT_SCHEMA};
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

    /// How long connecting to PostgreSQL may take (TCP, TLS, authentication)
    /// before the command gives up: 500ms, 10s, 1m.
    #[arg(long, global = true, default_value = "10s", value_parser = duration::parse, value_name = "DURATION")]
    connect_timeout: Duration,

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
        /// Notify on PGCacheWatch's default channel, ch_pgcachewatch_table_change
        /// (the same as --channel ch_pgcachewatch_table_change): Python services
        /// whose PGCacheWatch PGEventQueue listens with its defaults are then
        /// invalidated by these triggers (they read this payload as is).
        #[arg(long, conflicts_with = "channel")]
        pgcachewatch_compat: bool,
        /// Send the primary keys of affected rows (row mode: what the Keyed strategy
        /// needs to drop single rows; falls back to table-level events above
        /// PostgreSQL's 8000-byte payload limit). A table without a primary key
        /// still gets table-level events: install warns about it.
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
    /// TABLEs (with --all: on every table), and the function once unused.
    Uninstall {
        /// Tables to stop watching. Without any, the dry run lists the triggers of
        /// every table, and --commit needs --all.
        #[arg(value_name = "TABLE")]
        tables: Vec<String>,
        /// Remove the triggers from every table that has them (calling this
        /// function), instead of from the TABLEs named.
        #[arg(long, conflicts_with = "tables")]
        all: bool,
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
    /// Publish the events of a logical-replication slot (the default; lossless)
    /// or, with --source listen, of LISTEN channels to NATS JetStream (one
    /// PostgreSQL connection for every service that subscribes through NATS)
    /// and/or, with --ws-listen (LISTEN channels), serve them at
    /// ws://ADDR/pgpubsub/{channel} to PGCacheWatch's WSEventQueue (--no-nats:
    /// WebSocket only); `relay status` shows the NATS relay's health and lag.
    Relay(Box<commands::RelayArgs>),
    /// Write received events to FILE as a JSON-lines event log that the testkit replays.
    Record {
        /// Where to write the log: a new file (an existing one is refused unless
        /// --force).
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
        /// Replace FILE if it exists (its previous capture is lost).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        channels: ChannelArgs,
        #[command(flatten)]
        stop: StopArgs,
        /// Print the closing summary as JSON on stdout instead of text on stderr.
        #[arg(long)]
        json: bool,
    },
    /// What a cached query over SQL depends on, resolved on the server as
    /// `CachedQuery::attach` resolves it: "row-level on public.users(id) from
    /// $1", or "table-level on public.users, public.orgs: join". Exits non-zero
    /// on a refusal (FOR UPDATE, now(), a materialized view, …) and, with
    /// --strict, on any fall-back to table-level.
    Explain {
        /// The statement (one SELECT; parameters as $1, $2, …).
        #[arg(value_name = "SQL")]
        sql: String,
        /// Fail (exit non-zero) unless the query is row-level.
        #[arg(long)]
        strict: bool,
        /// Resolve names through this search_path (as the application's
        /// connections have it), e.g. "app, public"; default: the server's.
        #[arg(long, value_name = "SCHEMAS")]
        search_path: Option<String>,
        /// Skip the cross-check with the statement's generic plan (PREPARE +
        /// EXPLAIN), for connections that may not prepare statements.
        #[arg(long)]
        no_plan_check: bool,
        /// Print JSON: explain, level, reason, tables, resolution_key, warnings.
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
    /// Check the server and the TABLEs, then create the publication for them (with
    /// publish_via_partition_root, so a write to a partition arrives as its
    /// partitioned table) and the slot (pgoutput); prints the SQL, applies it only
    /// with --commit. The dry run reads the catalog and makes every check --commit
    /// makes. Refuses a table that does not exist, a view, a materialized view, a
    /// foreign or unlogged table, and a table without a primary key (published, its
    /// UPDATEs and DELETEs would fail) unless --replica-identity-full.
    Setup {
        /// Tables to publish (schema.table; quote mixed case: 'app."Orders"').
        /// A partitioned table is published as itself (it needs a primary key).
        #[arg(required = true, value_name = "TABLE")]
        tables: Vec<String>,
        #[command(flatten)]
        names: ReplicationNames,
        /// Publish tables without a primary key (or with REPLICA IDENTITY NOTHING) by
        /// running ALTER TABLE … REPLICA IDENTITY FULL on them, instead of refusing.
        /// Costs: every UPDATE and DELETE on such a table then writes the whole old
        /// row to the WAL (more WAL to retain and stream), and a table without a
        /// primary key gets table-level events (no row keys: each change invalidates
        /// the whole table). A partition created later needs it too (run setup
        /// again). Adding a primary key is the better fix.
        #[arg(long)]
        replica_identity_full: bool,
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

/// Without `RUST_LOG`: the library's warnings, except those the commands report
/// in their own words (`install`'s tables without a primary key).
const DEFAULT_LOG_FILTER: &str = "warn,pgcachewatch_backends::postgres::install::row_keys=error";

impl Cli {
    /// What clap's attributes cannot say: `uninstall --commit` names its tables
    /// or says `--all`.
    fn check(&self) -> Result<(), clap::Error> {
        if let Command::Uninstall {
            tables,
            all: false,
            target,
        } = &self.command
        {
            if target.commit && tables.is_empty() {
                let mut cmd = <Cli as clap::CommandFactory>::command();
                cmd.build();
                let message = "uninstall --commit without a TABLE would remove pgcachewatch's \
                               triggers from every table: name the TABLEs to stop watching, or \
                               add --all to mean every table (without --commit, uninstall only \
                               lists what it would remove)";
                let kind = clap::error::ErrorKind::MissingRequiredArgument;
                return Err(match cmd.find_subcommand_mut("uninstall") {
                    Some(uninstall) => uninstall.error(kind, message),
                    None => cmd.error(kind, message),
                });
            }
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli.check() {
        e.exit();
    }
    // Two rustls crypto providers are linked (NATS's ring, the replication
    // client's aws-lc-rs): rustls then picks none by itself, and sqlx's
    // verify-ca verifier would panic. Choose one for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
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
