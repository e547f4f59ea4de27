//! Keep in-process caches consistent with PostgreSQL.
//!
//! A service caches the results of its queries; PostgreSQL tells it what
//! changed — through `LISTEN`/`NOTIFY` triggers, a logical-replication slot, or a
//! NATS JetStream relay that shares one slot among many replicas — and an
//! invalidation strategy decides, as each event arrives, which entries to drop.
//!
//! **The guarantee.** Once the event of a committed write has been applied, no
//! read through a [`Cache`] that starts afterwards returns a value loaded before
//! that write: every load is stamped with a generation, and a load that began
//! before an invalidation is never stored. While a source cannot promise
//! delivery (a lost connection, an unanswered heartbeat, a possible gap), reads
//! bypass the cache — or, if you choose [`WhileUnhealthy::ServeWithin`], are
//! served only from entries loaded within a bound you set — and caching resumes,
//! after a flush of what the gap may have covered, once it can promise again.
//!
//! # Pick a source
//!
//! | source | feature | for | what it costs |
//! |---|---|---|---|
//! | [`postgres::PgListenerSource`] | `postgres` (default) | one or a few services, each with a direct (not transaction-pooled) connection for LISTEN | triggers on the watched tables ([`postgres::Installer`] or `pgcachewatch install`); events lost while disconnected, so a reconnect flushes |
//! | `replication::PgReplicationSource` | `replication` | no triggers; nothing lost across reconnects; read-your-writes with commit positions (`wait_for_lsn`) | one replication slot per service (`wal_level = logical`) |
//! | `nats::NatsSource` fed by a `nats::Relay` | `nats` | many replicas: one slot, read by a relay that publishes to a JetStream stream every replica reads | a NATS server with JetStream, and the relay (`pgcachewatch relay`) |
//!
//! Every source implements [`EventSource`]; the in-memory one ([`memory`]) is
//! for tests, and every source passes the same conformance suite.
//!
//! # A complete example
//!
//! ```toml
//! [dependencies]
//! pgcachewatch = "0.1"          # features: postgres, tls-rustls, macros
//! tokio = { version = "1", features = ["full"] }
//! ```
//!
//! ```rust,no_run
//! use std::sync::Arc;
//!
//! use pgcachewatch::postgres::{Installer, PgListenerSource, TableName};
//! use pgcachewatch::sqlx::{self, PgPool};
//! use pgcachewatch::{cached, Event};
//! use pgcachewatch::strategies::Greedy;
//!
//! // Cached by `id`; every entry is dropped as soon as `users` changes.
//! #[cached(key = id, strategy = Greedy::with_predicate(|e: &Event| e.table == "users"))]
//! async fn user_name(pool: &PgPool, id: i64) -> Result<String, Arc<sqlx::Error>> {
//!     Ok(sqlx::query_scalar("SELECT name FROM users WHERE id = $1")
//!         .bind(id)
//!         .fetch_one(pool)
//!         .await?)
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let url = "postgres://postgres@127.0.0.1:5432/test";
//!     let pool = PgPool::connect(url).await?;
//!     // Once, or with the CLI: `pgcachewatch install public.users --commit`.
//!     Installer::new().install(&pool, &[TableName::parse("public.users")?]).await?;
//!
//!     // At start-up: listen, and feed every `#[cached]` function's cache from it.
//!     let source = PgListenerSource::builder(url).connect().await?;
//!     let _caches = cached::attach(source); // keep it: dropping it stops invalidation
//!
//!     let first = user_name(&pool, 42).await?; // a query
//!     let again = user_name(&pool, 42).await?; // a hit, until `users` is written
//!     assert_eq!(first, again);
//!     Ok(())
//! }
//! ```
//!
//! `#[cached]` caches by the function's arguments (or `key = …`), runs the body
//! once for concurrent callers and caches no error. The same through a [`Cache`]
//! of your own: [`Cache::get_or_load`] with a [`Dispatcher`] applying the
//! strategy. Row-level strategies ([`strategies::Keyed`]) drop one row's entries
//! instead of the table's.
//!
//! # Dependencies from the SQL
//!
//! A hand-written rule goes stale the first time the query reads a table the rule
//! forgot. With feature `query`, the statement is the rule: row-level where that
//! is provably sound (one table, every key column pinned to a parameter),
//! table-level on every table it can read otherwise (joins, subqueries, views
//! expanded to their base tables), refused where no event would tell (`now()`,
//! `FOR UPDATE`, materialized views) — at compile time for SQL written in the
//! source, at attach for SQL built at run time (`query::CachedQuery`).
//!
//! ```rust,no_run
//! # #[cfg(feature = "query")]
//! # mod example {
//! use pgcachewatch::cached;
//! use pgcachewatch::postgres::PgListenerSource;
//! use pgcachewatch::query::CachedQueryError;
//! use pgcachewatch::sqlx::{FromRow, PgPool};
//!
//! #[derive(Clone, FromRow)]
//! struct User { id: i64, name: String }
//!
//! // The arguments are $1…$n and the key; `Option` caches "not found" too.
//! #[cached(query = "SELECT id, name FROM users WHERE id = $1")]
//! async fn user(id: i64) -> Result<Option<User>, CachedQueryError>;
//!
//! async fn run(pool: PgPool) -> Result<(), Box<dyn std::error::Error>> {
//!     let source = PgListenerSource::from_pool(&pool).connect().await?;
//!     let _attached = user_query().attach(&pool, &source).await?; // keep it
//!     // "row-level on public.users(id) from $1": a write to user 8 keeps user 7.
//!     println!("{}", user_query().explain().unwrap_or_default());
//!     let ann = user(7).await?;
//! #   let _ = ann.map(|u| (u.id, u.name));
//!     Ok(())
//! }
//! # }
//! # fn main() {}
//! ```
//!
//! `pgcachewatch explain "SELECT …"` prints the same derivation for any
//! statement, and a `#[cached]` function that declares `tables = [...]` by hand
//! is audited against its SQL (`query::audit`).
//!
//! # Which sqlx
//!
//! pgcachewatch uses sqlx 0.8 and re-exports it as [`sqlx`] (feature `postgres`):
//! use `pgcachewatch::sqlx`, or depend on the same major version of sqlx
//! yourself — with another one, a `PgPool` is not the `PgPool` the API takes.
//! Rust 1.88 or later.
//!
//! # Features
//!
//! | feature | default | what |
//! |---|---|---|
//! | `postgres` | yes | [`postgres`]: the LISTEN source and the trigger installer; [`sqlx`] |
//! | `tls-rustls` | yes | TLS to PostgreSQL through rustls (`sslmode`, `sslrootcert`) |
//! | `tls-native-tls` | no | TLS through the platform's library instead (turn default features off, pick `postgres` and this) |
//! | `macros` | yes | [`#[cached]`](macro@cached): an async fn read through a cache |
//! | `replication` | no | `replication`: the logical-replication source and `ReplicationSetup` |
//! | `nats` | no | `nats`: the JetStream relay and `NatsSource` |
//! | `websocket` | no | `websocket`: the `/pgpubsub/{channel}` server for PGCacheWatch's (Python) `WSEventQueue` clients |
//! | `query` | no | `query`: caches whose dependencies come from their SQL (PostgreSQL's own parser: needs a C compiler and libclang) |
//! | `metrics` | no | series through the `metrics` facade, per cache and per source (`telemetry` lists them) |
//! | `testkit` | no | `testkit`: event logs, replay, virtual clock, model checker, conformance suite, fault proxy |
//!
//! # Where to go next
//!
//! * [`Cache`]: reads, loads, TTLs, weighers, refresh of hot keys, statistics.
//! * [`strategies`]: the ready-made invalidation strategies; [`InvalidationStrategy`] to write your own.
//! * [`Dispatcher`]: feeding caches from a source by hand, and waiting for a commit position.
//! * [`source_kit`]: the building blocks for writing an [`EventSource`] of your own.
//! * The `pgcachewatch` command (crate `pgcachewatch-cli`): `install`, `status`,
//!   `listen`, `record`, `replication setup`, `relay`, `explain`.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

