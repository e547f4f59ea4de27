//! [`ReplicationSetup`]: the publication and slot a [`PgReplicationSource`](super::PgReplicationSource)
//! streams from, created, inspected and removed like the trigger installer's.
//!
//! * a publication for the named tables (every identifier double-quoted);
//! * a logical replication slot with the `pgoutput` plugin.
//!
//! Before anything is planned or applied it checks what would otherwise fail
//! later, with errors that say what to do: `wal_level` must be `logical`, a free
//! slot must remain (`max_replication_slots`), the role must be allowed to
//! replicate. **A slot retains WAL until it is consumed**: one nobody reads keeps
//! WAL forever and can fill the disk. [`status`](ReplicationSetup::status)
//! shows each slot's lag in bytes; `max_slot_wal_keep_size` caps what a slot may
//! retain (past it the server invalidates the slot, `wal_status = 'lost'`, and
//! the source reports a gap).

use sqlx::{PgConnection, Row};

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
    /// A query failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
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
/// ```no_run
/// use pgcachewatch_backends::postgres::TableName;
/// use pgcachewatch_backends::replication::ReplicationSetup;
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use sqlx::Connection;
/// let mut conn = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1/test").await?;
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
}

impl Default for ReplicationSetup {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplicationSetup {
    /// The default slot and publication names ([`DEFAULT_SLOT`], [`DEFAULT_PUBLICATION`]).
    pub fn new() -> Self {
        ReplicationSetup {
            slot: DEFAULT_SLOT.into(),
            publication: DEFAULT_PUBLICATION.into(),
        }
    }

    /// The slot's name.
    pub fn slot(mut self, name: impl Into<String>) -> Self {
        self.slot = name.into();
        self
    }

    /// The publication's name.
    pub fn publication(mut self, name: impl Into<String>) -> Self {
        self.publication = name.into();
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

    /// Checks the server and the role, then returns the SQL that
    /// [`setup`](Self::setup) would run. Applies nothing.
    ///
    /// # Errors
    ///
    /// [`SetupError`] saying what to fix.
    pub async fn plan_setup(
        &self,
        conn: &mut PgConnection,
        tables: &[TableName],
    ) -> Result<String, SetupError> {
        Ok(self.checked_plan(conn, tables).await?.join("\n"))
    }

    async fn checked_plan(
        &self,
        conn: &mut PgConnection,
        tables: &[TableName],
    ) -> Result<Vec<String>, SetupError> {
        self.check_names()?;
        if tables.is_empty() {
            return Err(SetupError::NoTables);
        }
        let row = sqlx::query(
            "SELECT current_setting('wal_level'), current_setting('max_replication_slots')::bigint, \
             (SELECT count(*) FROM pg_replication_slots), \
             EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
             EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $2), \
             current_user::text, \
             (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user), \
             has_database_privilege(current_database(), 'CREATE')",
        )
        .bind(&self.slot)
        .bind(&self.publication)
        .fetch_one(&mut *conn)
        .await?;
        let (wal_level, max, used): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let (slot_exists, pub_exists): (bool, bool) = (row.get(3), row.get(4));
        let (role, may_replicate, may_create): (String, bool, bool) = (
            row.get(5),
            row.get::<Option<bool>, _>(6).unwrap_or(false),
            row.get(7),
        );
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
        if !pub_exists && !may_create {
            return Err(SetupError::Privilege {
                role,
                what: "create a publication in this database",
                fix: "GRANT CREATE ON DATABASE … TO the role (it must also own the tables)",
            });
        }
        if !slot_exists && used >= max {
            return Err(SetupError::SlotsExhausted { max });
        }
        let list = tables
            .iter()
            .map(TableName::quoted)
            .collect::<Vec<_>>()
            .join(", ");
        let publication = quote_ident(&self.publication);
        let mut plan = vec![if pub_exists {
            format!("ALTER PUBLICATION {publication} SET TABLE {list};")
        } else {
            format!("CREATE PUBLICATION {publication} FOR TABLE {list};")
        }];
        if slot_exists {
            plan.push(format!("-- replication slot {} exists already", self.slot));
        } else {
            plan.push(format!(
                "SELECT pg_create_logical_replication_slot({}, 'pgoutput');",
                quote_literal(&self.slot)
            ));
        }
        Ok(plan)
    }

    /// Checks, then creates (or updates) the publication and creates the slot
    /// if it does not exist. Idempotent. Returns the SQL it ran.
    ///
    /// # Errors
    ///
    /// [`SetupError`] saying what to fix; nothing is applied if a check fails.
    pub async fn setup(
        &self,
        conn: &mut PgConnection,
        tables: &[TableName],
    ) -> Result<String, SetupError> {
        let plan = self.checked_plan(conn, tables).await?;
        // A slot cannot be created in a transaction that wrote: one statement each.
        for statement in plan.iter().filter(|s| !s.starts_with("--")) {
            sqlx::raw_sql(statement).execute(&mut *conn).await?;
        }
        Ok(plan.join("\n"))
    }

    /// The SQL [`teardown`](Self::teardown) would run, given what exists.
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
