//! What the replication tests share: unique names, a schema + publication per
//! test, killing a walsender, and cleaning up slots.
#![allow(dead_code)]

use std::time::Duration;

use pgcachewatch_testkit::env::database_url;
use sqlx::postgres::{PgPool, PgPoolOptions};

/// A lower-case name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

pub async fn db() -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .connect(&database_url())
        .await
        .expect("PostgreSQL must be running at DATABASE_URL")
}

/// A schema of its own with a publication of every table in it (PostgreSQL 15's
/// `FOR TABLES IN SCHEMA`, so tables created later are published too), and the
/// slots the test made, dropped by [`Fixture::cleanup`].
pub struct Fixture {
    pub db: PgPool,
    pub schema: String,
    pub publication: String,
    pub slots: parking_lot::Mutex<Vec<String>>,
}

impl Fixture {
    pub async fn new(prefix: &str) -> Fixture {
        let db = db().await;
        sweep_dead_slots(&db).await;
        sweep_dead_fixtures(&db).await;
        let schema = unique(prefix);
        let publication = format!("{schema}_pub");
        sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
            .execute(&db)
            .await
            .unwrap();
        sqlx::query(&format!(
            "CREATE PUBLICATION \"{publication}\" FOR TABLES IN SCHEMA \"{schema}\""
        ))
        .execute(&db)
        .await
        .unwrap();
        Fixture {
            db,
            schema,
            publication,
            slots: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// Drops the slots made so far (their sources must be shut down): the
    /// server has few slots (`max_replication_slots`) and tests run in parallel.
    pub async fn drop_slots(&self) {
        let slots = std::mem::take(&mut *self.slots.lock());
        for slot in slots {
            drop_slot(&self.db, &slot).await;
        }
    }

    /// A new slot name, dropped at cleanup.
    pub fn slot(&self) -> String {
        let name = unique("pgcw_slot");
        self.slots.lock().push(name.clone());
        name
    }

    /// `"schema"."table"`.
    pub fn table(&self, table: &str) -> String {
        format!("\"{}\".\"{table}\"", self.schema)
    }

    pub async fn exec(&self, sql: &str) {
        sqlx::query(sql)
            .execute(&self.db)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Drops the slots, the publication and the schema.
    pub async fn cleanup(&self) {
        let slots = self.slots.lock().clone();
        for slot in slots {
            drop_slot(&self.db, &slot).await;
        }
        let _ = sqlx::query(&format!(
            "DROP PUBLICATION IF EXISTS \"{}\"",
            self.publication
        ))
        .execute(&self.db)
        .await;
        let _ = sqlx::query(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        ))
        .execute(&self.db)
        .await;
    }
}

/// Drops the inactive test slots (`pgcw_slot_<pid>_…`) of test processes that
/// are gone (a test that panicked leaves its slots behind).
pub async fn sweep_dead_slots(db: &PgPool) {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT slot_name::text FROM pg_replication_slots \
         WHERE slot_name LIKE 'pgcw\\_slot\\_%' AND active_pid IS NULL",
    )
    .fetch_all(db)
    .await
    .unwrap_or_default();
    for name in names {
        let pid = name.split('_').nth(2).unwrap_or_default();
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(&name)
                .execute(db)
                .await;
        }
    }
}

/// The pid in a name made by [`unique`] (`prefix_<pid>_<hex>[_pub]`), if that
/// process is gone.
fn dead_pid(name: &str) -> bool {
    let name = name.strip_suffix("_pub").unwrap_or(name);
    let mut parts = name.rsplitn(3, '_');
    let (_hex, pid) = (parts.next(), parts.next());
    pid.and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
}

/// Drops the schemas and publications of test processes that are gone.
pub async fn sweep_dead_fixtures(db: &PgPool) {
    let publications: Vec<String> = sqlx::query_scalar(
        "SELECT pubname::text FROM pg_publication WHERE pubname LIKE 'pgcw\\_%'",
    )
    .fetch_all(db)
    .await
    .unwrap_or_default();
    for name in publications.into_iter().filter(|n| dead_pid(n)) {
        let _ = sqlx::query(&format!("DROP PUBLICATION IF EXISTS \"{name}\""))
            .execute(db)
            .await;
    }
    let schemas: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'pgcw\\_r%'")
            .fetch_all(db)
            .await
            .unwrap_or_default();
    for name in schemas.into_iter().filter(|n| dead_pid(n)) {
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
            .execute(db)
            .await;
    }
}

/// The server's WAL insert position now.
pub async fn wal_position(db: &PgPool) -> pgcachewatch_core::Lsn {
    let text: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(db)
        .await
        .expect("pg_current_wal_lsn");
    text.parse().expect("an LSN")
}

/// Drops `slot`, killing its walsender if one is still attached.
pub async fn drop_slot(db: &PgPool, slot: &str) {
    for _ in 0..100 {
        let _ = kill_walsender(db, slot).await;
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NULL",
        )
        .bind(slot)
        .execute(db)
        .await;
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
        )
        .bind(slot)
        .fetch_one(db)
        .await
        .unwrap_or(true);
        if dropped.is_ok() && !exists {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not drop replication slot {slot}");
}

/// Terminates the walsender streaming from `slot`; whether there was one.
pub async fn kill_walsender(db: &PgPool, slot: &str) -> bool {
    sqlx::query_scalar::<_, bool>(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
         WHERE slot_name = $1 AND active_pid IS NOT NULL",
    )
    .bind(slot)
    .fetch_optional(db)
    .await
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Waits (up to 10 s) until no walsender holds `slot`: a shut-down source's
/// server process lets go of its slot a moment after the connection closes.
pub async fn wait_slot_released(db: &PgPool, slot: &str) {
    for _ in 0..200 {
        let active: Option<bool> =
            sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot)
                .fetch_optional(db)
                .await
                .expect("pg_replication_slots");
        if active != Some(true) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("slot {slot} still active 10 s after its source shut down");
}
