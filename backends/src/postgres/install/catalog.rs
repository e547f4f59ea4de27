//! Reading the catalog: which tables, functions and triggers exist, which of them
//! pgcachewatch installed, and who is listening.

use chrono::{DateTime, Utc};
use pgcachewatch_core::Operation;
use sqlx::{PgConnection, Row};

use super::error::InstallError;
use super::sql::{trigger_name, MARKER};
use super::table_name::TableName;

/// A trigger pgcachewatch installed, as found in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstalledTrigger {
    /// The table it watches.
    pub table: TableName,
    /// The trigger's name (`pgcachewatch_insert`, …).
    pub name: String,
    /// The operations it fires on (one, for triggers pgcachewatch installs).
    pub operations: Vec<Operation>,
    /// The channel it notifies (its first argument).
    pub channel: String,
    /// Whether it sends row keys (its second argument is `rows`).
    pub row_keys: bool,
    /// The notify function it calls, as `"schema"."name"`.
    pub function: String,
    /// Whether the trigger is enabled (`ALTER TABLE … DISABLE TRIGGER` turns it off).
    pub enabled: bool,
}

/// A notify function pgcachewatch installed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstalledFunction {
    /// Schema of the function.
    pub schema: String,
    /// Name of the function.
    pub name: String,
    /// How many triggers (pgcachewatch's or not) call it.
    pub triggers: i64,
}

/// A session that looks like a listener: it runs pgcachewatch's listener
/// (`application_name` starting with `pgcachewatch`) or its last statement was a
/// `LISTEN`.
///
/// PostgreSQL does not expose other sessions' `LISTEN` channels, so this is a best
/// effort; sessions of other users show no query text unless you are a superuser or
/// member of `pg_read_all_stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerSession {
    /// Backend process id.
    pub pid: i32,
    /// Database user.
    pub user: Option<String>,
    /// `application_name` of the session.
    pub application_name: String,
    /// Client address, if over TCP.
    pub client_addr: Option<String>,
    /// When the session started.
    pub backend_start: Option<DateTime<Utc>>,
    /// `active`, `idle`, ….
    pub state: Option<String>,
    /// The session's last statement.
    pub query: Option<String>,
}

/// What [`status`](super::status) found.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Status {
    /// Notify functions pgcachewatch installed.
    pub functions: Vec<InstalledFunction>,
    /// Triggers pgcachewatch installed, by table then name.
    pub triggers: Vec<InstalledTrigger>,
    /// Sessions that appear to be listening.
    pub listeners: Vec<ListenerSession>,
    /// `pg_notification_queue_usage()`: the fraction (0–1) of the NOTIFY queue in
    /// use. Near 1, writers' commits start failing; a listener is not keeping up.
    pub queue_usage: f64,
}

const OUR_TRIGGERS: &str = r#"
SELECT n.nspname AS schema, c.relname AS "table", t.tgname AS name, t.tgtype::int4 AS tgtype,
       t.tgargs AS args, t.tgenabled <> 'D' AS enabled,
       pn.nspname AS function_schema, p.proname AS function_name
  FROM pg_catalog.pg_trigger t
  JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
  JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace
  JOIN pg_catalog.pg_description d
    ON d.objoid = t.oid AND d.classoid = 'pg_catalog.pg_trigger'::pg_catalog.regclass AND d.objsubid = 0
 WHERE NOT t.tgisinternal AND pg_catalog.starts_with(d.description, $1)
 ORDER BY 1, 2, 3"#;

