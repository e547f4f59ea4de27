#![doc = include_str!("../../README.md")]
//!
//! ## This crate
//!
//! One dependency for everything: the core ([`Cache`], [`Dispatcher`], the traits),
//! the [`strategies`], the in-memory source ([`memory`]), the PostgreSQL backend
//! (`postgres`, feature `postgres`, on by default) and, with feature `testkit`,
//! the test kit (`testkit`).
//!
//! ## Features
//!
//! | feature | default | what |
//! |---|---|---|
//! | `postgres` | yes | `pgcachewatch::postgres`: the LISTEN source and the trigger installer (sqlx) |
//! | `tls-rustls` | yes | TLS to PostgreSQL through rustls (`sslmode`, `sslrootcert`) |
//! | `tls-native-tls` | no | TLS through the platform's library instead (turn default features off, pick `postgres` and this) |
//! | `replication` | no | `pgcachewatch::replication`: the logical-replication source (lossless, commit positions) and `ReplicationSetup` (pgwire-replication; Rust 1.88) |
//! | `nats` | no | `pgcachewatch::nats`: the JetStream relay and `NatsSource` (async-nats) |
//! | `websocket` | no | `pgcachewatch::websocket`: the `/pgpubsub/{channel}` server for PGCacheWatch's `WSEventQueue` (axum) |
//! | `testkit` | no | `pgcachewatch::testkit`: event logs, replay, virtual clock, model checker, conformance suite, fault proxy |
//!
//! The architecture (the event flow, the design decisions, the PostgreSQL facts it
//! rests on) is in
//! [ARCHITECTURE.md](https://github.com/pgcachewatch/pgcachewatch/blob/main/ARCHITECTURE.md).
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

pub use pgcachewatch_core::*;

/// Ready-made invalidation strategies.
pub mod strategies {
    pub use pgcachewatch_strategies::*;
}

/// The in-memory event source and its driving handle.
pub mod memory {
    pub use pgcachewatch_backends::memory::*;
}

/// The PostgreSQL backend: LISTEN source, trigger SQL and installer.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres {
    pub use pgcachewatch_backends::postgres::*;
}

/// The logical-replication source: lossless across reconnects, with commit
/// positions for read-your-writes; and the setup of its publication and slot.
#[cfg(feature = "replication")]
#[cfg_attr(docsrs, doc(cfg(feature = "replication")))]
pub mod replication {
    pub use pgcachewatch_backends::replication::*;
}

/// NATS JetStream: the relay and the source that reads it.
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats {
    pub use pgcachewatch_backends::nats::*;
}

/// The WebSocket server PGCacheWatch's `WSEventQueue` clients connect to: a
/// drop-in for its `pg_event_distributor`, fed by any source.
#[cfg(feature = "websocket")]
#[cfg_attr(docsrs, doc(cfg(feature = "websocket")))]
pub mod websocket {
    pub use pgcachewatch_backends::websocket::*;
}

/// Record/replay, generators, the staleness model checker and the conformance suite.
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit {
    pub use pgcachewatch_testkit::*;
}
