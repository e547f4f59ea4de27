//! [`InstallError`]: what installing, uninstalling or inspecting triggers can fail with.

use pgcachewatch_core::Error;

/// Why a trigger installation, removal or status query failed.
///
/// Converts into [`pgcachewatch_core::Error`]: name problems become
/// [`Error::Config`], database problems [`Error::Connection`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// A table, schema, function or channel name cannot be used.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// What the name is for: "table", "schema", "channel", "function".
        what: &'static str,
        /// The offending name (or text being parsed).
        name: String,
        /// Why it was rejected, and what to do.
        reason: String,
    },
    /// No tables were given where at least one is required.
    #[error("no tables given: name at least one table to watch")]
    NoTables,
    /// A table to install triggers on does not exist.
    #[error("table {0} does not exist (or is not visible to this user)")]
    TableNotFound(String),
    /// The schema that should hold the notify function does not exist.
    #[error(
        "schema {0:?} for the notify function does not exist: create it first or choose another"
    )]
    SchemaNotFound(String),
    /// A trigger with one of pgcachewatch's reserved names exists on a table but was
    /// not installed by pgcachewatch; it is left alone and nothing is installed.
    #[error("table {table} already has a trigger named {trigger:?} that pgcachewatch did not install; rename or drop it first")]
    ForeignTrigger {
        /// The table, quoted.
        table: String,
        /// The trigger's name.
        trigger: String,
    },
    /// A function with the notify function's name exists but was not installed by
    /// pgcachewatch; it is not replaced.
    #[error(
        "function {0} exists but was not installed by pgcachewatch; choose another function name"
    )]
    ForeignFunction(String),
    /// Installing would switch tables that already have pgcachewatch's triggers
    /// between row-key and table-level events, and the change was not allowed
    /// ([`Installer::allow_mode_change`](super::Installer::allow_mode_change)).
    /// Nothing was changed.
    #[error(
        "installing would change how {} send events{}; nothing was changed. Install with \
         the mode they have, or allow the change explicitly (Installer::allow_mode_change(true))",
        super::ModeChange::list(.0), super::ModeChange::details(.0)
    )]
    ModeChange(Vec<super::ModeChange>),
    /// The database refused a statement, or the connection failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl InstallError {
    /// Whether retrying may help (a dropped connection), as opposed to a mistake in
    /// the input or the database's state.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            InstallError::Database(
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
            )
        )
    }
}

impl From<InstallError> for Error {
    fn from(e: InstallError) -> Self {
        match e {
            InstallError::Database(source) => {
                let temporary = matches!(source, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut);
                Error::Connection {
                    source: Box::new(source),
                    temporary,
                }
            }
            other => Error::Config(other.to_string()),
        }
    }
}
