//! The PostgreSQL backend (feature `postgres`): a `LISTEN` source with reconnect
//! and heartbeat, and the trigger SQL with its installer.

pub mod install;
pub mod listener;
