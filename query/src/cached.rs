//! [`CachedQuery`]: a cache over one SQL statement, keyed by its parameters,
//! invalidated by what the statement reads — the runtime form of a cached query
//! (issue 19). The user writes SQL and parameters; the cache key, the
//! dependencies and the strategy follow.
//!
//! ```text
//! CachedQuery::new(sql) ──attach(pool, source)──▶ analyze + resolve, once ──▶ QueryStrategy
//!        │                                                                        │
//!        └── fetch_one / fetch_optional / fetch_all(params) ──▶ Cache<QueryKey<P>, Rows<V>> ◀── Dispatcher
//! ```
//!
//! * **The key** is the parameter tuple itself ([`Params`]): a hit hashes the
//!   typed tuple, as a `#[cached]` function's hit does, with no JSON on the way.
//!   [`Dependencies::resolution_key`] is *not* repeated in every key: every entry
//!   of one attached query is read through the one pool its names were resolved
//!   on, so it is the same for all of them (a re-check that finds it changed
//!   flushes them all).
//! * **The strategy** ([`QueryStrategy`]) follows from the derivation:
//!   table-level → [`Decision::All`] on any event of a dependency table (O(1));
//!   row-level → exactly the cached parameter sets that read one of the event's
//!   row keys, with [`Dependencies::affects`]' semantics; a keyless event
//!   (table-level triggers, `TRUNCATE`, keys that did not fit) of the row-level
//!   table → `All`; a gap → `All`.
//! * **The inverse** (event key → cache keys) is found without a scan. Where
//!   every key column is pinned by exactly one `= $n`, every parameter is such a
//!   `$n`, and the key columns are integers, text or booleans, the event's key
//!   *is* the parameter tuple: it is rebuilt from the key's values
//!   ([`Params::from_json`]) and dropped directly, with no state at all.
//!   Otherwise (`IN ($1, $2)`, `= ANY($1)`, a literal, a parameter that is not a
//!   key pin, a `uuid` key) a reverse index maps each pinned key tuple to the
//!   cache keys that read it; see [`QueryStrategy`] for how it is kept and its
//!   memory bound.
//!
//! **DDL produces no row events**, so the query re-resolves its statement
//! ([`CachedQuery::recheck`]): every [`CachedQueryBuilder::recheck_every`]
//! (30 s by default), after every gap of a source, and when the application
//! asks (after its migrations). A re-check compares the new dependencies and a
//! fingerprint of the catalog rows behind them (the `xmin` of each relation's
//! `pg_class` row, of each view's rewrite rule, of each function and operator:
//! DDL writes new ones, DML, `ANALYZE` and `VACUUM` do not) with the current
//! ones; on a change (`CREATE OR REPLACE VIEW` to read another table, a
//! partition attached, a name now resolving elsewhere, a column type altered,
//! a function redefined) the strategies switch to the new dependencies, the
//! loads begun under the old ones are waited for, and the cache is flushed.
//! Between the DDL and the re-check that sees it, reads may be stale: the
//! interval is the bound. A periodic catalog probe was chosen over an event
//! trigger on `ddl_command_end` because it needs no superuser, no object in
//! the database and no help from the source (logical replication carries no
//! DDL; a NATS subscriber sees only what the relay forwards), and it also sees
//! what event triggers do not (a `search_path` change on the pool's
//! connections, DDL made while a source was away).
//!
//! Reads go through the same [`Cache`] as everything else: generations (a load
//! that started before an invalidation is never stored), single flight (one
//! query for concurrent misses of one key), bypass while the source is
//! unhealthy ([`WhileUnhealthy`]).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use pgcachewatch_core::{
    Cache, CacheStats, Decision, Dispatcher, DispatcherHandle, Event, EventSource, GapReason,
    InvalidationStrategy, Operation, RowKey, TableRef, WhileUnhealthy,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArguments, PgPool, PgRow};
use sqlx::{Arguments, Encode, FromRow, Postgres, Type};

use crate::catalog::{KeyType, KeyValue};
use crate::deps::{Dependencies, Level, ResolveOptions, RowLevel};
use crate::error::QueryError;
use crate::pins::PinValue;

/// A cache entry's pinned key tuples beyond this many (an `= ANY($1)` with a
/// long array, or a product of `IN` lists) make it a wildcard of the index:
/// checked against every keyed event of the table instead.
const MAX_TUPLES: usize = 1024;

/// One parameter of a [`CachedQuery`]: a value that binds to PostgreSQL
/// (`Encode` + `Type`), serializes to the JSON that events' keys are compared
/// with, and keys a cache (`Hash` + `Eq`).
///
/// Implemented for every type with those traits: the integers, `String`,
/// `bool`, `Vec<T>` (for `= ANY($1)`), `Option<T>`, `uuid::Uuid` and friends.
/// Its JSON must be the value it binds (true of all the standard types): it is
/// what row-level invalidation compares with the keys events carry.
///
/// ```
/// fn is_param<T: pgcachewatch_query::Param>() {}
/// is_param::<i64>();
/// is_param::<String>();
/// is_param::<Vec<i32>>();
/// ```
pub trait Param:
    for<'q> Encode<'q, Postgres>
    + Type<Postgres>
    + Serialize
    + DeserializeOwned
    + Hash
    + Eq
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> Param for T where
    T: for<'q> Encode<'q, Postgres>
        + Type<Postgres>
        + Serialize
        + DeserializeOwned
        + Hash
        + Eq
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// The parameters of a [`CachedQuery`], `$1` first: a tuple of up to six
/// [`Param`]s (`()` for none, `(i64,)` for one). The tuple is the cache key.
///
/// ```
/// use pgcachewatch_query::Params;
/// use serde_json::json;
/// assert_eq!((7_i64, "ann".to_string()).to_json()?, vec![json!(7), json!("ann")]);
/// assert_eq!(<(i64,)>::from_json(vec![json!(7)]), Some((7,)));
/// assert_eq!(<(i64,)>::LEN, 1);
/// # Ok::<_, serde_json::Error>(())
/// ```
pub trait Params: Hash + Eq + Clone + Send + Sync + 'static {
    /// How many parameters (the highest `$n` the statement may use).
    const LEN: usize;

    /// The values bound to `$1…$n`.
    ///
    /// # Errors
    ///
    /// A value's encoder refused it.
    fn arguments(&self) -> Result<PgArguments, BoxDynError>;

    /// The values as JSON, `$1` first: what row-level invalidation compares.
    ///
    /// # Errors
    ///
    /// A value does not serialize (a map with non-string keys, say).
    fn to_json(&self) -> Result<Vec<Value>, serde_json::Error>;

    /// The tuple whose JSON is `values`, if there is one.
    fn from_json(values: Vec<Value>) -> Option<Self>;
}

impl Params for () {
    const LEN: usize = 0;

    fn arguments(&self) -> Result<PgArguments, BoxDynError> {
        Ok(PgArguments::default())
    }

    fn to_json(&self) -> Result<Vec<Value>, serde_json::Error> {
        Ok(Vec::new())
    }

    fn from_json(values: Vec<Value>) -> Option<Self> {
        values.is_empty().then_some(())
    }
}

macro_rules! tuple_params {
    ($len:expr; $($t:ident $i:tt),+) => {
        impl<$($t: Param),+> Params for ($($t,)+) {
            const LEN: usize = $len;

            fn arguments(&self) -> Result<PgArguments, BoxDynError> {
                let mut args = PgArguments::default();
                $(args.add(self.$i.clone())?;)+
                Ok(args)
            }

            fn to_json(&self) -> Result<Vec<Value>, serde_json::Error> {
                Ok(vec![$(serde_json::to_value(&self.$i)?),+])
            }

            fn from_json(values: Vec<Value>) -> Option<Self> {
                if values.len() != $len {
                    return None;
                }
                serde_json::from_value(Value::Array(values)).ok()
            }
        }
    };
}

