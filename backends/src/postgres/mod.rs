//! The PostgreSQL backend (feature `postgres`): a `LISTEN` source with reconnect
//! and heartbeat, and the trigger SQL with its installer.

pub mod install;
pub mod listener;

pub use self::install::{InstallError, Installer, TableName};
pub use self::listener::{ListenerStats, MalformedPolicy, PgListenerBuilder, PgListenerSource};

/// The NOTIFY channel pgcachewatch's triggers send on and its listener listens on,
/// unless configured otherwise.
pub const DEFAULT_CHANNEL: &str = "pgcachewatch";
