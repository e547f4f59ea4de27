//! The PostgreSQL backend (feature `postgres`): a `LISTEN` source with reconnect
//! and heartbeat, and the trigger SQL with its installer.

pub mod install;
pub mod listener;

pub use self::install::{InstallError, Installer, TableName};
pub use self::listener::{ListenerStats, MalformedPolicy, PgListenerBuilder, PgListenerSource};

/// The NOTIFY channel pgcachewatch's triggers send on and its listener listens on,
/// unless configured otherwise.
pub const DEFAULT_CHANNEL: &str = "pgcachewatch";

/// `user@host:port/database` of a connection target, for errors and logs: never
/// the password.
///
/// ```
/// use pgcachewatch_backends::postgres::describe_target;
/// let o: sqlx::postgres::PgConnectOptions = "postgres://ann:secret@db:5433/app".parse().unwrap();
/// assert_eq!(describe_target(&o), "ann@db:5433/app");
/// ```
pub fn describe_target(options: &sqlx::postgres::PgConnectOptions) -> String {
    format!(
        "{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("<default database>")
    )
}
