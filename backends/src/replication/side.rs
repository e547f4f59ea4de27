//! The source's side connection: a plain session beside the replication
//! stream, for what the stream does not say.
//!
//! * **Visibility.** `pg_current_snapshot()`, so a commit is announced only once
//!   other sessions can see it (see [`visibility`](super::visibility)).
//! * **Keys and names.** For each relation the stream describes: its partition
//!   root (events name the table the user watches, even when the publication
//!   streams partitions) and its primary key from `pg_index` (pgoutput flags
//!   the *replica identity*, which `REPLICA IDENTITY USING INDEX` or `FULL`
//!   make something else).
//! * **Publication membership**, so a watched table that leaves the publication
//!   is not silent.
//!
//! The connection is opened when first needed and dropped on any error; the
//! task then ends its session (nothing was announced on an unanswered question)
//! and reconnects both.

use pgcachewatch_core::Lsn;
use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Row};

use super::visibility::{BadSnapshot, Snapshot};

/// What the catalog says of one streamed relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableInfo {
    /// The table events name: the relation itself, or its partition root.
    pub(crate) schema: String,
    pub(crate) name: String,
    /// Primary-key columns in key order, each with the type `to_jsonb` sees
    /// (a domain's base type); empty when the table has none.
    pub(crate) primary_key: Vec<(String, u32)>,
}

/// Why a side query failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SideError {
    #[error("the source's side connection failed: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("the source's side connection did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Snapshot(#[from] BadSnapshot),
}

/// A lazily opened plain connection; see the module docs.
pub(crate) struct SideConnection {
    options: PgConnectOptions,
    timeout: Duration,
    conn: Option<PgConnection>,
}

/// The relation's partition root (itself when it is none) and that root's
/// primary key, in key order, with each column's (base) type.
const DESCRIBE: &str = "\
SELECT n.nspname::text, c.relname::text,
       coalesce(key.names, '{}'), coalesce(key.types, '{}')
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN LATERAL (
       SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord) AS names,
              pg_catalog.array_agg((CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END)::pg_catalog.int8
                                   ORDER BY k.ord) AS types
         FROM pg_catalog.pg_index i
        CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::pg_catalog.int2[])
              WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
        WHERE i.indrelid = c.oid AND i.indisprimary) key ON true
 WHERE c.oid = coalesce(pg_catalog.pg_partition_root($1::pg_catalog.oid::pg_catalog.regclass),
                        $1::pg_catalog.oid::pg_catalog.regclass)";

impl SideConnection {
    pub(crate) fn new(options: PgConnectOptions, timeout: Duration) -> Self {
        SideConnection {
            options,
            timeout,
            conn: None,
        }
    }

    /// Runs `f` on the connection (opening it first if needed) within the
    /// timeout; drops the connection on any failure.
    async fn with<T>(
        &mut self,
        f: impl for<'c> FnOnce(
            &'c mut PgConnection,
        ) -> futures::future::BoxFuture<'c, Result<T, SideError>>,
    ) -> Result<T, SideError> {
        let timeout = self.timeout;
        let options = &self.options;
        let slot = &mut self.conn;
        let result = tokio::time::timeout(timeout, async move {
            if slot.is_none() {
                *slot = Some(PgConnection::connect_with(options).await?);
            }
            match slot.as_mut() {
                Some(conn) => f(conn).await,
                None => Err(SideError::Timeout(timeout)),
            }
        })
        .await
        .unwrap_or(Err(SideError::Timeout(timeout)));
        if result.is_err() {
            // A query cut off mid-way leaves the session in an unknown state.
            self.conn = None;
        }
        result
    }

    /// A snapshot taken now, as a new session would.
    /// The server's WAL flush position now (what `IDENTIFY_SYSTEM` reports).
    pub(crate) async fn wal_flush_position(&mut self) -> Result<Lsn, SideError> {
        self.with(|conn| {
            Box::pin(async move {
                let at: i64 = sqlx::query_scalar(
                    "SELECT (pg_catalog.pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint",
                )
                .fetch_one(conn)
                .await?;
                Ok(Lsn(at.max(0) as u64))
            })
        })
        .await
    }

    pub(crate) async fn snapshot(&mut self) -> Result<Snapshot, SideError> {
        self.with(|conn| {
            Box::pin(async move {
                let text: String =
                    sqlx::query_scalar("SELECT pg_catalog.pg_current_snapshot()::text")
                        .fetch_one(conn)
                        .await?;
                Ok(Snapshot::parse(&text)?.normalized())
            })
        })
        .await
    }

    /// The table events of relation `oid` name, and its primary key; `None`
    /// when the relation no longer exists.
    pub(crate) async fn describe(&mut self, oid: u32) -> Result<Option<TableInfo>, SideError> {
        self.with(|conn| {
            Box::pin(async move {
                let row = sqlx::query(DESCRIBE)
                    .bind(i64::from(oid))
                    .fetch_optional(conn)
                    .await?;
                let Some(row) = row else {
                    return Ok(None);
                };
                let names: Vec<String> = row.try_get(2)?;
                let types: Vec<i64> = row.try_get(3)?;
                Ok(Some(TableInfo {
                    schema: row.try_get(0)?,
                    name: row.try_get(1)?,
                    primary_key: names
                        .into_iter()
                        .zip(types)
                        .map(|(name, t)| (name, u32::try_from(t).unwrap_or(0)))
                        .collect(),
                }))
            })
        })
        .await
    }

    /// The tables of `publication` (`schema.table`, as PostgreSQL names them).
    pub(crate) async fn published_tables(
        &mut self,
        publication: &str,
    ) -> Result<BTreeSet<String>, SideError> {
        let publication = publication.to_owned();
        self.with(|conn| {
            Box::pin(async move {
                let rows: Vec<(String, String)> = sqlx::query_as(
                    "SELECT schemaname::text, tablename::text FROM pg_catalog.pg_publication_tables \
                     WHERE pubname = $1",
                )
                .bind(publication)
                .fetch_all(conn)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(schema, table)| format!("{schema}.{table}"))
                    .collect())
            })
        })
        .await
    }
}
