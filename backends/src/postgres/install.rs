//! Trigger SQL and its installer.
//!
//! pgcachewatch learns about writes from triggers: one PL/pgSQL function that
//! sends a `pg_notify`, and on each watched table one statement-level `AFTER`
//! trigger per operation (`INSERT`, `UPDATE`, `DELETE`, `TRUNCATE`) that calls it.
//! Each statement sends one notification:
//!
//! ```json
//! {"operation": "update", "schema": "public", "table": "users",
//!  "sent_at": "2024-05-01T10:00:00.123456+00:00", "txid": 1234}
//! ```
//!
//! * `sent_at` is `clock_timestamp()` (when the trigger ran), not `now()` (when the
//!   transaction started), so the measured notification latency is true.
//! * **Row mode** ([`Installer::row_keys`]): the `INSERT`/`UPDATE`/`DELETE` triggers
//!   declare transition tables and the payload carries the primary keys of the
//!   affected rows, `"keys": [{"id": 1}, {"id": 2}]` (for `UPDATE`, old and new keys,
//!   deduplicated). If that would reach PostgreSQL's 8000-byte payload limit, or the
//!   table has no primary key, or it is a `TRUNCATE`, the event is table-level (no
//!   `keys`), which strategies treat as "any row". A statement that touched no row
//!   sends `"keys": []`. Row mode on a table without a primary key is installed,
//!   with an [`InstallWarning::NoPrimaryKey`]: [`Installer::check`] reports it
//!   beforehand, [`Plan::warnings`] of the applied plan afterwards, and
//!   [`Installer::install`] logs it (`warn`, target
//!   `pgcachewatch_backends::postgres::install::row_keys`).
//! * Row mode is what makes [`Keyed`](https://docs.rs/pgcachewatch-strategies/latest/pgcachewatch_strategies/struct.Keyed.html)
//!   drop single rows: without it every event is table-level and `Keyed` drops
//!   everything, like `Greedy`.
//! * Installing never switches a table that already has pgcachewatch's triggers
//!   between row and table mode behind your back: that is an
//!   [`InstallError::ModeChange`] unless [`Installer::allow_mode_change`] says so
//!   ([`Installer::preflight`] tells beforehand).
//! * The channel and the mode are **trigger arguments**; the function body is
//!   static, so one function serves every table and channel, and no name a user
//!   supplies is spliced into PL/pgSQL.
//!
//! # Safety of the generated SQL
//!
//! Every identifier is double-quoted (embedded quotes doubled) and schema-qualified,
//! every string is a quoted literal, and names PostgreSQL would truncate or reject
//! (empty, over 63 bytes, NUL) are refused before any SQL is built. Inside the
//! function, column names go through `format('%I')` / `%L`.
//!
//! # What is installed, and how it is removed
//!
//! * The function (default `public.pgcachewatch_notify()`), commented
//!   `pgcachewatch:function …`.
//! * Triggers named `pgcachewatch_insert`, `pgcachewatch_update`,
//!   `pgcachewatch_delete`, `pgcachewatch_truncate`, each commented
//!   `pgcachewatch:trigger …`.
//!
//! Installing is idempotent (`CREATE OR REPLACE`, drop-if-exists of our own
//! triggers) and transactional, serialized against other installs by an advisory
//! lock. It refuses to replace a function or trigger of the same name that lacks
//! the marker comment. Uninstalling drops only marked triggers that call this
//! installer's function, then the function if no trigger calls it any more; a
//! user's own triggers, even on the same table, are untouched.
//!
//! # Example
//!
//! ```no_run
//! use pgcachewatch::postgres::{status, Installer, TableName};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/test").await?;
//! let tables = [TableName::parse("public.users")?, TableName::parse(r#"app."Orders""#)?];
//! let installer = Installer::new().channel("pgcachewatch").row_keys(true);
//!
//! println!("{}", installer.plan_install(&tables)?); // dry run: the SQL, applied nowhere
//! installer.install(&pool, &tables).await?;       // one transaction
//! let status = status(&pool).await?;
//! assert!(status.triggers.len() >= 8);
//! installer.uninstall(&pool, &tables).await?;
//! # Ok(()) }
//! ```

mod catalog;
mod error;
pub(crate) mod ident;
mod sql;
mod table_name;

use pgcachewatch_core::Operation;
use sqlx::{Acquire, PgConnection, Postgres};