/// Every trigger pgcachewatch installed, in the whole database.
pub(crate) async fn our_triggers(
    conn: &mut PgConnection,
) -> Result<Vec<InstalledTrigger>, InstallError> {
    let rows = sqlx::query(OUR_TRIGGERS)
        .bind(MARKER)
        .fetch_all(&mut *conn)
        .await?;
    let mut triggers = Vec::with_capacity(rows.len());
    for row in rows {
        let args: Vec<u8> = row.try_get("args")?;
        let mut args = args
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned());
        let function_schema: String = row.try_get("function_schema")?;
        let function_name: String = row.try_get("function_name")?;
        triggers.push(InstalledTrigger {
            table: TableName::new(
                row.try_get::<String, _>("schema")?,
                row.try_get::<String, _>("table")?,
            )?,
            name: row.try_get("name")?,
            operations: operations(row.try_get("tgtype")?),
            channel: args.next().unwrap_or_default(),
            row_keys: args.next().as_deref() == Some(super::sql::MODE_ROWS),
            function: super::sql::qualified_function(&function_schema, &function_name),
            enabled: row.try_get("enabled")?,
        });
    }
    Ok(triggers)
}

/// Decodes `pg_trigger.tgtype`'s event bits (`TRIGGER_TYPE_INSERT` = 4, …).
fn operations(tgtype: i32) -> Vec<Operation> {
    [
        (4, Operation::Insert),
        (16, Operation::Update),
        (8, Operation::Delete),
        (32, Operation::Truncate),
    ]
    .into_iter()
    .filter(|(bit, _)| tgtype & bit != 0)
    .map(|(_, op)| op)
    .collect()
}

/// Every notify function pgcachewatch installed.
pub(crate) async fn our_functions(
    conn: &mut PgConnection,
) -> Result<Vec<InstalledFunction>, InstallError> {
    let rows = sqlx::query(
        r#"
SELECT n.nspname AS schema, p.proname AS name,
       (SELECT pg_catalog.count(*) FROM pg_catalog.pg_trigger t WHERE t.tgfoid = p.oid) AS triggers
  FROM pg_catalog.pg_proc p
  JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
  JOIN pg_catalog.pg_description d
    ON d.objoid = p.oid AND d.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objsubid = 0
 WHERE pg_catalog.starts_with(d.description, $1)
 ORDER BY 1, 2"#,
    )
    .bind(MARKER)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(InstalledFunction {
                schema: row.try_get("schema")?,
                name: row.try_get("name")?,
                triggers: row.try_get("triggers")?,
            })
        })
        .collect()
}

/// What the catalog says about the function `schema.name()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FunctionState {
    /// No such function.
    Absent,
    /// It exists and carries our marker; `triggers` triggers call it.
    Ours { triggers: i64 },
    /// It exists and is somebody else's.
    Foreign,
}

pub(crate) async fn function_state(
    conn: &mut PgConnection,
    schema: &str,
    name: &str,
) -> Result<FunctionState, InstallError> {
    let row = sqlx::query(
        r#"
SELECT pg_catalog.starts_with(COALESCE(pg_catalog.obj_description(p.oid, 'pg_proc'), ''), $3) AS ours,
       (SELECT pg_catalog.count(*) FROM pg_catalog.pg_trigger t WHERE t.tgfoid = p.oid) AS triggers
  FROM pg_catalog.pg_proc p
  JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = $1 AND p.proname = $2 AND p.pronargs = 0"#,
    )
    .bind(schema)
    .bind(name)
    .bind(MARKER)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match row {
        None => FunctionState::Absent,
        Some(row) if row.try_get::<bool, _>("ours")? => FunctionState::Ours {
            triggers: row.try_get("triggers")?,
        },
        Some(_) => FunctionState::Foreign,
    })
}

pub(crate) async fn schema_exists(
    conn: &mut PgConnection,
    schema: &str,
) -> Result<bool, InstallError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
    )
    .bind(schema)
    .fetch_one(&mut *conn)
    .await?)
}