tuple_params!(1; A 0);
tuple_params!(2; A 0, B 1);
tuple_params!(3; A 0, B 1, C 2);
tuple_params!(4; A 0, B 1, C 2, D 3);
tuple_params!(5; A 0, B 1, C 2, D 3, E 4);
tuple_params!(6; A 0, B 1, C 2, D 3, E 4, F 5);

/// Which read a cache entry holds: the first row (`fetch_one`,
/// `fetch_optional`) or every row (`fetch_all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Read {
    /// The first row, or none.
    First,
    /// Every row.
    All,
}

/// The key of a [`CachedQuery`]'s cache: the parameters and the read.
///
/// ```
/// use pgcachewatch_query::{QueryKey, Read};
/// let key = QueryKey::new((7_i64,), Read::First);
/// assert_eq!(key.params, (7,));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct QueryKey<P> {
    /// `$1…$n`.
    pub params: P,
    /// Which read.
    pub read: Read,
}

impl<P> QueryKey<P> {
    /// The key of `read` with `params`.
    pub fn new(params: P, read: Read) -> Self {
        QueryKey { params, read }
    }
}

/// A [`CachedQuery`]'s cached value: the first row (or a cached "not found"),
/// or every row.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Rows<V> {
    /// `fetch_one` / `fetch_optional`: the first row, `None` when there was none
    /// (a cached "not found": the insert of the row drops it).
    First(Option<V>),
    /// `fetch_all`: every row.
    All(Arc<[V]>),
}

impl<V: Clone> Rows<V> {
    fn first(self) -> Option<V> {
        match self {
            Rows::First(v) => v,
            Rows::All(rows) => rows.first().cloned(),
        }
    }

    fn all(self) -> Arc<[V]> {
        match self {
            Rows::All(rows) => rows,
            Rows::First(v) => v.into_iter().collect(),
        }
    }
}

/// Why a [`CachedQuery`] could not be attached or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CachedQueryError {
    /// A read before [`CachedQuery::attach`]: the query's dependencies (and
    /// whether it may be cached at all) are known only once it is resolved there.
    #[error(
        "the cached query is not attached: call attach(pool, source) first (its \
         dependencies, and whether it may be cached at all, are derived there)"
    )]
    NotAttached,
    /// The dependencies could not be derived: a refusal (`FOR UPDATE`, `now()`,
    /// `current_user`, a materialized view…), a name that does not resolve, or
    /// with [`CachedQueryBuilder::strict`] a query that is only table-level.
    #[error(transparent)]
    Derive(#[from] QueryError),
    /// The statement's highest `$n` is not the parameter tuple's length.
    #[error("the statement uses {statement} parameter(s) but the parameter tuple has {tuple}")]
    ParamCount {
        /// The highest `$n` in the statement.
        statement: usize,
        /// [`Params::LEN`].
        tuple: usize,
    },
    /// A parameter does not serialize to JSON, which row-level invalidation needs.
    #[error("a parameter does not serialize to JSON (row-level invalidation compares it): {0}")]
    Params(#[source] serde_json::Error),
    /// `fetch_one` found no row.
    #[error("the query returned no row")]
    RowNotFound,
    /// The database (shared by every caller of one load).
    #[error("the database: {0}")]
    Database(#[source] Arc<sqlx::Error>),
}

impl From<sqlx::Error> for CachedQueryError {
    fn from(e: sqlx::Error) -> Self {
        CachedQueryError::Database(Arc::new(e))
    }
}

/// Settings of a [`CachedQuery`]; start from [`CachedQuery::builder`].
///
/// ```
/// use pgcachewatch_query::CachedQuery;
/// #[derive(Clone, sqlx::FromRow)]
/// struct User { id: i64, name: String }
/// let users = CachedQuery::<(i64,), User>::builder("SELECT id, name FROM users WHERE id = $1")
///     .name("user_by_id")
///     .capacity(50_000)
///     .strict(true) // a fall-back to table-level is an error at attach
///     .build();
/// assert_eq!(users.sql(), "SELECT id, name FROM users WHERE id = $1");
/// ```
pub struct CachedQueryBuilder<P, V> {
    sql: Cow<'static, str>,
    name: Option<String>,
    capacity: usize,
    options: ResolveOptions,
    while_unhealthy: WhileUnhealthy,
    recheck_every: Option<Duration>,
    _types: std::marker::PhantomData<fn() -> (P, V)>,
}

impl<P, V> fmt::Debug for CachedQueryBuilder<P, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedQueryBuilder")
            .field("sql", &self.sql)
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("options", &self.options)
            .field("while_unhealthy", &self.while_unhealthy)
            .field("recheck_every", &self.recheck_every)
            .finish()
    }
}

impl<P, V> CachedQueryBuilder<P, V>
where
    P: Params,
    V: Clone + Send + Sync + 'static,
{
    /// A name for logs and the cache's statistics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The most entries held (default 10 000).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Strict: a query that would be only table-level is refused at
    /// [`attach`](CachedQuery::attach) ([`QueryError::NotRowLevel`]) instead of
    /// falling back.
    pub fn strict(mut self, strict: bool) -> Self {
        self.options = self.options.strict(strict);
        self
    }

    /// Whether attach cross-checks the relations with the statement's generic
    /// plan (default on; see [`ResolveOptions::plan_check`]).
    pub fn plan_check(mut self, on: bool) -> Self {
        self.options = self.options.plan_check(on);
        self
    }

    /// What reads do while the source is unhealthy (default
    /// [`WhileUnhealthy::Bypass`]: every read runs the query).
    pub fn while_unhealthy(mut self, policy: WhileUnhealthy) -> Self {
        self.while_unhealthy = policy;
        self
    }

    /// How often an attached query resolves its statement again, to follow
    /// DDL, which produces no row events: a view replaced (`CREATE OR REPLACE
    /// VIEW`), a partition attached, a table shadowing another on the
    /// `search_path`, a function redefined (default every 30 s; `None`: only
    /// after a gap and on [`CachedQuery::recheck`]). See
    /// [`CachedQuery::recheck`] for what a re-check does.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgcachewatch_query::CachedQuery;
    /// let q = CachedQuery::<(i64,), (i64,)>::builder("SELECT id FROM users WHERE id = $1")
    ///     .recheck_every(Some(Duration::from_secs(5)))
    ///     .build();
    /// # let _ = q;
    /// ```
    pub fn recheck_every(mut self, interval: Option<Duration>) -> Self {
        self.recheck_every = interval.filter(|d| !d.is_zero());
        self
    }

    /// The cached query, not attached yet.
    pub fn build(self) -> CachedQuery<P, V> {
        let mut cache = Cache::builder()
            .capacity(self.capacity)
            .while_unhealthy(self.while_unhealthy)
            .unhealthy_until_attached();
        if let Some(name) = &self.name {
            cache = cache.name(name.clone());
        }
        CachedQuery {
            inner: Arc::new(QueryInner {
                sql: self.sql,
                options: self.options,
                capacity: self.capacity,
                cache: cache.build(),
                recheck_every: self.recheck_every,
                derived: tokio::sync::OnceCell::new(),
                derivations: AtomicU64::new(0),
            }),
        }
    }
}

