//! [`ReplicationSetup`]: the publication and slot a [`PgReplicationSource`](super::PgReplicationSource)
//! streams from, created, inspected and removed like the trigger installer's.
//!
//! * a publication for the named tables (every identifier double-quoted and
//!   schema-qualified) `WITH (publish_via_partition_root = true)`, so a write to
//!   a partition arrives as its partitioned table;
//! * a logical replication slot with the `pgoutput` plugin.
//!
//! Before anything is planned or applied it checks what would otherwise fail
//! later, with errors that say what to do: `wal_level` must be `logical`, a free
//! slot must remain (`max_replication_slots`), the role must be allowed to
//! replicate and own the tables, and every table must be one logical replication
//! can publish (not a view, materialized view, foreign, unlogged or temporary
//! table) with a replica identity: publishing a table without one makes every
//! `UPDATE` and `DELETE` on it fail. The dry run ([`plan_setup`](ReplicationSetup::plan_setup))
//! makes the same checks, reading the catalog and changing nothing.
//!
//! **A slot retains WAL until it is consumed**: one nobody reads keeps
//! WAL forever and can fill the disk. [`status`](ReplicationSetup::status)
//! shows each slot's lag in bytes; `max_slot_wal_keep_size` caps what a slot may
//! retain (past it the server invalidates the slot, `wal_status = 'lost'`, and
//! the source reports a gap).

use sqlx::postgres::types::Oid;
use sqlx::{Connection as _, PgConnection, Row};

use crate::postgres::install::ident::{quote_ident, quote_literal};
use crate::postgres::install::TableName;

use super::config::{valid_slot_name, DEFAULT_PUBLICATION, DEFAULT_SLOT};

/// Why the setup cannot proceed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// A slot or publication name PostgreSQL would reject or mangle.
    #[error("{what} {name:?} is invalid: {why}")]
    InvalidName {
        /// "slot" or "publication".
        what: &'static str,
        /// The name given.
        name: String,
        /// What a valid one looks like.
        why: &'static str,
    },
    /// No table to publish.
    #[error("no table to publish: name at least one (e.g. public.users)")]
    NoTables,
    /// `wal_level` is not `logical`.
    #[error(
        "wal_level is {level:?}; logical replication needs 'logical': run \
         ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
    )]
    WalLevel {
        /// The current setting.
        level: String,
    },
    /// Every replication slot is taken.
    #[error(
        "all {max} replication slots are in use: raise max_replication_slots (restart \
         needed) or drop an abandoned slot (`pgcachewatch replication status` lists them)"
    )]
    SlotsExhausted {
        /// `max_replication_slots`.
        max: i64,
    },
    /// The role may not do it.
    #[error("role {role:?} may not {what}: {fix}")]
    Privilege {
        /// The connected role.
        role: String,
        /// What it may not do.
        what: &'static str,
        /// How to allow it.
        fix: &'static str,
    },
    /// The slot is being streamed from.
    #[error("replication slot {slot:?} is in use by backend {pid}: stop its consumer first")]
    SlotActive {
        /// The slot.
        slot: String,
        /// The walsender's pid.
        pid: i32,
    },
    /// A table to publish does not exist.
    #[error(
        "table {table} does not exist (or is not visible to this user); unquoted names \
         fold to lower case: quote mixed case, e.g. app.\"Orders\""
    )]
    TableNotFound {
        /// The table, quoted.
        table: String,
    },
    /// A relation logical replication cannot publish: a view, a materialized
    /// view, a foreign, unlogged or temporary table, a sequence, an index…
    #[error("{table} is {kind}, which logical replication cannot publish: {fix}")]
    NotATable {
        /// The relation, quoted.
        table: String,
        /// What it is ("a view", "a materialized view", "a foreign table", …).
        kind: &'static str,
        /// What to publish instead.
        fix: &'static str,
    },
    /// The role does not own a table: adding it to a publication, or changing its
    /// replica identity, needs its owner.
    #[error(
        "role {role:?} does not own {table}: publishing a table (or changing its replica \
         identity) needs its owner; run the setup as the owner or a superuser"
    )]
    NotOwner {
        /// The connected role.
        role: String,
        /// The table, quoted.
        table: String,
    },
    /// Tables without a replica identity: no primary key and `REPLICA IDENTITY
    /// DEFAULT`, or `REPLICA IDENTITY NOTHING` (for a partitioned table: it, or a
    /// partition). Once they are published every `UPDATE` and `DELETE` on them
    /// fails ("cannot update table … because it does not have a replica identity
    /// and publishes updates"), so nothing was changed. Add a primary key, or set
    /// up with [`ReplicationSetup::replica_identity_full`].
    #[error(
        "{} cannot be published safely: once published, every UPDATE and DELETE on it \
         would fail (\"cannot update table … because it does not have a replica identity \
         and publishes updates\"); nothing was changed. Add a primary key (ALTER TABLE … \
         ADD PRIMARY KEY (…)), or set up with ReplicationSetup::replica_identity_full(true), \
         which runs ALTER TABLE … REPLICA IDENTITY FULL: every UPDATE and DELETE then \
         writes the whole old row to the WAL, and a table without a primary key gets \
         table-level events (no row keys)",
        list(.relations)
    )]
    NoReplicaIdentity {
        /// Each relation without one, quoted, with what it has instead, e.g.
        /// `"public"."logs" (no primary key, replica identity DEFAULT)`.
        relations: Vec<String>,
    },
    /// A query failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// `items` joined with commas, at most ten of them.
