//! `install` and `uninstall`: print the plan; apply it only with `--commit`.

use anyhow::{Context as _, Result};
use pgcachewatch::postgres::install::TableName;

use crate::connect::Target;
use crate::TriggerArgs;

fn parse_tables(tables: &[String]) -> Result<Vec<TableName>> {
    tables
        .iter()
        .map(|t| TableName::parse(t).map_err(anyhow::Error::from))
        .collect()
}

fn list(tables: &[TableName]) -> String {
    tables
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) async fn install(
    url: Option<&str>,
    tables: &[String],
    channel: &str,
    row_keys: bool,
    args: &TriggerArgs,
) -> Result<()> {
    let tables = parse_tables(tables)?;
    let installer = args.installer().channel(channel).row_keys(row_keys);
    let plan = installer.plan_install(&tables)?;
    crate::output::print(&plan.to_string())?;
    if !args.commit {
        eprintln!("-- dry run: nothing was applied; re-run with --commit to apply this SQL");
        return Ok(());
    }
    let target = Target::resolve(url)?;
    let mut conn = target.connect().await?;
    installer
        .install(&mut conn, &tables)
        .await
        .with_context(|| format!("installing on {}", target.describe()))?;
    eprintln!(
        "-- installed on {}: triggers for insert, update, delete, truncate on {} \
         (channel {:?}, {} events)",
        target.describe(),
        list(&tables),
        channel,
        if row_keys { "row-key" } else { "table-level" }
    );
    sqlx::Connection::close(conn).await.ok();
    Ok(())
}

pub(crate) async fn uninstall(
    url: Option<&str>,
    tables: &[String],
    args: &TriggerArgs,
) -> Result<()> {
    let tables = parse_tables(tables)?;
    let installer = args.installer();
    let target = Target::resolve(url)?;
    let mut conn = target.connect().await?;
    let plan = if args.commit {
        installer.uninstall(&mut conn, &tables).await
    } else {
        installer.plan_uninstall(&mut conn, &tables).await
    }
    .with_context(|| format!("uninstalling from {}", target.describe()))?;
    sqlx::Connection::close(conn).await.ok();

    let scope = if tables.is_empty() {
        "any table".to_owned()
    } else {
        list(&tables)
    };
    if plan.is_empty() {
        eprintln!(
            "-- nothing to uninstall: no pgcachewatch triggers calling {}.{} on {scope} in {}",
            args.function_schema,
            args.function_name,
            target.describe()
        );
        return Ok(());
    }
    crate::output::print(&plan.to_string())?;
    if args.commit {
        eprintln!("-- uninstalled from {}", target.describe());
    } else {
        eprintln!("-- dry run: nothing was removed; re-run with --commit to apply this SQL");
    }
    Ok(())
}