pub use self::catalog::{InstalledFunction, InstalledTrigger, ListenerSession, Status};
pub use self::error::InstallError;
pub use self::sql::Plan;
pub use self::table_name::{TableName, DEFAULT_SCHEMA};

use self::catalog::FunctionState;
use self::ident::check_ident;
use super::DEFAULT_CHANNEL;

/// The notify function's name unless configured otherwise.
pub const DEFAULT_FUNCTION_NAME: &str = "pgcachewatch_notify";

/// Installs and removes pgcachewatch's triggers; see the [module docs](self).
///
/// Defaults: channel [`DEFAULT_CHANNEL`], function
/// `public.`[`pgcachewatch_notify`](DEFAULT_FUNCTION_NAME)`()`, table-level events.
///
/// ```
/// use pgcachewatch::postgres::{Installer, TableName};
///
/// let sql = Installer::new()
///     .channel("orders_changed")
///     .plan_install(&[TableName::parse("shop.orders")?])?
///     .to_string();
/// assert!(sql.starts_with("BEGIN;"));
/// assert!(sql.contains(r#"CREATE TRIGGER "pgcachewatch_update" AFTER UPDATE ON "shop"."orders""#));
/// assert!(sql.contains(r#"EXECUTE FUNCTION "public"."pgcachewatch_notify"('orders_changed', 'table');"#));
/// # Ok::<_, pgcachewatch::postgres::InstallError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installer {
    channel: String,
    function_schema: String,
    function_name: String,
    row_keys: bool,
    allow_mode_change: bool,
}

/// A table whose installed triggers send events in another mode than the
/// installer would install: what [`Installer::preflight`] reports and
/// [`InstallError::ModeChange`] lists.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ModeChange {
    /// The table.
    pub table: TableName,
    /// Whether its installed triggers send row keys.
    pub installed_row_keys: bool,
    /// Whether the installer would make them send row keys.
    pub requested_row_keys: bool,
}

fn mode_name(row_keys: bool) -> &'static str {
    if row_keys {
        "row-key"
    } else {
        "table-level"
    }
}

impl std::fmt::Display for ModeChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} events -> {} events",
            self.table,
            mode_name(self.installed_row_keys),
            mode_name(self.requested_row_keys)
        )
    }
}

/// Something an install does that works, but perhaps not as meant. Reported by
/// [`Installer::check`] before, in [`Plan::warnings`] after, and logged by
/// [`Installer::install`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InstallWarning {
    /// Row keys were asked for, but the table has no primary key: its triggers
    /// send table-level events, so every write to it invalidates everything
    /// cached from it. Add a primary key to get row keys.
    NoPrimaryKey(TableName),
}

impl std::fmt::Display for InstallWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstallWarning::NoPrimaryKey(table) => write!(
                f,
                "{table} has no primary key: its row-mode triggers will send table-level \
                 events (every write to it invalidates everything cached from it); add a \
                 primary key to get row keys"
            ),
        }
    }
}

/// What [`Installer::check`] found: what an install would change, and what it
/// would warn about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Preflight {
    /// The tables whose mode an install would switch (only when
    /// [`allow_mode_change`](Installer::allow_mode_change) allows it; otherwise
    /// that is an [`InstallError::ModeChange`]).
    pub mode_changes: Vec<ModeChange>,
    /// What the install would warn about.
    pub warnings: Vec<InstallWarning>,
}

