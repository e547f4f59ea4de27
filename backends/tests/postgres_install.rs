//! The trigger SQL and its installer against the real local PostgreSQL
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`).
//!
//! Every test works in its own schema (dropped at the end, even on failure) with
//! its own channel and, where uninstalling everything is tested, its own notify
//! function, so test binaries may run in parallel against one database.
#![cfg(feature = "postgres")]

use std::collections::BTreeSet;
use std::time::Duration;

use pgcachewatch_backends::postgres::install::{status, InstallError, Installer, TableName};
use pgcachewatch_backends::postgres::listener::PgListenerSource;
use pgcachewatch_core::{
    parse_payload, Cache, Dispatcher, Event, EventSource, Operation, RowKey, Signal, Subscription,
};
use pgcachewatch_strategies::Greedy;
use pgcachewatch_testkit::env::{database_url, unique_name as unique};
use serde_json::json;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::Row;

const PATIENCE: Duration = Duration::from_secs(10);

fn q(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

async fn admin() -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .connect(&database_url())
        .await
        .expect("PostgreSQL must be running at DATABASE_URL")
}

/// A schema of this test's own, dropped (with everything in it) when the guard is
/// dropped, also when the test fails.
struct Scratch {
    db: PgPool,
    schema: String,
}

impl Scratch {
    async fn new(schema: String) -> Scratch {
        let db = admin().await;
        sqlx::raw_sql(&format!("CREATE SCHEMA {}", q(&schema)))
            .execute(&db)
            .await
            .unwrap();
        Scratch { db, schema }
    }

    fn table(&self, name: &str) -> TableName {
        TableName::new(self.schema.clone(), name).unwrap()
    }

    async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(&self.db)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// `name → pg_get_triggerdef` of every trigger in this schema.
    async fn triggers(&self) -> Vec<(String, String, String)> {
        sqlx::query(
            "SELECT c.relname::text, t.tgname::text, pg_get_triggerdef(t.oid)
               FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND NOT t.tgisinternal ORDER BY 1, 2",
        )
        .bind(&self.schema)
        .fetch_all(&self.db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    }

    /// `name → oid` of every function in this schema.
    async fn functions(&self) -> Vec<(String, i64)> {
        sqlx::query(
            "SELECT p.proname::text, p.oid::int8 FROM pg_proc p
               JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1 ORDER BY 1",
        )
        .bind(&self.schema)
        .fetch_all(&self.db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", q(&self.schema));
        // Drop runs inside the test's runtime: clean up from a thread of our own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(db) = PgPool::connect(&database_url()).await {
                    let _ = sqlx::raw_sql(&sql).execute(&db).await;
                }
            });
        })
        .join();
    }
}

/// A raw sqlx listener: what the triggers send, unfiltered by any of our code.
async fn raw_listener(channel: &str) -> PgListener {
    let mut listener = PgListener::connect(&database_url()).await.unwrap();
    listener.listen(channel).await.unwrap();
    listener
}

async fn next_event(listener: &mut PgListener) -> (Event, usize) {
    let n = tokio::time::timeout(PATIENCE, listener.recv())
        .await
        .expect("no notification within 10 s")
        .unwrap();
    let event = parse_payload(n.channel(), n.payload(), chrono::Utc::now())
        .unwrap_or_else(|e| panic!("payload {:?}: {e}", n.payload()));
    (event, n.payload().len())
}

/// Fails if a notification arrives: sends a marker NOTIFY and checks it comes first.
async fn assert_nothing_pending(db: &PgPool, listener: &mut PgListener, channel: &str) {
    sqlx::query("SELECT pg_notify($1, 'marker')")
        .bind(channel)
        .execute(db)
        .await
        .unwrap();
    let n = tokio::time::timeout(PATIENCE, listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.payload(), "marker", "unexpected notification");
}

/// The next event on a source subscription, skipping health signals.
async fn next_signal_event(sub: &mut Subscription) -> Event {
    loop {
        let signal = tokio::time::timeout(PATIENCE, sub.recv())
            .await
            .expect("no signal within 10 s")
            .expect("source ended");
        match signal {
            Signal::Event(e) => return (*e).clone(),
            Signal::Gap(g) => panic!("unexpected gap {g}"),
            _ => continue,
        }
    }
}

fn keys(event: &Event) -> Option<BTreeSet<String>> {
    event.keys.as_ref().map(|ks| {
        ks.iter()
            .map(|k| serde_json::to_string(k).unwrap())
            .collect()
    })
}

fn key_set(keys: &[serde_json::Value]) -> BTreeSet<String> {
    keys.iter()
        .map(|k| {
            let key: RowKey = serde_json::from_value(k.clone()).unwrap();
            serde_json::to_string(&key).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn every_operation_notifies_and_invalidates_a_cache() {
    let s = Scratch::new(unique("pgcw_ops")).await;
    let channel = unique("pgcw_ops");
    let table = s.table("items");
    s.exec(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, v text NOT NULL)"
    ))
    .await;
    Installer::new()
        .channel(&channel)
        .function_schema(&s.schema)
        .install(&s.db, std::slice::from_ref(&table))
        .await
        .unwrap();

    let mut raw = raw_listener(&channel).await;
    let source = PgListenerSource::builder(database_url())
        .channel(&channel)
        .connect()
        .await
        .unwrap();
    let mut seen_by_source = source.subscribe();
    let cache: Cache<&'static str, Vec<String>> = Cache::new(16);
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    let load = || {
        let db = s.db.clone();
        let sql = format!("SELECT v FROM {table} ORDER BY id");
        async move { sqlx::query_scalar::<_, String>(&sql).fetch_all(&db).await }
    };

    let steps = [
        (
            Operation::Insert,
            format!("INSERT INTO {table} VALUES (1, 'a'), (2, 'b')"),
            vec!["a", "b"],
        ),
        (
            Operation::Update,
            format!("UPDATE {table} SET v = v || '!'"),
            vec!["a!", "b!"],
        ),
        (
            Operation::Delete,
            format!("DELETE FROM {table} WHERE id = 1"),
            vec!["b!"],
        ),
        (Operation::Truncate, format!("TRUNCATE {table}"), vec![]),
    ];
    for (op, statement, expected) in steps {
        // Warm the cache with the value before the write.
        let before = cache.get_or_load("all", load).await.unwrap();
        assert_eq!(cache.get(&"all"), Some(before));

        // sent_at is clock_timestamp(): later than the start of its transaction.
        let mut tx = s.db.begin().await.unwrap();
        let tx_start: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        sqlx::query("SELECT pg_sleep(0.01)")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::raw_sql(&statement).execute(&mut *tx).await.unwrap();
        let txid: i64 = sqlx::query_scalar("SELECT txid_current()")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();

        let (event, _) = next_event(&mut raw).await;
        assert_eq!(event.operation, op, "{statement}");
        assert_eq!(event.schema.as_deref(), Some(s.schema.as_str()));
        assert_eq!(event.table, "items");
        assert_eq!(event.channel, channel);
        assert_eq!(event.txid, Some(txid));
        assert_eq!(event.keys, None);
        let sent_at = event.sent_at.expect("sent_at");
        assert!(
            sent_at > tx_start,
            "sent_at {sent_at} is not clock_timestamp() (tx start {tx_start})"
        );

        // The same event reached the source; once the dispatcher applied it, the
        // cache no longer holds the old value and a read is fresh.
        let via_source = next_signal_event(&mut seen_by_source).await;
        assert_eq!((via_source.operation, via_source.txid), (op, Some(txid)));
        dispatcher.sync().await;
        assert_eq!(cache.get(&"all"), None, "{op} did not invalidate");
        let fresh = cache.get_or_load("all", load).await.unwrap();
        assert_eq!(fresh, expected);
    }
    assert_nothing_pending(&s.db, &mut raw, &channel).await;
    assert!(cache.stats().flushes >= 4);
    dispatcher.shutdown().await;
    source.shutdown().await;
}

#[tokio::test]
async fn row_mode_sends_keys_and_falls_back_to_table_level_above_8000_bytes() {
    let s = Scratch::new(unique("pgcw_rows")).await;
    let channel = unique("pgcw_rows");
    let table = s.table("accounts");
    let keyless = s.table("log");
    s.exec(&format!(
        "CREATE TABLE {table} (region text, id int, v int NOT NULL DEFAULT 0, PRIMARY KEY (region, id));
         CREATE TABLE {keyless} (line text)"
    ))
    .await;
    Installer::new()
        .channel(&channel)
        .function_schema(&s.schema)
        .row_keys(true)
        .install(&s.db, &[table.clone(), keyless.clone()])
        .await
        .unwrap();
    let mut raw = raw_listener(&channel).await;

    s.exec(&format!(
        "INSERT INTO {table} (region, id) VALUES ('eu', 1), ('eu', 2), ('us', 1)"
    ))
    .await;
    let (e, _) = next_event(&mut raw).await;
    assert_eq!(e.operation, Operation::Insert);
    assert_eq!(
        keys(&e),
        Some(key_set(&[
            json!({"region": "eu", "id": 1}),
            json!({"region": "eu", "id": 2}),
            json!({"region": "us", "id": 1}),
        ]))
    );

    // An update that moves a row's key reports the old and the new key.
    s.exec(&format!(
        "UPDATE {table} SET id = 3, v = 1 WHERE region = 'eu' AND id = 2"
    ))
    .await;
    let (e, _) = next_event(&mut raw).await;
    assert_eq!(e.operation, Operation::Update);
    assert_eq!(
        keys(&e),
        Some(key_set(&[
            json!({"region": "eu", "id": 2}),
            json!({"region": "eu", "id": 3}),
        ]))
    );

    // An update of non-key columns reports each key once.
    s.exec(&format!("UPDATE {table} SET v = v + 1 WHERE region = 'eu'"))
        .await;
    let (e, _) = next_event(&mut raw).await;
    assert_eq!(
        keys(&e),
        Some(key_set(&[
            json!({"region": "eu", "id": 1}),
            json!({"region": "eu", "id": 3}),
        ]))
    );

    s.exec(&format!("DELETE FROM {table} WHERE region = 'us'"))
        .await;
    let (e, _) = next_event(&mut raw).await;
    assert_eq!(e.operation, Operation::Delete);
    assert_eq!(keys(&e), Some(key_set(&[json!({"region": "us", "id": 1})])));

    // A statement that touched nothing says so.
    s.exec(&format!("UPDATE {table} SET v = 0 WHERE false"))
        .await;
    let (e, _) = next_event(&mut raw).await;
    assert_eq!(e.keys, Some(vec![]));

    // 2000 rows do not fit in 8000 bytes: one table-level event per statement.
    s.exec(&format!(
        "INSERT INTO {table} (region, id) SELECT 'bulk', g FROM generate_series(1, 2000) g"
    ))
    .await;
    let (e, len) = next_event(&mut raw).await;
    assert_eq!((e.operation, e.keys.as_ref()), (Operation::Insert, None));
    assert!(len < 8000);
    s.exec(&format!(
        "UPDATE {table} SET v = v + 1 WHERE region = 'bulk'"
    ))
    .await;
    let (e, _) = next_event(&mut raw).await;
    assert_eq!((e.operation, e.keys.as_ref()), (Operation::Update, None));
    assert_eq!(e.table, "accounts");

    // Just under and just over the limit: a long text key makes the boundary sharp.
    let long = "x".repeat(3900);
    s.exec(&format!(
        "INSERT INTO {table} (region, id) VALUES ('{long}', 1)"
    ))
    .await;
    let (e, len) = next_event(&mut raw).await;
    assert_eq!(e.keys.as_ref().map(Vec::len), Some(1));
    assert!(len < 8000);
    s.exec(&format!(
        "INSERT INTO {table} (region, id) VALUES ('{long}', 2), ('{long}', 3)"
    ))
    .await;
    let (e, _) = next_event(&mut raw).await;
    assert_eq!(e.keys, None, "7800+ bytes of keys must fall back");

    // TRUNCATE has no transition tables; a table without a primary key has no keys.
    s.exec(&format!("TRUNCATE {table}")).await;
    let (e, _) = next_event(&mut raw).await;
    assert_eq!((e.operation, e.keys.as_ref()), (Operation::Truncate, None));
    s.exec(&format!("INSERT INTO {keyless} VALUES ('hello')"))
        .await;
    let (e, _) = next_event(&mut raw).await;
    assert_eq!((e.table.as_str(), e.keys.as_ref()), ("log", None));

    assert_nothing_pending(&s.db, &mut raw, &channel).await;
}

#[tokio::test]
async fn hostile_names_install_notify_and_uninstall() {
    // Quotes, a semicolon, spaces, mixed case, a backslash and SQL in every name.
    let schema = format!(
        "My \"Sch\"; DROP SCHEMA public; -- {}",
        rand::random::<u32>()
    );
    let s = Scratch::new(schema).await;
    let channel = format!("Ch'an\"; NOTIFY x; --\\ {}", rand::random::<u32>());
    let table = s.table("Tab;le \"X\" ' DROP TABLE y; --");
    let key_column = "I\"d; x'";
    s.exec(&format!(
        "CREATE TABLE {table} ({} int PRIMARY KEY, \"Value\" text)",
        q(key_column)
    ))
    .await;
    // The table name also parses back from its quoted form.
    assert_eq!(TableName::parse(&table.to_string()).unwrap(), table);

    let installer = Installer::new()
        .channel(&channel)
        .function_schema(&s.schema)
        .function_name("notify \"fn\"; --")
        .row_keys(true);
    installer
        .install(&s.db, std::slice::from_ref(&table))
        .await
        .unwrap();
    assert_eq!(s.triggers().await.len(), 4);
    assert_eq!(s.functions().await.len(), 1);

    let mut raw = raw_listener(&channel).await;
    s.exec(&format!("INSERT INTO {table} VALUES (7, 'seven')"))
        .await;
    let (e, _) = next_event(&mut raw).await;
    assert_eq!(e.channel, channel);
    assert_eq!(e.schema.as_deref(), Some(s.schema.as_str()));
    assert_eq!(e.table, table.table());
    assert_eq!(e.keys, Some(vec![RowKey::single(key_column, 7)]));
    s.exec(&format!("TRUNCATE {table}")).await;
    let (e, _) = next_event(&mut raw).await;
    assert_eq!(e.operation, Operation::Truncate);

    let st = status(&s.db).await.unwrap();
    let ours: Vec<_> = st.triggers.iter().filter(|t| t.table == table).collect();
    assert_eq!(ours.len(), 4);
    assert!(ours
        .iter()
        .all(|t| t.channel == channel && t.row_keys && t.enabled));

    installer
        .uninstall(&s.db, std::slice::from_ref(&table))
        .await
        .unwrap();
    assert_eq!(s.triggers().await, vec![]);
    assert_eq!(s.functions().await, vec![]);
    // The table and the public schema are intact.
    s.exec(&format!("INSERT INTO {table} VALUES (8, 'eight')"))
        .await;
    s.exec("SELECT 1 FROM pg_namespace WHERE nspname = 'public'")
        .await;
    assert_nothing_pending(&s.db, &mut raw, &channel).await;
}

#[tokio::test]
async fn install_is_idempotent() {
    let s = Scratch::new(unique("pgcw_idem")).await;
    let channel = unique("pgcw_idem");
    let table = s.table("t");
    s.exec(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await;
    let installer = Installer::new()
        .channel(&channel)
        .function_schema(&s.schema);

    installer
        .install(&s.db, std::slice::from_ref(&table))
        .await
        .unwrap();
    let (triggers, functions) = (s.triggers().await, s.functions().await);
    assert_eq!(triggers.len(), 4);
    assert_eq!(functions.len(), 1);
    // Twice, with the table named twice: the same objects, the same function.
    installer
        .install(&s.db, &[table.clone(), table.clone()])
        .await
        .unwrap();
    assert_eq!(s.triggers().await, triggers);
    assert_eq!(s.functions().await, functions);

    // And still exactly one notification per statement.
    let mut raw = raw_listener(&channel).await;
    s.exec(&format!("INSERT INTO {table} VALUES (1)")).await;
    let (e, _) = next_event(&mut raw).await;
    assert_eq!(e.operation, Operation::Insert);
    assert_nothing_pending(&s.db, &mut raw, &channel).await;

    // Switching modes is refused unless allowed, and then replaces the triggers
    // rather than adding to them.
    let rows = installer.clone().row_keys(true);
    assert!(matches!(
        rows.install(&s.db, std::slice::from_ref(&table)).await,
        Err(InstallError::ModeChange(_))
    ));
    assert_eq!(s.triggers().await, triggers);
    rows.clone()
        .allow_mode_change(true)
        .install(&s.db, std::slice::from_ref(&table))
        .await
        .unwrap();
    let after = s.triggers().await;
    assert_eq!(after.len(), 4);
    assert!(after.iter().any(|(_, _, def)| def.contains("REFERENCING")));
}

#[tokio::test]
async fn reinstalling_never_silently_changes_a_tables_mode() {
    let s = Scratch::new(unique("pgcw_mode")).await;
    let channel = unique("pgcw_mode");
    let (a, b) = (s.table("a"), s.table("b"));
    s.exec(&format!(
        "CREATE TABLE {a} (id int PRIMARY KEY); CREATE TABLE {b} (id int PRIMARY KEY)"
    ))
    .await;
    let table_level = Installer::new()
        .channel(&channel)
        .function_schema(&s.schema);
    let row_keys = table_level.clone().row_keys(true);
    row_keys
        .install(&s.db, std::slice::from_ref(&a))
        .await
        .unwrap();
    let installed = s.triggers().await;

    // Re-running the install without row keys, as a forgotten `--row-keys` does:
    // an error naming the table and both modes, and nothing changed (not even on
    // the other, new table).
    let err = table_level
        .install(&s.db, &[a.clone(), b.clone()])
        .await
        .unwrap_err();
    let InstallError::ModeChange(changes) = &err else {
        panic!("expected ModeChange, got {err:?}")
    };
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].table, a);
    assert!(changes[0].installed_row_keys && !changes[0].requested_row_keys);
    let text = err.to_string();
    assert!(
        text.contains("row-key events -> table-level events"),
        "{text}"
    );
    assert!(text.contains("allow_mode_change"), "{text}");
    assert_eq!(s.triggers().await, installed);
    // The dry-run check says the same, also with a pool, and changes nothing.
    assert!(matches!(
        table_level.preflight(&s.db, std::slice::from_ref(&a)).await,
        Err(InstallError::ModeChange(_))
    ));
    // The same mode again is no change; a new table is no change either.
    assert_eq!(
        row_keys
            .preflight(&s.db, &[a.clone(), b.clone()])
            .await
            .unwrap(),
        vec![]
    );

    // Allowed explicitly: reported, then applied.
    let allowed = table_level.clone().allow_mode_change(true);
    let reported = allowed
        .preflight(&s.db, std::slice::from_ref(&a))
        .await
        .unwrap();
    assert_eq!(reported.len(), 1);
    allowed
        .install(&s.db, std::slice::from_ref(&a))
        .await
        .unwrap();
    assert!(s
        .triggers()
        .await
        .iter()
        .all(|(_, _, def)| !def.contains("REFERENCING")));

    // A missing table fails the preflight check as it fails the install.
    let missing = s.table("missing");
    assert!(matches!(
        row_keys.preflight(&s.db, &[missing]).await,
        Err(InstallError::TableNotFound(_))
    ));
}

#[tokio::test]
async fn uninstall_removes_only_its_own_objects() {
    let s = Scratch::new(unique("pgcw_own")).await;
    let channel = unique("pgcw_own");
    let watched = s.table("watched");
    let other = s.table("other");
    let schema = q(&s.schema);
    s.exec(&format!(
        "CREATE TABLE {watched} (id int PRIMARY KEY);
         CREATE TABLE {other} (id int PRIMARY KEY);
         CREATE FUNCTION {schema}.audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
         CREATE TRIGGER audit AFTER INSERT ON {watched} FOR EACH STATEMENT EXECUTE FUNCTION {schema}.audit();
         CREATE TRIGGER pgcachewatch_like AFTER UPDATE ON {watched} FOR EACH ROW EXECUTE FUNCTION {schema}.audit();"
    ))
    .await;
    let installer = Installer::new()
        .channel(&channel)
        .function_schema(&s.schema);
    installer
        .install(&s.db, &[watched.clone(), other.clone()])
        .await
        .unwrap();
    assert_eq!(s.triggers().await.len(), 2 + 8);

    // Uninstalling one table leaves the other's triggers and the function.
    installer
        .uninstall(&s.db, std::slice::from_ref(&other))
        .await
        .unwrap();
    let names: Vec<_> = s
        .triggers()
        .await
        .into_iter()
        .map(|(t, n, _)| (t, n))
        .collect();
    assert!(names.iter().all(|(t, _)| t == "watched"), "{names:?}");
    assert_eq!(names.len(), 2 + 4);
    assert_eq!(s.functions().await.len(), 2);

    // A user trigger calling our function keeps the function alive.
    s.exec(&format!(
        "CREATE TRIGGER mine AFTER DELETE ON {other} FOR EACH STATEMENT
         EXECUTE FUNCTION {schema}.pgcachewatch_notify('x')"
    ))
    .await;
    installer.uninstall(&s.db, &[]).await.unwrap();
    let names: BTreeSet<_> = s.triggers().await.into_iter().map(|(_, n, _)| n).collect();
    assert_eq!(
        names,
        ["audit", "mine", "pgcachewatch_like"]
            .map(String::from)
            .into()
    );
    let functions: Vec<_> = s.functions().await.into_iter().map(|(n, _)| n).collect();
    assert_eq!(functions, ["audit", "pgcachewatch_notify"]);

    // Once nothing calls it, uninstall removes the function, and only it.
    s.exec(&format!("DROP TRIGGER mine ON {other}")).await;
    installer.uninstall(&s.db, &[]).await.unwrap();
    let functions: Vec<_> = s.functions().await.into_iter().map(|(n, _)| n).collect();
    assert_eq!(functions, ["audit"]);
    assert_eq!(s.triggers().await.len(), 2);
}

#[tokio::test]
async fn install_refuses_to_replace_foreign_objects_and_is_all_or_nothing() {
    let s = Scratch::new(unique("pgcw_foreign")).await;
    let ok = s.table("ok");
    let taken = s.table("taken");
    let schema = q(&s.schema);
    s.exec(&format!(
        "CREATE TABLE {ok} (id int);
         CREATE TABLE {taken} (id int);
         CREATE FUNCTION {schema}.f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
         CREATE TRIGGER pgcachewatch_delete AFTER DELETE ON {taken} FOR EACH STATEMENT EXECUTE FUNCTION {schema}.f();
         CREATE VIEW {schema}.v AS SELECT 1 AS one;"
    ))
    .await;
    let installer = Installer::new()
        .channel(unique("pgcw_foreign"))
        .function_schema(&s.schema);
    let before = (s.triggers().await, s.functions().await);

    let err = installer
        .install(&s.db, &[ok.clone(), taken.clone()])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, InstallError::ForeignTrigger { trigger, .. } if trigger == "pgcachewatch_delete"),
        "{err}"
    );
    let missing = s.table("missing");
    let err = installer
        .install(&s.db, &[ok.clone(), missing])
        .await
        .unwrap_err();
    assert!(matches!(err, InstallError::TableNotFound(_)), "{err}");
    let view = s.table("v");
    let err = installer.install(&s.db, &[view]).await.unwrap_err();
    assert!(err.to_string().contains("not a table"), "{err}");
    let err = installer
        .clone()
        .function_name("f")
        .install(&s.db, std::slice::from_ref(&ok))
        .await
        .unwrap_err();
    assert!(matches!(err, InstallError::ForeignFunction(_)), "{err}");
    let err = installer
        .clone()
        .function_schema(unique("pgcw_no_such_schema"))
        .install(&s.db, std::slice::from_ref(&ok))
        .await
        .unwrap_err();
    assert!(matches!(err, InstallError::SchemaNotFound(_)), "{err}");
    assert_eq!((s.triggers().await, s.functions().await), before);
}

#[tokio::test]
async fn dry_runs_apply_nothing() {
    let s = Scratch::new(unique("pgcw_dry")).await;
    let table = s.table("t");
    s.exec(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await;
    let installer = Installer::new()
        .channel(unique("pgcw_dry"))
        .function_schema(&s.schema)
        .row_keys(true);

    let plan = installer
        .plan_install(std::slice::from_ref(&table))
        .unwrap();
    let text = plan.to_string();
    assert!(text.starts_with("BEGIN;\n") && text.ends_with("COMMIT;\n"));
    assert_eq!(text.matches("CREATE TRIGGER").count(), 4);
    assert_eq!(s.triggers().await, vec![]);
    assert_eq!(s.functions().await, vec![]);

    // The printed plan, run as a script, installs exactly what install() does.
    sqlx::raw_sql(&text).execute(&s.db).await.unwrap();
    let by_script = (s.triggers().await, s.functions().await.len());
    assert_eq!(by_script.0.len(), 4);
    let applied = installer
        .install(&s.db, std::slice::from_ref(&table))
        .await
        .unwrap();
    assert_eq!(applied, plan);
    assert_eq!((s.triggers().await, s.functions().await.len()), by_script);

    let plan = installer.plan_uninstall(&s.db, &[]).await.unwrap();
    assert_eq!(plan.to_string().matches("DROP TRIGGER").count(), 4);
    assert_eq!(plan.to_string().matches("DROP FUNCTION").count(), 1);
    assert_eq!((s.triggers().await, s.functions().await.len()), by_script);
    installer.uninstall(&s.db, &[]).await.unwrap();
    assert!(installer
        .plan_uninstall(&s.db, &[])
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn status_lists_triggers_listeners_and_queue_usage() {
    let s = Scratch::new(unique("pgcw_status")).await;
    let channel = unique("pgcw_status");
    let table = s.table("t");
    s.exec(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await;
    Installer::new()
        .channel(&channel)
        .function_schema(&s.schema)
        .install(&s.db, std::slice::from_ref(&table))
        .await
        .unwrap();
    let source = PgListenerSource::builder(database_url())
        .channel(&channel)
        .connect()
        .await
        .unwrap();

    let st = status(&s.db).await.unwrap();
    let mine: Vec<_> = st.triggers.iter().filter(|t| t.table == table).collect();
    let ops: BTreeSet<_> = mine.iter().flat_map(|t| t.operations.clone()).collect();
    assert_eq!(ops, Operation::ALL.into_iter().collect());
    assert!(mine.iter().all(|t| t.channel == channel && !t.row_keys));
    assert!(st
        .functions
        .iter()
        .any(|f| f.schema == s.schema && f.name == "pgcachewatch_notify" && f.triggers == 4));
    assert!(
        st.listeners
            .iter()
            .any(|l| l.application_name.starts_with("pgcachewatch")),
        "{:?}",
        st.listeners
    );
    assert!((0.0..=1.0).contains(&st.queue_usage));
    source.shutdown().await;
}