fn list(items: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = items[..items.len().min(SHOWN)].join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    text
}

/// One replication slot, as [`ReplicationSetup::status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotStatus {
    /// The slot's name.
    pub name: String,
    /// Its output plugin (`pgoutput` for this source).
    pub plugin: Option<String>,
    /// Whether a consumer streams from it now.
    pub active: bool,
    /// That consumer's walsender pid.
    pub active_pid: Option<i32>,
    /// Temporary (dies with its session).
    pub temporary: bool,
    /// `reserved`, `extended`, `unreserved` or `lost` (WAL gone: the slot is useless).
    pub wal_status: Option<String>,
    /// WAL retained for it: `pg_current_wal_lsn() - confirmed_flush_lsn`, in bytes.
    pub lag_bytes: Option<i64>,
    /// WAL it may still retain before `max_slot_wal_keep_size` invalidates it
    /// (`None`: unlimited).
    pub safe_wal_size: Option<i64>,
}

/// Creates, checks and removes the publication and slot of a replication source.
///
/// [`setup`](Self::setup) creates the publication `WITH (publish_via_partition_root
/// = true)` (and sets that on a publication of the same name that exists), so a
/// write to a partition (`orders_eu`) arrives as the partitioned table you named
/// (`orders`) and its strategies and tags match. It refuses, changing nothing, a
/// table that cannot be replicated safely:
///
/// * one that does not exist, or is not a table: a view, a materialized view, a
///   foreign, unlogged or temporary table ([`SetupError::TableNotFound`],
///   [`SetupError::NotATable`]);
/// * one the role does not own ([`SetupError::NotOwner`]; an existing
///   publication another role owns is a [`SetupError::Privilege`]);
/// * one without a replica identity: no primary key and `REPLICA IDENTITY DEFAULT`,
///   or `REPLICA IDENTITY NOTHING` ([`SetupError::NoReplicaIdentity`]). Published,
///   every `UPDATE` and `DELETE` on it would fail. A partitioned table needs a
///   primary key (its partitions then have one); each partition is checked too.
///   Add a primary key, or opt in to [`replica_identity_full`](Self::replica_identity_full).
///
/// The dry run, [`plan_setup`](Self::plan_setup), makes every check `setup` makes
/// (it reads the catalog) and changes nothing. `setup` applies the table and
/// publication statements in one transaction, then creates the slot (which cannot
/// be created in a transaction that wrote).
///
/// ```no_run
/// use pgcachewatch::postgres::TableName;
/// use pgcachewatch::sqlx::{Connection, PgConnection};
/// use pgcachewatch_backends::replication::ReplicationSetup;
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let mut conn = PgConnection::connect("postgres://postgres@127.0.0.1/test").await?;
/// let setup = ReplicationSetup::new().slot("app_cache").publication("app_cache");
/// let tables = [TableName::parse("public.users")?];
/// println!("{}", setup.plan_setup(&mut conn, &tables).await?); // dry run
/// setup.setup(&mut conn, &tables).await?;
/// for slot in ReplicationSetup::status(&mut conn).await? {
///     println!("{}: {:?} bytes behind, {:?}", slot.name, slot.lag_bytes, slot.wal_status);
/// }
/// setup.teardown(&mut conn).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ReplicationSetup {
    slot: String,
    publication: String,
    replica_identity_full: bool,
}

