//! One module per subcommand.

mod install;
mod listen;
mod record;
mod relay;
mod replication;
mod status;
mod watch;

use anyhow::Result;

use crate::{Cli, Command};
pub(crate) use relay::RelayArgs;

pub(crate) async fn run(cli: Cli) -> Result<()> {
    let url = cli.database_url.as_deref();
    match cli.command {
        Command::Install {
            tables,
            channel,
            row_keys,
            change_mode,
            target,
        } => {
            let mode = install::Mode {
                row_keys,
                change_mode,
            };
            install::install(url, &tables, &channel, mode, &target).await
        }
        Command::Uninstall { tables, target } => install::uninstall(url, &tables, &target).await,
        Command::Status { json } => status::status(url, json).await,
        Command::Listen {
            channels,
            json,
            stop,
        } => listen::listen(url, channels.channels, json, stop).await,
        Command::Relay(args) => relay::relay(url, *args).await,
        Command::Record {
            file,
            channels,
            stop,
            json,
        } => record::record(url, &file, channels.channels, stop, json).await,
        Command::Replication { command } => replication::run(url, command).await,
    }
}
