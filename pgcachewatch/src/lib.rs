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
//! | `macros` | yes | `#[pgcachewatch::cached]`: an async fn read through a cache, declared with its strategy |
//! | `metrics` | no | series through the `metrics` facade, per cache (`cache` label) and per source (`source` label): hits, misses, loads, load errors and duration, invalidations by kind, bypasses, entries; events, gaps by reason, health, reconnects, event latency, heartbeat round trip, NOTIFY queue usage, slot lag. Names and details: `pgcachewatch::telemetry` and the README's "Metrics" |
//! | `testkit` | no | `pgcachewatch::testkit`: event logs, replay, virtual clock, model checker, conformance suite, fault proxy |
//!
//! The architecture (the event flow, the design decisions, the PostgreSQL facts it
//! rests on) is in
//! [ARCHITECTURE.md](https://github.com/pgcachewatch/pgcachewatch/blob/main/ARCHITECTURE.md).
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

pub use pgcachewatch_core::*;

/// `#[pgcachewatch::cached]`: an `async fn` read through a [`Cache`] (feature
/// `macros`, on by default). The run-time half — attaching the caches declared
/// with a strategy to a source — is the [`cached`](mod@cached) module.
#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
pub use pgcachewatch_macros::cached;

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

/// What the code `#[cached]` writes uses. Not a public API: it changes without notice.
#[doc(hidden)]
pub mod __private {
    use std::convert::Infallible;
    use std::future::Future;
    use std::hash::Hash;

    use pgcachewatch_core::{Cache, IntoTableRef};

    pub use std::sync::LazyLock;

    /// `Ok` and `Err` of a `Result` written through an alias (`io::Result<T>`).
    pub trait IsResult {
        /// The value type.
        type Ok;
        /// The error type.
        type Err;
        /// `Ok(value)`.
        fn from_ok(value: Self::Ok) -> Self;
    }

    impl<T, E> IsResult for Result<T, E> {
        type Ok = T;
        type Err = E;
        #[inline]
        fn from_ok(value: T) -> Self {
            Ok(value)
        }
    }

    /// The fresh cached value for `key`, counting a hit when there is one (a
    /// miss is counted by the load that follows). The hit path of a `#[cached]`
    /// function: checked before the load's future is built, so a hit costs no
    /// more than [`Cache::get`].
    #[inline]
    pub fn hit<K, V>(cache: &Cache<K, V>, key: &K) -> Option<V>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        cache.hit_only(key)
    }

    /// An error a `#[cached]` function may return: shared by every caller of one load.
    #[diagnostic::on_unimplemented(
        message = "a `#[cached]` function's error type must be `Clone + std::error::Error + Send + Sync + 'static`: `{Self}` is not",
        label = "every caller waiting on one load gets a clone of this error",
        note = "an error that is not `Clone` (such as `sqlx::Error`) can be returned as `Arc<E>`: `-> Result<T, Arc<sqlx::Error>>`; `?` converts `E` into `Arc<E>`"
    )]
    pub trait SharedError: Clone + std::error::Error + Send + Sync + 'static {}
    impl<E: Clone + std::error::Error + Send + Sync + 'static> SharedError for E {}

    /// A key of a `#[cached]` function.
    #[diagnostic::on_unimplemented(
        message = "the key of a `#[cached]` function must be `Clone + Hash + Eq + Send + Sync + 'static`: `{Self}` is not",
        label = "the cache key (every argument, or `key = …`)",
        note = "leave an argument out of the key with `key = …` (e.g. `key = id`)"
    )]
    pub trait CacheKey: Hash + Eq + Clone + Send + Sync + 'static {}
    impl<K: Hash + Eq + Clone + Send + Sync + 'static> CacheKey for K {}

    /// A value of a `#[cached]` function.
    #[diagnostic::on_unimplemented(
        message = "the value of a `#[cached]` function must be `Clone + Send + Sync + 'static`: `{Self}` is not",
        label = "the cached value",
        note = "wrap a value that is costly to clone or not `Clone` in an `Arc`"
    )]
    pub trait CacheValue: Clone + Send + Sync + 'static {}
    impl<V: Clone + Send + Sync + 'static> CacheValue for V {}

    /// Names `E` to check it is a [`SharedError`].
    pub fn shared_error<E: SharedError>() {}
    /// Names `K` to check it is a [`CacheKey`].
    pub fn key<K: CacheKey>() {}
    /// Names `V` to check it is a [`CacheValue`].
    pub fn value<V: CacheValue>() {}

    /// A function returning `Result<V, E>`: `try_get_with_tagged`, with the shared
    /// `Arc<E>` cloned back into the function's own error type.
    #[inline]
    pub async fn result<K, V, E, T, F, Fut>(
        cache: &Cache<K, V>,
        key: K,
        tables: &[T],
        loader: F,
    ) -> Result<V, E>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
        E: SharedError,
        T: IntoTableRef + Clone,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        match cache.try_get_with_tagged(key, tables, loader).await {
            Ok(v) => Ok(v),
            Err(e) => Err(E::clone(&e)),
        }
    }

    /// A function returning a plain `V`: `try_get_with_tagged` with a loader that
    /// cannot fail.
    #[inline]
    pub async fn plain<K, V, T, F, Fut>(cache: &Cache<K, V>, key: K, tables: &[T], loader: F) -> V
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
        T: IntoTableRef + Clone,
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let loaded = cache
            .try_get_with_tagged(key, tables, || async move {
                Ok::<V, Infallible>(loader().await)
            })
            .await;
        match loaded {
            Ok(v) => v,
            Err(never) => match *never {},
        }
    }
}
