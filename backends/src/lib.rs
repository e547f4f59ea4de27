//! # pgcachewatch-backends
//!
//! [`EventSource`](pgcachewatch_core::EventSource) implementations:
//!
//! * [`memory`]: the in-memory source, always built, with a handle that publishes
//!   events and injects faults (disconnect, reconnect, lost events) so strategy and
//!   cache tests run without a database.
//! * `postgres` (feature `postgres`): a `LISTEN` connection with reconnect and
//!   heartbeat, the trigger SQL and its installer.
//! * `replication` (feature `replication`): a logical-replication source,
//!   lossless across reconnects, and the setup of its publication and slot.
//! * `nats` (feature `nats`): a relay from any source to NATS JetStream, and
//!   the source that reads it back.
//! * `websocket` (feature `websocket`): a WebSocket server, fed by any source,
//!   that speaks the protocol of PGCacheWatch's `pg_event_distributor`, so
//!   Python services using its `WSEventQueue` connect to it unchanged.
//!
//! All pass the conformance suite in `pgcachewatch-testkit`.
//!
//! Applications depend on the facade crate `pgcachewatch`, which re-exports this
//! crate as `pgcachewatch::memory` and `pgcachewatch::postgres`; the examples here
//! are written that way.
//!
//! ## Features
//!
//! * `postgres`: the PostgreSQL source and installer (sqlx).
//! * `tls-rustls` (default): TLS to PostgreSQL through rustls (`sslmode`,
//!   `sslrootcert`).
//! * `tls-native-tls`: TLS through the platform's library instead.
//! * `replication`: [`PgReplicationSource`](replication::PgReplicationSource) and
//!   `ReplicationSetup` (implies `postgres`; its connection is pgwire-replication
//!   with rustls, whatever the TLS feature; needs Rust 1.88).
//! * `nats`: the JetStream relay and the `NatsSource` (async-nats).
//! * `websocket`: the `/pgpubsub/{channel}` WebSocket server (axum).
//!
//! ## A source outlives its local handle
//!
//! Each source's subscriptions and inline attachments keep it running: a
//! [`Dispatcher`](pgcachewatch_core::Dispatcher) spawned on a source keeps
//! invalidating after the code that built it dropped its `source` variable.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod keep_alive;
pub mod memory;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "replication")]
#[cfg_attr(docsrs, doc(cfg(feature = "replication")))]
pub mod replication;
#[cfg(feature = "metrics")]
mod telemetry;
#[cfg(feature = "websocket")]
#[cfg_attr(docsrs, doc(cfg(feature = "websocket")))]
pub mod websocket;

pub use memory::{InMemoryHandle, InMemorySource};
