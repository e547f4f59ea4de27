//! `#[cached(query = …)]` end to end against the real PostgreSQL
//! (`DATABASE_URL`): the statement is the function, its arguments the
//! parameters and the key; the dependencies and the strategy come from the
//! statement at attach. Attached to the LISTEN source (row-key triggers) and to
//! a second source (any `EventSource`: here the in-memory one), through the
//! same `Cache` as every other form.
#![cfg(feature = "query")]

use std::time::Duration;

use pgcachewatch::cached;
use pgcachewatch::memory::InMemorySource;
use pgcachewatch::postgres::{Installer, PgListenerSource, TableName};
use pgcachewatch::query::CachedQueryError;
use pgcachewatch::{Event, Operation, RowKey};
use pgcachewatch_testkit::env::{database_url, unique_name};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct User {
    id: i64,
    name: String,
}

/// Row-level: the key is `id`.
#[cached(query = "SELECT id, name FROM users WHERE id = $1")]
async fn user(id: i64) -> Result<Option<User>, CachedQueryError>;

/// Table-level: a join.
#[cached(
    query = "SELECT u.name, o.name AS org FROM users u JOIN orgs o ON o.id = u.org_id WHERE u.id = $1",
    name = "user_org",
    capacity = 100
)]
async fn user_org(id: i64) -> Result<(String, String), CachedQueryError>;

/// Every row of an `= ANY` list.
#[cached(query = "SELECT id, name FROM users WHERE id = ANY($1) ORDER BY id")]
async fn team(ids: Vec<i64>) -> Result<Vec<User>, CachedQueryError>;

#[tokio::test]
async fn the_query_form_reads_through_a_cache_kept_fresh_from_its_statement() {
    let schema = unique_name("pgcw_cqm");
    let channel = unique_name("pgcw_cqm");
    let mut admin = PgConnection::connect(&database_url())
        .await
        .expect("PostgreSQL at DATABASE_URL");
    admin
        .execute(
            format!(
                "CREATE SCHEMA {schema}; SET search_path = {schema};
                 CREATE TABLE orgs (id int8 PRIMARY KEY, name text NOT NULL);
                 CREATE TABLE users (id int8 PRIMARY KEY, org_id int8 NOT NULL, name text NOT NULL);
                 INSERT INTO orgs VALUES (1, 'acme');
                 INSERT INTO users VALUES (1, 1, 'ann'), (2, 1, 'bob');"
            )
            .as_str(),
        )
        .await
        .expect("setup");
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run(
        schema.clone(),
        channel,
    )))
    .await;
    admin
        .execute(format!("DROP SCHEMA {schema} CASCADE").as_str())
        .await
        .expect("drop schema");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e);
    }
}

async fn run(schema: String, channel: String) {
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
    let tables = [
        TableName::new(&schema, "users").unwrap(),
        TableName::new(&schema, "orgs").unwrap(),
    ];
    Installer::new()
        .channel(&channel)
        .function_schema(&schema)
        .row_keys(true)
        .install(&pool, &tables)
        .await
        .expect("triggers");
    let source = PgListenerSource::builder(database_url())
        .channel(&channel)
        .connect()
        .await
        .expect("LISTEN source");

    // Before attach: an error, not a silent uncached read.
    assert!(matches!(user(1).await, Err(CachedQueryError::NotAttached)));
    let a = user_query().attach(&pool, &source).await.expect("attach");
    let b = user_org_query()
        .attach(&pool, &source)
        .await
        .expect("attach");
    let c = team_query().attach(&pool, &source).await.expect("attach");
    assert_eq!(
        user_query().explain().unwrap(),
        format!("row-level on {schema}.users(id) from $1")
    );
    assert_eq!(
        user_org_query().explain().unwrap(),
        format!("table-level on {schema}.users, {schema}.orgs: join")
    );

    let ann = User {
        id: 1,
        name: "ann".into(),
    };
    assert_eq!(user(1).await.unwrap(), Some(ann.clone()));
    assert_eq!(user(1).await.unwrap(), Some(ann));
    assert_eq!(user(3).await.unwrap(), None); // a cached "not found"
    assert_eq!(user_query().stats().loads, 2);
    assert_eq!(
        user_org(1).await.unwrap(),
        ("ann".to_string(), "acme".to_string())
    );
    assert_eq!(team(vec![1, 2]).await.unwrap().len(), 2);

    let write = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            (&mut *tx).execute(sql).await.unwrap();
            let txid: i64 = sqlx::query_scalar("SELECT txid_current()")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            txid
        }
    };
    let seen = |txid: i64| {
        let handles = [a.dispatcher(), b.dispatcher(), c.dispatcher()];
        async move {
            for h in handles {
                h.wait_for_txid(txid, Duration::from_secs(10))
                    .await
                    .expect("the write's event is applied");
            }
        }
    };
    seen(write("INSERT INTO users VALUES (3, 1, 'cy')").await).await;
    assert_eq!(user(3).await.unwrap().unwrap().name, "cy");
    seen(write("UPDATE orgs SET name = 'acme 2' WHERE id = 1").await).await;
    assert_eq!(user_org(1).await.unwrap().1, "acme 2");
    let loads = user_query().stats().loads;
    assert_eq!(user(1).await.unwrap().unwrap().name, "ann"); // orgs is no dependency
    assert_eq!(user_query().stats().loads, loads);
    seen(write("DELETE FROM users WHERE id = 2").await).await;
    assert_eq!(team(vec![1, 2]).await.unwrap().len(), 1);

    // Any source: a second attachment, to an in-memory source, feeds the same cache.
    let (memory, events) = InMemorySource::pair();
    let d = user_query().attach(&pool, &memory).await.expect("attach");
    assert_eq!(user_query().derivations(), 1);
    assert_eq!(user(1).await.unwrap().unwrap().name, "ann");
    sqlx::query("ALTER TABLE users DISABLE TRIGGER USER")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE users SET name = 'ann 2' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        user(1).await.unwrap().unwrap().name,
        "ann",
        "no trigger: no event yet"
    );
    events.publish(
        Event::new(&channel, Operation::Update, schema.as_str(), "users")
            .with_keys(vec![RowKey::single("id", 1)]),
    );
    d.sync().await;
    assert_eq!(user(1).await.unwrap().unwrap().name, "ann 2");
    for attached in [a, b, c, d] {
        attached.shutdown().await;
    }
}
