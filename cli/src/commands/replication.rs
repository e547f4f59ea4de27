//! `replication setup | teardown | status`: the publication and slot of the
//! logical-replication source. `setup` and `teardown` print the SQL and apply it
//! only with `--commit`; `setup`'s dry run makes every check `--commit` makes.

use anyhow::{anyhow, Context as _, Result};
use pgcachewatch::postgres::TableName;
use pgcachewatch::replication::{ReplicationSetup, SetupError, SlotStatus};
use serde_json::json;

use crate::connect::Database;
use crate::ReplicationCommand;

pub(crate) async fn run(db: Database<'_>, command: ReplicationCommand) -> Result<()> {
    let target = db.target()?;
    let mut conn = target.connect().await?;
    let db = target.describe();
    match command {
        ReplicationCommand::Setup {
            tables,
            names,
            replica_identity_full,
            commit,
        } => {
            let tables = tables
                .iter()
                .map(|t| TableName::parse(t).map_err(anyhow::Error::from))
                .collect::<Result<Vec<_>>>()?;
            let setup = names.setup().replica_identity_full(replica_identity_full);
            if commit {
                let sql = setup
                    .setup(&mut conn, &tables)
                    .await
                    .map_err(explain)
                    .with_context(|| format!("setting up replication on {db}"))?;
                crate::output::print(&format!("{sql}\n"))?;
                eprintln!(
                    "-- set up on {db}: publication {:?}, slot {:?} (pgoutput). The slot now \
                     retains WAL until a source consumes it: run the source, or `pgcachewatch \
                     replication teardown --commit` when done",
                    names.publication, names.slot
                );
            } else {
                let sql = setup
                    .plan_setup(&mut conn, &tables)
                    .await
                    .map_err(explain)
                    .with_context(|| format!("checking {db} for replication"))?;
                crate::output::print(&format!("{sql}\n"))?;
                eprintln!(
                    "-- dry run: nothing was applied; re-run with --commit to apply this SQL"
                );
            }
        }
        ReplicationCommand::Teardown { names, commit } => {
            let setup = names.setup();
            let sql = if commit {
                setup.teardown(&mut conn).await
            } else {
                setup.plan_teardown(&mut conn).await
            }
            .with_context(|| format!("tearing down replication on {db}"))?;
            if sql.is_empty() {
                eprintln!(
                    "-- nothing to remove: no slot {:?} or publication {:?} on {db}",
                    names.slot, names.publication
                );
            } else {
                crate::output::print(&format!("{sql}\n"))?;
                if commit {
                    eprintln!("-- removed from {db}");
                } else {
                    eprintln!(
                        "-- dry run: nothing was removed; re-run with --commit to apply this SQL"
                    );
                }
            }
        }
        ReplicationCommand::Status { json } => {
            let slots = ReplicationSetup::status(&mut conn)
                .await
                .with_context(|| format!("reading the replication slots of {db}"))?;
            if json {
                crate::output::print(&format!("{:#}\n", to_json(&db, &slots)))?;
            } else {
                crate::output::print(&to_text(&db, &slots))?;
            }
        }
    }
    sqlx::Connection::close(conn).await.ok();
    Ok(())
}

/// A setup error in the command line's words.
fn explain(error: SetupError) -> anyhow::Error {
    match error {
        SetupError::NoReplicaIdentity { relations } => anyhow!(
            "{} cannot be published safely: once published, every UPDATE and DELETE on it \
             would fail (\"cannot update table … because it does not have a replica identity \
             and publishes updates\"); nothing was changed. Add a primary key (ALTER TABLE … \
             ADD PRIMARY KEY (…)), or re-run with --replica-identity-full, which runs ALTER \
             TABLE … REPLICA IDENTITY FULL: every UPDATE and DELETE then writes the whole old \
             row to the WAL, and a table without a primary key gets table-level events (no \
             row keys)",
            relations.join(", ")
        ),
        other => other.into(),
    }
}

fn to_json(database: &str, slots: &[SlotStatus]) -> serde_json::Value {
    json!({
        "database": database,
        "slots": slots.iter().map(|s| json!({
            "name": s.name, "plugin": s.plugin, "active": s.active,
            "active_pid": s.active_pid, "temporary": s.temporary,
            "wal_status": s.wal_status, "lag_bytes": s.lag_bytes,
            "safe_wal_size": s.safe_wal_size,
        })).collect::<Vec<_>>(),
    })
}

fn to_text(database: &str, slots: &[SlotStatus]) -> String {
    let mut out = format!("logical replication slots on {database}:\n");
    if slots.is_empty() {
        out.push_str("  (none)\n");
    }
    for s in slots {
        let lag = s
            .lag_bytes
            .map_or_else(|| "?".to_owned(), |b| format!("{b} bytes"));
        out.push_str(&format!(
            "  {}  plugin={} {}  wal_status={}  lag={lag}{}{}\n",
            s.name,
            s.plugin.as_deref().unwrap_or("?"),
            match s.active_pid {
                Some(pid) if s.active => format!("active (pid {pid})"),
                _ => "INACTIVE".to_owned(),
            },
            s.wal_status.as_deref().unwrap_or("?"),
            if s.temporary { "  temporary" } else { "" },
            s.safe_wal_size
                .map(|b| format!("  safe_wal_size={b} bytes"))
                .unwrap_or_default(),
        ));
    }
    out.push_str(
        "\nA slot retains WAL until it is consumed: an inactive slot nobody will read again \
         keeps WAL forever and can fill the disk. Drop it (`pgcachewatch replication teardown \
         --slot NAME --commit`), and set max_slot_wal_keep_size so the server invalidates a \
         slot (wal_status = lost) before the disk fills.\n",
    );
    out
}
