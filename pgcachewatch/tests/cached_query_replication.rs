//! A cached query fed by the logical-replication source (features `query` and
//! `replication`), against the real PostgreSQL (`DATABASE_URL`, `wal_level =
//! logical`): row-level by the keys pgoutput carries (old and new for an
//! `UPDATE` that moves a key), table-level for a join, read-your-writes by
//! commit position. The same `CachedQuery` as over LISTEN: the source is the
//! only difference. With feature `nats` too, the same through a NATS JetStream
//! relay (`NATS_URL`): the query's dispatcher reads a `NatsSource`.
#![cfg(all(feature = "query", feature = "replication"))]

use std::time::Duration;

use pgcachewatch::query::CachedQuery;
use pgcachewatch::replication::PgReplicationSource;
use pgcachewatch::{Health, Lsn};
use pgcachewatch_testkit::env::{database_url, unique_name};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct User {
    id: i64,
    name: String,
}

async fn position(pool: &PgPool) -> Lsn {
    let text: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await
        .expect("position");
    text.parse().expect("an LSN")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_query_over_the_replication_source_is_row_level_and_fresh() {
    let schema = unique_name("pgcw_cqr");
    let publication = format!("{schema}_pub");
    let slot = format!("{schema}_slot");
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url())
        .await
        .expect("PostgreSQL at DATABASE_URL");
    admin
        .execute(
            format!(
                "CREATE SCHEMA {schema};
                 CREATE TABLE {schema}.orgs (id int8 PRIMARY KEY, name text NOT NULL);
                 CREATE TABLE {schema}.users (id int8 PRIMARY KEY, org_id int8 NOT NULL, name text NOT NULL);
                 INSERT INTO {schema}.orgs VALUES (1, 'acme');
                 INSERT INTO {schema}.users VALUES (1, 1, 'ann'), (2, 1, 'bob');
                 CREATE PUBLICATION {publication} FOR TABLES IN SCHEMA {schema};"
            )
            .as_str(),
        )
        .await
        .expect("setup");
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run(
        schema.clone(),
        publication.clone(),
        slot.clone(),
    )))
    .await;
    let _ = sqlx::query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active")
        .bind(&slot)
        .execute(&admin)
        .await;
    admin
        .execute(
            format!("DROP PUBLICATION IF EXISTS {publication}; DROP SCHEMA {schema} CASCADE")
                .as_str(),
        )
        .await
        .expect("clean-up");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e);
    }
}