pub use pgcachewatch_core::{
    cached, BoxError, Cache, CacheBuilder, CacheStats, Decision, Dispatcher, DispatcherHandle,
    DispatcherStats, Error, Event, EventSource, GapReason, Health, HealthSummary, IntoTableRef,
    InvalidTableName, InvalidationStrategy, InvalidationTarget, Lsn, Name, Operation,
    ParseLsnError, Refresh, RefreshTask, RemovalCause, Result, RowKey, Signal, Subscription,
    TableRef, Targets, TryRecvError, UnknownOperation, WaitError, WhileUnhealthy,
};

#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub use pgcachewatch_core::telemetry;

/// `#[pgcachewatch::cached]`: an `async fn` read through a [`Cache`] (feature
/// `macros`, on by default). The run-time half — attaching the caches declared
/// with a strategy to a source — is the [`cached`](mod@cached) module.
#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
pub use pgcachewatch_macros::cached;

/// The sqlx this crate is built with (0.8): its `PgPool` is the one every API
/// here takes.
///
/// ```
/// use pgcachewatch::sqlx::postgres::PgPoolOptions;
/// let options = PgPoolOptions::new().max_connections(4);
/// # let _ = options;
/// ```
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use sqlx;

/// The building blocks for writing an [`EventSource`] of your own: the
/// broadcast hub a source publishes [`Signal`]s through, health voting, inline
/// delivery, the trigger payload parser. A service that only uses the sources
/// of this crate needs none of it.
pub mod source_kit {
    pub use pgcachewatch_core::{
        parse_payload, ClosableHub, HasHealthBoard, HealthBoard, HealthVote, InlineAttachment,
        InlineHandler, PayloadError, PayloadParser, SignalHub, SignalRecord, DEFAULT_HUB_CAPACITY,
        MAX_HUB_CAPACITY,
    };
}

/// Ready-made invalidation strategies.
pub mod strategies {
    pub use pgcachewatch_strategies::*;
}

/// The in-memory event source, for tests: events you publish by hand, gaps and
/// health you choose.
pub mod memory {
    pub use pgcachewatch_backends::memory::*;
}

