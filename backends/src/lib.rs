//! # pgcachewatch-backends
//!
//! [`EventSource`](pgcachewatch_core::EventSource) implementations:
//!
//! * [`memory`]: the in-memory source, always built, with a handle that publishes
//!   events and injects faults (disconnect, reconnect, lost events) so strategy and
//!   cache tests run without a database.
//! * `postgres` (feature `postgres`): a `LISTEN` connection with reconnect and
//!   heartbeat, the trigger SQL and its installer.
//!
//! Both pass the conformance suite in `pgcachewatch-testkit`.
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "replication")]
pub mod replication;

pub use memory::{InMemoryHandle, InMemorySource};