async fn run(schema: String, publication: String, slot: String) {
    // Every session of the pool reads the test's schema first (a startup option).
    let options = database_url()
        .parse::<PgConnectOptions>()
        .expect("DATABASE_URL")
        .options([("search_path", schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("pool");
    let source = PgReplicationSource::builder(database_url())
        .slot(&slot)
        .publication(&publication)
        .create_slot_if_missing(true)
        .connect()
        .await
        .expect("replication source");
    let mut health = pgcachewatch::EventSource::subscribe(&source);

    let user = CachedQuery::<(i64,), User>::new("SELECT id, name FROM users WHERE id = $1");
    let both = CachedQuery::<(i64,), (String, String)>::new(
        "SELECT u.name, o.name FROM users u JOIN orgs o ON o.id = u.org_id WHERE u.id = $1",
    );
    let a = user.attach(&pool, &source).await.expect("attach");
    let b = both.attach(&pool, &source).await.expect("attach");
    assert_eq!(
        user.explain().unwrap(),
        format!("row-level on {schema}.users(id) from $1")
    );
    assert!(both.explain().unwrap().ends_with(": join"));
    // Healthy: the slot streams.
    loop {
        match tokio::time::timeout(Duration::from_secs(60), health.recv()).await {
            Ok(Some(pgcachewatch::Signal::Health(Health::Healthy))) => break,
            Ok(Some(_)) => continue,
            other => panic!("the replication source is not healthy: {other:?}"),
        }
    }
    drop(health);
    let applied = |lsn: Lsn| {
        let (a, b) = (a.dispatcher(), b.dispatcher());
        async move {
            a.wait_for_lsn(lsn, Duration::from_secs(30))
                .await
                .expect("applied");
            b.wait_for_lsn(lsn, Duration::from_secs(30))
                .await
                .expect("applied");
        }
    };
    let write = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(sql).execute(&pool).await.expect(sql);
            position(&pool).await
        }
    };

    assert_eq!(user.fetch_one((1,)).await.unwrap().name, "ann");
    assert_eq!(user.fetch_one((2,)).await.unwrap().name, "bob");
    assert_eq!(user.fetch_optional((3,)).await.unwrap(), None);
    assert_eq!(both.fetch_one((1,)).await.unwrap().1, "acme");
    let loads = user.stats().loads;

    // Row-level: user 1 written, user 2 stays cached.
    applied(write("UPDATE users SET name = 'ann 2' WHERE id = 1").await).await;
    assert_eq!(user.fetch_one((1,)).await.unwrap().name, "ann 2");
    assert_eq!(user.fetch_one((2,)).await.unwrap().name, "bob");
    assert_eq!(user.stats().loads, loads + 1);
    // A key moved by UPDATE: the cached "not found" of the new key is dropped.
    applied(write("UPDATE users SET id = 3 WHERE id = 2").await).await;
    assert_eq!(user.fetch_optional((2,)).await.unwrap(), None);
    assert_eq!(user.fetch_one((3,)).await.unwrap().name, "bob");
    // Table-level: a write to orgs drops the join's entries.
    applied(write("UPDATE orgs SET name = 'acme 2' WHERE id = 1").await).await;
    assert_eq!(both.fetch_one((1,)).await.unwrap().1, "acme 2");

    a.shutdown().await;
    b.shutdown().await;
    source.shutdown().await;
}

/// The same queries through NATS: a relay publishes the slot's events to a
/// JetStream stream of the test's own; the cached queries read a `NatsSource`.
#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_query_over_a_nats_relay_is_row_level_and_fresh() {
    use pgcachewatch::nats::{NatsConnect, NatsSource, Relay, StreamSettings};
    use pgcachewatch_testkit::env::nats_url;

    let schema = unique_name("pgcw_cqn");
    let publication = format!("{schema}_pub");
    let slot = format!("{schema}_slot");
    let stream = StreamSettings::new()
        .stream(schema.to_uppercase())
        .subject_prefix(schema.clone())
        .memory(true);
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url())
        .await
        .expect("PostgreSQL at DATABASE_URL");
    admin
        .execute(
            format!(
                "CREATE SCHEMA {schema};
                 CREATE TABLE {schema}.users (id int8 PRIMARY KEY, name text NOT NULL);
                 INSERT INTO {schema}.users VALUES (1, 'ann'), (2, 'bob');
                 CREATE PUBLICATION {publication} FOR TABLES IN SCHEMA {schema};"
            )
            .as_str(),
        )
        .await
        .expect("setup");
    let body = async {
        // Every session of the pool reads the test's schema first (a startup option).
        let options = database_url()
            .parse::<PgConnectOptions>()
            .expect("DATABASE_URL")
            .options([("search_path", schema.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("pool");
        let slot_source = PgReplicationSource::builder(database_url())
            .slot(&slot)
            .publication(&publication)
            .create_slot_if_missing(true)
            .connect()
            .await
            .expect("replication source");
        let relay = Relay::builder(NatsConnect::new(nats_url()))
            .stream(stream.clone())
            .heartbeat_interval(Duration::from_millis(100))
            .start(&slot_source)
            .await
            .expect("relay");
        let source = NatsSource::builder(NatsConnect::new(nats_url()))
            .stream(stream.clone())
            .connect()
            .await
            .expect("NatsSource");
        let mut health = pgcachewatch::EventSource::subscribe(&source);
        let user = CachedQuery::<(i64,), User>::new("SELECT id, name FROM users WHERE id = $1");
        let attached = user.attach(&pool, &source).await.expect("attach");
        loop {
            match tokio::time::timeout(Duration::from_secs(60), health.recv()).await {
                Ok(Some(pgcachewatch::Signal::Health(Health::Healthy))) => break,
                Ok(Some(_)) => continue,
                other => panic!("the NATS source is not healthy: {other:?}"),
            }
        }
        drop(health);
        assert_eq!(user.fetch_one((1,)).await.unwrap().name, "ann");
        assert_eq!(user.fetch_one((2,)).await.unwrap().name, "bob");
        let loads = user.stats().loads;
        sqlx::query("UPDATE users SET name = 'ann 2' WHERE id = 1")
            .execute(&pool)
            .await
            .unwrap();
        attached
            .dispatcher()
            .wait_for_lsn(position(&pool).await, Duration::from_secs(30))
            .await
            .expect("applied through NATS");
        assert_eq!(user.fetch_one((1,)).await.unwrap().name, "ann 2");
        assert_eq!(user.fetch_one((2,)).await.unwrap().name, "bob");
        assert_eq!(user.stats().loads, loads + 1, "row-level through NATS too");
        attached.shutdown().await;
        source.shutdown().await;
        relay.shutdown().await;
        slot_source.shutdown().await;
    };
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(body)).await;
    let _ = sqlx::query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active")
        .bind(&slot)
        .execute(&admin)
        .await;
    admin
        .execute(
            format!("DROP PUBLICATION IF EXISTS {publication}; DROP SCHEMA {schema} CASCADE")
                .as_str(),
        )
        .await
        .expect("clean-up");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e);
    }
}