impl Default for ReplicationSetup {
    fn default() -> Self {
        Self::new()
    }
}

/// What [`ReplicationSetup::setup`] runs, in order.
struct Plan {
    /// `ALTER TABLE … REPLICA IDENTITY FULL`, in the transaction, before…
    replica_identity: Vec<String>,
    /// …the publication's statements.
    publication: Vec<String>,
    /// Run after it commits: the slot's creation, or `None` if the slot exists.
    create_slot: Option<String>,
    /// The slot's name, for the comment when it exists.
    slot: String,
}

impl Plan {
    /// The SQL as it runs, `BEGIN;` … `COMMIT;` included.
    fn render(&self) -> String {
        let mut lines = vec!["BEGIN;".to_owned()];
        lines.extend(self.replica_identity.iter().cloned());
        lines.extend(self.publication.iter().cloned());
        lines.push("COMMIT;".to_owned());
        lines.push(match &self.create_slot {
            Some(sql) => sql.clone(),
            None => format!("-- replication slot {} exists already", self.slot),
        });
        lines.join("\n")
    }
}

/// A table to publish, or one of its partitions, as the checks read it.
struct Relation {
    /// `"schema"."name"`.
    quoted: String,
    /// Partitioned (`relkind = 'p'`).
    partitioned: bool,
    /// `pg_class.relreplident`: `d`efault, `n`othing, `f`ull, `i`ndex.
    identity: String,
    has_primary_key: bool,
    has_identity_index: bool,
    /// The connected role has its owner's privileges.
    owned: bool,
}

impl Relation {
    /// Why its updates would fail once published; `None`: they would not.
    fn missing_identity(&self) -> Option<&'static str> {
        match self.identity.as_str() {
            "f" => None,
            "d" if self.has_primary_key => None,
            "i" if self.has_identity_index => None,
            "d" => Some("no primary key, replica identity DEFAULT"),
            "n" => Some("replica identity NOTHING"),
            "i" => Some("replica identity USING INDEX, but that index is gone"),
            _ => Some("an unknown replica identity"),
        }
    }
}

/// Why a relation of kind `relkind` and persistence `relpersistence` cannot be
/// published, and what to do: `None` for a permanent ordinary or partitioned table.
fn unpublishable(relkind: &str, relpersistence: &str) -> Option<(&'static str, &'static str)> {
    Some(match (relkind, relpersistence) {
        ("r" | "p", "p") => return None,
        ("r" | "p", "u") => (
            "an unlogged table",
            "its changes are not written to the WAL; make it logged first \
             (ALTER TABLE … SET LOGGED)",
        ),
        ("r" | "p", _) => (
            "a temporary table",
            "only a permanent table's changes can be streamed",
        ),
        ("v", _) => ("a view", "publish the tables it reads from instead"),
        ("m", _) => (
            "a materialized view",
            "publish the tables it is computed from instead (a REFRESH is not replicated)",
        ),
        ("f", _) => (
            "a foreign table",
            "its rows live on another server; publish the table there",
        ),
        ("S", _) => ("a sequence", "name a table"),
        ("i" | "I", _) => ("an index", "name its table"),
        ("c", _) => ("a composite type", "name a table"),
        _ => ("not a table", "name a table"),
    })
}

