//! The WebSocket server over the real `LISTEN` source: writes to PostgreSQL
//! reach a WebSocket client, and PGCacheWatch 0.4.2's own `WSEventQueue` (from
//! `bench/python`'s venv, made by `bench/python/setup.sh`) reads them unchanged.
//!
//! The Python test is skipped only when `python3` is missing, and never in CI
//! (`CI=true`): there it must run.
#![cfg(all(feature = "websocket", feature = "postgres"))]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use pgcachewatch_backends::postgres::listener::PgListenerSource;
use pgcachewatch_backends::postgres::{Installer, TableName};
use pgcachewatch_backends::websocket::WsServer;
use pgcachewatch_core::{EventSource, Health};
use pgcachewatch_testkit::env::{database_url, unique_name};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

/// A table with triggers on its own channel, and a listener whose sessions
/// carry `app` as `application_name` (so the test can kill them).
async fn setup(db: &PgPool, app: &str) -> (String, String, PgListenerSource) {
    let table = unique_name("pgcw_ws");
    let channel = unique_name("pgcw_ws_ch");
    sqlx::query(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, name text)"
    ))
    .execute(db)
    .await
    .unwrap();
    Installer::new()
        .channel(&channel)
        .install(db, &[TableName::parse(&format!("public.{table}")).unwrap()])
        .await
        .expect("install triggers");
    let url = database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let source = PgListenerSource::builder(format!("{url}{sep}application_name={app}"))
        .channel(&channel)
        .connect()
        .await
        .expect("listener");
    (table, channel, source)
}

async fn healthy(source: &PgListenerSource) {
    let mut sub = source.subscribe();
    while source.health() != Health::Healthy {
        let _ = tokio::time::timeout(WAIT, sub.recv())
            .await
            .expect("healthy in time");
    }
}

async fn write_three(db: &PgPool, table: &str) {
    for sql in [
        format!("INSERT INTO {table} VALUES (1, 'a')"),
        format!("UPDATE {table} SET name = 'b' WHERE id = 1"),
        format!("DELETE FROM {table} WHERE id = 1"),
    ] {
        sqlx::query(&sql).execute(db).await.unwrap();
    }
}

async fn drop_table(db: &PgPool, table: &str) {
    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(db)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_a_websocket_client_as_pgcachewatch_events() {
    let db = PgPool::connect(&database_url()).await.expect("PostgreSQL");
    let app = unique_name("pgcw_ws_app");
    let (table, channel, source) = setup(&db, &app).await;
    healthy(&source).await;
    let srv = WsServer::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .channel(&channel)
        .start(&source)
        .await
        .unwrap();
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/pgpubsub/{channel}", srv.local_addr()))
            .await
            .unwrap();
    write_three(&db, &table).await;
    for op in ["insert", "update", "delete"] {
        let m = loop {
            match tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("event in time")
            {
                Some(Ok(Message::Text(t))) => {
                    break serde_json::from_str::<serde_json::Value>(&t).unwrap()
                }
                Some(Ok(_)) => continue,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(m["operation"], op);
        assert_eq!(m["table"], table.as_str());
        assert_eq!(m["channel"], channel.as_str());
        let sent_at = chrono::DateTime::parse_from_rfc3339(m["sent_at"].as_str().unwrap()).unwrap();
        assert!((chrono::Utc::now() - sent_at.to_utc()).num_seconds().abs() < 60);
    }
    srv.shutdown().await;
    source.shutdown().await;
    drop_table(&db, &table).await;
}

/// `bench/python/.venv`'s interpreter, made (idempotently) by `setup.sh`;
/// `None` only when python3 is missing outside CI.
fn pgcachewatch_python() -> Option<PathBuf> {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let has_python = std::process::Command::new(&python)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_python {
        assert!(
            !in_ci,
            "CI=true but {python} is missing: the PGCacheWatch test must run in CI"
        );
        eprintln!("SKIPPED: {python} is missing, so PGCacheWatch's WSEventQueue cannot be run");
        return None;
    }
    let bench = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/python");
    let status = std::process::Command::new("bash")
        .arg(bench.join("setup.sh"))
        .status()
        .expect("bash");
    assert!(
        status.success(),
        "bench/python/setup.sh failed: the PGCacheWatch venv could not be made"
    );
    Some(bench.join(".venv/bin/python"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgcachewatch_wseventqueue_reads_the_events_and_bypasses_once_the_source_loses_postgres() {
    // With a token: the service only adds the header to its `connect` call.
    let Some(python) = pgcachewatch_python() else {
        return;
    };
    let db = PgPool::connect(&database_url()).await.expect("PostgreSQL");
    let app = unique_name("pgcw_ws_app");
    let (table, channel, source) = setup(&db, &app).await;
    healthy(&source).await;
    let srv = WsServer::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .channel(&channel)
        .token("py-secret")
        .start(&source)
        .await
        .unwrap();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/wseventqueue_client.py");
    let mut child = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(format!("ws://{}/pgpubsub/{channel}", srv.local_addr()))
        .arg(&channel)
        .arg("3")
        .arg("py-secret")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("a line from the Python client in time")
            .unwrap()
            .expect("the Python client ended early")
    };
    assert_eq!(next().await, "ready");
    assert_eq!(srv.stats().clients, 1);
    write_three(&db, &table).await;
    for op in ["insert", "update", "delete"] {
        let line = next().await;
        let e: serde_json::Value = serde_json::from_str(&line).expect(&line);
        assert_eq!(e["operation"], op, "{line}");
        assert_eq!(e["table"], table.as_str(), "{line}");
        assert_eq!(e["channel"], channel.as_str(), "{line}");
    }
    // Two calls through PGCacheWatch's cache: one load.
    assert_eq!(next().await, "cached 1");

    // The listener loses its PostgreSQL connection: a gap, so the server closes
    // the client; WSEventQueue turns unhealthy and the cache bypasses.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&app)
    .execute(&db)
    .await
    .unwrap();
    assert_eq!(next().await, "closed healthy=False bypass 2");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the Python client failed: {status}");
    assert!(srv.stats().closed_by_source >= 1);
    srv.shutdown().await;
    source.shutdown().await;
    drop_table(&db, &table).await;
}
