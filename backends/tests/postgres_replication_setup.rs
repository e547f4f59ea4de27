//! [`ReplicationSetup`] against the real local PostgreSQL: dry-run plan, setup
//! (idempotent, quoted identifiers), status, a source streaming from what it
//! made, refusing to tear down an active slot, teardown; refusing (in the dry
//! run too, changing nothing) a table without a replica identity, a missing
//! table, a view, a materialized view, a foreign or unlogged table;
//! `replica_identity_full`; a partitioned table published via its root.
#![cfg(feature = "replication")]

#[path = "support/replication.rs"]
mod support;

use pgcachewatch_backends::postgres::TableName;
use pgcachewatch_backends::replication::{PgReplicationSource, ReplicationSetup, SetupError};
use pgcachewatch_core::EventSource;
use pgcachewatch_testkit::env::database_url;
use sqlx::Connection;
use support::Fixture;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_status_and_teardown() {
    let f = Fixture::new("pgcw_rsetup").await;
    // A mixed-case table with a quote in its name: identifiers must be quoted.
    let odd = r#"Odd "Name""#;
    f.exec(&format!(
        "CREATE TABLE \"{}\".\"Odd \"\"Name\"\"\" (id int PRIMARY KEY)",
        f.schema
    ))
    .await;
    let table = TableName::new(f.schema.clone(), odd).unwrap();
    let slot = support::unique("pgcw_slot");
    let publication = format!("{}_Setup", f.schema);
    let setup = ReplicationSetup::new()
        .slot(&slot)
        .publication(&publication);
    let mut conn = sqlx::PgConnection::connect(&database_url()).await.unwrap();

    let plan = setup
        .plan_setup(&mut conn, std::slice::from_ref(&table))
        .await
        .unwrap();
    assert!(plan.contains("CREATE PUBLICATION"), "{plan}");
    assert!(plan.contains(r#""Odd ""Name""""#), "{plan}");
    assert!(
        plan.contains("pg_create_logical_replication_slot"),
        "{plan}"
    );
    assert!(
        ReplicationSetup::status(&mut conn)
            .await
            .unwrap()
            .iter()
            .all(|s| s.name != slot),
        "a dry run created the slot"
    );
    assert!(matches!(
        setup.plan_setup(&mut conn, &[]).await,
        Err(SetupError::NoTables)
    ));
    assert!(matches!(
        ReplicationSetup::new()
            .slot("Bad-Slot")
            .plan_setup(&mut conn, std::slice::from_ref(&table))
            .await,
        Err(SetupError::InvalidName { what: "slot", .. })
    ));

    setup
        .setup(&mut conn, std::slice::from_ref(&table))
        .await
        .unwrap();
    let again = setup
        .setup(&mut conn, std::slice::from_ref(&table))
        .await
        .unwrap();
    assert!(
        again.contains("ALTER PUBLICATION") && again.contains("exists already"),
        "{again}"
    );
    let status = ReplicationSetup::status(&mut conn).await.unwrap();
    let mine = status
        .iter()
        .find(|s| s.name == slot)
        .expect("the slot exists");
    assert_eq!(mine.plugin.as_deref(), Some("pgoutput"));
    assert!(!mine.active);
    assert!(mine.lag_bytes.is_some());

    // The source streams from what setup made, and teardown refuses meanwhile.
    let source = PgReplicationSource::builder(database_url())
        .slot(&slot)
        .publication(&publication)
        .connect()
        .await
        .unwrap();
    assert!(matches!(
        setup.teardown(&mut conn).await,
        Err(SetupError::SlotActive { .. })
    ));
    source.shutdown().await;

    let mut dropped = String::new();
    for _ in 0..100 {
        match setup.teardown(&mut conn).await {
            Ok(sql) => {
                dropped = sql;
                break;
            }
            Err(SetupError::SlotActive { .. }) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(dropped.contains("pg_drop_replication_slot") && dropped.contains("DROP PUBLICATION"));
    assert_eq!(setup.teardown(&mut conn).await.unwrap(), "");
    f.cleanup().await;
}

/// A [`Fixture`] whose schema is not published: the fixture's own publication
/// (`FOR TABLES IN SCHEMA`) would publish a keyless table before setup runs.
async fn unpublished(prefix: &str) -> Fixture {
    let f = Fixture::new(prefix).await;
    f.exec(&format!("DROP PUBLICATION \"{}\"", f.publication))
        .await;
    f
}

/// Runs `sql`, which may hold several statements.
async fn batch(f: &Fixture, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(&f.db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn scalar<T>(f: &Fixture, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .fetch_one(&f.db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Whether a publication `name` exists.
async fn publication_exists(f: &Fixture, name: &str) -> bool {
    scalar(
        f,
        &format!("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '{name}')"),
    )
    .await
}

/// Whether a slot `name` exists.
async fn slot_exists(f: &Fixture, name: &str) -> bool {
    scalar(
        f,
        &format!("SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{name}')"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_replica_identity_is_refused_and_stays_writable() {
    let f = unpublished("pgcw_rsetup_nopk").await;
    let keyless = f.table("logs");
    f.exec(&format!("CREATE TABLE {keyless} (v text)")).await;
    f.exec(&format!("INSERT INTO {keyless} VALUES ('a')")).await;
    // A primary key, but REPLICA IDENTITY NOTHING: as unusable.
    let nothing = f.table("nothing");
    batch(
        &f,
        &format!(
            "CREATE TABLE {nothing} (id int PRIMARY KEY); \
             ALTER TABLE {nothing} REPLICA IDENTITY NOTHING"
        ),
    )
    .await;
    let slot = f.slot();
    let publication = f.publication.clone();
    let setup = ReplicationSetup::new()
        .slot(&slot)
        .publication(&publication);
    let mut conn = sqlx::PgConnection::connect(&database_url()).await.unwrap();

    for (table, why) in [
        (&keyless, "(no primary key, replica identity DEFAULT)"),
        (&nothing, "(replica identity NOTHING)"),
    ] {
        let tables = [TableName::parse(table).unwrap()];
        // The dry run refuses as --commit does, and so does --commit.
        let planned = setup.plan_setup(&mut conn, &tables).await;
        let applied = setup.setup(&mut conn, &tables).await;
        for result in [planned, applied] {
            let err = result.expect_err("a table without a replica identity was accepted");
            let text = err.to_string();
            assert!(
                matches!(&err, SetupError::NoReplicaIdentity { relations }
                    if *relations == [format!("{table} {why}")]),
                "{err:?}"
            );
            assert!(
                text.contains("primary key") && text.contains("REPLICA IDENTITY FULL"),
                "the error does not say how to fix it: {text}"
            );
        }
    }
    assert!(neither_exists(&f, &publication, &slot).await);
    // The application's writes still work: nothing was published.
    f.exec(&format!("UPDATE {keyless} SET v = 'b'")).await;
    f.exec(&format!("DELETE FROM {keyless}")).await;
    f.exec(&format!("INSERT INTO {nothing} VALUES (1)")).await;
    f.exec(&format!("UPDATE {nothing} SET id = 2")).await;
    f.cleanup().await;
}

/// Neither the publication nor the slot exists.
async fn neither_exists(f: &Fixture, publication: &str, slot: &str) -> bool {
    !publication_exists(f, publication).await && !slot_exists(f, slot).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relations_that_cannot_be_published_are_refused_by_the_dry_run() {
    let f = unpublished("pgcw_rsetup_kind").await;
    drop_globals_of_dead_tests(&f).await;
    let base = f.table("base");
    f.exec(&format!("CREATE TABLE {base} (id int PRIMARY KEY)"))
        .await;
    f.exec(&format!(
        "CREATE VIEW {} AS SELECT id FROM {base}",
        f.table("v")
    ))
    .await;
    f.exec(&format!(
        "CREATE MATERIALIZED VIEW {} AS SELECT id FROM {base}",
        f.table("mv")
    ))
    .await;
    f.exec(&format!(
        "CREATE UNLOGGED TABLE {} (id int PRIMARY KEY)",
        f.table("scratch")
    ))
    .await;
    // A foreign table needs no extension: a wrapper without a handler will do.
    let wrapper = format!("{}_fdw", f.schema);
    batch(
        &f,
        &format!(
            "CREATE FOREIGN DATA WRAPPER \"{wrapper}\"; \
             CREATE SERVER \"{wrapper}_srv\" FOREIGN DATA WRAPPER \"{wrapper}\""
        ),
    )
    .await;
    f.exec(&format!(
        "CREATE FOREIGN TABLE {} (id int) SERVER \"{wrapper}_srv\"",
        f.table("remote")
    ))
    .await;
    let slot = f.slot();
    let publication = f.publication.clone();
    let setup = ReplicationSetup::new()
        .slot(&slot)
        .publication(&publication);
    let mut conn = sqlx::PgConnection::connect(&database_url()).await.unwrap();

    for (name, says) in [
        ("missing", "does not exist"),
        ("v", "is a view"),
        ("mv", "is a materialized view"),
        ("remote", "is a foreign table"),
        ("scratch", "is an unlogged table"),
    ] {
        let table = f.table(name);
        // With a good table beside it: one bad table refuses the whole setup.
        let tables = [
            TableName::parse(&base).unwrap(),
            TableName::parse(&table).unwrap(),
        ];
        let planned = setup.plan_setup(&mut conn, &tables).await;
        let err = planned.expect_err(&format!("the dry run accepted {table}"));
        let text = err.to_string();
        assert!(
            text.contains(&table) && text.contains(says),
            "{name}: {text}"
        );
        assert!(
            matches!(
                (&err, name),
                (SetupError::TableNotFound { .. }, "missing")
                    | (
                        SetupError::NotATable { .. },
                        "v" | "mv" | "remote" | "scratch"
                    )
            ),
            "{err:?}"
        );
        let applied = setup.setup(&mut conn, &tables).await;
        assert_eq!(applied.expect_err("setup accepted it").to_string(), text);
    }
    assert!(neither_exists(&f, &publication, &slot).await);
    // Its server and foreign table go with it.
    f.exec(&format!("DROP FOREIGN DATA WRAPPER \"{wrapper}\" CASCADE"))
        .await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_is_published_via_its_root() {
    let f = unpublished("pgcw_rsetup_part").await;
    let orders = f.table("orders");
    batch(
        &f,
        &format!(
            "CREATE TABLE {orders} (id int, region text, total int, PRIMARY KEY (id, region)) \
               PARTITION BY LIST (region); \
             CREATE TABLE {} PARTITION OF {orders} FOR VALUES IN ('eu'); \
             CREATE TABLE {} PARTITION OF {orders} FOR VALUES IN ('us')",
            f.table("orders_eu"),
            f.table("orders_us")
        ),
    )
    .await;
    let slot = f.slot();
    let publication = f.publication.clone();
    let setup = ReplicationSetup::new()
        .slot(&slot)
        .publication(&publication);
    let tables = [TableName::parse(&orders).unwrap()];
    let mut conn = sqlx::PgConnection::connect(&database_url()).await.unwrap();

    let plan = setup.plan_setup(&mut conn, &tables).await.unwrap();
    assert!(
        plan.contains("WITH (publish_via_partition_root = true)"),
        "{plan}"
    );
    setup.setup(&mut conn, &tables).await.unwrap();
    let via_root: bool = scalar(
        &f,
        &format!("SELECT pubviaroot FROM pg_publication WHERE pubname = '{publication}'"),
    )
    .await;
    assert!(via_root, "the publication does not publish via the root");

    // A write to a partition arrives as the partitioned table.
    let source = PgReplicationSource::builder(database_url())
        .slot(&slot)
        .publication(&publication)
        .connect()
        .await
        .unwrap();
    let mut sub = source.subscribe();
    f.exec(&format!("INSERT INTO {orders} VALUES (1, 'eu', 10)"))
        .await;
    f.exec(&format!("UPDATE {orders} SET total = 11 WHERE id = 1"))
        .await;
    for op in ["INSERT", "UPDATE"] {
        let event = next_event(&mut sub).await;
        assert_eq!(
            (event.schema.as_deref(), &*event.table),
            (Some(f.schema.as_str()), "orders"),
            "the {op} on orders_eu arrived as {event:?}"
        );
    }
    source.shutdown().await;
    f.drop_slots().await;
    f.exec(&format!("DROP PUBLICATION \"{publication}\"")).await;

    // A publication made without the option (by an older setup) gets it.
    f.exec(&format!(
        "CREATE PUBLICATION \"{publication}\" FOR TABLE {orders}"
    ))
    .await;
    let setup = setup.slot(f.slot());
    let plan = setup.setup(&mut conn, &tables).await.unwrap();
    assert!(
        plan.contains(&format!(
            "ALTER PUBLICATION \"{publication}\" SET (publish_via_partition_root = true);"
        )),
        "{plan}"
    );
    let via_root: bool = scalar(
        &f,
        &format!("SELECT pubviaroot FROM pg_publication WHERE pubname = '{publication}'"),
    )
    .await;
    assert!(via_root, "setup left the existing publication as it was");
    f.drop_slots().await;
    f.exec(&format!("DROP PUBLICATION \"{publication}\"")).await;

    // Without a primary key on the partitioned table its partitions have none:
    // refused like any keyless table.
    let keyless = f.table("events");
    batch(
        &f,
        &format!(
            "CREATE TABLE {keyless} (at date, v text) PARTITION BY RANGE (at); \
             CREATE TABLE {} PARTITION OF {keyless} \
               FOR VALUES FROM ('2020-01-01') TO ('2030-01-01')",
            f.table("events_2020s")
        ),
    )
    .await;
    let err = setup
        .plan_setup(&mut conn, &[TableName::parse(&keyless).unwrap()])
        .await
        .expect_err("a partitioned table without a primary key was accepted");
    assert!(
        matches!(&err, SetupError::NoReplicaIdentity { relations } if *relations == [
            format!("{keyless} (partitioned table, no primary key, replica identity DEFAULT)"),
            format!(
                "{} (partition of {keyless}; no primary key, replica identity DEFAULT)",
                f.table("events_2020s")
            ),
        ]),
        "{err:?}"
    );
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_full_publishes_keyless_tables_whose_writes_keep_working() {
    let f = unpublished("pgcw_rsetup_full").await;
    let logs = f.table("logs");
    f.exec(&format!("CREATE TABLE {logs} (v text)")).await;
    f.exec(&format!("INSERT INTO {logs} VALUES ('a')")).await;
    let (events, events_2020s) = (f.table("events"), f.table("events_2020s"));
    batch(
        &f,
        &format!(
            "CREATE TABLE {events} (at date, v text) PARTITION BY RANGE (at); \
             CREATE TABLE {events_2020s} PARTITION OF {events} \
               FOR VALUES FROM ('2020-01-01') TO ('2030-01-01')"
        ),
    )
    .await;
    let with_key = f.table("with_key");
    f.exec(&format!("CREATE TABLE {with_key} (id int PRIMARY KEY)"))
        .await;
    let slot = f.slot();
    let publication = f.publication.clone();
    let setup = ReplicationSetup::new()
        .slot(&slot)
        .publication(&publication)
        .replica_identity_full(true);
    let tables = [&logs, &events, &with_key].map(|t| TableName::parse(t).unwrap());
    let mut conn = sqlx::PgConnection::connect(&database_url()).await.unwrap();
    let identity = |table: &str| {
        format!("SELECT relreplident::text FROM pg_class WHERE oid = '{table}'::regclass")
    };

    // The dry run shows the ALTER TABLEs and changes nothing.
    let plan = setup.plan_setup(&mut conn, &tables).await.unwrap();
    for table in [&logs, &events, &events_2020s] {
        assert!(
            plan.contains(&format!("ALTER TABLE {table} REPLICA IDENTITY FULL;")),
            "{plan}"
        );
        assert_eq!(scalar::<String>(&f, &identity(table)).await, "d");
    }
    assert!(!plan.contains(&format!("ALTER TABLE {with_key}")), "{plan}");
    assert!(neither_exists(&f, &publication, &slot).await);

    let applied = setup.setup(&mut conn, &tables).await.unwrap();
    assert_eq!(applied, plan);
    for table in [&logs, &events, &events_2020s] {
        assert_eq!(scalar::<String>(&f, &identity(table)).await, "f", "{table}");
    }
    assert_eq!(scalar::<String>(&f, &identity(&with_key)).await, "d");
    // Published, and the application's writes work; the source sees them.
    let source = PgReplicationSource::builder(database_url())
        .slot(&slot)
        .publication(&publication)
        .connect()
        .await
        .unwrap();
    let mut sub = source.subscribe();
    f.exec(&format!("UPDATE {logs} SET v = 'b'")).await;
    f.exec(&format!("INSERT INTO {events} VALUES ('2024-05-01', 'x')"))
        .await;
    f.exec(&format!("UPDATE {events} SET v = 'y'")).await;
    f.exec(&format!("DELETE FROM {events}")).await;
    let seen: Vec<String> = tables_of_next_events(&mut sub, 4).await;
    assert_eq!(seen, ["logs", "events", "events", "events"]);
    source.shutdown().await;

    // Again: the identities are set, only the publication is restated.
    let again = setup.setup(&mut conn, &tables).await.unwrap();
    assert!(!again.contains("ALTER TABLE"), "{again}");
    f.cleanup().await;
}

/// The tables of the next `n` events.
async fn tables_of_next_events(sub: &mut pgcachewatch_core::Subscription, n: usize) -> Vec<String> {
    let mut tables = Vec::with_capacity(n);
    for _ in 0..n {
        tables.push(next_event(sub).await.table.to_string());
    }
    tables
}

/// The next event, skipping health and progress signals.
async fn next_event(
    sub: &mut pgcachewatch_core::Subscription,
) -> std::sync::Arc<pgcachewatch_core::Event> {
    use pgcachewatch_core::Signal;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(60), sub.recv()).await {
            Ok(Some(Signal::Event(e))) => return e,
            Ok(Some(Signal::Health(_) | Signal::Progress(_))) => continue,
            Ok(Some(other)) => panic!("expected an event, got {other:?}"),
            Ok(None) => panic!("subscription ended"),
            Err(_) => panic!("no event within a minute"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dry_run_refuses_what_the_role_does_not_own() {
    let f = unpublished("pgcw_rsetup_own").await;
    drop_globals_of_dead_tests(&f).await;
    // A role that may replicate and create publications, owning one table.
    let role = support::unique("pgcw_role");
    let (theirs, mine) = (f.table("theirs"), f.table("mine"));
    batch(
        &f,
        &format!(
            "CREATE ROLE \"{role}\" LOGIN REPLICATION; \
             GRANT USAGE ON SCHEMA \"{schema}\" TO \"{role}\"; \
             CREATE TABLE {theirs} (id int PRIMARY KEY); \
             CREATE TABLE {mine} (id int PRIMARY KEY); \
             ALTER TABLE {mine} OWNER TO \"{role}\"",
            schema = f.schema
        ),
    )
    .await;
    let database: String = scalar(&f, "SELECT current_database()::text").await;
    batch(
        &f,
        &format!("GRANT CREATE ON DATABASE \"{database}\" TO \"{role}\""),
    )
    .await;
    let options: sqlx::postgres::PgConnectOptions = database_url().parse().unwrap();
    let mut conn = sqlx::PgConnection::connect_with(&options.username(&role))
        .await
        .unwrap();
    let slot = f.slot();
    let publication = f.publication.clone();
    let setup = ReplicationSetup::new()
        .slot(&slot)
        .publication(&publication);
    let table = |t: &str| [TableName::parse(t).unwrap()];

    let err = setup
        .plan_setup(&mut conn, &table(&theirs))
        .await
        .expect_err("the dry run accepted a table the role does not own");
    assert!(
        matches!(&err, SetupError::NotOwner { role: r, table } if *r == role && *table == theirs),
        "{err:?}"
    );
    let plan = setup.plan_setup(&mut conn, &table(&mine)).await.unwrap();
    assert!(plan.contains("CREATE PUBLICATION"), "{plan}");

    // A publication of that name owned by someone else: changing it would fail.
    f.exec(&format!(
        "CREATE PUBLICATION \"{publication}\" FOR TABLE {theirs}"
    ))
    .await;
    let err = setup
        .plan_setup(&mut conn, &table(&mine))
        .await
        .expect_err("the dry run accepted a publication the role does not own");
    assert!(
        matches!(&err, SetupError::Privilege { what, .. } if what.contains("publication")),
        "{err:?}"
    );
    assert!(!slot_exists(&f, &slot).await);
    conn.close().await.unwrap();
    f.cleanup().await;
    batch(
        &f,
        &format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\""),
    )
    .await;
}

/// Drops the roles (`pgcw_role_<pid>_…`) and foreign-data wrappers
/// (`pgcw_rsetup_kind_<pid>_…`) of test processes that are gone: they are not
/// in the fixture's schema, and outlive a test that failed before dropping them.
async fn drop_globals_of_dead_tests(f: &Fixture) {
    let names: Vec<(String, String)> = sqlx::query_as(
        "SELECT 'ROLE', rolname::text FROM pg_roles WHERE rolname LIKE 'pgcw\\_role\\_%' \
         UNION ALL SELECT 'FOREIGN DATA WRAPPER', fdwname::text FROM pg_foreign_data_wrapper \
          WHERE fdwname LIKE 'pgcw\\_rsetup\\_kind\\_%'",
    )
    .fetch_all(&f.db)
    .await
    .unwrap_or_default();
    for (what, name) in names {
        let pid = name.split('_').find(|p| p.parse::<u32>().is_ok());
        if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            let sql = if what == "ROLE" {
                format!("DROP OWNED BY \"{name}\"; DROP ROLE \"{name}\"")
            } else {
                format!("DROP FOREIGN DATA WRAPPER \"{name}\" CASCADE")
            };
            let _ = sqlx::raw_sql(&sql).execute(&f.db).await;
        }
    }
}
