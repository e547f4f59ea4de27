//! The PostgreSQL backend (feature `postgres`): a `LISTEN` source with reconnect
//! and heartbeat, and the trigger SQL with its installer.

pub mod install;
pub mod listener;

/// The NOTIFY channel pgcachewatch's triggers send on and its listener listens on,
/// unless configured otherwise.
pub const DEFAULT_CHANNEL: &str = "pgcachewatch";
