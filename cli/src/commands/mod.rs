//! One module per subcommand.

mod explain;
mod install;
mod listen;
mod record;
mod relay;
mod replication;
mod status;
mod watch;

use anyhow::Result;

use crate::connect::Database;
use crate::{Cli, Command};
pub(crate) use relay::RelayArgs;

/// The channel PGCacheWatch (the Python library) listens on by default
/// (`pgcachewatch.models.DEFAULT_PG_CHANNE`): `install --pgcachewatch-compat`.
pub(crate) const PGCACHEWATCH_CHANNEL: &str = "ch_pgcachewatch_table_change";

pub(crate) async fn run(cli: Cli) -> Result<()> {
    let db = Database {
        url: cli.database_url.as_deref(),
        connect_timeout: cli.connect_timeout,
    };
    match cli.command {
        Command::Install {
            tables,
            channel,
            pgcachewatch_compat,
            row_keys,
            change_mode,
            target,
        } => {
            let mode = install::Mode {
                row_keys,
                change_mode,
            };
            let channel = if pgcachewatch_compat {
                PGCACHEWATCH_CHANNEL.to_owned()
            } else {
                channel
            };
            install::install(db, &tables, &channel, mode, &target).await
        }
        Command::Uninstall {
            tables,
            all: _,
            target,
        } => install::uninstall(db, &tables, &target).await,
        Command::Status { json } => status::status(db, json).await,
        Command::Listen {
            channels,
            json,
            stop,
        } => listen::listen(db, channels.channels, json, stop).await,
        Command::Relay(args) => relay::relay(db, *args).await,
        Command::Record {
            file,
            force,
            channels,
            stop,
            json,
        } => record::record(db, &file, force, channels.channels, stop, json).await,
        Command::Replication { command } => replication::run(db, command).await,
        Command::Explain {
            sql,
            strict,
            search_path,
            no_plan_check,
            json,
        } => {
            let request = explain::Request {
                sql: &sql,
                strict,
                search_path: search_path.as_deref(),
                plan_check: !no_plan_check,
                json,
            };
            explain::explain(db, request).await
        }
    }
}