/// A cache over one SQL statement: reads by parameters, kept fresh by what the
/// statement reads, with no strategy code (issue 19, the runtime form).
///
/// * `P` is the parameter tuple ([`Params`], `$1` first), which is also the
///   cache key; `V` a row (`sqlx::FromRow`).
/// * [`attach`](Self::attach) derives the statement's [`Dependencies`] **once**
///   (parsed with PostgreSQL's parser, resolved on one connection of the pool:
///   `search_path`, views, partitions, keys, the generic plan), refuses what
///   cannot be cached, and spawns a [`Dispatcher`] applying a [`QueryStrategy`]
///   to the inner [`Cache`]. Attaching again (another source) reuses the
///   derivation.
/// * [`fetch_one`](Self::fetch_one), [`fetch_optional`](Self::fetch_optional)
///   and [`fetch_all`](Self::fetch_all) read through the cache, on the pool given
///   to the first attach.
///
/// **Reads before attach are errors** ([`CachedQueryError::NotAttached`]), not
/// a bypass as with `#[cached]`: whether the statement may be cached at all
/// (no `FOR UPDATE`, no `now()`, …) and on which pool is known only there, and a
/// read that silently ran a refused statement would hide the refusal.
///
/// `CachedQuery` is cheap to clone; clones share the cache and the derivation.
///
/// ```no_run
/// use pgcachewatch_backends::postgres::listener::PgListenerSource;
/// use pgcachewatch_query::CachedQuery;
///
/// #[derive(Clone, sqlx::FromRow)]
/// struct User { id: i64, name: String }
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await?;
/// let source = PgListenerSource::builder("postgres://postgres@127.0.0.1/app").connect().await?;
///
/// let user = CachedQuery::<(i64,), User>::new("SELECT id, name FROM users WHERE id = $1");
/// let _attached = user.attach(&pool, &source).await?; // keep it: dropping it stops invalidation
/// assert_eq!(user.explain().as_deref(), Some("row-level on public.users(id) from $1"));
///
/// let ann = user.fetch_one((7,)).await?;       // a query
/// let again = user.fetch_one((7,)).await?;     // a hit, until user 7 is written
/// let maybe = user.fetch_optional((8,)).await?; // "not found" is cached too
/// let team = CachedQuery::<(Vec<i64>,), User>::new("SELECT id, name FROM users WHERE id = ANY($1)");
/// # Ok(()) }
/// ```
pub struct CachedQuery<P, V> {
    inner: Arc<QueryInner<P, V>>,
}

impl<P, V> Clone for CachedQuery<P, V> {
    fn clone(&self) -> Self {
        CachedQuery {
            inner: self.inner.clone(),
        }
    }
}

struct QueryInner<P, V> {
    sql: Cow<'static, str>,
    options: ResolveOptions,
    capacity: usize,
    cache: Cache<QueryKey<P>, Rows<V>>,
    recheck_every: Option<Duration>,
    derived: tokio::sync::OnceCell<Derived<P>>,
    derivations: AtomicU64,
}

/// What attach derived, once per statement (and what re-checks replace).
struct Derived<P> {
    pool: PgPool,
    shared: Arc<Shared<P>>,
    /// Why the last re-check refused the statement (reads then bypass the
    /// cache), and the same as one flag for the hit path.
    refused: Mutex<Option<String>>,
    bypass: AtomicBool,
    /// One re-check at a time.
    recheck_lock: tokio::sync::Mutex<()>,
    /// The re-check task, while some attachment holds it.
    rechecker: Mutex<Weak<Rechecker>>,
}

/// What the reads and the strategies of one query share: the current
/// derivation, replaced by a re-check that finds the catalog changed.
struct Shared<P> {
    current: RwLock<Arc<Current<P>>>,
    /// Bumped (after `current` is replaced) by every replacement; a load reads
    /// it after counting itself in, to know its derivation is still current.
    epoch: AtomicU64,
    /// Wakes the re-check task (a gap: the source was away, DDL may have run).
    wake: tokio::sync::Notify,
    rechecks: AtomicU64,
}

