//! `status`: what is installed, who listens, how full the NOTIFY queue is.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use pgcachewatch::postgres::{self, InstalledTrigger, Status};
use serde_json::json;

use crate::connect::Database;

pub(crate) async fn status(db: Database<'_>, as_json: bool) -> Result<()> {
    let target = db.target()?;
    let mut conn = target.connect().await?;
    let status = postgres::status(&mut conn)
        .await
        .with_context(|| format!("reading the catalog of {}", target.describe()))?;
    sqlx::Connection::close(conn).await.ok();
    if as_json {
        crate::output::print(&format!("{:#}\n", to_json(&target.describe(), &status)))?;
    } else {
        crate::output::print(&to_text(&target.describe(), &status))?;
    }
    Ok(())
}

fn to_json(database: &str, status: &Status) -> serde_json::Value {
    json!({
        "database": database,
        "queue_usage": status.queue_usage,
        "functions": status.functions.iter().map(|f| json!({
            "schema": f.schema, "name": f.name, "triggers": f.triggers,
        })).collect::<Vec<_>>(),
        "triggers": status.triggers.iter().map(|t| json!({
            "schema": t.table.schema(), "table": t.table.table(), "name": t.name,
            "operations": t.operations, "channel": t.channel, "row_keys": t.row_keys,
            "function": t.function, "enabled": t.enabled,
        })).collect::<Vec<_>>(),
        "listeners": status.listeners.iter().map(|l| json!({
            "pid": l.pid, "user": l.user, "application_name": l.application_name,
            "client_addr": l.client_addr, "backend_start": l.backend_start,
            "state": l.state, "query": l.query,
        })).collect::<Vec<_>>(),
    })
}

fn to_text(database: &str, status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "database: {database}");
    let _ = writeln!(
        out,
        "NOTIFY queue usage: {:.4}%",
        status.queue_usage * 100.0
    );

    let _ = writeln!(out, "\nnotify functions: {}", status.functions.len());
    for f in &status.functions {
        let _ = writeln!(
            out,
            "  {}.{}()  called by {} trigger(s)",
            quote(&f.schema),
            quote(&f.name),
            f.triggers
        );
    }

    // One line per (table, channel, mode, function, enabled): the operations joined.
    let mut by_table: BTreeMap<(String, &str, bool, &str, bool), Vec<&InstalledTrigger>> =
        BTreeMap::new();
    for t in &status.triggers {
        by_table
            .entry((
                t.table.to_string(),
                t.channel.as_str(),
                t.row_keys,
                t.function.as_str(),
                t.enabled,
            ))
            .or_default()
            .push(t);
    }
    let tables: std::collections::BTreeSet<_> =
        status.triggers.iter().map(|t| t.table.clone()).collect();
    let _ = writeln!(
        out,
        "\nwatched tables: {} ({} triggers)",
        tables.len(),
        status.triggers.len()
    );
    for ((table, channel, row_keys, function, enabled), triggers) in &by_table {
        let mut ops: Vec<_> = triggers
            .iter()
            .flat_map(|t| t.operations.iter().copied())
            .collect();
        ops.sort();
        let ops: Vec<&str> = ops.into_iter().map(|op| op.as_str()).collect();
        let _ = writeln!(
            out,
            "  {table}  {}  channel={channel:?}  events={}  function={function}{}",
            ops.join(","),
            if *row_keys { "row-keys" } else { "table" },
            if *enabled { "" } else { "  DISABLED" }
        );
    }

    let _ = writeln!(out, "\nlistening sessions: {}", status.listeners.len());
    for l in &status.listeners {
        let _ = writeln!(
            out,
            "  pid {}  {}  user={}  from={}  since={}  state={}  last={:?}",
            l.pid,
            if l.application_name.is_empty() {
                "-"
            } else {
                &l.application_name
            },
            l.user.as_deref().unwrap_or("-"),
            l.client_addr.as_deref().unwrap_or("local"),
            l.backend_start
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(|| "-".into()),
            l.state.as_deref().unwrap_or("-"),
            l.query.as_deref().unwrap_or("").trim()
        );
    }
    out
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}
