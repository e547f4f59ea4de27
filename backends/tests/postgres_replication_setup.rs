//! [`ReplicationSetup`] against the real local PostgreSQL: dry-run plan, setup
//! (idempotent, quoted identifiers), status, a source streaming from what it
//! made, refusing to tear down an active slot, teardown.
#![cfg(feature = "replication")]

#[path = "support/replication.rs"]
mod support;

use pgcachewatch_backends::postgres::TableName;
use pgcachewatch_backends::replication::{PgReplicationSource, ReplicationSetup, SetupError};
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