/// One derivation: the dependencies, the strategy's plan, the catalog's
/// fingerprint, and the loads begun under it.
struct Current<P> {
    deps: Arc<Dependencies>,
    plan: Plan<P>,
    fingerprint: String,
    epoch: u64,
    /// Loads in flight that began under this derivation.
    loads: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl<P> Shared<P> {
    fn new(current: Current<P>) -> Self {
        Shared {
            epoch: AtomicU64::new(current.epoch),
            current: RwLock::new(Arc::new(current)),
            wake: tokio::sync::Notify::new(),
            rechecks: AtomicU64::new(0),
        }
    }

    fn current(&self) -> Arc<Current<P>> {
        self.current.read().clone()
    }

    /// The current derivation, with this load counted in it: a re-check that
    /// replaces it waits for the load before it flushes the cache.
    fn begin_load(&self) -> LoadGuard<P> {
        loop {
            let current = self.current();
            current.loads.fetch_add(1, Ordering::SeqCst);
            let guard = LoadGuard(current);
            // Either this sees the replacement's new epoch (and counts itself
            // in the new derivation instead), or the replacement sees this
            // load's count (and waits for it): both are `SeqCst`.
            if self.epoch.load(Ordering::SeqCst) == guard.0.epoch {
                return guard;
            }
        }
    }
}

/// A load counted in its derivation.
struct LoadGuard<P>(Arc<Current<P>>);

impl<P> Drop for LoadGuard<P> {
    fn drop(&mut self) {
        if self.0.loads.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Aborts the re-check task when the last attachment holding it is dropped.
#[derive(Debug)]
struct Rechecker(tokio::task::AbortHandle);

impl Drop for Rechecker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The default of [`CachedQueryBuilder::recheck_every`].
const DEFAULT_RECHECK: Duration = Duration::from_secs(30);

/// After a re-check failed on the database, the next one comes this soon
/// (or at the interval, if sooner).
const RECHECK_RETRY: Duration = Duration::from_secs(1);

impl<P, V> fmt::Debug for CachedQuery<P, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        f.debug_struct("CachedQuery")
            .field("sql", &inner.sql)
            .field("cache", &inner.cache)
            .field(
                "dependencies",
                &inner
                    .derived
                    .get()
                    .map(|d| d.shared.current().deps.explain()),
            )
            .finish_non_exhaustive()
    }
}

impl<P, V> CachedQuery<P, V>
where
    P: Params,
    V: for<'r> FromRow<'r, PgRow> + Clone + Send + Sync + Unpin + 'static,
{
    /// A cached query over `sql` with the default settings (10 000 entries,
    /// not strict, bypass while unhealthy).
    pub fn new(sql: impl Into<Cow<'static, str>>) -> Self {
        Self::builder(sql).build()
    }

    /// A builder for the other settings.
    pub fn builder(sql: impl Into<Cow<'static, str>>) -> CachedQueryBuilder<P, V> {
        CachedQueryBuilder {
            sql: sql.into(),
            name: None,
            capacity: 10_000,
            options: ResolveOptions::new(),
            while_unhealthy: WhileUnhealthy::Bypass,
            recheck_every: Some(DEFAULT_RECHECK),
            _types: std::marker::PhantomData,
        }
    }

    /// The statement.
    pub fn sql(&self) -> &str {
        &self.inner.sql
    }

    /// Derives the statement's dependencies (the first time only: analyze, then
    /// resolve on one connection of `pool`) and spawns a dispatcher that applies
    /// a [`QueryStrategy`] for them to this query's cache, from `source`. Reads
    /// then go through the cache, on `pool`.
    ///
    /// Keep the returned [`AttachedQuery`]: dropping it (or shutting it down)
    /// stops the dispatcher and the cache then bypasses (every read runs the
    /// query) until the next attach. Attaching again, to another source, reuses
    /// the derivation (and the first pool); the cache trusts its entries only
    /// while every attached source is healthy and none was stopped.
    ///
    /// # Errors
    ///
    /// [`CachedQueryError::Derive`] for a refusal, an unknown name or (strict) a
    /// table-level query; [`CachedQueryError::ParamCount`] when the statement's
    /// parameters are not `P`'s; [`CachedQueryError::Database`] when no
    /// connection could be had. Nothing is attached then.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (the dispatcher is a task).
    pub async fn attach<S>(
        &self,
        pool: &PgPool,
        source: &S,
    ) -> Result<AttachedQuery, CachedQueryError>
    where
        S: EventSource + ?Sized,
    {
        let inner = &*self.inner;
        let derived = inner.derived.get_or_try_init(|| self.derive(pool)).await?;
        let strategy = QueryStrategy {
            shared: derived.shared.clone(),
        };
        let handle = Dispatcher::new()
            .attach(strategy, inner.cache.clone())
            .spawn(source);
        Ok(AttachedQuery {
            handle,
            _rechecker: self.rechecker(derived),
        })
    }

    /// The re-check task of this query, spawned by the first attachment that
    /// finds none running.
    fn rechecker(&self, derived: &Derived<P>) -> Arc<Rechecker> {
        let mut slot = derived.rechecker.lock();
        if let Some(running) = slot.upgrade() {
            return running;
        }
        let weak = Arc::downgrade(&self.inner);
        let shared = derived.shared.clone();
        let interval = self.inner.recheck_every;
        let task = tokio::spawn(async move {
            let mut wait = interval;
            loop {
                match wait {
                    Some(d) => {
                        tokio::select! {
                            () = tokio::time::sleep(d) => {}
                            () = shared.wake.notified() => {}
                        }
                    }
                    None => shared.wake.notified().await,
                }
                let Some(inner) = weak.upgrade() else { return };
                let query = CachedQuery { inner };
                wait = match query.recheck().await {
                    Err(CachedQueryError::Database(_)) => {
                        Some(interval.map_or(RECHECK_RETRY, |d| d.min(RECHECK_RETRY)))
                    }
                    _ => interval,
                };
            }
        });
        let rechecker = Arc::new(Rechecker(task.abort_handle()));
        *slot = Arc::downgrade(&rechecker);
        rechecker
    }

    /// Resolves the statement again now, as attach did, and compares: when the
    /// dependencies or the catalog rows behind them changed (a view replaced,
    /// a partition attached, a name now resolving elsewhere, a table altered, a
    /// function redefined), the query's strategies switch to the new
    /// dependencies, and once every load begun under the old ones has ended the
    /// cache is flushed. Returns whether that happened. DDL produces no row
    /// events, so this is how a cached query follows it: run by the query
    /// itself every [`recheck_every`](CachedQueryBuilder::recheck_every), after
    /// every gap of a source (the source was away; DDL may have run), and by
    /// the application when it knows (after its migrations, say).
    ///
    /// What is compared: the dependencies, and a fingerprint of the catalog
    /// rows behind them (the `xmin` of each relation's `pg_class` row, of each
    /// view's rewrite rule, of each function's and operator's row: DDL writes
    /// new ones; DML, `ANALYZE` and `VACUUM` do not), so a view redefined over
    /// the same tables is a change too. Between the DDL and the re-check that
    /// sees it, reads may be stale: the interval bounds that. A periodic probe
    /// was chosen over an event trigger on `ddl_command_end`: it needs no
    /// superuser, no object in the database and nothing from the source
    /// (logical replication carries no DDL, a NATS subscriber sees only what
    /// the relay forwards), and it also sees a name resolving elsewhere and
    /// DDL made while a source was away.
    ///
    /// A statement refused now (the view reads `now()`, the table is gone, a
    /// strict query became table-level) is not cached any more: its cache is
    /// flushed and reads bypass it (each runs the statement) until a re-check
    /// accepts it again ([`refusal`](Self::refusal) says why meanwhile); the
    /// refusal is logged and returned.
    ///
    /// # Errors
    ///
    /// [`CachedQueryError::NotAttached`] before attach;
    /// [`CachedQueryError::Derive`] for a refusal;
    /// [`CachedQueryError::Database`] when the server could not be asked (the
    /// derivation is kept, and retried within a second by the query's own
    /// re-checks).
    pub async fn recheck(&self) -> Result<bool, CachedQueryError> {
        let derived = self.attached()?;
        let _one = derived.recheck_lock.lock().await;
        let inner = &*self.inner;
        derived.shared.rechecks.fetch_add(1, Ordering::Relaxed);
        let resolved = async {
            let analysis = crate::analyze(&inner.sql)?;
            let mut conn = derived.pool.acquire().await?;
            let deps = crate::resolve_with(&analysis, &mut conn, &inner.options).await?;
            let fingerprint = crate::server::catalog_fingerprint(&mut conn, &deps).await?;
            Ok::<_, CachedQueryError>((deps, fingerprint))
        }
        .await;
        let (deps, fingerprint) = match resolved {
            Ok(found) => found,
            Err(CachedQueryError::Derive(QueryError::Database(e))) => {
                tracing::warn!(sql = %inner.sql, "cached query: re-check failed, kept the derivation: {e}");
                return Err(e.into());
            }
            Err(CachedQueryError::Derive(refusal)) => {
                let message = refusal.to_string();
                tracing::error!(sql = %inner.sql, "cached query: refused on re-check, its cache is bypassed until it is accepted again: {message}");
                *derived.refused.lock() = Some(message);
                derived.bypass.store(true, Ordering::SeqCst);
                inner.cache.invalidate_all();
                return Err(refusal.into());
            }
            Err(e) => {
                tracing::warn!(sql = %inner.sql, "cached query: re-check failed, kept the derivation: {e}");
                return Err(e);
            }
        };
        let old = derived.shared.current();
        let was_refused = derived.refused.lock().is_some();
        let same = old.fingerprint == fingerprint
            && old.deps.level == deps.level
            && old.deps.resolved == deps.resolved
            && old.deps.objects == deps.objects;
        if same && !was_refused {
            return Ok(false);
        }
        tracing::warn!(
            sql = %inner.sql,
            before = %old.deps.explain(),
            now = %deps.explain(),
            "cached query: the catalog changed under the statement (DDL): re-derived, its cache flushed"
        );
        let epoch = old.epoch + 1;
        let plan = Plan::new(&deps, P::LEN, inner.capacity);
        *derived.shared.current.write() = Arc::new(Current {
            deps: Arc::new(deps),
            plan,
            fingerprint,
            epoch,
            loads: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
        });
        derived.shared.epoch.store(epoch, Ordering::SeqCst);
        // Loads begun under the old derivation registered with its index (or
        // none): wait for them, so that none is stamped after the flush.
        loop {
            let idle = old.idle.notified();
            if old.loads.load(Ordering::SeqCst) == 0 {
                break;
            }
            idle.await;
        }
        inner.cache.invalidate_all();
        *derived.refused.lock() = None;
        derived.bypass.store(false, Ordering::SeqCst);
        Ok(true)
    }

    /// How many re-checks ran ([`recheck`](Self::recheck), periodic or after
    /// a gap); 0 before attach.
    pub fn rechecks(&self) -> u64 {
        self.inner
            .derived
            .get()
            .map_or(0, |d| d.shared.rechecks.load(Ordering::Relaxed))
    }

    /// Why the last re-check refused the statement (reads bypass its cache
    /// meanwhile: each runs the statement); `None` when it is cached.
    pub fn refusal(&self) -> Option<String> {
        self.inner
            .derived
            .get()
            .and_then(|d| d.refused.lock().clone())
    }

    async fn derive(&self, pool: &PgPool) -> Result<Derived<P>, CachedQueryError> {
        let inner = &*self.inner;
        let analysis = crate::analyze(&inner.sql)?;
        if analysis.param_count() != P::LEN {
            return Err(CachedQueryError::ParamCount {
                statement: analysis.param_count(),
                tuple: P::LEN,
            });
        }
        let mut conn = pool.acquire().await?;
        inner.derivations.fetch_add(1, Ordering::Relaxed);
        let deps = crate::resolve_with(&analysis, &mut conn, &inner.options).await?;
        let fingerprint = crate::server::catalog_fingerprint(&mut conn, &deps).await?;
        drop(conn);
        let plan = Plan::new(&deps, P::LEN, inner.capacity);
        tracing::debug!(sql = %inner.sql, dependencies = %deps.explain(), inverse = plan.describe(), "cached query attached");
        Ok(Derived {
            pool: pool.clone(),
            shared: Arc::new(Shared::new(Current {
                deps: Arc::new(deps),
                plan,
                fingerprint,
                epoch: 0,
                loads: AtomicUsize::new(0),
                idle: tokio::sync::Notify::new(),
            })),
            refused: Mutex::new(None),
            bypass: AtomicBool::new(false),
            recheck_lock: tokio::sync::Mutex::new(()),
            rechecker: Mutex::new(Weak::new()),
        })
    }

    /// What was derived at attach (or by the latest re-check that found a
    /// change), in one line (`"row-level on public.users(id) from $1"`,
    /// `"table-level on public.orgs, public.users: join"`); `None` before attach.
    pub fn explain(&self) -> Option<String> {
        self.dependencies().map(|d| d.explain())
    }

    /// The dependencies derived at attach (or by the latest re-check that found
    /// a change); `None` before.
    pub fn dependencies(&self) -> Option<Arc<Dependencies>> {
        self.inner
            .derived
            .get()
            .map(|d| d.shared.current().deps.clone())
    }

    /// How many times the dependencies were derived at attach (resolved on the
    /// server): 1 after any number of attaches and reads (0 before the first
    /// attach; a failed attach is retried by the next). For the figure
    /// "derivation once per statement". Re-checks are counted apart
    /// ([`rechecks`](Self::rechecks)).
    pub fn derivations(&self) -> u64 {
        self.inner.derivations.load(Ordering::Relaxed)
    }

    /// The cache's counters (hits, misses, loads, invalidations).
    pub fn stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// The inner cache (to attach further dispatchers by hand with
    /// [`strategy`](Self::strategy), or to invalidate by hand).
    pub fn cache(&self) -> &Cache<QueryKey<P>, Rows<V>> {
        &self.inner.cache
    }

    /// A fresh strategy for this query's cache, for a [`Dispatcher`] built by
    /// hand (`Dispatcher::new().attach(q.strategy()?, q.cache().clone())`);
    /// `None` before attach.
    pub fn strategy(&self) -> Option<QueryStrategy<P>> {
        self.inner.derived.get().map(|d| QueryStrategy {
            shared: d.shared.clone(),
        })
    }

    fn attached(&self) -> Result<&Derived<P>, CachedQueryError> {
        self.inner
            .derived
            .get()
            .ok_or(CachedQueryError::NotAttached)
    }

    /// The first row for `params`, from the cache while nothing it read was
    /// written. A cached "no row" is [`CachedQueryError::RowNotFound`] (and is
    /// dropped by the insert of the row).
    ///
    /// # Errors
    ///
    /// [`CachedQueryError::RowNotFound`], [`CachedQueryError::NotAttached`],
    /// [`CachedQueryError::Database`] (shared by every caller of one load; never
    /// cached), [`CachedQueryError::Params`].
    #[inline]
    pub async fn fetch_one(&self, params: P) -> Result<V, CachedQueryError> {
        self.fetch_optional(params)
            .await?
            .ok_or(CachedQueryError::RowNotFound)
    }

    /// The first row for `params`, or `None`; both are cached.
    ///
    /// # Errors
    ///
    /// As [`fetch_one`](Self::fetch_one), without `RowNotFound`.
    #[inline]
    pub async fn fetch_optional(&self, params: P) -> Result<Option<V>, CachedQueryError> {
        let derived = self.attached()?;
        let key = QueryKey::new(params, Read::First);
        if derived.bypass.load(Ordering::Relaxed) {
            return Ok(Box::pin(self.uncached(derived, key)).await?.first());
        }
        if let Some(rows) = self.inner.cache.hit_only(&key) {
            return Ok(rows.first());
        }
        // The load's future is large: boxed, so that a hit stays small.
        Ok(Box::pin(self.load(derived, key)).await?.first())
    }

    /// Every row for `params` (shared: a hit clones an `Arc`).
    ///
    /// # Errors
    ///
    /// As [`fetch_optional`](Self::fetch_optional).
    pub async fn fetch_all(&self, params: P) -> Result<Arc<[V]>, CachedQueryError> {
        let derived = self.attached()?;
        let key = QueryKey::new(params, Read::All);
        if derived.bypass.load(Ordering::Relaxed) {
            return Ok(Box::pin(self.uncached(derived, key)).await?.all());
        }
        if let Some(rows) = self.inner.cache.hit_only(&key) {
            return Ok(rows.all());
        }
        Ok(Box::pin(self.load(derived, key)).await?.all())
    }

    /// A miss: registers the key with the reverse index (before the load is
    /// stamped, so an event that arrives while it runs finds it), then loads
    /// through the cache.
    async fn load(
        &self,
        derived: &Derived<P>,
        key: QueryKey<P>,
    ) -> Result<Rows<V>, CachedQueryError> {
        let inner = &*self.inner;
        let load = derived.shared.begin_load();
        let _registration = match &load.0.plan {
            Plan::Indexed(index) => {
                let json = key.params.to_json().map_err(CachedQueryError::Params)?;
                let (registration, sweep) = index.register(&key, json);
                if sweep {
                    index.sweep(|k| inner.cache.contains_key(k), inner.cache.is_healthy());
                }
                Some(registration)
            }
            _ => None,
        };
        let params = key.params.clone();
        let read = key.read;
        let sql: &str = &inner.sql;
        let pool = &derived.pool;
        inner
            .cache
            .try_get_with(key, move || run(sql, pool, params, read))
            .await
            .map_err(CachedQueryError::Database)
    }

    /// A read while a re-check refuses the statement: straight to the server.
    async fn uncached(
        &self,
        derived: &Derived<P>,
        key: QueryKey<P>,
    ) -> Result<Rows<V>, CachedQueryError> {
        Ok(run(&self.inner.sql, &derived.pool, key.params, key.read).await?)
    }
}

/// Runs the statement with `params`.
async fn run<P, V>(sql: &str, pool: &PgPool, params: P, read: Read) -> Result<Rows<V>, sqlx::Error>
where
    P: Params,
    V: for<'r> FromRow<'r, PgRow> + Send + Unpin,
{
    let args = params.arguments().map_err(sqlx::Error::Encode)?;
    let query = sqlx::query_as_with::<Postgres, V, _>(sql, args);
    match read {
        Read::First => query.fetch_optional(pool).await.map(Rows::First),
        Read::All => query.fetch_all(pool).await.map(|v| Rows::All(v.into())),
    }
}

/// Keeps a [`CachedQuery`]'s dispatcher running; dropping it stops invalidation
/// (the cache then bypasses: every read runs the query, until the query is
/// attached again — also when other attachments of the same query still run).
#[must_use = "dropping it stops invalidation at once (the cache then bypasses); keep it for as long as the query is read"]
#[derive(Debug)]
pub struct AttachedQuery {
    handle: DispatcherHandle,
    /// Keeps the query's re-check task running.
    _rechecker: Arc<Rechecker>,
}

impl AttachedQuery {
    /// The dispatcher (for its counters and read-your-writes waits).
    pub fn dispatcher(&self) -> &DispatcherHandle {
        &self.handle
    }