impl ReplicationSetup {
    /// The default slot and publication names ([`DEFAULT_SLOT`], [`DEFAULT_PUBLICATION`]).
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::TableName;
    /// use pgcachewatch::sqlx::{Connection, PgConnection};
    /// use pgcachewatch_backends::replication::{PgReplicationSource, ReplicationSetup};
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut conn = PgConnection::connect("postgres://postgres@db.internal/app").await?;
    /// ReplicationSetup::new().setup(&mut conn, &[TableName::parse("public.users")?]).await?;
    /// // Slot and publication "pgcachewatch": the source's defaults too.
    /// let source = PgReplicationSource::builder("postgres://app@db.internal/app").connect().await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn new() -> Self {
        ReplicationSetup {
            slot: DEFAULT_SLOT.into(),
            publication: DEFAULT_PUBLICATION.into(),
            replica_identity_full: false,
        }
    }

    /// The slot's name.
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::TableName;
    /// use pgcachewatch_backends::replication::{PgReplicationSource, ReplicationSetup};
    /// # async fn run(conn: &mut pgcachewatch::sqlx::PgConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// let setup = ReplicationSetup::new().slot("orders_service").publication("orders_service");
    /// setup.setup(conn, &[TableName::parse("public.orders")?]).await?;
    /// let source = PgReplicationSource::builder("postgres://app@db.internal/app")
    ///     .slot("orders_service")
    ///     .publication("orders_service")
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn slot(mut self, name: impl Into<String>) -> Self {
        self.slot = name.into();
        self
    }

    /// The publication's name.
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::TableName;
    /// use pgcachewatch_backends::replication::ReplicationSetup;
    /// # async fn run(conn: &mut pgcachewatch::sqlx::PgConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// // One publication per service: each streams only the tables it caches.
    /// let tables = [TableName::parse("public.orders")?, TableName::parse("public.order_lines")?];
    /// let setup = ReplicationSetup::new().slot("orders_service").publication("orders_tables");
    /// setup.setup(conn, &tables).await?;
    /// # Ok(()) }
    /// ```
    pub fn publication(mut self, name: impl Into<String>) -> Self {
        self.publication = name.into();
        self
    }

    /// Publish tables without a replica identity (no primary key, or `REPLICA
    /// IDENTITY NOTHING`) by running `ALTER TABLE … REPLICA IDENTITY FULL` on them
    /// (for a partitioned table: on it and on each partition lacking one), instead
    /// of refusing with [`SetupError::NoReplicaIdentity`]. Off by default; tables
    /// with a primary key are left alone.
    ///
    /// What it costs: every `UPDATE` and `DELETE` on such a table then writes the
    /// whole old row to the WAL (more WAL, more for the slot to retain and stream),
    /// and a table without a primary key still has none: the source's row keys
    /// are primary keys, so its events are table-level (each change invalidates
    /// the whole table). A partition created later does not inherit it: run the
    /// setup again. Adding a primary key is the better fix where one exists.
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::TableName;
    /// use pgcachewatch_backends::replication::ReplicationSetup;
    /// # async fn run(conn: &mut pgcachewatch::sqlx::PgConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// // `audit_log` has no primary key: log whole old rows rather than refuse.
    /// let setup = ReplicationSetup::new().replica_identity_full(true);
    /// let sql = setup.setup(conn, &[TableName::parse("public.audit_log")?]).await?;
    /// assert!(sql.contains("REPLICA IDENTITY FULL"));
    /// # Ok(()) }
    /// ```
    pub fn replica_identity_full(mut self, allow: bool) -> Self {
        self.replica_identity_full = allow;
        self
    }

    fn check_names(&self) -> Result<(), SetupError> {
        if !valid_slot_name(&self.slot) {
            return Err(SetupError::InvalidName {
                what: "slot",
                name: self.slot.clone(),
                why: "use 1 to 63 lower-case letters, digits and underscores",
            });
        }
        if self.publication.is_empty()
            || self.publication.len() > 63
            || self.publication.contains('\0')
        {
            return Err(SetupError::InvalidName {
                what: "publication",
                name: self.publication.clone(),
                why: "use 1 to 63 bytes without NUL",
            });
        }
        Ok(())
    }

    /// Checks the server, the role and the tables as [`setup`](Self::setup)
    /// does (reading the catalog), then returns the SQL it would run. Changes
    /// nothing.
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::TableName;
    /// use pgcachewatch_backends::replication::ReplicationSetup;
    /// # async fn run(conn: &mut pgcachewatch::sqlx::PgConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// let sql = ReplicationSetup::new().plan_setup(conn, &[TableName::parse("public.users")?]).await?;
    /// println!("{sql}"); // BEGIN; CREATE PUBLICATION …; COMMIT; SELECT pg_create_logical_replication_slot(…)
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SetupError`] saying what to fix: the same error `setup` would return.
    pub async fn plan_setup(
        &self,
        conn: &mut PgConnection,
        tables: &[TableName],
    ) -> Result<String, SetupError> {
        Ok(self.checked_plan(conn, tables).await?.render())
    }

    async fn checked_plan(
        &self,
        conn: &mut PgConnection,
        tables: &[TableName],
    ) -> Result<Plan, SetupError> {
        self.check_names()?;
        if tables.is_empty() {
            return Err(SetupError::NoTables);
        }
        let row = sqlx::query(
            "SELECT current_setting('wal_level'), current_setting('max_replication_slots')::bigint, \
             (SELECT count(*) FROM pg_replication_slots), \
             EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
             (SELECT pubviaroot FROM pg_publication WHERE pubname = $2), \
             current_user::text, \
             (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user), \
             has_database_privilege(current_database(), 'CREATE'), \
             (SELECT pg_has_role(pubowner, 'USAGE') FROM pg_publication WHERE pubname = $2)",
        )
        .bind(&self.slot)
        .bind(&self.publication)
        .fetch_one(&mut *conn)
        .await?;
        let (wal_level, max, used): (String, i64, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let slot_exists: bool = row.try_get(3)?;
        // `None`: no such publication; else whether it publishes via the root.
        let via_root: Option<bool> = row.try_get(4)?;
        let (role, may_replicate, may_create): (String, bool, bool) = (
            row.try_get(5)?,
            row.try_get::<Option<bool>, _>(6)?.unwrap_or(false),
            row.try_get(7)?,
        );
        let owns_publication: Option<bool> = row.try_get(8)?;
        if wal_level != "logical" {
            return Err(SetupError::WalLevel { level: wal_level });
        }
        if !may_replicate {
            return Err(SetupError::Privilege {
                role,
                what: "create or stream from a replication slot",
                fix: "ALTER ROLE … REPLICATION (or use a superuser)",
            });
        }
        if via_root.is_none() && !may_create {
            return Err(SetupError::Privilege {
                role,
                what: "create a publication in this database",
                fix: "GRANT CREATE ON DATABASE … TO the role (it must also own the tables)",
            });
        }
        if owns_publication == Some(false) {
            return Err(SetupError::Privilege {
                role,
                what: "change the existing publication (another role owns it)",
                fix: "run the setup as its owner or a superuser, or choose another publication \
                      name",
            });
        }
        if !slot_exists && used >= max {
            return Err(SetupError::SlotsExhausted { max });
        }

        // Each table once, in the order given.
        let mut seen = std::collections::HashSet::new();
        let tables: Vec<&TableName> = tables.iter().filter(|t| seen.insert(*t)).collect();
        let mut keyless = Vec::new();
        let mut replica_identity = Vec::new();
        for table in &tables {
            for relation in check_table(conn, table, &role).await? {
                let Some(why) = relation.missing_identity() else {
                    continue;
                };
                if self.replica_identity_full && !relation.owned {
                    return Err(SetupError::NotOwner {
                        role,
                        table: relation.quoted,
                    });
                }
                let of = if relation.quoted == table.quoted() {
                    String::new()
                } else {
                    format!("partition of {table}; ")
                };
                let kind = if relation.partitioned {
                    "partitioned table, "
                } else {
                    ""
                };
                replica_identity.push(format!(
                    "ALTER TABLE {} REPLICA IDENTITY FULL;",
                    relation.quoted
                ));
                keyless.push(format!("{} ({of}{kind}{why})", relation.quoted));
            }
        }
        if !keyless.is_empty() && !self.replica_identity_full {
            return Err(SetupError::NoReplicaIdentity { relations: keyless });
        }

        let list = tables
            .iter()
            .map(|t| t.quoted())
            .collect::<Vec<_>>()
            .join(", ");
        let publication = quote_ident(&self.publication);
        let mut plan = Vec::new();
        match via_root {
            None => plan.push(format!(
                "CREATE PUBLICATION {publication} FOR TABLE {list} \
                 WITH (publish_via_partition_root = true);"
            )),
            Some(via_root) => {
                plan.push(format!("ALTER PUBLICATION {publication} SET TABLE {list};"));
                if !via_root {
                    plan.push(format!(
                        "ALTER PUBLICATION {publication} SET (publish_via_partition_root = true);"
                    ));
                }
            }
        }
        Ok(Plan {
            replica_identity,
            publication: plan,
            create_slot: (!slot_exists).then(|| {
                format!(
                    "SELECT pg_create_logical_replication_slot({}, 'pgoutput');",
                    quote_literal(&self.slot)
                )
            }),
            slot: self.slot.clone(),
        })
    }

    /// Checks as [`plan_setup`](Self::plan_setup) does, then, in one
    /// transaction, sets `REPLICA IDENTITY FULL` where
    /// [`replica_identity_full`](Self::replica_identity_full) allows it and
    /// creates (or updates) the publication `WITH (publish_via_partition_root =
    /// true)`; then creates the slot if it does not exist. Idempotent. Returns
    /// the SQL it ran.
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::TableName;
    /// use pgcachewatch_backends::replication::{ReplicationSetup, SetupError};
    /// # async fn run(conn: &mut pgcachewatch::sqlx::PgConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// match ReplicationSetup::new().setup(conn, &[TableName::parse("public.users")?]).await {
    ///     Ok(sql) => println!("ran:\n{sql}"), // idempotent: safe to run at every start
    ///     Err(e @ SetupError::WalLevel { .. }) => eprintln!("{e}"), // what to run, and the restart
    ///     Err(e) => return Err(e.into()),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SetupError`] saying what to fix; nothing is applied if a check fails.
    pub async fn setup(
        &self,
        conn: &mut PgConnection,
        tables: &[TableName],
    ) -> Result<String, SetupError> {
        let mut tx = conn.begin().await?;
        let plan = self.checked_plan(&mut tx, tables).await?;
        for statement in &plan.replica_identity {
            tracing::warn!(
                %statement,
                "a table without a replica identity: its UPDATEs and DELETEs now write whole \
                 old rows to the WAL"
            );
            sqlx::raw_sql(statement).execute(&mut *tx).await?;
        }
        for statement in &plan.publication {
            sqlx::raw_sql(statement).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        // A slot cannot be created in a transaction that wrote: after the commit.
        if let Some(statement) = &plan.create_slot {
            sqlx::raw_sql(statement).execute(&mut *conn).await?;
        }
        tracing::info!(
            publication = %self.publication,
            slot = %self.slot,
            tables = tables.len(),
            "replication set up"
        );
        Ok(plan.render())
    }

    /// The SQL [`teardown`](Self::teardown) would run, given what exists.
    ///
    /// ```no_run
    /// use pgcachewatch_backends::replication::ReplicationSetup;
    /// # async fn run(conn: &mut pgcachewatch::sqlx::PgConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// let setup = ReplicationSetup::new().slot("orders_service").publication("orders_service");
    /// println!("{}", setup.plan_teardown(conn).await?); // the DROPs teardown would run
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SetupError::Database`] if the catalog cannot be read.
    pub async fn plan_teardown(&self, conn: &mut PgConnection) -> Result<String, SetupError> {
        Ok(self.teardown_plan(conn).await?.join("\n"))
    }

    async fn teardown_plan(&self, conn: &mut PgConnection) -> Result<Vec<String>, SetupError> {
        self.check_names()?;
        let row = sqlx::query(
            "SELECT (SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1), \
             EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
             EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $2)",
        )
        .bind(&self.slot)
        .bind(&self.publication)
        .fetch_one(&mut *conn)
        .await?;
        let (active_pid, slot_exists, pub_exists): (Option<i32>, bool, bool) =
            (row.get(0), row.get(1), row.get(2));
        if let Some(pid) = active_pid {
            return Err(SetupError::SlotActive {
                slot: self.slot.clone(),
                pid,
            });
        }
        let mut plan = Vec::new();
        if slot_exists {
            plan.push(format!(
                "SELECT pg_drop_replication_slot({});",
                quote_literal(&self.slot)
            ));
        }
        if pub_exists {
            plan.push(format!(
                "DROP PUBLICATION {};",
                quote_ident(&self.publication)
            ));
        }
        Ok(plan)
    }

    /// Drops the slot (refusing while a consumer streams from it) and the
    /// publication, whichever exist. Returns the SQL it ran (empty: nothing).
    ///
    /// ```no_run
    /// use pgcachewatch_backends::replication::{ReplicationSetup, SetupError};
    /// # async fn run(conn: &mut pgcachewatch::sqlx::PgConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// match ReplicationSetup::new().teardown(conn).await {
    ///     Ok(sql) if sql.is_empty() => println!("nothing to remove"),
    ///     Ok(sql) => println!("ran:\n{sql}"),
    ///     Err(SetupError::SlotActive { pid, .. }) => eprintln!("a service streams from it (pid {pid}): stop it first"),
    ///     Err(e) => return Err(e.into()),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SetupError::SlotActive`], or [`SetupError::Database`].
    pub async fn teardown(&self, conn: &mut PgConnection) -> Result<String, SetupError> {
        let plan = self.teardown_plan(conn).await?;
        for statement in &plan {
            sqlx::raw_sql(statement).execute(&mut *conn).await?;
        }
        Ok(plan.join("\n"))
    }

    /// Every logical replication slot of the server, with its lag.
    ///
    /// ```no_run
    /// use pgcachewatch_backends::replication::ReplicationSetup;
    /// # async fn run(conn: &mut pgcachewatch::sqlx::PgConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// for slot in ReplicationSetup::status(conn).await? {
    ///     if !slot.active && slot.lag_bytes.unwrap_or(0) > 1 << 30 {
    ///         eprintln!("slot {} is not consumed and retains over 1 GiB of WAL", slot.name);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SetupError::Database`] if the catalog cannot be read.
    pub async fn status(conn: &mut PgConnection) -> Result<Vec<SlotStatus>, SetupError> {
        let rows = sqlx::query(
            "SELECT slot_name::text, plugin::text, active, active_pid, temporary, wal_status, \
             (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, safe_wal_size \
             FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY slot_name",
        )
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| SlotStatus {
                name: r.get(0),
                plugin: r.get(1),
                active: r.get(2),
                active_pid: r.get(3),
                temporary: r.get(4),
                wal_status: r.get(5),
                lag_bytes: r.get(6),
                safe_wal_size: r.get(7),
            })
            .collect())
    }
}

