//! # pgcachewatch-query
//!
//! Derives what a cached SQL query depends on from its text, so that nobody has
//! to write (and keep right) a strategy by hand: **row-level** where that is
//! provably sound, **table-level** on every base table the query can read
//! everywhere else, and a **refusal** where no event would ever tell a cache
//! that the result changed.
//!
//! ```text
//!  SQL ──analyze──▶ Analysis ──resolve(conn)──▶ Dependencies ──affects(params, event)──▶ bool
//!      (pure: PostgreSQL's   (names, kinds, keys,  (row-level on public.users(id) from $1,
//!       parser, no I/O)       views, partitions,    or table-level on …: reason)
//!                             generic plan)
//!               └──────derive(catalog)──────┘ (pure: the same decision from facts given by hand)
//! ```
//!
//! * [`analyze`] reads one statement with PostgreSQL's own parser: the base
//!   relations it can read (FROM, JOINs, `JOIN … ON` subqueries, subqueries in
//!   the select list, `WHERE`, function arguments, CTE bodies — CTE names scoped,
//!   so a CTE never stands for a real table — and set operations), the functions
//!   and operators it calls, and whether it is a row-level candidate (its
//!   [`Shape`]). It refuses what cannot be cached (see [`QueryError`]).
//! * [`resolve`] (feature `postgres`) checks that against the server: names
//!   through the connection's `search_path`, relation kinds, views expanded to
//!   their base tables (through `pg_depend`, recursively), partitioned tables to
//!   their root and partitions, primary keys, the volatility and origin of every
//!   function and operator, row security; and it cross-checks the relations with
//!   those of the statement's generic plan. [`derive`](crate::derive()) is the same decision from a
//!   [`Catalog`] given by hand.
//! * [`Dependencies::affects`] is the predicate an invalidation strategy needs:
//!   may this event change the result of the query run with these parameters?
//!
//! ## Where it is used
//!
//! * [`CachedQuery`] (feature `postgres`): a cache over one statement, for SQL
//!   built at run time; the user writes SQL and parameters, the key, the
//!   dependencies and the strategy follow.
//! * `#[pgcachewatch::cached(query = "SELECT …")]` (the facade's feature
//!   `query`): the same for SQL written in the source, read by [`analyze`] at
//!   compile time, so a refusal is a compile error.
//! * `pgcachewatch explain "SQL"` (the CLI): [`Dependencies::explain`] for a
//!   statement, resolved on a server; `--strict` fails on a fall-back.
//! * [`audit`]: the tables a hand-written rule (`#[cached(tables = [...])]`)
//!   leaves out.
//!
//! ## Row-level, and why it is sound
//!
//! A query is row-level only when it reads exactly one plain (or partitioned)
//! table — no join, subquery, CTE or set operation — and the top-level
//! conjunction of its `WHERE` pins every primary-key column with `=`, `IN (…)` or
//! `= ANY(…)` to parameters or literals of the column's own type. Other conjuncts
//! may narrow the rows further. Then a row can reach the result only if its key
//! passes the pins, and every write of a row produces an event carrying that row's
//! key (for an `UPDATE`, old and new), so a write to any other row cannot change
//! the result, and a write to a passing row is always seen.
//!
//! **Aggregates, `GROUP BY`, `HAVING`, window functions, `DISTINCT`, `ORDER BY`
//! and `LIMIT` stay row-level** when the `WHERE` pins the key: they are computed
//! from the rows the `WHERE` lets through, which are exactly the pinned ones.
//! `SELECT count(*) FROM users WHERE id = $1` (0 when the user is missing) is
//! dropped by the insert of that user, whose event carries its key.
//!
//! Key types are limited to those whose `=` is equality of the values events
//! carry ([`KeyType`]); a filter on a non-key column is never a pin, since
//! events carry only the key (no source here sends a row's old and new values of
//! other columns).
//!
//! ## The parser: `pg_query`, chosen by measurement
//!
//! Both candidates were built and run here (2 cores, Rust 1.95, a machine shared
//! with other builds, so the processor times are the figures to compare):
//!
//! | | `sqlparser` 0.64 (`PostgreSqlDialect`) | `pg_query` 18.1 (libpg_query) |
//! |---|---|---|
//! | clean debug build, processor time | 30 s user + 4 s sys | 78 s user + 13 s sys |
//! | build needs | nothing but Rust | a C compiler and **libclang** (bindgen): Debian `libclang-dev`; without it the build fails |
//! | target directory | 180 MB | 415 MB |
//! | 254-statement corpus of `WHERE` clauses: accepted where PostgreSQL rejects | 25 | 0 (it is PostgreSQL's grammar) |
//! | rejected where PostgreSQL accepts | 7 (`ISNULL`, `IS DOCUMENT`, `VARIADIC`, `BETWEEN SYMMETRIC`, `AT LOCAL`, `XMLELEMENT`, a `*=` operator) | 0 |
//! | accepted by both, read differently | 3: `- a ^ 2` as `-(a ^ 2)` (PostgreSQL: `(-a) ^ 2`), `-2 ^ 2` likewise, and **`b == 2` read as `b = 2`** (PostgreSQL: the operator `==`, which a user may define) | — |
//!
//! A misread `WHERE` would make row-level unsound, and `==` is exactly such a
//! misreading: `id == $1` would become a pin on `id` through an operator that may
//! mean anything. The remaining differences are the kind nobody can enumerate in
//! advance, while `pg_query` is, by construction, what the server runs. So this
//! crate uses `pg_query` and pays for it at build time: about 2.6 times the
//! processor time of `sqlparser`, and libclang on every machine that builds it
//! (install `libclang-dev` on Debian and Ubuntu, `clang-devel` on Fedora).
//! Its grammar is PostgreSQL 18's; a statement only an older server rejects is
//! rejected by that server when [`resolve`] prepares it.
//!
//! The tree is walked generically (every node of every kind is visited), with
//! only `SELECT`s, `WITH`, table references and a few expression kinds read
//! specifically, so a node kind the walk does not know still has its tables
//! found. pg_query's own table list is not used: it drops a table whose name is
//! also a CTE name anywhere (`WITH f AS (SELECT * FROM f) SELECT * FROM f` has
//! no tables there). Whatever the parser cannot read with certainty is never a
//! pin: a query whose `WHERE` holds anything but the pin shapes above in its
//! top-level `AND` still counts only its pins, and a query without pins on the
//! whole key is table-level.
//!
//! ## Functions
//!
//! [`analyze`] refuses by name the built-ins whose result moves without a write
//! (`now()`, `random()`, `nextval()`, `CURRENT_TIMESTAMP`, `'now'::date`, …),
//! those that depend on the session (`current_user`, `current_setting()`,
//! privilege checks: what row security reads), and those that read what sends
//! no events (large objects, files, `query_to_xml`). [`resolve`] then looks up
//! every function and operator the query names on the server: a volatile one
//! (`pg_proc.provolatile = 'v'`) is refused; so is one that is not built in and
//! not immutable (a user's function may read any table, and its reads are
//! unknown). An immutable user function is accepted: immutability promises it
//! reads no table. Declaring the tables yourself is the way out of every
//! refusal.
//!
//! An immutable function that does read a table (PostgreSQL takes the
//! declaration on trust too) is caught only where the planner inlines it: the
//! plan then scans that table, and the larger set wins.
//!
//! ## Using it from a cache
//!
//! Derive once per statement, not per call: [`analyze`] where the SQL is known
//! (at compile time for SQL written in the source), [`resolve`] when the cache is
//! attached to a connection. A cached query's entries are keyed by the statement
//! and its parameter values (and [`Dependencies::resolution_key`] where one cache
//! serves connections with different `search_path`s). On each event:
//!
//! * table-level: drop the entries of the statement when
//!   [`Dependencies::affects`] says so (it looks only at the table), or tag the
//!   entries with [`Dependencies::tables`] and drop by table;
//! * row-level: [`RowLevel::row_params`] turns a row's key into the parameter
//!   values of the entries that read it when every key column is pinned by one
//!   `= $n` (an index lookup); otherwise ask [`Dependencies::affects`] of each
//!   entry's parameters.
//!
//! Gaps drop everything, as with every strategy.
//!
//! DDL produces no events: a view replaced to read another table, a partition
//! attached, a table created earlier on the `search_path`. [`CachedQuery`]
//! resolves its statement again after every gap, every
//! [`recheck_every`](CachedQueryBuilder::recheck_every) (30 s by default) and on
//! [`CachedQuery::recheck`], and flushes its entries when the dependencies or
//! the catalog rows behind them changed; see [`CachedQuery::recheck`] for the
//! mechanism and its bound.
//!
//! ## What is left to the cache
//!
//! Results that depend on session settings other than `search_path` (`TimeZone`
//! and `DateStyle` change how time stamps print) are assumed to be read under one
//! setting. The `search_path` is part of what [`resolve`] records
//! ([`Dependencies::resolution_key`]) so that a cache key can include it.

#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod analyze;
pub mod audit;
#[cfg(feature = "postgres")]
mod cached;
mod catalog;
mod deps;
mod error;
mod pins;
#[cfg(feature = "postgres")]
mod server;

pub use analyze::{analyze, Analysis, RelationName, RoutineName, RowCandidate, Shape};
#[cfg(feature = "postgres")]
pub use cached::{
    AttachedQuery, CachedQuery, CachedQueryBuilder, CachedQueryError, Param, Params, QueryKey,
    QueryStrategy, Read, Rows,
};
pub use catalog::{Catalog, KeyColumn, KeyType, KeyValue, RelationKind, ResolvedRelation};
pub use deps::{derive, Dependencies, KeyPin, Level, ResolveOptions, RowLevel, TableLevel};
pub use error::{QueryError, WAY_OUT};
pub use pins::{Literal, Pin, PinValue, TypeName};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use server::{resolve, resolve_with};