    /// Waits until every signal the source emitted before this call is applied.
    pub async fn sync(&self) {
        self.handle.sync().await;
    }

    /// Stops the dispatcher and waits for it; the cache then bypasses.
    pub async fn shutdown(self) {
        self.handle.shutdown().await;
    }
}

/// The invalidation strategy of a [`CachedQuery`], derived from its
/// [`Dependencies`]; implements [`InvalidationStrategy`] for the query's cache
/// key [`QueryKey<P>`].
///
/// * **Table-level**: [`Decision::All`] on any event about one of the
///   dependency tables (O(1) in the cache), nothing on others.
/// * **Row-level**: the cache keys whose parameters read one of the event's row
///   keys ([`Dependencies::affects`]' semantics: an `UPDATE` that moves a key
///   carries both keys, so a cached "not found" for the new key is dropped too);
///   `All` for a keyless event or `TRUNCATE` of the table, or a key value that
///   cannot be compared.
/// * **Gaps**: `All`.
///
/// # The inverse: event key → cache keys
///
/// * **Direct** (no state): when every primary-key column is an integer, text
///   or boolean pinned by exactly one `= $n` and every parameter is one of
///   those, the key's values are the parameters: the key `{id: 7}` of `… WHERE
///   id = $1` is the cache key `(7,)`, rebuilt with [`Params::from_json`] and
///   checked to serialize back to the same values (a tuple that cannot be
///   rebuilt means `All`).
/// * **Indexed** otherwise: a reverse index, shared between the query's reads
///   and its strategies (the one piece of state a strategy shares, behind a
///   mutex: reads write it, strategies read it; no I/O), maps each pinned key
///   tuple (`IN ($1, $2)` → two tuples, `= ANY($1)` → one per element) to the
///   cache keys that read it. A miss registers its key before its load is
///   stamped, so an event that arrives while the load runs finds it; a key
///   leaves the index when an invalidation drops it, on `All`, or when a sweep
///   finds it no longer cached — never while one of its loads is in flight.
///   Entries whose pins cannot be enumerated (a parameter of another type than
///   the key, more than 1024 tuples) are wildcards, checked with
///   [`RowLevel::admits`] on every keyed event of the table.
///
///   **Memory bound**: a sweep runs when the index holds more than
///   `2 × capacity + 64` cache keys (or twice what the previous sweep kept),
///   so it holds at most about twice the cache's entries plus the loads in
///   flight; each cache key costs its parameters (as JSON) and its pinned
///   tuples (at most 1024; beyond that it is a wildcard). While the source is
///   unhealthy the sweep waits (held entries may not be checked then), so the
///   keys first read during an outage add to the index until it recovers.
///
/// The strategy never reads the clock and holds no deadline.
pub struct QueryStrategy<P> {
    shared: Arc<Shared<P>>,
}

impl<P: Params> fmt::Debug for QueryStrategy<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.shared.current();
        f.debug_struct("QueryStrategy")
            .field("dependencies", &current.deps.explain())
            .field("inverse", &current.plan.describe())
            .finish()
    }
}