impl ModeChange {
    pub(crate) fn list(changes: &[ModeChange]) -> String {
        changes
            .iter()
            .map(|c| c.table.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(crate) fn details(changes: &[ModeChange]) -> String {
        let details: Vec<String> = changes.iter().map(ToString::to_string).collect();
        format!(" ({})", details.join("; "))
    }
}

impl Default for Installer {
    fn default() -> Self {
        Installer {
            channel: DEFAULT_CHANNEL.to_owned(),
            function_schema: DEFAULT_SCHEMA.to_owned(),
            function_name: DEFAULT_FUNCTION_NAME.to_owned(),
            row_keys: false,
            allow_mode_change: false,
        }
    }
}

impl Installer {
    /// An installer with the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The NOTIFY channel the triggers send on (raw name, any characters).
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }

    /// Send primary keys of affected rows (see the [module docs](self)): row mode,
    /// which [`Keyed`](https://docs.rs/pgcachewatch-strategies/latest/pgcachewatch_strategies/struct.Keyed.html)
    /// needs to drop single rows. Off by default: table-level events.
    ///
    /// ```
    /// use pgcachewatch::postgres::{Installer, TableName};
    /// let sql = Installer::new()
    ///     .row_keys(true)
    ///     .plan_install(&[TableName::parse("public.users")?])?
    ///     .to_string();
    /// assert!(sql.contains("REFERENCING NEW TABLE AS"));
    /// # Ok::<_, pgcachewatch::postgres::InstallError>(())
    /// ```
    pub fn row_keys(mut self, row_keys: bool) -> Self {
        self.row_keys = row_keys;
        self
    }

    /// Whether [`install`](Self::install) may switch tables that already have
    /// pgcachewatch's triggers between row-key and table-level events. Off by
    /// default: re-running an install without [`row_keys`](Self::row_keys) on a
    /// row-mode table is then an [`InstallError::ModeChange`], not a silent
    /// downgrade that turns every `Keyed` strategy into a full flush.
    pub fn allow_mode_change(mut self, allow: bool) -> Self {
        self.allow_mode_change = allow;
        self
    }

    /// The schema that holds the notify function (must exist; default `public`).
    pub fn function_schema(mut self, schema: impl Into<String>) -> Self {
        self.function_schema = schema.into();
        self
    }

    /// The notify function's name (default `pgcachewatch_notify`).
    pub fn function_name(mut self, name: impl Into<String>) -> Self {
        self.function_name = name.into();
        self
    }

    /// The configured channel.
    pub fn channel_name(&self) -> &str {
        &self.channel
    }

    fn validate(&self) -> Result<(), InstallError> {
        check_ident("channel", &self.channel)?;
        check_ident("schema", &self.function_schema)?;
        check_ident("function", &self.function_name)
    }

    /// The SQL that [`install`](Installer::install) runs, without touching a database:
    /// print it for a dry run, or pipe it into `psql`.
    pub fn plan_install(&self, tables: &[TableName]) -> Result<Plan, InstallError> {
        self.validate()?;
        if tables.is_empty() {
            return Err(InstallError::NoTables);
        }
        let mut tables = tables.to_vec();
        tables.sort();
        tables.dedup();

        let function = sql::qualified_function(&self.function_schema, &self.function_name);
        let mut plan = Plan::default();
        plan.push(sql::lock_statement());
        for statement in sql::create_function(&self.function_schema, &self.function_name) {
            plan.push(statement);
        }
        for table in &tables {
            for op in Operation::ALL {
                for statement in
                    sql::create_trigger(table, op, &function, &self.channel, self.row_keys)
                {
                    plan.push(statement);
                }
            }
        }
        Ok(plan)
    }

    /// Installs the function and the triggers on `tables`, in one transaction, and
    /// returns the plan it applied, with what it warns about in
    /// [`Plan::warnings`] (also logged: a table without a primary key in row mode).
    ///
    /// `conn` is anything that can open a transaction: `&PgPool`, `&mut PgConnection`,
    /// or an open `&mut Transaction` (then it nests as a savepoint).
    ///
    /// # Errors
    ///
    /// Nothing is changed if any table is missing, the function's schema is missing,
    /// a same-named function or trigger that pgcachewatch did not install exists, or
    /// the database refuses a statement.
    pub async fn install<'c, A>(&self, conn: A, tables: &[TableName]) -> Result<Plan, InstallError>
    where
        A: Acquire<'c, Database = Postgres>,
    {
        let mut plan = self.plan_install(tables)?;
        let mut tx = conn.begin().await?;
        lock(&mut tx).await?;
        let found = self.checks(&mut tx, tables).await?;
        for change in &found.mode_changes {
            tracing::warn!(%change, "changing the event mode of a table (allowed by allow_mode_change)");
        }
        sqlx::raw_sql(&plan.body()).execute(&mut *tx).await?;
        tx.commit().await?;
        for warning in &found.warnings {
            tracing::warn!(target: concat!(module_path!(), "::row_keys"), "{warning}");
        }
        plan.set_warnings(found.warnings);
        tracing::info!(tables = tables.len(), channel = %self.channel, row_keys = self.row_keys, "pgcachewatch triggers installed");
        Ok(plan)
    }

    /// Runs every check [`install`](Self::install) runs, and changes nothing: the
    /// tables exist and are tables, the function's schema exists, no same-named
    /// function or trigger belongs to someone else, and no table would switch
    /// between row-key and table-level events unless
    /// [`allow_mode_change`](Self::allow_mode_change) allows it. Returns the mode
    /// changes an install would make (empty unless allowed). For dry runs.
    ///
    /// # Errors
    ///
    /// What [`install`](Self::install) would fail with before applying anything.
    pub async fn preflight<'c, A>(
        &self,
        conn: A,
        tables: &[TableName],
    ) -> Result<Vec<ModeChange>, InstallError>
    where
        A: Acquire<'c, Database = Postgres>,
    {
        Ok(self.check(conn, tables).await?.mode_changes)
    }

