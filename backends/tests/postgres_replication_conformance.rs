//! The `EventSource` conformance suite against [`PgReplicationSource`] and the
//! real local PostgreSQL, directly, boxed and arced, as a *lossless* source: an
//! interrupted stream (its walsender terminated) must recover without a gap and
//! deliver what was written meanwhile.
//!
//! The driver emits by inserting a row into a table named after the tag, in a
//! schema published `FOR TABLES IN SCHEMA`; each check gets its own slot.
#![cfg(feature = "replication")]

#[path = "support/replication.rs"]
mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pgcachewatch_backends::replication::PgReplicationSource;
use pgcachewatch_core::{BoxError, EventSource};
use pgcachewatch_testkit::conformance::{
    async_trait, run_all, Capabilities, SourceDriver, SourceHarness,
};
use pgcachewatch_testkit::env::database_url;
use support::{kill_walsender, Fixture};

/// Per-subscriber buffer (a power of two, so the declared bound is exact).
const BUFFER: usize = 32;

struct Driver {
    fixture: Arc<Fixture>,
    created: Arc<Mutex<HashSet<String>>>,
    slot: String,
    source: PgReplicationSource,
}

#[async_trait]
impl SourceDriver for Driver {
    async fn emit(&self, table: &str) -> Result<(), BoxError> {
        let qualified = self.fixture.table(table);
        if !self.created.lock().contains(table) {
            sqlx::query(&format!(
                "CREATE TABLE IF NOT EXISTS {qualified} (id bigserial PRIMARY KEY)"
            ))
            .execute(&self.fixture.db)
            .await?;
            self.created.lock().insert(table.to_owned());
        }
        sqlx::query(&format!("INSERT INTO {qualified} DEFAULT VALUES"))
            .execute(&self.fixture.db)
            .await?;
        Ok(())
    }

    async fn interrupt(&self) -> Result<(), BoxError> {
        if kill_walsender(&self.fixture.db, &self.slot).await {
            Ok(())
        } else {
            Err(format!("no walsender streams from slot {}", self.slot).into())
        }
    }

    async fn shutdown(&self) -> Result<(), BoxError> {
        self.source.shutdown().await;
        Ok(())
    }
}

struct Harness<S> {
    fixture: Arc<Fixture>,
    created: Arc<Mutex<HashSet<String>>>,
    wrap: fn(PgReplicationSource) -> S,
}

#[async_trait]
impl<S: EventSource> SourceHarness for Harness<S> {
    type Source = S;
    type Driver = Driver;

    async fn fresh(&self) -> Result<(S, Driver), BoxError> {
        // The previous check's source is shut down: free its slot.
        self.fixture.drop_slots().await;
        let slot = self.fixture.slot();
        let source = PgReplicationSource::builder(database_url())
            .slot(&slot)
            .publication(&self.fixture.publication)
            .create_slot_if_missing(true)
            .buffer(BUFFER)
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(500))
            .connect()
            .await?;
        let driver = Driver {
            fixture: self.fixture.clone(),
            created: self.created.clone(),
            slot,
            source: source.clone(),
        };
        Ok(((self.wrap)(source), driver))
    }
}

fn caps() -> Capabilities {
    Capabilities::new()
        .lag_buffer(BUFFER)
        .interrupt_rounds(3)
        .lossless()
        .delivery_timeout(Duration::from_secs(30))
}

/// Every tag the suite emits, so the tables exist before any check starts: DDL
/// during a check would add `Progress` signals (the slot passes its WAL) to the
/// subscribers' buffers.
fn tags(caps: &Capabilities) -> Vec<String> {
    let mut tags: Vec<String> = ["health_first", "before", "after", "last"]
        .map(String::from)
        .into();
    for i in 0..caps.events {
        tags.push(format!("t{i}"));
        tags.push(format!("f{i}"));
    }
    for i in 0..BUFFER * 2 + 8 {
        tags.push(format!("l{i}"));
    }
    for round in 0..caps.interrupt_rounds {
        for what in ["before", "during", "after"] {
            tags.push(format!("{what}{round}"));
        }
    }
    tags
}

async fn conforms<S: EventSource>(prefix: &str, wrap: fn(PgReplicationSource) -> S) {
    let fixture = Fixture::new(prefix).await;
    let created: Arc<Mutex<HashSet<String>>> = Arc::default();
    for tag in tags(&caps()) {
        fixture
            .exec(&format!(
                "CREATE TABLE {} (id bigserial PRIMARY KEY)",
                fixture.table(&tag)
            ))
            .await;
        created.lock().insert(tag);
    }
    let harness = Harness {
        fixture: Arc::new(fixture),
        created,
        wrap,
    };
    run_all(&harness, &caps()).await;
    harness.fixture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_replication_source_conforms() {
    conforms("pgcw_rconf", |s| s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_replication_source_conforms_boxed() {
    conforms("pgcw_rconfb", |s| -> Box<dyn EventSource> { Box::new(s) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_replication_source_conforms_arced() {
    conforms("pgcw_rconfa", |s| -> Arc<dyn EventSource> { Arc::new(s) }).await;
}