impl<P: Params> QueryStrategy<P> {
    /// What the strategy was derived from (the latest derivation: a re-check
    /// that finds the catalog changed replaces it).
    pub fn dependencies(&self) -> Arc<Dependencies> {
        self.shared.current().deps.clone()
    }

    /// How it finds the cache keys of a row-level event: `"table-level"`,
    /// `"direct"` (the key is the parameters) or `"indexed"`.
    pub fn inverse(&self) -> &'static str {
        self.shared.current().plan.describe()
    }
}

impl<P: Params> InvalidationStrategy<QueryKey<P>> for QueryStrategy<P> {
    fn on_event(&mut self, event: &Event, _now: Instant) -> Decision<QueryKey<P>> {
        let current = self.shared.current();
        let deps = &current.deps;
        if !about_any(event, deps.tables()) {
            return Decision::Nothing;
        }
        let keys = match (&event.keys, event.operation) {
            (Some(keys), op) if op != Operation::Truncate => keys,
            _ => return all(&current),
        };
        match (&current.plan, deps.level()) {
            (Plan::Table, _) => Decision::All,
            (Plan::Direct(direct), _) => direct.decide(keys),
            (Plan::Indexed(index), Level::Row(row)) => index.decide(row, keys),
            // An indexed plan is made only for a row-level query.
            (Plan::Indexed(_), _) => all(&current),
        }
    }

    fn on_gap(&mut self, _reason: &GapReason, _now: Instant) -> Decision<QueryKey<P>> {
        // The source was away: DDL may have run meanwhile. Re-check (in the
        // query's task; a strategy does no I/O).
        self.shared.wake.notify_one();
        all(&self.shared.current())
    }

    fn reads_clock(&self) -> bool {
        false
    }
}

fn all<P: Params>(current: &Current<P>) -> Decision<QueryKey<P>> {
    if let Plan::Indexed(index) = &current.plan {
        index.clear();
    }
    Decision::All
}

fn about_any(event: &Event, tables: &[TableRef]) -> bool {
    tables
        .iter()
        .any(|t| event.is_about(t.schema.as_deref(), &t.table))
}

/// How a strategy finds the cache keys of an event.
enum Plan<P> {
    /// Table-level: everything.
    Table,
    /// The key is the parameters.
    Direct(Direct),
    /// A reverse index.
    Indexed(Box<Index<P>>),
}

impl<P: Params> Plan<P> {
    fn new(deps: &Dependencies, param_count: usize, capacity: usize) -> Self {
        let Level::Row(row) = deps.level() else {
            return Plan::Table;
        };
        match Direct::new(row, param_count) {
            Some(direct) => Plan::Direct(direct),
            None => Plan::Indexed(Box::new(Index::new(row.clone(), capacity))),
        }
    }
}

impl<P> Plan<P> {
    fn describe(&self) -> &'static str {
        match self {
            Plan::Table => "table-level",
            Plan::Direct(_) => "direct",
            Plan::Indexed(_) => "indexed",
        }
    }
}

/// Each key column with its type and the `$n` that pins it.
struct Direct {
    columns: Vec<(String, KeyType, usize)>,
    params: usize,
}

impl Direct {
    fn new(row: &RowLevel, params: usize) -> Option<Direct> {
        let mut covered = vec![false; params];
        let mut columns = Vec::with_capacity(row.key_columns.len());
        for column in &row.key_columns {
            let ty = column.key_type?;
            // Types whose Rust values are equal exactly when PostgreSQL's keys
            // are (a uuid may be written in several ways as text).
            if !matches!(ty, KeyType::Int | KeyType::Text | KeyType::Bool) {
                return None;
            }
            let mut pins = row.pins.iter().filter(|p| p.pin.column == column.name);
            let (Some(pin), None) = (pins.next(), pins.next()) else {
                return None;
            };
            let ([PinValue::Param { index, .. }], false) = (pin.pin.values.as_slice(), pin.pin.any)
            else {
                return None;
            };
            *covered.get_mut(index.checked_sub(1)?)? = true;
            columns.push((column.name.clone(), ty, *index));
        }
        covered
            .iter()
            .all(|c| *c)
            .then_some(Direct { columns, params })
    }

    fn decide<P: Params>(&self, keys: &[RowKey]) -> Decision<QueryKey<P>> {
        let mut out = Vec::with_capacity(keys.len() * 2);
        'keys: for key in keys {
            let mut values = vec![Value::Null; self.params];
            let mut set = vec![false; self.params];
            for (column, ty, index) in &self.columns {
                let Some(value) = key.get(column).and_then(|v| ty.value(v)) else {
                    return Decision::All; // not comparable: unsure
                };
                let value = canonical(value);
                let i = index - 1;
                if set[i] && values[i] != value {
                    continue 'keys; // `a = $1 AND b = $1` with a ≠ b: read by no parameters
                }
                values[i] = value;
                set[i] = true;
            }
            let Some(params) = P::from_json(values.clone()) else {
                return Decision::All;
            };
            if params.to_json().ok().as_ref() != Some(&values) {
                return Decision::All; // not the tuple a caller would pass
            }
            out.push(QueryKey::new(params.clone(), Read::All));
            out.push(QueryKey::new(params, Read::First));
        }
        Decision::keys(out)
    }
}

/// A key value as the JSON a parameter serializes to.
fn canonical(value: KeyValue) -> Value {
    match value {
        KeyValue::Int(i) => Value::from(i),
        KeyValue::Text(s) | KeyValue::Uuid(s) => Value::String(s),
        KeyValue::Bool(b) => Value::Bool(b),
    }
}

/// The reverse index of an indexed [`QueryStrategy`].
struct Index<P> {
    row: RowLevel,
    base_limit: usize,
    state: Mutex<IndexState<P>>,
}

struct IndexState<P> {
    entries: HashMap<QueryKey<P>, IndexEntry>,
    by_tuple: HashMap<Vec<KeyValue>, HashSet<QueryKey<P>>>,
    wild: HashSet<QueryKey<P>>,
    serial: u64,
    limit: usize,
}