    /// [`preflight`](Self::preflight), also returning what an install would warn
    /// about: [`InstallWarning::NoPrimaryKey`] for each table that would get
    /// row-mode triggers without having a primary key. Changes nothing and logs
    /// nothing: for dry runs that report the warnings themselves.
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::{Installer, TableName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// let tables = [TableName::parse("public.audit_log")?];
    /// let found = Installer::new().row_keys(true).check(&pool, &tables).await?;
    /// for warning in &found.warnings {
    ///     eprintln!("warning: {warning}"); // "… has no primary key: … table-level events …"
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`preflight`](Self::preflight).
    pub async fn check<'c, A>(
        &self,
        conn: A,
        tables: &[TableName],
    ) -> Result<Preflight, InstallError>
    where
        A: Acquire<'c, Database = Postgres>,
    {
        self.plan_install(tables)?;
        let mut conn = conn.acquire().await?;
        self.checks(&mut conn, tables).await
    }

    async fn checks(
        &self,
        conn: &mut PgConnection,
        tables: &[TableName],
    ) -> Result<Preflight, InstallError> {
        let mut warnings = Vec::new();
        if !catalog::schema_exists(conn, &self.function_schema).await? {
            return Err(InstallError::SchemaNotFound(self.function_schema.clone()));
        }
        if catalog::function_state(conn, &self.function_schema, &self.function_name).await?
            == FunctionState::Foreign
        {
            return Err(InstallError::ForeignFunction(sql::function_signature(
                &self.function_schema,
                &self.function_name,
            )));
        }
        for table in tables {
            catalog::check_table(conn, table).await?;
            catalog::check_no_foreign_trigger(conn, table).await?;
            if self.row_keys
                && !catalog::has_primary_key(conn, table).await?
                && !warnings.contains(&InstallWarning::NoPrimaryKey(table.clone()))
            {
                warnings.push(InstallWarning::NoPrimaryKey(table.clone()));
            }
        }
        let function = sql::qualified_function(&self.function_schema, &self.function_name);
        let mut changes: Vec<ModeChange> = Vec::new();
        for trigger in catalog::our_triggers(conn).await? {
            if trigger.function == function
                && trigger.row_keys != self.row_keys
                && tables.contains(&trigger.table)
                && !changes.iter().any(|c| c.table == trigger.table)
            {
                changes.push(ModeChange {
                    table: trigger.table,
                    installed_row_keys: trigger.row_keys,
                    requested_row_keys: self.row_keys,
                });
            }
        }
        if !changes.is_empty() && !self.allow_mode_change {
            return Err(InstallError::ModeChange(changes));
        }
        Ok(Preflight {
            mode_changes: changes,
            warnings,
        })
    }

    /// The SQL that [`uninstall`](Installer::uninstall) would run now: drops of the
    /// triggers pgcachewatch installed on `tables` (on every table, if `tables` is
    /// empty) that call this installer's function, and of the function if no other
    /// trigger calls it. Reads the catalog; changes nothing.
    pub async fn plan_uninstall<'c, A>(
        &self,
        conn: A,
        tables: &[TableName],
    ) -> Result<Plan, InstallError>
    where
        A: Acquire<'c, Database = Postgres>,
    {
        self.validate()?;
        let mut conn = conn.acquire().await?;
        self.uninstall_plan(&mut conn, tables).await
    }

    /// Removes what [`plan_uninstall`](Installer::plan_uninstall) lists, in one
    /// transaction, and returns the plan it applied.
    pub async fn uninstall<'c, A>(
        &self,
        conn: A,
        tables: &[TableName],
    ) -> Result<Plan, InstallError>
    where
        A: Acquire<'c, Database = Postgres>,
    {
        self.validate()?;
        let mut tx = conn.begin().await?;
        lock(&mut tx).await?;
        let plan = self.uninstall_plan(&mut tx, tables).await?;
        sqlx::raw_sql(&plan.body()).execute(&mut *tx).await?;
        tx.commit().await?;
        tracing::info!(
            statements = plan.statements().len(),
            "pgcachewatch triggers uninstalled"
        );
        Ok(plan)
    }

    async fn uninstall_plan(
        &self,
        conn: &mut PgConnection,
        tables: &[TableName],
    ) -> Result<Plan, InstallError> {
        let function = sql::qualified_function(&self.function_schema, &self.function_name);
        let ours: Vec<InstalledTrigger> = catalog::our_triggers(conn)
            .await?
            .into_iter()
            .filter(|t| t.function == function)
            .filter(|t| tables.is_empty() || tables.contains(&t.table))
            .collect();
        let mut plan = Plan::default();
        plan.push(sql::lock_statement());
        for trigger in &ours {
            plan.push(sql::drop_trigger(&trigger.table, &trigger.name));
        }
        let state =
            catalog::function_state(conn, &self.function_schema, &self.function_name).await?;
        if let FunctionState::Ours { triggers } = state {
            let remaining = triggers - ours.len() as i64;
            if remaining == 0 {
                plan.push(sql::drop_function(
                    &self.function_schema,
                    &self.function_name,
                ));
            } else if tables.is_empty() {
                tracing::warn!(
                    remaining,
                    function = %function,
                    "keeping the notify function: triggers pgcachewatch did not install still call it"
                );
            }
        }
        Ok(plan)
    }
}

