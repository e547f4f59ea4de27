//! The `EventSource` conformance suite (pgcachewatch-testkit) against
//! [`PgListenerSource`] and the real local PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`): directly, through
//! `Box<dyn EventSource>` and through `Arc<dyn EventSource>`.
//!
//! The driver emits with `pg_notify`, interrupts with `pg_terminate_backend` on
//! the listener's own backend, and shuts the source down.
#![cfg(feature = "postgres")]

use std::sync::Arc;

use pgcachewatch_backends::postgres::listener::PgListenerSource;
use pgcachewatch_core::{BoxError, EventSource};
use pgcachewatch_testkit::conformance::{
    async_trait, run_all, Capabilities, SourceDriver, SourceHarness,
};
use pgcachewatch_testkit::env::database_url;
use sqlx::postgres::{PgPool, PgPoolOptions};

/// Per-subscriber buffer of every source built here (a power of two, so the
/// declared bound is exact).
const BUFFER: usize = 16;

struct Driver {
    db: PgPool,
    channel: String,
    source: PgListenerSource,
}

#[async_trait]
impl SourceDriver for Driver {
    async fn emit(&self, table: &str) -> Result<(), BoxError> {
        sqlx::query(
            "SELECT pg_notify($1, json_build_object('operation', 'insert', 'schema', 'public', \
             'table', $2::text, 'sent_at', clock_timestamp(), 'txid', txid_current())::text)",
        )
        .bind(&self.channel)
        .bind(table)
        .execute(&self.db)
        .await?;
        Ok(())
    }

    async fn interrupt(&self) -> Result<(), BoxError> {
        let pid = self
            .source
            .stats()
            .backend_pid
            .ok_or("the listener is not connected")?;
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(i32::try_from(pid)?)
            .fetch_one(&self.db)
            .await?;
        if killed {
            Ok(())
        } else {
            Err(format!("backend {pid} was not terminated").into())
        }
    }

    async fn shutdown(&self) -> Result<(), BoxError> {
        self.source.shutdown().await;
        Ok(())
    }
}

/// Builds a fresh source on its own channel, handed to the suite as `S`.
struct Harness<S> {
    db: PgPool,
    wrap: fn(PgListenerSource) -> S,
}

impl<S> Harness<S> {
    async fn new(wrap: fn(PgListenerSource) -> S) -> Self {
        let db = PgPoolOptions::new()
            .max_connections(2)
            .connect(&database_url())
            .await
            .expect("PostgreSQL must be running at DATABASE_URL");
        Harness { db, wrap }
    }
}

#[async_trait]
impl<S: EventSource> SourceHarness for Harness<S> {
    type Source = S;
    type Driver = Driver;

    async fn fresh(&self) -> Result<(S, Driver), BoxError> {
        let channel = format!(
            "pgcw_conf_{}_{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let source = PgListenerSource::builder(database_url())
            .channel(&channel)
            .buffer(BUFFER)
            .reconnect_backoff(
                std::time::Duration::from_millis(20),
                std::time::Duration::from_millis(500),
            )
            .connect()
            .await?;
        let driver = Driver {
            db: self.db.clone(),
            channel,
            source: source.clone(),
        };
        Ok(((self.wrap)(source), driver))
    }
}

fn caps() -> Capabilities {
    Capabilities::new().lag_buffer(BUFFER).interrupt_rounds(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_listener_source_conforms() {
    run_all(&Harness::new(|s| s).await, &caps()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_listener_source_conforms_boxed() {
    let boxed = |s: PgListenerSource| -> Box<dyn EventSource> { Box::new(s) };
    run_all(&Harness::new(boxed).await, &caps()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_listener_source_conforms_arced() {
    let arced = |s: PgListenerSource| -> Arc<dyn EventSource> { Arc::new(s) };
    run_all(&Harness::new(arced).await, &caps()).await;
}