/// The catalog's view of `table` (first) and of its partitions, if it is
/// partitioned: fails unless it exists, logical replication can publish it and
/// `role` owns it.
async fn check_table(
    conn: &mut PgConnection,
    table: &TableName,
    role: &str,
) -> Result<Vec<Relation>, SetupError> {
    let row = sqlx::query(
        "SELECT c.oid, c.relkind::text, c.relpersistence::text \
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
          WHERE n.nspname = $1 AND c.relname = $2",
    )
    .bind(table.schema())
    .bind(table.table())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Err(SetupError::TableNotFound {
            table: table.quoted(),
        });
    };
    let (oid, relkind, persistence): (Oid, String, String) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    if let Some((kind, fix)) = unpublishable(&relkind, &persistence) {
        return Err(SetupError::NotATable {
            table: table.quoted(),
            kind,
            fix,
        });
    }
    // The table first, then its partitions (pg_partition_tree lists nothing for
    // a table that is neither partitioned nor a partition).
    let rows = sqlx::query(
        "SELECT n.nspname::text, c.relname::text, c.relkind = 'p', c.relreplident::text, \
                EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                         WHERE i.indrelid = c.oid AND i.indisprimary), \
                EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                         WHERE i.indrelid = c.oid AND i.indisreplident), \
                pg_catalog.pg_has_role(c.relowner, 'USAGE') \
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
          WHERE c.oid = $1 \
             OR c.oid IN (SELECT relid FROM pg_catalog.pg_partition_tree($1::regclass)) \
          ORDER BY c.oid <> $1, n.nspname, c.relname",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await?;
    let mut relations = Vec::with_capacity(rows.len());
    for row in rows {
        let (schema, name): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        relations.push(Relation {
            quoted: format!("{}.{}", quote_ident(&schema), quote_ident(&name)),
            partitioned: row.try_get(2)?,
            identity: row.try_get(3)?,
            has_primary_key: row.try_get(4)?,
            has_identity_index: row.try_get(5)?,
            owned: row.try_get(6)?,
        });
    }
    match relations.first() {
        Some(first) if !first.owned => Err(SetupError::NotOwner {
            role: role.to_owned(),
            table: first.quoted.clone(),
        }),
        Some(_) => Ok(relations),
        // Dropped between the two queries.
        None => Err(SetupError::TableNotFound {
            table: table.quoted(),
        }),
    }
}