struct IndexEntry {
    /// The parameters as JSON (for [`RowLevel::admits`]).
    params: Vec<Value>,
    /// The pinned key tuples, `None` for a wildcard.
    tuples: Option<Vec<Vec<KeyValue>>>,
    /// Loads of this key in flight (registered, not finished).
    inflight: u32,
    /// Which incarnation (a key removed and registered again is another).
    id: u64,
    /// Changes with every registration (for the sweep).
    touched: u64,
}

/// A key's registration with the index, held while its load runs.
struct Registration<'a, P: Params> {
    index: &'a Index<P>,
    key: QueryKey<P>,
    id: u64,
}

impl<P: Params> Drop for Registration<'_, P> {
    fn drop(&mut self) {
        let mut state = self.index.state.lock();
        if let Some(entry) = state.entries.get_mut(&self.key) {
            if entry.id == self.id {
                entry.inflight = entry.inflight.saturating_sub(1);
            }
        }
    }
}

impl<P: Params> Index<P> {
    fn new(row: RowLevel, capacity: usize) -> Self {
        let base_limit = capacity.saturating_mul(2).saturating_add(64);
        Index {
            row,
            base_limit,
            state: Mutex::new(IndexState {
                entries: HashMap::new(),
                by_tuple: HashMap::new(),
                wild: HashSet::new(),
                serial: 0,
                limit: base_limit,
            }),
        }
    }

    /// Registers a load of `key` (whose parameters are `params`); the second
    /// value says whether the index is due for a sweep.
    fn register(&self, key: &QueryKey<P>, params: Vec<Value>) -> (Registration<'_, P>, bool) {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        state.serial += 1;
        let serial = state.serial;
        let entry = match state.entries.get_mut(key) {
            Some(entry) => entry,
            None => {
                let tuples = pinned_tuples(&self.row, &params);
                match &tuples {
                    Some(tuples) => {
                        for tuple in tuples {
                            state
                                .by_tuple
                                .entry(tuple.clone())
                                .or_default()
                                .insert(key.clone());
                        }
                    }
                    None => {
                        state.wild.insert(key.clone());
                    }
                }
                state.entries.entry(key.clone()).or_insert(IndexEntry {
                    params,
                    tuples,
                    inflight: 0,
                    id: serial,
                    touched: serial,
                })
            }
        };
        entry.inflight += 1;
        entry.touched = serial;
        let id = entry.id;
        let sweep = state.entries.len() > state.limit;
        drop(guard);
        (
            Registration {
                index: self,
                key: key.clone(),
                id,
            },
            sweep,
        )
    }

    /// Removes the keys no longer cached and with no load in flight. Checks
    /// the cache outside the lock (the cache may call back under its own).
    fn sweep(&self, cached: impl Fn(&QueryKey<P>) -> bool, healthy: bool) {
        if !healthy {
            return; // entries are not readable now, yet may be held: keep them
        }
        let candidates: Vec<(QueryKey<P>, u64)> = {
            let state = self.state.lock();
            state
                .entries
                .iter()
                .filter(|(_, e)| e.inflight == 0)
                .map(|(k, e)| (k.clone(), e.touched))
                .collect()
        };
        let gone: Vec<(QueryKey<P>, u64)> =
            candidates.into_iter().filter(|(k, _)| !cached(k)).collect();
        let mut state = self.state.lock();
        for (key, touched) in gone {
            let idle = state
                .entries
                .get(&key)
                .is_some_and(|e| e.inflight == 0 && e.touched == touched);
            if idle {
                state.remove(&key);
            }
        }
        state.limit = self.base_limit.max(state.entries.len().saturating_mul(2));
    }

    /// On `All`: forgets every key with no load in flight (their entries are
    /// flushed; a load in flight may still store, so its key stays).
    fn clear(&self) {
        let mut state = self.state.lock();
        let idle: Vec<QueryKey<P>> = state
            .entries
            .iter()
            .filter(|(_, e)| e.inflight == 0)
            .map(|(k, _)| k.clone())
            .collect();
        if idle.len() == state.entries.len() {
            state.entries.clear();
            state.by_tuple.clear();
            state.wild.clear();
        } else {
            for key in idle {
                state.remove(&key);
            }
        }
    }

    fn decide(&self, row: &RowLevel, keys: &[RowKey]) -> Decision<QueryKey<P>> {
        let tuples: Option<Vec<Vec<KeyValue>>> = keys
            .iter()
            .map(|key| {
                row.key_columns
                    .iter()
                    .map(|c| c.key_type?.value(key.get(&c.name)?))
                    .collect()
            })
            .collect();
        let Some(tuples) = tuples else {
            self.clear();
            return Decision::All; // a key not comparable: every entry may read it
        };
        let mut state = self.state.lock();
        let mut out: Vec<QueryKey<P>> = Vec::new();
        let mut seen: HashSet<&QueryKey<P>> = HashSet::new();
        for (key, tuple) in keys.iter().zip(&tuples) {
            let candidates = state
                .by_tuple
                .get(tuple)
                .into_iter()
                .flatten()
                .chain(state.wild.iter());
            for candidate in candidates {
                let admits = state
                    .entries
                    .get(candidate)
                    .is_none_or(|e| row.admits(&e.params, key));
                if admits && seen.insert(candidate) {
                    out.push(candidate.clone());
                }
            }
        }
        drop(seen);
        for key in &out {
            if state.entries.get(key).is_some_and(|e| e.inflight == 0) {
                state.remove(key);
            }
        }
        Decision::keys(out)
    }
}

impl<P: Params> IndexState<P> {
    fn remove(&mut self, key: &QueryKey<P>) {
        let Some(entry) = self.entries.remove(key) else {
            return;
        };
        match entry.tuples {
            Some(tuples) => {
                for tuple in tuples {
                    if let Some(keys) = self.by_tuple.get_mut(&tuple) {
                        keys.remove(key);
                        if keys.is_empty() {
                            self.by_tuple.remove(&tuple);
                        }
                    }
                }
            }
            None => {
                self.wild.remove(key);
            }
        }
    }
}

