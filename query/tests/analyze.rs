//! `analyze` and `derive` on statements chosen for what they test: the relation
//! set (subqueries anywhere, CTE scoping, set operations), the row-level shape,
//! refusals, and `affects`.

use pgcachewatch_core::{Event, Operation, RowKey};
use pgcachewatch_query::{
    analyze, derive, Catalog, KeyColumn, KeyType, Level, QueryError, ResolveOptions,
    ResolvedRelation, Shape,
};
use serde_json::{json, Value};

fn relations(sql: &str) -> Vec<String> {
    analyze(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .relations()
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn reason(sql: &str) -> String {
    match analyze(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .shape()
    {
        Shape::Table { reason } => reason.clone(),
        Shape::Row(row) => format!("row: {row:?}"),
        other => format!("{other:?}"),
    }
}

fn catalog() -> Catalog {
    Catalog::new()
        .table("public.users", &[("id", KeyType::Int)])
        .table("public.orgs", &[("id", KeyType::Int)])
        .table(
            "public.members",
            &[("org_id", KeyType::Int), ("user_id", KeyType::Int)],
        )
        .table("public.tags", &[("name", KeyType::Text)])
        .table("public.docs", &[("id", KeyType::Uuid)])
        .relation(ResolvedRelation::table(
            pgcachewatch_core::TableRef::new("public", "prices"),
            vec![KeyColumn::unsupported("amount", "numeric")],
        ))
}

fn explain(sql: &str) -> String {
    let analysis = analyze(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    derive(&analysis, &catalog(), &ResolveOptions::new())
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .explain()
}

fn event(op: Operation, table: &str, keys: Option<Vec<Value>>) -> Event {
    let e = Event::new("ch", op, "public", table);
    match keys {
        Some(keys) => e.with_keys(
            keys.into_iter()
                .map(|k| serde_json::from_value::<RowKey>(k).expect("a key object"))
                .collect(),
        ),
        None => e,
    }
}

#[test]
fn relations_in_every_position() {
    // FROM and JOIN ... ON with a subquery in the condition.
    assert_eq!(
        relations(
            "SELECT * FROM users u JOIN orgs o ON o.id = u.org_id \
             AND o.id IN (SELECT org_id FROM members)"
        ),
        ["users", "orgs", "members"]
    );
    // A subquery in the select list.
    assert_eq!(
        relations("SELECT id, (SELECT count(*) FROM posts p WHERE p.user_id = u.id) FROM users u"),
        ["posts", "users"]
    );
    // Inside a function argument, inside a CASE, inside ORDER BY.
    assert_eq!(
        relations(
            "SELECT coalesce((SELECT name FROM orgs WHERE id = 1), 'x') FROM users \
             ORDER BY CASE WHEN EXISTS (SELECT 1 FROM bans b) THEN 1 END"
        ),
        ["orgs", "users", "bans"]
    );
    // LATERAL, a subquery in FROM, a function in FROM, set operations.
    assert_eq!(
        relations(
            "SELECT * FROM (SELECT * FROM a) x, LATERAL (SELECT * FROM b WHERE b.id = x.id) y, \
             generate_series(1, (SELECT max(n) FROM c)) g \
             UNION SELECT * FROM d EXCEPT SELECT * FROM e"
        ),
        ["a", "b", "c", "d", "e"]
    );
    // Qualified names, ONLY, a three-part name, quoted names.
    assert_eq!(
        relations(r#"SELECT * FROM ONLY app.t, "Odd"."Name", db.s.u"#),
        ["ONLY app.t", r#""Odd"."Name""#, "db.s.u"]
    );
    // A table named twice counts once; ONLY only when every mention says it.
    assert_eq!(relations("SELECT * FROM ONLY t, t t2"), ["t"]);
    // HAVING, GROUP BY, window, LIMIT, VALUES, array subqueries.
    assert_eq!(
        relations(
            "SELECT count(*) FROM t GROUP BY (SELECT 1 FROM g) \
             HAVING count(*) > (SELECT count(*) FROM h) \
             LIMIT (SELECT 1 FROM l)"
        ),
        ["t", "g", "h", "l"]
    );
    assert_eq!(relations("VALUES (1), ((SELECT 2 FROM v))"), ["v"]);
    assert_eq!(relations("SELECT ARRAY(SELECT id FROM a)"), ["a"]);
    assert!(relations("SELECT 1").is_empty());
}

#[test]
fn cte_names_are_scoped() {
    // The CTE's own body reads the real table of the same name.
    assert_eq!(
        relations("WITH users AS (SELECT * FROM users WHERE active) SELECT * FROM users"),
        ["users"]
    );
    // A CTE is not a table, anywhere in its scope (subqueries, set operations).
    assert_eq!(
        relations(
            "WITH c AS (SELECT * FROM base) SELECT * FROM c \
             WHERE EXISTS (SELECT 1 FROM c) UNION SELECT * FROM c"
        ),
        ["base"]
    );
    // A later CTE sees an earlier one; an earlier one sees the real table.
    assert_eq!(
        relations("WITH a AS (SELECT * FROM b), b AS (SELECT * FROM a) SELECT * FROM b"),
        ["b"]
    );
    // RECURSIVE: every CTE of the list is in scope in every body.
    assert_eq!(
        relations(
            "WITH RECURSIVE tree AS (SELECT id FROM nodes WHERE id = 1 \
             UNION ALL SELECT n.id FROM nodes n JOIN tree ON n.parent = tree.id) \
             SELECT * FROM tree"
        ),
        ["nodes"]
    );
    // An inner WITH shadows an outer one only inside it.
    assert_eq!(
        relations("WITH x AS (SELECT 1) SELECT * FROM x, (WITH y AS (SELECT * FROM x) SELECT * FROM y) s, y"),
        ["y"]
    );
    // Outside its scope the name is a table again.
    assert_eq!(
        relations("SELECT * FROM (WITH c AS (SELECT 1) SELECT * FROM c) s, c"),
        ["c"]
    );
    // A qualified name never stands for a CTE.
    assert_eq!(
        relations("WITH users AS (SELECT 1) SELECT * FROM users, public.users"),
        ["public.users"]
    );
}

#[test]
fn shapes() {
    assert_eq!(
        reason("SELECT * FROM users u JOIN orgs o ON true WHERE u.id = 1"),
        "join"
    );
    assert_eq!(
        reason("SELECT * FROM users, orgs WHERE users.id = 1"),
        "join"
    );
    assert_eq!(
        reason("SELECT *, (SELECT 1 FROM orgs) FROM users WHERE id = 1"),
        "subquery"
    );
    assert_eq!(
        reason("SELECT *, (SELECT 1) FROM users WHERE id = 1"),
        "subquery"
    );
    assert_eq!(
        reason("SELECT * FROM users WHERE id = 1 AND EXISTS (SELECT 1)"),
        "subquery"
    );
    assert_eq!(
        reason("WITH c AS (SELECT 1) SELECT * FROM users WHERE id = 1"),
        "CTE"
    );
    assert_eq!(
        reason("SELECT * FROM users WHERE id = 1 UNION SELECT * FROM users WHERE id = 2"),
        "set operation"
    );
    assert_eq!(reason("SELECT * FROM users"), "no WHERE: every row");
    assert_eq!(reason("SELECT 1"), "reads no table");
    assert_eq!(
        reason("SELECT * FROM users WHERE id = 1 OR id = 2"),
        "the WHERE pins no column with =, IN (…) or = ANY in a top-level AND"
    );
    assert_eq!(
        reason("SELECT * FROM users WHERE NOT id <> 1"),
        "the WHERE pins no column with =, IN (…) or = ANY in a top-level AND"
    );
    // Forms that are pins.
    for sql in [
        "SELECT * FROM users WHERE id = $1",
        "SELECT * FROM users WHERE $1 = id",
        "SELECT * FROM users u WHERE u.id = $1",
        "SELECT * FROM public.users WHERE public.users.id = $1",
        "SELECT * FROM users WHERE id IN ($1, $2, 3)",
        "SELECT * FROM users WHERE id = ANY($1)",
        "SELECT * FROM users WHERE id = ANY($1::int8[])",
        "SELECT * FROM users WHERE id = ANY(ARRAY[$1, 2])",
        "SELECT * FROM users WHERE id OPERATOR(pg_catalog.=) $1",
        "SELECT * FROM users WHERE (id = $1 AND (active AND name LIKE $2))",
        "SELECT count(*) FROM users WHERE id = $1 GROUP BY name HAVING count(*) > 1",
        "SELECT DISTINCT name FROM users WHERE id = $1 ORDER BY name LIMIT $2",
    ] {
        assert!(
            matches!(analyze(sql).unwrap().shape(), Shape::Row(_)),
            "{sql}: {}",
            reason(sql)
        );
    }
    // Forms that are not: another operator, a cast with a modifier, an
    // expression, a column of another table, `==` (a different operator).
    for sql in [
        "SELECT * FROM users WHERE id == $1",
        "SELECT * FROM users WHERE id >= $1 AND id <= $1",
        "SELECT * FROM users WHERE id = $1 + 0",
        "SELECT * FROM users WHERE id::text = $1",
        "SELECT * FROM users WHERE name = $1::varchar(3)",
        "SELECT * FROM users u WHERE users.id = $1",
        "SELECT * FROM users WHERE id NOT IN ($1)",
        "SELECT * FROM users WHERE id = ANY('{1,2}')",
        "SELECT * FROM users WHERE id = ALL($1)",
        "SELECT * FROM users WHERE id IS NOT DISTINCT FROM $1",
        "SELECT * FROM users WHERE coalesce(id, 0) = $1",
        "SELECT * FROM users WHERE id = $1 OR false",
    ] {
        assert!(
            matches!(analyze(sql).unwrap().shape(), Shape::Table { .. }),
            "{sql} should not be a row candidate"
        );
    }
}

#[test]
fn refusals() {
    let refused = |sql: &str| analyze(sql).expect_err(sql);
    assert!(matches!(
        refused("SELECT * FROM users WHERE id = $1 FOR UPDATE"),
        QueryError::Locking { .. }
    ));
    assert!(matches!(
        refused("SELECT * FROM users WHERE id IN (SELECT id FROM users FOR SHARE)"),
        QueryError::Locking { clause } if clause == "FOR SHARE"
    ));
    for sql in [
        "SELECT now()",
        "SELECT * FROM events WHERE at > now() - interval '1 day'",
        "SELECT * FROM t WHERE at > CURRENT_TIMESTAMP",
        "SELECT CURRENT_DATE",
        "SELECT random()",
        "SELECT nextval('s')",
        "SELECT pg_catalog.clock_timestamp()",
        "SELECT * FROM t TABLESAMPLE SYSTEM (10)",
        "SELECT * FROM t WHERE day = 'today'::date",
        "SELECT * FROM t WHERE at < 'now'",
        "SELECT age(born) FROM users",
        "SELECT lower((SELECT gen_random_uuid()::text))",
    ] {
        assert!(matches!(refused(sql), QueryError::Volatile { .. }), "{sql}");
    }
    for sql in [
        "SELECT * FROM docs WHERE owner = current_user",
        "SELECT * FROM docs WHERE owner = CURRENT_USER",
        "SELECT session_user",
        "SELECT * FROM docs WHERE tenant = current_setting('app.tenant')::int",
        "SELECT has_table_privilege('docs', 'select')",
        "SELECT pg_backend_pid()",
    ] {
        assert!(
            matches!(refused(sql), QueryError::SessionDependent { .. }),
            "{sql}"
        );
    }
    for sql in [
        "SELECT query_to_xml('select 1', true, true, '')",
        "SELECT lo_get(42)",
        "SELECT pg_read_file('x')",
    ] {
        assert!(
            matches!(refused(sql), QueryError::UnknownFunctionReads { .. }),
            "{sql}"
        );
    }
    for sql in [
        "INSERT INTO t VALUES (1)",
        "UPDATE t SET a = 1",
        "DELETE FROM t",
        "SELECT * INTO t2 FROM t",
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "EXPLAIN SELECT 1",
        "CREATE TABLE x (a int)",
    ] {
        assert!(
            matches!(refused(sql), QueryError::NotSelect { .. }),
            "{sql}"
        );
    }
    assert!(matches!(
        refused("SELECT 1; SELECT 2"),
        QueryError::StatementCount { count: 2 }
    ));
    assert!(matches!(
        refused(""),
        QueryError::StatementCount { count: 0 }
    ));
    assert!(matches!(refused("SELEC 1"), QueryError::Parse { .. }));
    assert!(matches!(refused("SELECT 1\0"), QueryError::Parse { .. }));
    assert!(matches!(
        refused("SELECT * FROM t WHERE a = 1 = true"),
        QueryError::Parse { .. }
    ));
    // A user's function named like a built-in is not refused by name (the server
    // judges it); a quoted name is another function.
    assert!(analyze("SELECT app.now()").is_ok());
    assert!(analyze(r#"SELECT "NOW"()"#).is_ok());
    // Every refusal says the way out.
    for sql in [
        "SELECT now()",
        "SELECT * FROM t FOR UPDATE",
        "INSERT INTO t VALUES (1)",
    ] {
        let text = refused(sql).to_string();
        assert!(text.contains("tables = [...]"), "{text}");
    }
}

#[test]
fn explanations() {
    assert_eq!(
        explain("SELECT * FROM users WHERE id = $1"),
        "row-level on public.users(id) from $1"
    );
    assert_eq!(
        explain("SELECT * FROM users WHERE id IN ($1, $2) AND active"),
        "row-level on public.users(id) from IN ($1, $2)"
    );
    assert_eq!(
        explain("SELECT * FROM users WHERE id = ANY($1)"),
        "row-level on public.users(id) from = ANY($1)"
    );
    assert_eq!(
        explain("SELECT * FROM members WHERE user_id = $2 AND org_id = 7"),
        "row-level on public.members(org_id, user_id) from org_id = 7, user_id = $2"
    );
    assert_eq!(
        explain("SELECT * FROM members WHERE user_id = $1"),
        "table-level on public.members: the WHERE does not pin key column org_id with =, IN (…) or = ANY"
    );
    assert_eq!(
        explain("SELECT * FROM users u JOIN orgs o ON o.id = u.org_id WHERE u.id = $1"),
        "table-level on public.users, public.orgs: join"
    );
    assert_eq!(
        explain("SELECT 1"),
        "table-level on no table: reads no table"
    );
    assert_eq!(
        explain("SELECT * FROM tags WHERE name = $1::text"),
        "row-level on public.tags(name) from $1::text"
    );
    // A cast to another type family is no pin.
    assert_eq!(
        explain("SELECT * FROM tags WHERE name = $1::int8"),
        "table-level on public.tags: the WHERE does not pin key column name with =, IN (…) or = ANY"
    );
    assert_eq!(
        explain("SELECT * FROM prices WHERE amount = $1"),
        "table-level on public.prices: key column amount is numeric, whose equality is not \
         compared exactly (row-level needs integer, text, varchar, uuid or bool keys)"
    );
    let unknown = derive(
        &analyze("SELECT * FROM nope").unwrap(),
        &catalog(),
        &ResolveOptions::new(),
    );
    assert!(matches!(unknown, Err(QueryError::UnknownRelation { .. })));
    let strict = derive(
        &analyze("SELECT * FROM users").unwrap(),
        &catalog(),
        &ResolveOptions::new().strict(true),
    );
    assert!(
        matches!(strict, Err(QueryError::NotRowLevel { explanation }) if explanation.contains("no WHERE"))
    );
}

#[test]
fn affects_row_level() {
    let deps = derive(
        &analyze("SELECT * FROM users WHERE id IN ($1, $2)").unwrap(),
        &catalog(),
        &ResolveOptions::new(),
    )
    .unwrap();
    let params = [json!(1), json!(2)];
    let keys = |ids: &[i64]| Some(ids.iter().map(|id| json!({ "id": id })).collect());
    assert!(deps.affects(&params, &event(Operation::Delete, "users", keys(&[2]))));
    assert!(!deps.affects(&params, &event(Operation::Delete, "users", keys(&[3]))));
    // A missing row inserted: its key matches.
    assert!(deps.affects(&params, &event(Operation::Insert, "users", keys(&[1]))));
    // An UPDATE that moves a key carries old and new: a cached "not found" for the new key.
    assert!(deps.affects(&params, &event(Operation::Update, "users", keys(&[9, 2]))));
    // No keys, TRUNCATE, an unreadable key value: unsure, so yes.
    assert!(deps.affects(&params, &event(Operation::Update, "users", None)));
    assert!(deps.affects(&params, &event(Operation::Truncate, "users", keys(&[]))));
    assert!(deps.affects(
        &params,
        &event(Operation::Update, "users", Some(vec![json!({"id": "x"})]))
    ));
    assert!(deps.affects(
        &params,
        &event(Operation::Update, "users", Some(vec![json!({"other": 1})]))
    ));
    // An empty key list touched no row.
    assert!(!deps.affects(&params, &event(Operation::Update, "users", keys(&[]))));
    // Another table, another schema.
    assert!(!deps.affects(&params, &event(Operation::Update, "orgs", None)));
    assert!(!deps.affects(
        &params,
        &Event::new("ch", Operation::Update, "app", "users")
    ));
    // A missing parameter: unsure; NULL parameters match nothing.
    assert!(deps.affects(&[json!(5)], &event(Operation::Update, "users", keys(&[2]))));
    assert!(!deps.affects(
        &[Value::Null, Value::Null],
        &event(Operation::Update, "users", keys(&[2]))
    ));

    let any = derive(
        &analyze("SELECT * FROM docs WHERE id = ANY($1::uuid[])").unwrap(),
        &catalog(),
        &ResolveOptions::new(),
    )
    .unwrap();
    let doc = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    let docs_event = |id: &str| event(Operation::Update, "docs", Some(vec![json!({ "id": id })]));
    assert!(any.affects(&[json!([doc.to_uppercase(), null])], &docs_event(doc)));
    assert!(!any.affects(&[json!([null])], &docs_event(doc)));
    assert!(any.affects(&[json!("not an array")], &docs_event(doc)));

    // Literals: an integer column against a fraction matches nothing.
    let fraction = derive(
        &analyze("SELECT * FROM users WHERE id = 7.5").unwrap(),
        &catalog(),
        &ResolveOptions::new(),
    )
    .unwrap();
    assert!(fraction.is_row_level());
    assert!(!fraction.affects(&[], &event(Operation::Update, "users", keys(&[7]))));
    let seven = derive(
        &analyze("SELECT * FROM users WHERE id = 7.0 AND id = '7'").unwrap(),
        &catalog(),
        &ResolveOptions::new(),
    )
    .unwrap();
    assert!(seven.affects(&[], &event(Operation::Update, "users", keys(&[7]))));
    assert!(!seven.affects(&[], &event(Operation::Update, "users", keys(&[8]))));
}

#[test]
fn affects_table_level_and_partitions() {
    let catalog = catalog().relation(ResolvedRelation::partitioned(
        pgcachewatch_core::TableRef::new("public", "events"),
        vec![pgcachewatch_core::TableRef::new("public", "events_2024")],
        vec![KeyColumn::new("id", KeyType::Int)],
    ));
    let deps = derive(
        &analyze("SELECT * FROM events WHERE id = $1").unwrap(),
        &catalog,
        &ResolveOptions::new(),
    )
    .unwrap();
    assert_eq!(
        deps.explain(),
        "row-level on public.events(id) and its partition from $1"
    );
    let through_partition = |id: i64| {
        event(
            Operation::Update,
            "events_2024",
            Some(vec![json!({ "id": id })]),
        )
    };
    assert!(deps.affects(&[json!(1)], &through_partition(1)));
    assert!(!deps.affects(&[json!(1)], &through_partition(2)));

    let join = derive(
        &analyze("SELECT * FROM users u JOIN orgs o ON o.id = u.org_id WHERE u.id = $1").unwrap(),
        &catalog,
        &ResolveOptions::new(),
    )
    .unwrap();
    let Level::Table(t) = join.level() else {
        panic!("join is table-level")
    };
    assert_eq!(t.reason, "join");
    assert!(join.affects(
        &[json!(1)],
        &event(Operation::Insert, "orgs", Some(vec![json!({"id": 99})]))
    ));
    assert!(!join.affects(&[json!(1)], &event(Operation::Insert, "tags", None)));
    // An event without a schema matches by name.
    let mut schemaless = event(Operation::Insert, "orgs", None);
    schemaless.schema = None;
    assert!(join.affects(&[], &schemaless));
}
