//! The audit of hand-written rules (feature `query`): a `#[cached]` function
//! that declares `tables = [...]` and whose SQL is known (`sql = "…"`, or a
//! literal given to `sqlx::query*` in its body) has the tables that SQL reads
//! and the declaration leaves out reported when its cache is made (by name),
//! and on the server by `query::audit::check_on` (views expanded), against the
//! real PostgreSQL (`DATABASE_URL`).
#![cfg(feature = "query")]

use std::sync::Arc;

use pgcachewatch::cached;
use pgcachewatch::query::audit;
use pgcachewatch::strategies::Greedy;
use pgcachewatch_testkit::env::{database_url, unique_name};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, PgPool};

/// Forgets `orgs`: found from the literal in the body.
#[cached(key = id, tables = ["users"], strategy = Greedy::new())]
async fn user_with_org(pool: &PgPool, id: i64) -> Result<String, Arc<sqlx::Error>> {
    Ok(sqlx::query_scalar::<_, String>(
        "SELECT u.name || '@' || o.name FROM users u JOIN orgs o ON o.id = u.org_id WHERE u.id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await?)
}

/// Right, through a view: by name the view is reported (a declaration must
/// name its base tables), on the server it is not.
#[cached(
    key = id,
    tables = ["users", "orgs"],
    strategy = Greedy::new(),
    sql = "SELECT name, org FROM user_orgs WHERE id = $1"
)]
async fn member(pool: &PgPool, id: i64) -> Result<(String, String), Arc<sqlx::Error>> {
    Ok(
        sqlx::query_as("SELECT name, org FROM user_orgs WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

/// Wrong through a view: the view reads `orgs`, which is not declared.
#[cached(
    key = id,
    tables = ["users"],
    strategy = Greedy::new(),
    sql = "SELECT org FROM user_orgs WHERE id = $1"
)]
async fn member_org(pool: &PgPool, id: i64) -> Result<String, Arc<sqlx::Error>> {
    Ok(
        sqlx::query_scalar("SELECT org FROM user_orgs WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

/// Declares all it reads: nothing to report.
#[cached(key = id, tables = ["users"], strategy = Greedy::new())]
async fn user_name(pool: &PgPool, id: i64) -> Result<String, Arc<sqlx::Error>> {
    Ok(sqlx::query_scalar("SELECT name FROM users WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await?)
}

fn finding(name: &str) -> Option<audit::Finding> {
    audit::findings().into_iter().find(|f| f.rule.name == name)
}

#[tokio::test]
async fn rules_that_forget_a_table_are_reported_by_name_and_on_the_server() {
    // Reported when the cache is made (here by its handle), with no server.
    let _ = (
        user_with_org_cache(),
        member_cache(),
        member_org_cache(),
        user_name_cache(),
    );
    assert_eq!(audit::rules().len(), 4);
    let f = finding("user_with_org").expect("orgs forgotten");
    assert_eq!(f.unwatched_names(), vec!["orgs"]);
    assert!(!f.resolved);
    assert!(f.to_string().contains("add it to `tables`"), "{f}");
    assert_eq!(
        finding("member").map(|f| f.unwatched_names()),
        Some(vec!["user_orgs".to_string()])
    );
    assert_eq!(
        finding("member_org").map(|f| f.unwatched_names()),
        Some(vec!["user_orgs".to_string()])
    );
    assert!(finding("user_name").is_none());

    // On the server: names resolved, the view expanded.
    let schema = unique_name("pgcw_audit");
    let mut admin = PgConnection::connect(&database_url())
        .await
        .expect("PostgreSQL at DATABASE_URL");
    admin
        .execute(
            format!(
                "CREATE SCHEMA {schema}; SET search_path = {schema};
                 CREATE TABLE orgs (id int8 PRIMARY KEY, name text NOT NULL);
                 CREATE TABLE users (id int8 PRIMARY KEY, org_id int8 NOT NULL, name text NOT NULL);
                 CREATE VIEW user_orgs AS SELECT u.id, u.name, o.name AS org FROM users u JOIN orgs o ON o.id = u.org_id;"
            )
            .as_str(),
        )
        .await
        .expect("setup");
    // Every session of the pool reads the test's schema first (a startup option).
    let options = database_url()
        .parse::<PgConnectOptions>()
        .expect("DATABASE_URL")
        .options([("search_path", schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("pool");
    let checked = audit::check_on(&pool).await;
    admin
        .execute(format!("DROP SCHEMA {schema} CASCADE").as_str())
        .await
        .expect("drop schema");
    let found = checked.expect("checked on the server");
    let names: Vec<(&str, Vec<String>)> = found
        .iter()
        .map(|f| (f.rule.name.as_str(), f.unwatched_names()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("user_with_org", vec![format!("{schema}.orgs")]),
            ("member_org", vec![format!("{schema}.orgs")]),
        ]
    );
    assert!(found.iter().all(|f| f.resolved));
    assert_eq!(audit::findings(), found);
}