/// What pgcachewatch has installed in the database, who listens, and how full the
/// NOTIFY queue is. Reads the catalog; changes nothing.
pub async fn status<'c, A>(conn: A) -> Result<Status, InstallError>
where
    A: Acquire<'c, Database = Postgres>,
{
    let mut conn = conn.acquire().await?;
    Ok(Status {
        functions: catalog::our_functions(&mut conn).await?,
        triggers: catalog::our_triggers(&mut conn).await?,
        listeners: catalog::listeners(&mut conn).await?,
        queue_usage: catalog::queue_usage(&mut conn).await?,
    })
}

async fn lock(conn: &mut PgConnection) -> Result<(), InstallError> {
    sqlx::raw_sql(&sql::lock_statement())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use pgcachewatch_testkit::env::{database_url, unique_name};

    use super::*;

    #[tokio::test]
    async fn row_keys_without_a_primary_key_are_reported_before_and_after_the_install() {
        let db = sqlx::PgPool::connect(&database_url())
            .await
            .expect("PostgreSQL must be running at DATABASE_URL");
        let schema = unique_name("pgcw_inst_nopk");
        sqlx::raw_sql(&format!(
            "CREATE SCHEMA {schema}; CREATE TABLE {schema}.logs (line text);
             CREATE TABLE {schema}.users (id int PRIMARY KEY)"
        ))
        .execute(&db)
        .await
        .unwrap();
        let logs = TableName::new(schema.as_str(), "logs").unwrap();
        let tables = [
            logs.clone(),
            TableName::new(schema.as_str(), "users").unwrap(),
        ];
        let rows = Installer::new()
            .channel(&schema)
            .function_schema(&schema)
            .row_keys(true);

        // Before: reported, nothing installed.
        let found = rows.check(&db, &tables).await.unwrap();
        assert_eq!(
            found.warnings,
            vec![InstallWarning::NoPrimaryKey(logs.clone())]
        );
        assert!(found.mode_changes.is_empty());
        let text = found.warnings[0].to_string();
        assert!(
            text.contains(&logs.to_string())
                && text.contains("no primary key")
                && text.contains("table-level events")
                && text.contains("add a primary key"),
            "{text}"
        );
        assert_eq!(rows.preflight(&db, &tables).await.unwrap(), vec![]);
        assert!(rows.plan_install(&tables).unwrap().warnings().is_empty());

        // After: the applied plan carries it.
        let plan = rows.install(&db, &tables).await.unwrap();
        assert_eq!(plan.warnings(), found.warnings.as_slice());

        // Table-level events: nothing to warn about.
        let table_level = rows.clone().row_keys(false).allow_mode_change(true);
        assert!(table_level
            .check(&db, &tables)
            .await
            .unwrap()
            .warnings
            .is_empty());
        let plan = table_level.install(&db, &tables).await.unwrap();
        assert!(plan.warnings().is_empty());

        sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&db)
            .await
            .unwrap();
    }
}