/// The PostgreSQL LISTEN source and the installer of its triggers.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres {
    pub use pgcachewatch_backends::postgres::install::{
        status, InstallError, InstallWarning, InstalledFunction, InstalledTrigger, Installer,
        ListenerSession, ModeChange, Plan, Preflight, Status, TableName, DEFAULT_FUNCTION_NAME,
        DEFAULT_SCHEMA,
    };
    pub use pgcachewatch_backends::postgres::listener::{
        ListenerStats, MalformedPolicy, PgListenerBuilder, PgListenerSource,
        DEFAULT_CONNECT_TIMEOUT, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT,
        DEFAULT_RECONNECT_MAX, DEFAULT_RECONNECT_MIN,
    };
    pub use pgcachewatch_backends::postgres::DEFAULT_CHANNEL;
}

/// The logical-replication source: lossless across reconnects, with commit
/// positions for read-your-writes; and the setup of its publication and slot.
#[cfg(feature = "replication")]
#[cfg_attr(docsrs, doc(cfg(feature = "replication")))]
pub mod replication {
    pub use pgcachewatch_backends::replication::*;
}

/// NATS JetStream: the relay that publishes a source's events to a stream, and
/// the source that reads them in each replica.
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats {
    pub use pgcachewatch_backends::nats::relay::{
        DEFAULT_MAX_IN_FLIGHT, DEFAULT_PROGRESS_INTERVAL, DEFAULT_RELAY_HEARTBEAT,
    };
    pub use pgcachewatch_backends::nats::source::DEFAULT_HEARTBEAT_TIMEOUT;
    pub use pgcachewatch_backends::nats::{
        report, subject, wire, Confirm, NatsAuth, NatsConnect, NatsError, NatsSource,
        NatsSourceBuilder, NatsSourceStats, Relay, RelayBuilder, RelayHandle, RelayStatus,
        StreamSettings, DEFAULT_ACK_TIMEOUT, DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES,
        DEFAULT_NATS_CONNECT_TIMEOUT, DEFAULT_NATS_PING_INTERVAL, DEFAULT_PREFIX, DEFAULT_REPLICAS,
        DEFAULT_STREAM, MAX_REPLICAS,
    };
}

/// The WebSocket server PGCacheWatch's `WSEventQueue` clients connect to: a
/// drop-in for its `pg_event_distributor`, fed by any source.
#[cfg(feature = "websocket")]
#[cfg_attr(docsrs, doc(cfg(feature = "websocket")))]
pub mod websocket {
    pub use pgcachewatch_backends::websocket::*;
}

/// Caches whose dependencies come from their SQL: a [`CachedQuery`](query::CachedQuery)
/// is invalidated row-level where that is provably sound and table-level on
/// every table the query can read everywhere else; [`explain`](query::Dependencies::explain)
/// says which and why.
#[cfg(feature = "query")]
#[cfg_attr(docsrs, doc(cfg(feature = "query")))]
pub mod query {
    pub use pgcachewatch_query::*;
}

/// The repository README's examples, compiled and run as this crate's doctests
/// (only under `cfg(doctest)`: a published package holds no repository README).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

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

    /// A row of a `#[cached(query = …)]` function (`CachedQuery`'s `V`).
    #[cfg(feature = "query")]
    #[diagnostic::on_unimplemented(
        message = "a `#[cached(query = …)]` function's row must be `sqlx::FromRow + Clone + Send + Sync + Unpin + 'static`: `{Self}` is not",
        label = "the row type (`T` of `Result<T, E>`, `Option<T>`, `Vec<T>`)",
        note = "derive it: `#[derive(Clone, sqlx::FromRow)]`, or use a tuple such as `(i64, String)`"
    )]
    pub trait QueryRow:
        for<'r> crate::sqlx::FromRow<'r, crate::sqlx::postgres::PgRow>
        + Clone
        + Send
        + Sync
        + Unpin
        + 'static
    {
    }
    #[cfg(feature = "query")]
    impl<T> QueryRow for T where
        T: for<'r> crate::sqlx::FromRow<'r, crate::sqlx::postgres::PgRow>
            + Clone
            + Send
            + Sync
            + Unpin
            + 'static
    {
    }

    /// Checks a `#[cached(query = …)]` row type with a readable error.
    #[cfg(feature = "query")]
    #[inline]
    pub fn query_row<T: QueryRow>() {}

    /// A `#[cached(query = …)]` function's error: `E::from` the query's.
    #[cfg(feature = "query")]
    #[inline]
    pub fn query_error<E: From<pgcachewatch_query::CachedQueryError>>(
        error: pgcachewatch_query::CachedQueryError,
    ) -> E {
        E::from(error)
    }

    /// The audit of a `#[cached(tables = [...])]` function whose SQL is known:
    /// registered when its cache is made (`pgcachewatch::query::audit`).
    #[cfg(feature = "query")]
    pub fn audit_rule(name: &str, sql: &str, declared: &[&str]) {
        let _ = pgcachewatch_query::audit::register(pgcachewatch_query::audit::Rule::new(
            name, sql, declared,
        ));
    }

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