/// Fails unless `table` is an ordinary or partitioned table.
pub(crate) async fn check_table(
    conn: &mut PgConnection,
    table: &TableName,
) -> Result<(), InstallError> {
    let kind: Option<String> = sqlx::query_scalar(
        r#"
SELECT c.relkind::text AS kind
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relname = $2"#,
    )
    .bind(table.schema())
    .bind(table.table())
    .fetch_optional(&mut *conn)
    .await?;
    match kind.as_deref() {
        Some("r" | "p") => Ok(()),
        Some(_) => Err(InstallError::TableNotFound(format!(
            "{table} (it exists but is not a table)"
        ))),
        None => Err(InstallError::TableNotFound(table.to_string())),
    }
}

/// Fails if `table` has a trigger with one of pgcachewatch's reserved names that
/// pgcachewatch did not install: installing would replace it.
pub(crate) async fn check_no_foreign_trigger(
    conn: &mut PgConnection,
    table: &TableName,
) -> Result<(), InstallError> {
    let names: Vec<String> = Operation::ALL.into_iter().map(trigger_name).collect();
    let foreign: Option<String> = sqlx::query_scalar(
        r#"
SELECT t.tgname::text
  FROM pg_catalog.pg_trigger t
  JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relname = $2 AND t.tgname = ANY($3)
   AND NOT pg_catalog.starts_with(COALESCE(pg_catalog.obj_description(t.oid, 'pg_trigger'), ''), $4)
 LIMIT 1"#,
    )
    .bind(table.schema())
    .bind(table.table())
    .bind(&names)
    .bind(MARKER)
    .fetch_optional(&mut *conn)
    .await?;
    match foreign {
        Some(trigger) => Err(InstallError::ForeignTrigger {
            table: table.to_string(),
            trigger,
        }),
        None => Ok(()),
    }
}

/// Whether `table` has a primary key (row mode needs one to send keys).
pub(crate) async fn has_primary_key(
    conn: &mut PgConnection,
    table: &TableName,
) -> Result<bool, InstallError> {
    Ok(sqlx::query_scalar(
        r#"
SELECT EXISTS (
  SELECT 1 FROM pg_catalog.pg_index i
    JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname = $1 AND c.relname = $2 AND i.indisprimary)"#,
    )
    .bind(table.schema())
    .bind(table.table())
    .fetch_one(&mut *conn)
    .await?)
}

pub(crate) async fn listeners(
    conn: &mut PgConnection,
) -> Result<Vec<ListenerSession>, InstallError> {
    let rows = sqlx::query(
        r#"
SELECT pid, usename::text AS "user", COALESCE(application_name, '') AS application_name,
       client_addr::text AS client_addr, backend_start, state, query
  FROM pg_catalog.pg_stat_activity
 WHERE datname = pg_catalog.current_database() AND pid <> pg_catalog.pg_backend_pid()
   AND (application_name LIKE 'pgcachewatch%' OR query ~* '^\s*listen\s')
 ORDER BY backend_start, pid"#,
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(ListenerSession {
                pid: row.try_get("pid")?,
                user: row.try_get("user")?,
                application_name: row.try_get("application_name")?,
                client_addr: row.try_get("client_addr")?,
                backend_start: row.try_get("backend_start")?,
                state: row.try_get("state")?,
                query: row.try_get("query")?,
            })
        })
        .collect()
}

pub(crate) async fn queue_usage(conn: &mut PgConnection) -> Result<f64, InstallError> {
    Ok(
        sqlx::query_scalar("SELECT pg_catalog.pg_notification_queue_usage()")
            .fetch_one(&mut *conn)
            .await?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_trigger_event_bits() {
        // AFTER ... FOR EACH STATEMENT: only event bits set.
        assert_eq!(operations(4), vec![Operation::Insert]);
        assert_eq!(operations(16), vec![Operation::Update]);
        assert_eq!(operations(8), vec![Operation::Delete]);
        assert_eq!(operations(32), vec![Operation::Truncate]);
        // FOR EACH ROW (1) | BEFORE (2) | INSERT | UPDATE
        assert_eq!(
            operations(1 | 2 | 4 | 16),
            vec![Operation::Insert, Operation::Update]
        );
    }
}
