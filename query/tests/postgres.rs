//! `resolve` against a real PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`): every test works in a schema of
//! its own, dropped afterwards whatever happened.

use std::future::Future;

use pgcachewatch_core::{Event, Operation, RowKey, TableRef};
use pgcachewatch_query::{
    analyze, resolve, resolve_with, Dependencies, Level, QueryError, ResolveOptions,
};
use pgcachewatch_testkit::env::{database_url, unique_name};
use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection};

async fn connect() -> PgConnection {
    PgConnection::connect(&database_url())
        .await
        .expect("PostgreSQL at DATABASE_URL")
}

async fn exec(conn: &mut PgConnection, sql: &str) {
    // `Executor::execute` on text without arguments: the simple query protocol
    // (several statements at once). Its future is `Send`, unlike `raw_sql`'s.
    conn.execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Runs `body` with a connection whose `search_path` starts with a fresh schema
/// (its name replaces `{s}` in `setup`), then drops the schema, even if `body`
/// panicked.
async fn in_schema<F, Fut>(setup: &str, body: F)
where
    F: FnOnce(PgConnection, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    in_schema_then(setup, "", body).await;
}

/// [`in_schema`], running `teardown` (for objects outside the schema) at the end.
async fn in_schema_then<F, Fut>(setup: &str, teardown: &str, body: F)
where
    F: FnOnce(PgConnection, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let schema = unique_name("pgcw_query");
    let mut conn = connect().await;
    exec(
        &mut conn,
        &format!(
            "CREATE SCHEMA {schema}; SET search_path = {schema}, public; {}",
            setup.replace("{s}", &schema)
        ),
    )
    .await;
    let outcome = tokio::spawn(body(conn, schema.clone())).await;
    let mut conn = connect().await;
    exec(
        &mut conn,
        &format!(
            "DROP SCHEMA {schema} CASCADE; DROP SCHEMA IF EXISTS {schema}_b CASCADE; {teardown}"
        ),
    )
    .await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn deps(conn: &mut PgConnection, sql: &str) -> Dependencies {
    let analysis = analyze(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    resolve(&analysis, conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn refusal(conn: &mut PgConnection, sql: &str) -> QueryError {
    match analyze(sql) {
        Err(e) => e,
        Ok(analysis) => match resolve(&analysis, conn).await {
            Err(e) => e,
            Ok(d) => panic!("{sql} was not refused: {}", d.explain()),
        },
    }
}

fn tables(d: &Dependencies) -> Vec<String> {
    let mut t: Vec<String> = d.tables().iter().map(ToString::to_string).collect();
    t.sort();
    t
}

fn event(op: Operation, schema: &str, table: &str, keys: &[Value]) -> Event {
    Event::new("ch", op, schema, table).with_keys(
        keys.iter()
            .map(|k| serde_json::from_value::<RowKey>(k.clone()).expect("a key object"))
            .collect(),
    )
}

const SHOP: &str = "
    CREATE TABLE {s}.orgs (id int8 PRIMARY KEY, name text NOT NULL);
    CREATE TABLE {s}.teams (id int8 PRIMARY KEY, name text NOT NULL);
    CREATE TABLE {s}.users (id int8 PRIMARY KEY, org_id int8, team_id int8, name text NOT NULL);
    CREATE TABLE {s}.posts (id int8 PRIMARY KEY, user_id int8 NOT NULL, body text);
";

#[tokio::test]
async fn join_is_table_level_on_both_tables() {
    in_schema(SHOP, |mut conn, s| async move {
        let d = deps(
            &mut conn,
            &format!("SELECT u.name, o.name FROM {s}.users u JOIN {s}.orgs o ON o.id = u.org_id WHERE u.id = $1"),
        )
        .await;
        assert_eq!(tables(&d), [format!("{s}.orgs"), format!("{s}.users")]);
        assert_eq!(d.explain(), format!("table-level on {s}.users, {s}.orgs: join"));
        // Any write to either table; none to another.
        assert!(d.affects(&[json!(1)], &event(Operation::Update, &s, "orgs", &[json!({"id": 9})])));
        assert!(!d.affects(&[json!(1)], &event(Operation::Update, &s, "posts", &[json!({"id": 9})])));
        assert!(d.warnings().is_empty(), "{:?}", d.warnings());
        // Strict: an error, with the explanation.
        let strict = resolve_with(
            &analyze(d.sql()).unwrap(),
            &mut conn,
            &ResolveOptions::new().strict(true),
        )
        .await;
        assert!(matches!(strict, Err(QueryError::NotRowLevel { explanation }) if explanation.ends_with(": join")));
    })
    .await;
}

#[tokio::test]
async fn subqueries_in_the_select_list_and_in_function_arguments() {
    in_schema(SHOP, |mut conn, s| async move {
        let select_list = deps(
            &mut conn,
            &format!(
                "SELECT u.name, (SELECT count(*) FROM {s}.posts p WHERE p.user_id = u.id) \
                 FROM {s}.users u WHERE u.id = $1"
            ),
        )
        .await;
        assert_eq!(
            tables(&select_list),
            [format!("{s}.posts"), format!("{s}.users")]
        );
        assert!(
            select_list.explain().ends_with(": subquery"),
            "{}",
            select_list.explain()
        );
        // A post written for the user changes the count: table-level sees it.
        assert!(select_list.affects(
            &[json!(1)],
            &event(Operation::Insert, &s, "posts", &[json!({"id": 5})])
        ));

        let argument = deps(
            &mut conn,
            &format!(
                "SELECT coalesce((SELECT o.name FROM {s}.orgs o WHERE o.id = u.org_id), '-') \
                 FROM {s}.users u WHERE u.id = $1"
            ),
        )
        .await;
        assert_eq!(
            tables(&argument),
            [format!("{s}.orgs"), format!("{s}.users")]
        );
        assert!(argument.affects(
            &[json!(1)],
            &event(Operation::Update, &s, "orgs", &[json!({"id": 2})])
        ));
    })
    .await;
}

#[tokio::test]
async fn a_view_over_a_join_follows_create_or_replace() {
    let setup = format!(
        "{SHOP}
         CREATE VIEW {{s}}.member_names AS
           SELECT u.id, o.name AS org FROM {{s}}.users u JOIN {{s}}.orgs o ON o.id = u.org_id;
         CREATE VIEW {{s}}.on_top AS SELECT * FROM {{s}}.member_names WHERE id > 0;"
    );
    in_schema(&setup, |mut conn, s| async move {
        let sql = format!("SELECT org FROM {s}.member_names WHERE id = $1");
        let d = deps(&mut conn, &sql).await;
        assert_eq!(tables(&d), [format!("{s}.orgs"), format!("{s}.users")]);
        assert_eq!(
            d.explain(),
            format!("table-level on {s}.orgs, {s}.users: view")
        );
        assert!(d.warnings().is_empty(), "{:?}", d.warnings());

        // A view of the view.
        let nested = deps(&mut conn, &format!("SELECT * FROM {s}.on_top")).await;
        assert_eq!(tables(&nested), [format!("{s}.orgs"), format!("{s}.users")]);

        // The view now reads teams instead of orgs: resolved again, it says so.
        exec(
            &mut conn,
            &format!(
                "CREATE OR REPLACE VIEW {s}.member_names AS
                   SELECT u.id, t.name AS org FROM {s}.users u JOIN {s}.teams t ON t.id = u.team_id"
            ),
        )
        .await;
        let again = deps(&mut conn, &sql).await;
        assert_eq!(tables(&again), [format!("{s}.teams"), format!("{s}.users")]);
        assert!(again.affects(
            &[json!(1)],
            &event(Operation::Update, &s, "teams", &[json!({"id": 3})])
        ));
        assert!(!again.affects(
            &[json!(1)],
            &event(Operation::Update, &s, "orgs", &[json!({"id": 3})])
        ));
    })
    .await;
}

#[tokio::test]
async fn in_lists_and_any_are_row_level() {
    in_schema(SHOP, |mut conn, s| async move {
        let list = deps(
            &mut conn,
            &format!("SELECT * FROM {s}.users WHERE id IN ($1, $2)"),
        )
        .await;
        assert_eq!(
            list.explain(),
            format!("row-level on {s}.users(id) from IN ($1, $2)")
        );
        let any = deps(
            &mut conn,
            &format!("SELECT * FROM {s}.users WHERE id = ANY($1) AND name <> ''"),
        )
        .await;
        assert_eq!(
            any.explain(),
            format!("row-level on {s}.users(id) from = ANY($1)")
        );

        let users = |op, ids: &[i64]| {
            let keys: Vec<Value> = ids.iter().map(|id| json!({ "id": id })).collect();
            event(op, &s, "users", &keys)
        };
        // A row of the result deleted; a missing row inserted; another row written.
        assert!(list.affects(&[json!(1), json!(2)], &users(Operation::Delete, &[2])));
        assert!(list.affects(&[json!(1), json!(3)], &users(Operation::Insert, &[3])));
        assert!(!list.affects(&[json!(1), json!(2)], &users(Operation::Update, &[4])));
        assert!(any.affects(&[json!([1, 2, 3])], &users(Operation::Delete, &[3])));
        assert!(any.affects(&[json!([7])], &users(Operation::Insert, &[7])));
        assert!(!any.affects(&[json!([1, 2])], &users(Operation::Insert, &[7])));
        // A key changed by UPDATE: the event carries old and new.
        let moved = users(Operation::Update, &[5, 6]);
        assert!(
            list.affects(&[json!(6), json!(9)], &moved),
            "the new key: a cached 'not found'"
        );
        assert!(list.affects(&[json!(5), json!(9)], &moved), "the old key");

        let Level::Row(row) = list.level() else {
            panic!("row-level")
        };
        assert_eq!(row.table, TableRef::new(s.clone(), "users"));
        assert_eq!(row.key_columns[0].name, "id");
    })
    .await;
}

#[tokio::test]
async fn a_partitioned_table_depends_on_its_partitions() {
    let setup = "
        CREATE TABLE {s}.events (tenant int4, id int8, body text, PRIMARY KEY (tenant, id))
          PARTITION BY LIST (tenant);
        CREATE TABLE {s}.events_1 PARTITION OF {s}.events FOR VALUES IN (1);
        CREATE TABLE {s}.events_rest PARTITION OF {s}.events DEFAULT PARTITION BY HASH (id);
        CREATE TABLE {s}.events_rest_0 PARTITION OF {s}.events_rest FOR VALUES WITH (MODULUS 2, REMAINDER 0);
        CREATE TABLE {s}.events_rest_1 PARTITION OF {s}.events_rest FOR VALUES WITH (MODULUS 2, REMAINDER 1);";
    in_schema(setup, |mut conn, s| async move {
        let d = deps(
            &mut conn,
            &format!("SELECT body FROM {s}.events WHERE tenant = $1 AND id = $2"),
        )
        .await;
        assert_eq!(
            d.explain(),
            format!("row-level on {s}.events(tenant, id) and its 4 partitions from tenant = $1, id = $2")
        );
        assert_eq!(
            tables(&d),
            ["events", "events_1", "events_rest", "events_rest_0", "events_rest_1"]
                .map(|t| format!("{s}.{t}"))
        );
        // A write through a partition is named after it, with the key.
        let through = |table: &str, tenant: i64, id: i64| {
            event(Operation::Update, &s, table, &[json!({ "tenant": tenant, "id": id })])
        };
        assert!(d.affects(&[json!(1), json!(10)], &through("events_1", 1, 10)));
        assert!(d.affects(&[json!(2), json!(11)], &through("events_rest_1", 2, 11)));
        assert!(!d.affects(&[json!(1), json!(10)], &through("events_1", 1, 12)));

        // Table-level reads of the root also depend on every partition.
        let all = deps(&mut conn, &format!("SELECT count(*) FROM {s}.events")).await;
        assert!(all.affects(&[], &Event::new("ch", Operation::Insert, s.as_str(), "events_rest_0")));
    })
    .await;
}

#[tokio::test]
async fn names_resolve_through_the_search_path() {
    let setup = r#"
        CREATE TABLE {s}.users (id int8 PRIMARY KEY);
        CREATE TABLE {s}."order" (id int8 PRIMARY KEY);
        CREATE TABLE {s}."Mixed Case" (id int8 PRIMARY KEY);
        CREATE SCHEMA {s}_b;
        CREATE TABLE {s}_b.users (id int8 PRIMARY KEY);"#;
    in_schema(setup, |mut conn, s| async move {
        let sql = "SELECT * FROM users WHERE id = $1";
        let first = deps(&mut conn, sql).await;
        assert_eq!(
            first.explain(),
            format!("row-level on {s}.users(id) from $1")
        );
        assert_eq!(first.resolution_key(), format!("users={s}.users"));

        exec(&mut conn, &format!("SET search_path = {s}_b, {s}")).await;
        let second = deps(&mut conn, sql).await;
        assert_eq!(second.resolution_key(), format!("users={s}_b.users"));
        assert_ne!(first.resolution_key(), second.resolution_key());
        assert!(second.affects(
            &[json!(1)],
            &event(
                Operation::Update,
                &format!("{s}_b"),
                "users",
                &[json!({"id": 1})]
            )
        ));
        assert!(!second.affects(
            &[json!(1)],
            &event(Operation::Update, &s, "users", &[json!({"id": 1})])
        ));

        // Reserved words and quoted names resolve too.
        let reserved = deps(&mut conn, r#"SELECT * FROM "order" o WHERE o.id = $1"#).await;
        assert_eq!(
            reserved.explain(),
            format!("row-level on {s}.order(id) from $1")
        );
        let quoted = deps(&mut conn, r#"SELECT * FROM "Mixed Case" WHERE id = $1"#).await;
        assert_eq!(
            quoted.resolution_key(),
            format!(r#""Mixed Case"={s}."Mixed Case""#)
        );

        // A qualified name adds nothing to the key.
        let qualified = deps(&mut conn, &format!("SELECT * FROM {s}.users WHERE id = $1")).await;
        assert_eq!(qualified.resolution_key(), "");

        exec(&mut conn, &format!("SET search_path = {s}_b")).await;
        exec(&mut conn, &format!("DROP SCHEMA {s}_b CASCADE")).await;
        let gone = resolve(&analyze(sql).unwrap(), &mut conn).await;
        assert!(matches!(gone, Err(QueryError::UnknownRelation { name, .. }) if name == "users"));
    })
    .await;
}

#[tokio::test]
async fn refusals_on_the_server() {
    let fdw = unique_name("pgcw_fdw");
    let setup = format!(
        "{SHOP}
         CREATE MATERIALIZED VIEW {{s}}.org_counts AS SELECT org_id, count(*) FROM {{s}}.users GROUP BY org_id;
         CREATE SEQUENCE {{s}}.seq;
         CREATE FOREIGN DATA WRAPPER {fdw};
         CREATE SERVER {fdw}_server FOREIGN DATA WRAPPER {fdw};
         CREATE FOREIGN TABLE {{s}}.remote (id int8) SERVER {fdw}_server;
         CREATE TABLE {{s}}.secure (id int8 PRIMARY KEY, owner text);
         ALTER TABLE {{s}}.secure ENABLE ROW LEVEL SECURITY;
         CREATE FUNCTION {{s}}.org_name(int8) RETURNS text STABLE LANGUAGE sql
           AS 'SELECT name FROM {{s}}.orgs WHERE id = $1';
         CREATE FUNCTION {{s}}.roll() RETURNS int8 VOLATILE LANGUAGE sql AS 'SELECT 4';
         CREATE FUNCTION {{s}}.twice(int8) RETURNS int8 IMMUTABLE LANGUAGE sql AS 'SELECT $1 * 2';
         CREATE VIEW {{s}}.recent AS SELECT * FROM {{s}}.posts WHERE id > extract(epoch from now());
         CREATE VIEW {{s}}.mine AS SELECT * FROM {{s}}.posts WHERE body = CURRENT_USER;
         CREATE VIEW {{s}}.rolled AS SELECT {{s}}.roll() AS r;"
    );
    let teardown = format!("DROP FOREIGN DATA WRAPPER {fdw} CASCADE");
    in_schema_then(&setup, &teardown, |mut conn, s| async move {
        let q = |sql: &str| sql.replace("{s}", &s);
        let kind = |e: &QueryError| match e {
            QueryError::NoEvents { kind, .. } => kind.clone(),
            other => panic!("expected NoEvents, got {other}"),
        };
        let e = refusal(&mut conn, &q("SELECT * FROM {s}.org_counts")).await;
        assert_eq!(kind(&e), "materialized view");
        let e = refusal(&mut conn, &q("SELECT * FROM {s}.remote WHERE id = $1")).await;
        assert_eq!(kind(&e), "foreign table");
        let e = refusal(&mut conn, &q("SELECT last_value FROM {s}.seq")).await;
        assert_eq!(kind(&e), "sequence");
        let e = refusal(&mut conn, "SELECT relname FROM pg_class WHERE oid = $1").await;
        assert_eq!(kind(&e), "system catalog");
        let e = refusal(&mut conn, "SELECT * FROM information_schema.tables").await;
        assert_eq!(kind(&e), "system catalog");
        exec(&mut conn, "CREATE TEMP TABLE scratch (id int8 PRIMARY KEY)").await;
        let e = refusal(&mut conn, "SELECT * FROM scratch WHERE id = $1").await;
        assert!(kind(&e).starts_with("temporary table"));

        let e = refusal(&mut conn, &q("SELECT * FROM {s}.secure WHERE id = $1")).await;
        assert!(matches!(e, QueryError::RowSecurity { .. }), "{e}");

        // A user's function whose reads are unknown; a volatile one; both
        // through a view too. An immutable one is accepted.
        let e = refusal(
            &mut conn,
            &q("SELECT {s}.org_name(org_id) FROM {s}.users WHERE id = $1"),
        )
        .await;
        assert!(matches!(e, QueryError::UnknownFunctionReads { .. }), "{e}");
        let e = refusal(
            &mut conn,
            &q("SELECT * FROM {s}.users WHERE id = {s}.roll()"),
        )
        .await;
        assert!(matches!(e, QueryError::Volatile { .. }), "{e}");
        let e = refusal(&mut conn, &q("SELECT * FROM {s}.rolled")).await;
        assert!(matches!(e, QueryError::Volatile { .. }), "{e}");
        let e = refusal(&mut conn, &q("SELECT * FROM {s}.recent")).await;
        assert!(
            matches!(e, QueryError::Volatile { ref function } if function == "now()"),
            "{e}"
        );
        let e = refusal(&mut conn, &q("SELECT * FROM {s}.mine")).await;
        assert!(matches!(e, QueryError::SessionDependent { .. }), "{e}");
        let ok = deps(
            &mut conn,
            &q("SELECT {s}.twice(id) FROM {s}.users WHERE id = $1"),
        )
        .await;
        assert!(ok.is_row_level(), "{}", ok.explain());

        // Refused from the text alone, before the server.
        for sql in [
            "SELECT * FROM {s}.users WHERE id = $1 FOR UPDATE",
            "SELECT * FROM {s}.users WHERE id = $1 AND now() > '2020-01-01'",
            "SELECT * FROM {s}.users WHERE name = current_user",
            "DELETE FROM {s}.users WHERE id = $1",
        ] {
            let e = refusal(&mut conn, &q(sql)).await;
            assert!(e.is_refusal(), "{sql}: {e}");
        }
        // Every refusal names the way out.
        assert!(e.to_string().contains("tables = [...]"));

        // A text PostgreSQL 15 does not prepare is the server's error.
        let bad = resolve(
            &analyze(&q("SELECT nope FROM {s}.users")).unwrap(),
            &mut conn,
        )
        .await;
        assert!(matches!(bad, Err(QueryError::Database(_))), "{bad:?}");
    })
    .await;
}

#[tokio::test]
async fn key_types_and_collations() {
    let setup = "
        CREATE TABLE {s}.prices (amount numeric PRIMARY KEY);
        CREATE TABLE {s}.tags (name text PRIMARY KEY);
        CREATE TABLE {s}.docs (id uuid PRIMARY KEY);
        CREATE COLLATION {s}.loose (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
        CREATE TABLE {s}.handles (name text COLLATE {s}.loose PRIMARY KEY);";
    in_schema(setup, |mut conn, s| async move {
        let numeric = deps(
            &mut conn,
            &format!("SELECT * FROM {s}.prices WHERE amount = $1"),
        )
        .await;
        assert!(
            numeric.explain().contains("key column amount is numeric"),
            "{}",
            numeric.explain()
        );
        let loose = deps(
            &mut conn,
            &format!("SELECT * FROM {s}.handles WHERE name = $1"),
        )
        .await;
        assert!(
            loose.explain().contains("nondeterministic collation"),
            "{}",
            loose.explain()
        );

        let tags = deps(
            &mut conn,
            &format!("SELECT * FROM {s}.tags WHERE name = $1::text"),
        )
        .await;
        assert!(tags.is_row_level(), "{}", tags.explain());
        let docs = deps(
            &mut conn,
            &format!("SELECT * FROM {s}.docs WHERE id = ANY($1::uuid[])"),
        )
        .await;
        assert!(docs.is_row_level(), "{}", docs.explain());
        let id = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        let write = event(Operation::Delete, &s, "docs", &[json!({ "id": id })]);
        assert!(docs.affects(&[json!([id.to_uppercase()])], &write));
        assert!(!docs.affects(&[json!(["b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"])], &write));

        // standard_conforming_strings = off: the literal is read as that server reads it.
        exec(
            &mut conn,
            "SET standard_conforming_strings = off; SET escape_string_warning = off",
        )
        .await;
        let legacy = deps(
            &mut conn,
            &format!(r"SELECT * FROM {s}.tags WHERE name = 'a\\b'"),
        )
        .await;
        assert_eq!(
            legacy.explain(),
            format!(r"row-level on {s}.tags(name) from 'a\b'")
        );
        let write = event(Operation::Update, &s, "tags", &[json!({ "name": r"a\b" })]);
        assert!(legacy.affects(&[], &write));
    })
    .await;
}

#[tokio::test]
async fn the_generic_plan_cross_checks_the_parser() {
    let setup = format!(
        "{SHOP}
         CREATE FUNCTION {{s}}.all_orgs() RETURNS SETOF {{s}}.orgs IMMUTABLE LANGUAGE sql
           AS 'SELECT * FROM {{s}}.orgs';"
    );
    in_schema(&setup, |mut conn, s| async move {
        // The function's body is inlined into the plan: the plan reads orgs,
        // which the text does not name. The larger set wins.
        let d = deps(&mut conn, &format!("SELECT * FROM {s}.users WHERE id = $1 AND org_id IN (SELECT id FROM {s}.all_orgs())")).await;
        assert_eq!(tables(&d), [format!("{s}.orgs"), format!("{s}.users")]);
        assert!(d.warnings().iter().any(|w| w.contains("which the parser did not find")), "{:?}", d.warnings());
        let inlined = deps(&mut conn, &format!("SELECT * FROM {s}.all_orgs() WHERE id = $1")).await;
        assert_eq!(tables(&inlined), [format!("{s}.orgs")]);
        assert!(!inlined.is_row_level());

        // The plan folds a table away: it stays a dependency, with a warning.
        let folded = deps(&mut conn, &format!("SELECT * FROM {s}.users WHERE false AND id = $1")).await;
        assert_eq!(tables(&folded), [format!("{s}.users")]);
        assert!(folded.warnings().iter().any(|w| w.contains("does not scan")), "{:?}", folded.warnings());

        // No prepared statement is left behind, and plan_cache_mode is as it was.
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgcw_probe%'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, 0);
        let mode: String = sqlx::query_scalar("SELECT current_setting('plan_cache_mode')")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(mode, "auto");

        // Without the plan check nothing is prepared; the parser's set stands.
        let unchecked = resolve_with(
            &analyze(&format!("SELECT * FROM {s}.all_orgs() WHERE id = $1")).unwrap(),
            &mut conn,
            &ResolveOptions::new().plan_check(false),
        )
        .await
        .unwrap();
        assert!(unchecked.tables().is_empty(), "{}", unchecked.explain());
    })
    .await;
}
