//! `CachedQuery` against a real PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), through the public API, fed by
//! the LISTEN source with row-key triggers installed on the test's own tables.
//!
//! Every test works in a schema of its own (the pool's `search_path`, so the
//! queries' names are unqualified and resolved there), with its own channel,
//! and drops the schema afterwards whatever happened. Each write waits until
//! its transaction's event was applied (`wait_for_txid`), then the next read
//! must be fresh; row-level precision is checked with the cache's load counter.

use std::future::Future;
use std::time::Duration;

use pgcachewatch_backends::postgres::install::{Installer, TableName};
use pgcachewatch_backends::postgres::listener::PgListenerSource;
use pgcachewatch_query::{AttachedQuery, CachedQuery, CachedQueryError, QueryError};
use pgcachewatch_testkit::env::{database_url, unique_name};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};

const PATIENCE: Duration = Duration::from_secs(10);

/// One test's schema, pool (whose `search_path` is the schema) and source.
struct Db {
    schema: String,
    pool: PgPool,
    source: PgListenerSource,
}

impl Db {
    /// Runs a write in a transaction and returns its transaction id.
    async fn write(&self, sql: &str) -> i64 {
        let mut tx = self.pool.begin().await.expect("begin");
        (&mut *tx)
            .execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let txid: i64 = sqlx::query_scalar("SELECT txid_current()")
            .fetch_one(&mut *tx)
            .await
            .expect("txid");
        tx.commit().await.expect("commit");
        txid
    }

    /// [`write`](Self::write), then waits until every attached query applied it.
    async fn write_seen(&self, sql: &str, attached: &[&AttachedQuery]) {
        let txid = self.write(sql).await;
        for a in attached {
            a.dispatcher()
                .wait_for_txid(txid, PATIENCE)
                .await
                .unwrap_or_else(|e| panic!("{sql}: its event was not applied: {e}"));
        }
    }
}

/// Creates a schema, runs `setup` in it (`{s}` is the schema), installs row-key
/// triggers on `tables`, connects a LISTEN source, runs `body`, and drops the
/// schema even if `body` panicked.
async fn with_db<F, Fut>(setup: &str, tables: &[&str], body: F)
where
    F: FnOnce(Db) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let schema = unique_name("pgcw_cq");
    let channel = unique_name("pgcw_cq");
    let mut admin = PgConnection::connect(&database_url())
        .await
        .expect("PostgreSQL at DATABASE_URL");
    admin
        .execute(
            format!(
                "CREATE SCHEMA {schema}; SET search_path = {schema}; {}",
                setup.replace("{s}", &schema)
            )
            .as_str(),
        )
        .await
        .unwrap_or_else(|e| panic!("setup: {e}"));
    let outcome = async {
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
        if !tables.is_empty() {
            let names: Vec<TableName> = tables
                .iter()
                .map(|t| TableName::new(&schema, *t).expect("table name"))
                .collect();
            Installer::new()
                .channel(&channel)
                .function_schema(&schema)
                .row_keys(true)
                .install(&pool, &names)
                .await
                .expect("triggers");
        }
        let source = PgListenerSource::builder(database_url())
            .channel(&channel)
            .connect()
            .await
            .expect("LISTEN source");
        tokio::spawn(body(Db {
            schema: schema.clone(),
            pool,
            source,
        }))
        .await
    }
    .await;
    admin
        .execute(format!("DROP SCHEMA {schema} CASCADE").as_str())
        .await
        .expect("drop schema");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

const USERS: &str = "
    CREATE TABLE orgs (id int8 PRIMARY KEY, name text NOT NULL);
    CREATE TABLE users (id int8 PRIMARY KEY, org_id int8 REFERENCES orgs, name text NOT NULL);
    CREATE TABLE orders (id int8 PRIMARY KEY, user_id int8 NOT NULL, total int8 NOT NULL);
    INSERT INTO orgs VALUES (1, 'acme'), (2, 'globex');
    INSERT INTO users VALUES (1, 1, 'ann'), (2, 2, 'bob'), (3, 1, 'cy'), (50, 2, 'zed');
    INSERT INTO orders VALUES (1, 1, 10), (2, 1, 20), (3, 2, 5);";