/// The key tuples the query with `params` can read (each column's values from
/// its first pin: a superset, refined with [`RowLevel::admits`] per event);
/// `None` when they cannot be enumerated (a wildcard).
fn pinned_tuples(row: &RowLevel, params: &[Value]) -> Option<Vec<Vec<KeyValue>>> {
    let param = |index: usize| index.checked_sub(1).and_then(|i| params.get(i));
    let mut tuples: Vec<Vec<KeyValue>> = vec![Vec::new()];
    for column in &row.key_columns {
        let ty = column.key_type?;
        let pin = row.pins.iter().find(|p| p.pin.column == column.name)?;
        let mut values: Vec<KeyValue> = Vec::new();
        let mut push = |v: &Value| -> Option<()> {
            if !v.is_null() {
                let v = ty.value(v)?;
                if !values.contains(&v) {
                    values.push(v);
                }
            }
            Some(())
        };
        for value in &pin.pin.values {
            match value {
                PinValue::Null => {}
                PinValue::Literal { value, .. } => {
                    if let Some(v) = ty.literal(value)? {
                        push(&canonical(v))?;
                    }
                }
                PinValue::Param { index, .. } => push(param(*index)?)?,
                PinValue::ParamArray { index, .. } => match param(*index)? {
                    Value::Null => {}
                    Value::Array(items) => {
                        for item in items {
                            push(item)?;
                        }
                    }
                    _ => return None,
                },
            }
        }
        if tuples.len().saturating_mul(values.len()) > MAX_TUPLES {
            return None;
        }
        tuples = tuples
            .iter()
            .flat_map(|prefix| {
                values.iter().map(move |v| {
                    let mut t = prefix.clone();
                    t.push(v.clone());
                    t
                })
            })
            .collect();
    }
    Some(tuples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{analyze, derive, Catalog};
    use serde_json::json;

    fn deps(sql: &str, catalog: &Catalog) -> Dependencies {
        derive(&analyze(sql).unwrap(), catalog, &ResolveOptions::new()).unwrap()
    }

    fn users() -> Catalog {
        Catalog::new()
            .table("users", &[("id", KeyType::Int)])
            .table("orgs", &[("id", KeyType::Int)])
            .table("pairs", &[("a", KeyType::Int), ("b", KeyType::Text)])
    }

    fn strategy<P: Params>(deps: Dependencies) -> QueryStrategy<P> {
        let plan = Plan::new(&deps, P::LEN, 100);
        QueryStrategy {
            shared: Arc::new(Shared::new(Current {
                deps: Arc::new(deps),
                plan,
                fingerprint: String::new(),
                epoch: 0,
                loads: AtomicUsize::new(0),
                idle: tokio::sync::Notify::new(),
            })),
        }
    }

    fn event(op: Operation, table: &str, keys: Option<Vec<RowKey>>) -> Event {
        let e = Event::new("ch", op, "public", table);
        match keys {
            Some(k) => e.with_keys(k),
            None => e,
        }
    }

    fn id(i: i64) -> RowKey {
        RowKey::single("id", i)
    }

    #[test]
    fn direct_maps_keys_to_params() {
        let mut s = strategy::<(i64,)>(deps("SELECT * FROM users WHERE id = $1", &users()));
        assert_eq!(s.inverse(), "direct");
        let now = Instant::now();
        let d = s.on_event(&event(Operation::Update, "users", Some(vec![id(7)])), now);
        assert_eq!(
            d,
            Decision::keys([
                QueryKey::new((7,), Read::All),
                QueryKey::new((7,), Read::First)
            ])
        );
        assert_eq!(
            s.on_event(&event(Operation::Update, "orgs", Some(vec![id(7)])), now),
            Decision::Nothing
        );
        assert_eq!(
            s.on_event(&event(Operation::Update, "users", None), now),
            Decision::All
        );
        assert_eq!(
            s.on_event(&event(Operation::Truncate, "users", Some(vec![])), now),
            Decision::All
        );
        assert_eq!(
            s.on_event(&event(Operation::Delete, "users", Some(vec![])), now),
            Decision::Nothing
        );
        // A key that is not an integer: unsure.
        assert_eq!(
            s.on_event(
                &event(
                    Operation::Delete,
                    "users",
                    Some(vec![RowKey::single("id", "x")])
                ),
                now
            ),
            Decision::All
        );
        assert_eq!(s.on_gap(&GapReason::Reconnected, now), Decision::All);
    }

    #[test]
    fn table_level_drops_all_on_its_tables_only() {
        let mut s = strategy::<(i64,)>(deps(
            "SELECT * FROM users u JOIN orgs o ON o.id = u.id WHERE u.id = $1",
            &users(),
        ));
        assert_eq!(s.inverse(), "table-level");
        let now = Instant::now();
        assert_eq!(
            s.on_event(&event(Operation::Insert, "orgs", Some(vec![id(1)])), now),
            Decision::All
        );
        assert_eq!(
            s.on_event(&event(Operation::Insert, "other", None), now),
            Decision::Nothing
        );
    }

    #[test]
    fn indexed_finds_registered_keys_and_forgets_them() {
        let d = deps("SELECT * FROM users WHERE id IN ($1, $2)", &users());
        let mut s = strategy::<(i64, i64)>(d);
        assert_eq!(s.inverse(), "indexed");
        let current = s.shared.current();
        let Plan::Indexed(index) = &current.plan else {
            panic!()
        };
        let key = QueryKey::new((1, 2), Read::First);
        let other = QueryKey::new((3, 4), Read::First);
        drop(index.register(&key, vec![json!(1), json!(2)]));
        drop(index.register(&other, vec![json!(3), json!(4)]));
        let now = Instant::now();
        assert_eq!(
            s.on_event(&event(Operation::Delete, "users", Some(vec![id(5)])), now),
            Decision::Nothing
        );
        assert_eq!(
            s.on_event(&event(Operation::Delete, "users", Some(vec![id(2)])), now),
            Decision::keys([key.clone()])
        );
        // Dropped, and no load in flight: forgotten.
        assert_eq!(
            s.on_event(&event(Operation::Delete, "users", Some(vec![id(1)])), now),
            Decision::Nothing
        );
        // A load in flight keeps its key through an invalidation and an `All`.
        let (registration, _) = index.register(&key, vec![json!(1), json!(2)]);
        assert_eq!(
            s.on_event(&event(Operation::Delete, "users", Some(vec![id(1)])), now),
            Decision::keys([key.clone()])
        );
        assert_eq!(s.on_gap(&GapReason::Reconnected, now), Decision::All);
        drop(registration);
        assert_eq!(
            s.on_event(&event(Operation::Update, "users", Some(vec![id(2)])), now),
            Decision::keys([key.clone()])
        );
        // `other` was forgotten by the gap (its entry was flushed).
        assert_eq!(
            s.on_event(&event(Operation::Update, "users", Some(vec![id(3)])), now),
            Decision::Nothing
        );
    }

    #[test]
    fn indexed_any_and_composite_keys() {
        let mut s =
            strategy::<(Vec<i64>,)>(deps("SELECT * FROM users WHERE id = ANY($1)", &users()));
        let current = s.shared.current();
        let Plan::Indexed(index) = &current.plan else {
            panic!()
        };
        let key = QueryKey::new((vec![1, 2, 3],), Read::All);
        drop(index.register(&key, vec![json!([1, 2, 3])]));
        let now = Instant::now();
        assert_eq!(
            s.on_event(&event(Operation::Insert, "users", Some(vec![id(3)])), now),
            Decision::keys([key])
        );

        let mut s = strategy::<(i64, String)>(deps(
            "SELECT * FROM pairs WHERE a = $1 AND b = $2",
            &users(),
        ));
        assert_eq!(s.inverse(), "direct");
        let mut k = serde_json::Map::new();
        k.insert("a".into(), json!(1));
        k.insert("b".into(), json!("x"));
        assert_eq!(
            s.on_event(
                &event(Operation::Update, "pairs", Some(vec![RowKey(k)])),
                now
            ),
            Decision::keys([
                QueryKey::new((1, "x".to_string()), Read::All),
                QueryKey::new((1, "x".to_string()), Read::First)
            ])
        );
    }

    #[test]
    fn a_parameter_that_is_no_pin_needs_the_index() {
        let mut s = strategy::<(i64, bool)>(deps(
            "SELECT * FROM users WHERE id = $1 AND active = $2",
            &users(),
        ));
        assert_eq!(s.inverse(), "indexed");
        let current = s.shared.current();
        let Plan::Indexed(index) = &current.plan else {
            panic!()
        };
        let key = QueryKey::new((4, true), Read::First);
        drop(index.register(&key, vec![json!(4), json!(true)]));
        assert_eq!(
            s.on_event(
                &event(Operation::Update, "users", Some(vec![id(4)])),
                Instant::now()
            ),
            Decision::keys([key])
        );
    }

    #[test]
    fn the_sweep_keeps_what_is_cached_or_loading() {
        let d = deps("SELECT * FROM users WHERE id IN ($1, $2)", &users());
        let index = Index::<(i64, i64)>::new(
            match d.level() {
                Level::Row(r) => r.clone(),
                _ => panic!(),
            },
            1,
        );
        let keys: Vec<_> = (0..100)
            .map(|i| QueryKey::new((i, i + 1000), Read::First))
            .collect();
        let mut due = false;
        for k in &keys {
            let (_r, sweep) = index.register(k, vec![json!(k.params.0), json!(k.params.1)]);
            due |= sweep;
        }
        assert!(due);
        let (loading, _) = index.register(&keys[1], vec![json!(1), json!(1001)]);
        index.sweep(|k| k.params.0 == 0, true);
        let state = index.state.lock();
        let mut left: Vec<i64> = state.entries.keys().map(|k| k.params.0).collect();
        left.sort();
        assert_eq!(left, vec![0, 1]);
        assert_eq!(state.by_tuple.len(), 4);
        drop(state);
        drop(loading);
    }
}
