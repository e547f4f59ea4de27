//! `install` and `uninstall`: print the plan; apply it only with `--commit`.

use anyhow::{anyhow, Context as _, Result};
use pgcachewatch::postgres::{InstallError, InstallWarning, Installer, TableName};

use crate::connect::Database;
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

/// How `install` treats row keys.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mode {
    /// `--row-keys`.
    pub(crate) row_keys: bool,
    /// `--change-mode`.
    pub(crate) change_mode: bool,
}

fn mode_name(row_keys: bool) -> &'static str {
    if row_keys {
        "row-key"
    } else {
        "table-level"
    }
}

/// An install error in the command line's words.
fn explain(error: InstallError, mode: Mode) -> anyhow::Error {
    match error {
        InstallError::ModeChange(changes) => {
            let details: Vec<String> = changes.iter().map(ToString::to_string).collect();
            let keep = if mode.row_keys {
                "drop --row-keys to keep their table-level events"
            } else {
                "add --row-keys to keep their row-key events"
            };
            anyhow!(
                "install would change how these tables send events: {}; nothing was changed. \
                 To keep their mode, {keep}; to switch, add --change-mode",
                details.join("; ")
            )
        }
        other => other.into(),
    }
}

pub(crate) async fn install(
    db: Database<'_>,
    tables: &[String],
    channel: &str,
    mode: Mode,
    args: &TriggerArgs,
) -> Result<()> {
    let tables = parse_tables(tables)?;
    let installer = args
        .installer()
        .channel(channel)
        .row_keys(mode.row_keys)
        .allow_mode_change(mode.change_mode);
    let plan = installer.plan_install(&tables)?;
    if !args.commit {
        return dry_run(db, &installer, &tables, &plan.to_string(), mode).await;
    }
    let target = db.target()?;
    let mut conn = target.connect().await?;
    let context = || format!("installing on {}", target.describe());
    // The checks first (nothing is printed before an error), then the install.
    let found = installer
        .check(&mut conn, &tables)
        .await
        .map_err(|e| explain(e, mode))
        .with_context(context)?;
    let applied = installer
        .install(&mut conn, &tables)
        .await
        .map_err(|e| explain(e, mode))
        .with_context(context)?;
    sqlx::Connection::close(conn).await.ok();
    if args.verbose {
        crate::output::print(&plan.to_string())?;
    }
    for change in &found.mode_changes {
        eprintln!("-- changed {change}");
    }
    warn(applied.warnings());
    eprintln!(
        "-- installed on {}: triggers for insert, update, delete, truncate on {} \
         (channel {:?}{}, {} events)",
        target.describe(),
        list(&tables),
        channel,
        if channel == super::PGCACHEWATCH_CHANNEL {
            ": PGCacheWatch's default, its PGEventQueue receives them"
        } else {
            ""
        },
        mode_name(mode.row_keys)
    );
    Ok(())
}

/// Checks what `--commit` would check, if the database can be reached, then
/// prints the SQL. A failed check is an error, as it would be with `--commit`.
async fn dry_run(
    db: Database<'_>,
    installer: &Installer,
    tables: &[TableName],
    sql: &str,
    mode: Mode,
) -> Result<()> {
    let connected = match db.target() {
        Ok(target) => match target.connect().await {
            Ok(conn) => Ok((target, conn)),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let note = match connected {
        Ok((target, mut conn)) => {
            let found = installer
                .check(&mut conn, tables)
                .await
                .map_err(|e| explain(e, mode))
                .with_context(|| format!("checking the install on {}", target.describe()))?;
            sqlx::Connection::close(conn).await.ok();
            warn(&found.warnings);
            let mut note = format!(
                "-- dry run: checked against {}; nothing was applied; re-run with --commit to apply this SQL",
                target.describe()
            );
            for change in &found.mode_changes {
                note.push_str(&format!(
                    "\n-- --commit would change {change} (--change-mode)"
                ));
            }
            note
        }
        Err(e) => format!(
            "-- dry run: nothing was applied; the tables were NOT checked (could not connect: {})\n\
             -- re-run with --commit to apply this SQL",
            first_line(&crate::output::describe(&e))
        ),
    };
    crate::output::print(sql)?;
    eprintln!("{note}");
    Ok(())
}

/// The installer's warnings, on stderr, in the command line's words.
fn warn(warnings: &[InstallWarning]) {
    for warning in warnings {
        match warning {
            InstallWarning::NoPrimaryKey(table) => eprintln!(
                "warning: {table} has no primary key: with --row-keys its events are still \
                 table-level (every write to it invalidates everything cached from it); add a \
                 primary key to get row keys"
            ),
            other => eprintln!("warning: {other}"),
        }
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

pub(crate) async fn uninstall(
    db: Database<'_>,
    tables: &[String],
    args: &TriggerArgs,
) -> Result<()> {
    let tables = parse_tables(tables)?;
    let installer = args.installer();
    let target = db.target()?;
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
    if !args.commit || args.verbose {
        crate::output::print(&plan.to_string())?;
    }
    if args.commit {
        eprintln!("-- uninstalled from {}", target.describe());
    } else if tables.is_empty() {
        eprintln!(
            "-- dry run: nothing was removed; this removes the triggers from every table: \
             re-run with --all --commit to apply this SQL, or name the TABLEs"
        );
    } else {
        eprintln!("-- dry run: nothing was removed; re-run with --commit to apply this SQL");
    }
    Ok(())
}