const USER_TABLES: &[&str] = &["orgs", "users", "orders"];

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct Named {
    id: i64,
    name: String,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct UserOrg {
    name: String,
    org: String,
}

#[tokio::test]
async fn a_join_is_table_level_and_a_write_to_either_table_is_seen() {
    with_db(USERS, USER_TABLES, |db| async move {
        let q = CachedQuery::<(i64,), UserOrg>::new(
            "SELECT u.name, o.name AS org FROM users u JOIN orgs o ON o.id = u.org_id WHERE u.id = $1",
        );
        let attached = q.attach(&db.pool, &db.source).await.expect("attach");
        let s = &db.schema;
        assert_eq!(
            q.explain().as_deref(),
            Some(format!("table-level on {s}.users, {s}.orgs: join").as_str())
        );
        let ann = |org: &str| UserOrg {
            name: "ann".into(),
            org: org.into(),
        };
        assert_eq!(q.fetch_one((1,)).await.unwrap(), ann("acme"));
        assert_eq!(q.fetch_one((1,)).await.unwrap(), ann("acme"));
        assert_eq!(q.stats().loads, 1, "the second read is a hit");

        db.write_seen("UPDATE orgs SET name = 'acme 2' WHERE id = 1", &[&attached])
            .await;
        assert_eq!(q.fetch_one((1,)).await.unwrap(), ann("acme 2"));
        db.write_seen("UPDATE users SET name = 'ann' WHERE id = 50", &[&attached])
            .await; // another row: table-level drops everything anyway
        assert_eq!(q.fetch_one((1,)).await.unwrap(), ann("acme 2"));
        assert_eq!(q.stats().loads, 3);
        db.write_seen("UPDATE users SET org_id = 2 WHERE id = 1", &[&attached])
            .await;
        assert_eq!(q.fetch_one((1,)).await.unwrap(), ann("globex"));
        attached.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn subqueries_in_the_select_list_and_in_a_function_argument_are_seen() {
    with_db(USERS, USER_TABLES, |db| async move {
        #[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
        struct Spent {
            name: String,
            spent: i64,
        }
        let select_list = CachedQuery::<(i64,), Spent>::new(
            "SELECT u.name, (SELECT coalesce(sum(total), 0) FROM orders o WHERE o.user_id = u.id)::int8 AS spent \
             FROM users u WHERE u.id = $1",
        );
        let argument = CachedQuery::<(i64,), Named>::new(
            "SELECT id, upper(coalesce((SELECT name FROM orgs WHERE orgs.id = users.org_id), '?')) AS name \
             FROM users WHERE id = $1",
        );
        let a = select_list.attach(&db.pool, &db.source).await.expect("attach");
        let b = argument.attach(&db.pool, &db.source).await.expect("attach");
        let s = &db.schema;
        for q in [select_list.explain(), argument.explain()] {
            let explain = q.expect("attached");
            assert!(explain.starts_with("table-level on "), "{explain}");
            assert!(explain.contains(&format!("{s}.users")), "{explain}");
        }
        assert!(select_list.explain().unwrap().contains(&format!("{s}.orders")));
        assert!(argument.explain().unwrap().contains(&format!("{s}.orgs")));

        assert_eq!(select_list.fetch_one((1,)).await.unwrap().spent, 30);
        assert_eq!(argument.fetch_one((1,)).await.unwrap().name, "ACME");
        db.write_seen("INSERT INTO orders VALUES (10, 1, 12)", &[&a, &b])
            .await;
        assert_eq!(select_list.fetch_one((1,)).await.unwrap().spent, 42);
        db.write_seen("UPDATE orgs SET name = 'initech' WHERE id = 1", &[&a, &b])
            .await;
        assert_eq!(argument.fetch_one((1,)).await.unwrap().name, "INITECH");
    })
    .await;
}

#[tokio::test]
async fn a_view_over_a_join_is_seen_through_its_base_tables() {
    let setup = format!(
        "{USERS}
         CREATE VIEW user_orgs AS SELECT u.id, u.name, o.name AS org FROM users u JOIN orgs o ON o.id = u.org_id;"
    );
    with_db(&setup, USER_TABLES, |db| async move {
        let q =
            CachedQuery::<(i64,), UserOrg>::new("SELECT name, org FROM user_orgs WHERE id = $1");
        let attached = q.attach(&db.pool, &db.source).await.expect("attach");
        let explain = q.explain().unwrap();
        let s = &db.schema;
        assert!(explain.starts_with("table-level on "), "{explain}");
        assert!(
            explain.contains(&format!("{s}.users")) && explain.contains(&format!("{s}.orgs")),
            "{explain}"
        );
        assert_eq!(q.fetch_one((2,)).await.unwrap().org, "globex");
        db.write_seen(
            "UPDATE orgs SET name = 'globex 2' WHERE id = 2",
            &[&attached],
        )
        .await;
        assert_eq!(q.fetch_one((2,)).await.unwrap().org, "globex 2");
        db.write_seen("UPDATE users SET name = 'rob' WHERE id = 2", &[&attached])
            .await;
        assert_eq!(q.fetch_one((2,)).await.unwrap().name, "rob");
    })
    .await;
}

/// `USERS`, a table `people` the view will be switched to, and a view over a join.
fn view_setup() -> String {
    format!(
        "{USERS}
         CREATE TABLE people (id int8 PRIMARY KEY, name text NOT NULL, org text NOT NULL);
         INSERT INTO people VALUES (1, 'pat', 'initech'), (2, 'sam', 'initech');
         CREATE VIEW user_orgs AS SELECT u.id, u.name, o.name AS org FROM users u JOIN orgs o ON o.id = u.org_id;"
    )
}

const VIEW_TABLES: &[&str] = &["orgs", "users", "orders", "people"];

/// Re-reads the view's (new) base table.
const REPLACE_VIEW: &str =
    "CREATE OR REPLACE VIEW user_orgs AS SELECT p.id, p.name, p.org FROM people p";

#[tokio::test]
async fn a_view_over_a_join_is_re_resolved_after_create_or_replace_view() {
    with_db(&view_setup(), VIEW_TABLES, |db| async move {
        let q = CachedQuery::<(i64,), UserOrg>::builder(
            "SELECT name, org FROM user_orgs WHERE id = $1",
        )
        .recheck_every(None) // only the explicit re-check below
        .build();
        let attached = q.attach(&db.pool, &db.source).await.expect("attach");
        let s = &db.schema;
        assert_eq!(
            q.explain().as_deref(),
            Some(format!("table-level on {s}.orgs, {s}.users: view").as_str())
        );
        assert_eq!(q.fetch_one((1,)).await.unwrap().org, "acme");
        assert!(!q.recheck().await.expect("re-check"), "nothing changed yet");
        assert_eq!(q.fetch_one((1,)).await.unwrap().org, "acme");
        assert_eq!(
            q.stats().loads,
            1,
            "an unchanged re-check keeps the entries"
        );

        // DDL: no row event. The re-check sees the view's new rule.
        db.write(REPLACE_VIEW).await;
        assert!(q.recheck().await.expect("re-check"), "the view changed");
        assert_eq!(
            q.explain().as_deref(),
            Some(format!("table-level on {s}.people: view").as_str())
        );
        let pat = q.fetch_one((1,)).await.unwrap();
        assert_eq!((pat.name.as_str(), pat.org.as_str()), ("pat", "initech"));
        // A write to the new table makes the next read fresh.
        db.write_seen("UPDATE people SET org = 'hooli' WHERE id = 1", &[&attached])
            .await;
        assert_eq!(q.fetch_one((1,)).await.unwrap().org, "hooli");
        // The old tables are no dependency any more.
        let loads = q.stats().loads;
        db.write_seen("UPDATE orgs SET name = 'acme 2' WHERE id = 1", &[&attached])
            .await;
        assert_eq!(q.fetch_one((1,)).await.unwrap().org, "hooli");
        assert_eq!(q.stats().loads, loads);
        assert_eq!(q.derivations(), 1);
        assert_eq!(q.rechecks(), 2);
        attached.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn the_periodic_re_check_follows_a_view_replaced_and_a_definition_changed_in_place() {
    with_db(&view_setup(), VIEW_TABLES, |db| async move {
        let q = CachedQuery::<(i64,), UserOrg>::builder(
            "SELECT name, org FROM user_orgs WHERE id = $1",
        )
        .recheck_every(Some(std::time::Duration::from_millis(50)))
        .build();
        let attached = q.attach(&db.pool, &db.source).await.expect("attach");
        let s = db.schema.clone();
        assert_eq!(q.fetch_one((2,)).await.unwrap().org, "globex");
        db.write(REPLACE_VIEW).await;
        // Waits (no timing asserted) for the query's own re-check.
        let followed = async {
            while !q.explain().unwrap().contains(&format!("{s}.people")) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(PATIENCE, followed)
            .await
            .expect("the periodic re-check follows the view");
        // The re-check that switched the dependencies flushes the cache once its
        // loads ended; the next one starts after it finished.
        let switched = q.rechecks();
        let finished = async {
            while q.rechecks() <= switched {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(PATIENCE, finished)
            .await
            .expect("the next re-check");
        assert_eq!(q.fetch_one((2,)).await.unwrap().name, "sam");
        db.write_seen("UPDATE people SET name = 'sammy' WHERE id = 2", &[&attached])
            .await;
        assert_eq!(q.fetch_one((2,)).await.unwrap().name, "sammy");

        // The same tables, another definition: the dependencies are equal, the
        // view's rule is not; its entries are flushed all the same.
        let flushes = q.stats().flushes;
        db.write("CREATE OR REPLACE VIEW user_orgs AS SELECT p.id, upper(p.name) AS name, p.org FROM people p")
            .await;
        // Re-checks run one at a time and are counted when they start: once
        // two more have started, one that began after the DDL has ended.
        let after_ddl = q.rechecks();
        let rechecked = async {
            while q.rechecks() < after_ddl + 2 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(PATIENCE, rechecked)
            .await
            .expect("the periodic re-check runs");
        assert!(q.stats().flushes > flushes, "the view's new rule is a change");
        assert_eq!(q.fetch_one((2,)).await.unwrap().name, "SAMMY");
        attached.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_gap_re_checks_the_statement_ddl_made_while_a_source_was_away_is_followed() {
    with_db(&view_setup(), VIEW_TABLES, |db| async move {
        // Only gaps trigger re-checks here (no interval).
        let q = CachedQuery::<(i64,), UserOrg>::builder(
            "SELECT name, org FROM user_orgs WHERE id = $1",
        )
        .recheck_every(None)
        .build();
        let attached = q.attach(&db.pool, &db.source).await.expect("attach");
        let (away, control) = pgcachewatch_backends::memory::InMemorySource::pair();
        let second = q.attach(&db.pool, &away).await.expect("attach");
        assert_eq!(q.fetch_one((1,)).await.unwrap().org, "acme");
        let before = q.rechecks();
        // The second source goes away; the view is replaced meanwhile; it comes
        // back (a gap): the query re-checks and follows the view.
        control.disconnect("connection reset");
        db.write(REPLACE_VIEW).await;
        control.reconnect();
        second.sync().await;
        let followed = async {
            while !q.explain().unwrap().contains(".people") {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(PATIENCE, followed)
            .await
            .expect("the gap's re-check follows the view");
        assert!(q.rechecks() > before);
        assert_eq!(q.fetch_one((1,)).await.unwrap().org, "initech");
        db.write_seen("UPDATE people SET org = 'hooli' WHERE id = 1", &[&attached])
            .await;
        assert_eq!(q.fetch_one((1,)).await.unwrap().org, "hooli");
        second.shutdown().await;
        attached.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_view_that_becomes_uncacheable_bypasses_until_it_is_cacheable_again() {
    with_db(&view_setup(), VIEW_TABLES, |db| async move {
        let q = CachedQuery::<(i64,), UserOrg>::builder(
            "SELECT name, org FROM user_orgs WHERE id = $1",
        )
        .recheck_every(None)
        .build();
        let attached = q.attach(&db.pool, &db.source).await.expect("attach");
        q.fetch_one((1,)).await.unwrap();
        db.write(
            "CREATE OR REPLACE VIEW user_orgs AS SELECT p.id, p.name || clock_timestamp()::text AS name, p.org FROM people p",
        )
        .await;
        let err = q.recheck().await.unwrap_err();
        assert!(
            matches!(err, CachedQueryError::Derive(QueryError::Volatile { .. })),
            "{err}"
        );
        assert!(q.refusal().unwrap().contains("tables = [...]"));
        // Not cached while refused: each read runs the statement.
        let first = q.fetch_one((1,)).await.unwrap().name;
        let second = q.fetch_one((1,)).await.unwrap().name;
        assert!(first.starts_with("pat2") && first != second, "{first} {second}");

        db.write(REPLACE_VIEW).await;
        assert!(q.recheck().await.expect("accepted again"));
        assert_eq!(q.refusal(), None);
        assert_eq!(q.fetch_one((1,)).await.unwrap().name, "pat");
        db.write_seen("UPDATE people SET name = 'patty' WHERE id = 1", &[&attached])
            .await;
        assert_eq!(q.fetch_one((1,)).await.unwrap().name, "patty");
        attached.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_cached_not_found_is_dropped_by_the_insert_and_other_rows_drop_nothing() {
    with_db(USERS, USER_TABLES, |db| async move {
        let q = CachedQuery::<(i64,), Named>::builder("SELECT id, name FROM users WHERE id = $1")
            .name("user_by_id")
            .strict(true)
            .build();
        let attached = q.attach(&db.pool, &db.source).await.expect("attach");
        let s = &db.schema;
        assert_eq!(
            q.explain().as_deref(),
            Some(format!("row-level on {s}.users(id) from $1").as_str())
        );
        assert_eq!(q.strategy().unwrap().inverse(), "direct");
        assert_eq!(q.fetch_optional((42,)).await.unwrap(), None);
        assert!(matches!(
            q.fetch_one((42,)).await,
            Err(CachedQueryError::RowNotFound)
        ));
        assert_eq!(q.fetch_one((1,)).await.unwrap().name, "ann");
        assert_eq!(q.stats().loads, 2, "not-found is cached");

        // Writes to other rows drop neither entry.
        db.write_seen(
            "UPDATE users SET name = 'zed 2' WHERE id = 50",
            &[&attached],
        )
        .await;
        db.write_seen("INSERT INTO users VALUES (43, 1, 'new')", &[&attached])
            .await;
        db.write_seen("DELETE FROM users WHERE id = 3", &[&attached])
            .await;
        assert_eq!(q.fetch_optional((42,)).await.unwrap(), None);
        assert_eq!(q.fetch_one((1,)).await.unwrap().name, "ann");
        assert_eq!(
            q.stats().loads,
            2,
            "row-level: other rows' writes keep both entries"
        );

        // The insert of the missing row carries its key.
        db.write_seen("INSERT INTO users VALUES (42, 2, 'found')", &[&attached])
            .await;
        assert_eq!(q.fetch_one((42,)).await.unwrap().name, "found");
        assert_eq!(q.fetch_one((1,)).await.unwrap().name, "ann");
        assert_eq!(q.stats().loads, 3);
        // A write to another table drops nothing either.
        db.write_seen("UPDATE orgs SET name = 'x' WHERE id = 1", &[&attached])
            .await;
        assert_eq!(q.fetch_one((1,)).await.unwrap().name, "ann");
        assert_eq!(q.stats().loads, 3);
        // TRUNCATE names no rows: everything.
        db.write_seen("TRUNCATE orders", &[&attached]).await; // another table
        db.write_seen("TRUNCATE users", &[&attached]).await;
        assert_eq!(q.fetch_optional((1,)).await.unwrap(), None);
    })
    .await;
}

#[tokio::test]
async fn in_lists_and_any_see_deleted_rows_and_inserted_missing_rows() {
    with_db(USERS, USER_TABLES, |db| async move {
        let in_list = CachedQuery::<(i64, i64), Named>::new(
            "SELECT id, name FROM users WHERE id IN ($1, $2) ORDER BY id",
        );
        let any = CachedQuery::<(Vec<i64>,), Named>::new(
            "SELECT id, name FROM users WHERE id = ANY($1) ORDER BY id",
        );
        let a = in_list.attach(&db.pool, &db.source).await.expect("attach");
        let b = any.attach(&db.pool, &db.source).await.expect("attach");
        let s = &db.schema;
        assert_eq!(
            in_list.explain().as_deref(),
            Some(format!("row-level on {s}.users(id) from IN ($1, $2)").as_str())
        );
        assert_eq!(
            any.explain().as_deref(),
            Some(format!("row-level on {s}.users(id) from = ANY($1)").as_str())
        );
        assert_eq!(in_list.strategy().unwrap().inverse(), "indexed");
        let ids = |rows: &[Named]| rows.iter().map(|r| r.id).collect::<Vec<_>>();

        assert_eq!(ids(&in_list.fetch_all((1, 99)).await.unwrap()), [1]);
        assert_eq!(ids(&any.fetch_all((vec![2, 98],)).await.unwrap()), [2]);
        assert_eq!(any.fetch_optional((vec![97],)).await.unwrap(), None);
        let (loads_in, loads_any) = (in_list.stats().loads, any.stats().loads);

        // Rows outside both: nothing dropped.
        db.write_seen("UPDATE users SET name = 'zed 2' WHERE id = 50", &[&a, &b])
            .await;
        db.write_seen("INSERT INTO users VALUES (96, 1, 'x')", &[&a, &b])
            .await;
        assert_eq!(ids(&in_list.fetch_all((1, 99)).await.unwrap()), [1]);
        assert_eq!(ids(&any.fetch_all((vec![2, 98],)).await.unwrap()), [2]);
        assert_eq!(any.fetch_optional((vec![97],)).await.unwrap(), None);
        assert_eq!(
            (in_list.stats().loads, any.stats().loads),
            (loads_in, loads_any),
            "row-level: writes to other rows drop nothing"
        );

        // A listed row deleted, a missing listed row inserted.
        db.write_seen("DELETE FROM users WHERE id = 1", &[&a, &b])
            .await;
        assert_eq!(
            ids(&in_list.fetch_all((1, 99)).await.unwrap()),
            Vec::<i64>::new()
        );
        db.write_seen("INSERT INTO users VALUES (99, 1, 'late')", &[&a, &b])
            .await;
        assert_eq!(ids(&in_list.fetch_all((1, 99)).await.unwrap()), [99]);
        db.write_seen(
            "INSERT INTO users VALUES (98, 1, 'late'), (97, 2, 'later')",
            &[&a, &b],
        )
        .await;
        assert_eq!(ids(&any.fetch_all((vec![2, 98],)).await.unwrap()), [2, 98]);
        assert_eq!(
            any.fetch_optional((vec![97],))
                .await
                .unwrap()
                .map(|r| r.name),
            Some("later".to_owned())
        );
        db.write_seen("DELETE FROM users WHERE id = 2", &[&a, &b])
            .await;
        assert_eq!(ids(&any.fetch_all((vec![2, 98],)).await.unwrap()), [98]);
    })
    .await;
}

#[tokio::test]
async fn an_update_that_changes_a_key_drops_both_keys() {
    with_db(USERS, USER_TABLES, |db| async move {
        let q = CachedQuery::<(i64,), Named>::new("SELECT id, name FROM users WHERE id = $1");
        let attached = q.attach(&db.pool, &db.source).await.expect("attach");
        assert_eq!(q.fetch_one((3,)).await.unwrap().name, "cy");
        assert_eq!(q.fetch_optional((30,)).await.unwrap(), None);
        assert_eq!(q.fetch_one((2,)).await.unwrap().name, "bob");
        db.write_seen("UPDATE users SET id = 30 WHERE id = 3", &[&attached])
            .await;
        assert_eq!(q.fetch_optional((3,)).await.unwrap(), None);
        assert_eq!(
            q.fetch_one((30,)).await.unwrap(),
            Named {
                id: 30,
                name: "cy".into()
            }
        );
        // Neither key was user 2's.
        let loads = q.stats().loads;
        assert_eq!(q.fetch_one((2,)).await.unwrap().name, "bob");
        assert_eq!(q.stats().loads, loads);
    })
    .await;
}

#[tokio::test]
async fn a_partitioned_table_written_through_a_partition_is_seen() {
    let setup = "
        CREATE TABLE events (tenant int4, id int8, body text, PRIMARY KEY (tenant, id)) PARTITION BY LIST (tenant);
        CREATE TABLE events_1 PARTITION OF events FOR VALUES IN (1);
        CREATE TABLE events_2 PARTITION OF events FOR VALUES IN (2);
        INSERT INTO events VALUES (1, 10, 'a'), (2, 20, 'b'), (1, 11, 'c');";
    with_db(setup, &["events_1", "events_2"], |db| async move {
        #[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
        struct Body {
            body: String,
        }
        let q = CachedQuery::<(i32, i64), Body>::new(
            "SELECT body FROM events WHERE tenant = $1 AND id = $2",
        );
        let attached = q.attach(&db.pool, &db.source).await.expect("attach");
        let s = &db.schema;
        assert_eq!(
            q.explain().as_deref(),
            Some(format!("row-level on {s}.events(tenant, id) and its 2 partitions from tenant = $1, id = $2").as_str())
        );
        assert_eq!(q.fetch_one((1, 10)).await.unwrap().body, "a");
        assert_eq!(q.fetch_one((2, 20)).await.unwrap().body, "b");
        assert_eq!(q.fetch_optional((2, 21)).await.unwrap(), None);
        db.write_seen("UPDATE events_1 SET body = 'a2' WHERE id = 10", &[&attached])
            .await;
        db.write_seen("UPDATE events_1 SET body = 'c2' WHERE id = 11", &[&attached])
            .await;
        assert_eq!(q.fetch_one((1, 10)).await.unwrap().body, "a2");
        let loads = q.stats().loads;
        assert_eq!(q.fetch_one((2, 20)).await.unwrap().body, "b");
        assert_eq!(q.stats().loads, loads, "another partition's rows drop nothing");
        db.write_seen("INSERT INTO events_2 VALUES (2, 21, 'new')", &[&attached])
            .await;
        assert_eq!(q.fetch_one((2, 21)).await.unwrap().body, "new");
    })
    .await;
}

#[tokio::test]
async fn refusals_and_misuse_are_errors_at_attach() {
    let setup = format!(
        "{USERS}
         CREATE MATERIALIZED VIEW user_names AS SELECT id, name FROM users;"
    );
    with_db(&setup, USER_TABLES, |db| async move {
        let refused = |sql: &'static str| {
            let db = &db;
            async move {
                let q = CachedQuery::<(i64,), Named>::new(sql);
                let err = q
                    .attach(&db.pool, &db.source)
                    .await
                    .map(|_| ())
                    .expect_err(sql);
                assert_eq!(q.explain(), None, "{sql}");
                assert!(
                    matches!(q.fetch_one((1,)).await, Err(CachedQueryError::NotAttached)),
                    "{sql}: reads before a successful attach are errors"
                );
                match err {
                    CachedQueryError::Derive(e) => {
                        assert!(e.is_refusal(), "{sql}: {e}");
                        assert!(e.to_string().contains("tables = [...]"), "{sql}: {e}");
                        e
                    }
                    other => panic!("{sql}: {other}"),
                }
            }
        };
        let e = refused("SELECT id, name FROM users WHERE id = $1 FOR UPDATE").await;
        assert!(matches!(e, QueryError::Locking { .. }), "{e}");
        let e = refused("SELECT id, name FROM users WHERE id = $1 AND now() > '2000-01-01'").await;
        assert!(matches!(e, QueryError::Volatile { .. }), "{e}");
        let e = refused("SELECT id, current_user::text AS name FROM users WHERE id = $1").await;
        assert!(matches!(e, QueryError::SessionDependent { .. }), "{e}");
        let e = refused("SELECT id, name FROM user_names WHERE id = $1").await;
        assert!(matches!(e, QueryError::NoEvents { .. }), "{e}");

        // Strict: a fall-back to table-level is an error.
        let strict = CachedQuery::<(i64,), Named>::builder(
            "SELECT u.id, o.name FROM users u JOIN orgs o ON o.id = u.org_id WHERE u.id = $1",
        )
        .strict(true)
        .build();
        let err = strict
            .attach(&db.pool, &db.source)
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(
                err,
                CachedQueryError::Derive(QueryError::NotRowLevel { .. })
            ),
            "{err}"
        );
        // The parameter tuple must match the statement.
        let wrong =
            CachedQuery::<(i64, i64), Named>::new("SELECT id, name FROM users WHERE id = $1");
        let err = wrong
            .attach(&db.pool, &db.source)
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(
                err,
                CachedQueryError::ParamCount {
                    statement: 1,
                    tuple: 2
                }
            ),
            "{err}"
        );
    })
    .await;
}

#[tokio::test]
async fn derivation_happens_once_per_statement() {
    with_db(USERS, USER_TABLES, |db| async move {
        let q = CachedQuery::<(i64,), Named>::new("SELECT id, name FROM users WHERE id = $1");
        assert_eq!(q.derivations(), 0);
        let first = q.attach(&db.pool, &db.source).await.expect("attach");
        let second = q.attach(&db.pool, &db.source).await.expect("attach again");
        for id in [1, 2, 1, 2, 3] {
            q.fetch_one((id,)).await.unwrap();
        }
        assert_eq!(q.derivations(), 1);
        assert_eq!(q.stats().loads, 3);
        assert_eq!(q.stats().dispatchers, 2);
        // Either dispatcher's event is enough; both see it.
        db.write_seen(
            "UPDATE users SET name = 'ann 2' WHERE id = 1",
            &[&first, &second],
        )
        .await;
        assert_eq!(q.fetch_one((1,)).await.unwrap().name, "ann 2");
        // Stopped: the cache bypasses (every read runs the query), still fresh.
        first.shutdown().await;
        second.shutdown().await;
        let loads = q.stats().loads;
        q.fetch_one((2,)).await.unwrap();
        q.fetch_one((2,)).await.unwrap();
        assert_eq!(q.stats().bypasses, 2);
        assert_eq!(q.stats().loads, loads);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_never_outlive_an_applied_write() {
    with_db(USERS, USER_TABLES, |db| async move {
        // Indexed (an IN list): a miss registers its key before its load, so
        // an event that arrives while the load runs finds it.
        let q = CachedQuery::<(i64, i64), Named>::new(
            "SELECT id, name FROM users WHERE id IN ($1, $2) ORDER BY id",
        );
        let attached = q.attach(&db.pool, &db.source).await.expect("attach");
        let pairs = [(1, 2), (2, 3), (3, 50), (50, 1)];
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..4)
            .map(|r| {
                let (q, stop) = (q.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut i = r;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        q.fetch_all(pairs[i % pairs.len()]).await.expect("read");
                        i += 1;
                        if i % 8 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for round in 0..24 {
            let id = [1, 2, 3, 50][round % 4];
            let name = format!("v{round}");
            db.write_seen(
                &format!("UPDATE users SET name = '{name}' WHERE id = {id}"),
                &[&attached],
            )
            .await;
            for pair in pairs.iter().filter(|(a, b)| *a == id || *b == id) {
                let rows = q.fetch_all(*pair).await.expect("read");
                let got = rows.iter().find(|r| r.id == id).map(|r| r.name.as_str());
                assert_eq!(got, Some(name.as_str()), "round {round}, {pair:?}");
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in readers {
            r.await.expect("reader");
        }
        assert!(q.stats().hits > 0, "{:?}", q.stats());
    })
    .await;
}
