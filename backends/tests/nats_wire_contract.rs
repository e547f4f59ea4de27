//! The relay's messages as a contract for consumers in any language (issue 18,
//! item 8): every message two real relays wrote (one over a replication slot,
//! one over `LISTEN`, into one stream) holds to the JSON Schema in
//! `docs/wire/relay-message.schema.json`, every kind of message among them;
//! and the Python consumer in `docs/wire/consumer.py` (nats-py) reads a real
//! relay: the rows written, the position after them, a new epoch as a flush.
//! Real PostgreSQL (`DATABASE_URL`, `wal_level = logical`) and NATS
//! (`NATS_URL`). No timing assertions.
#![cfg(all(feature = "nats", feature = "replication"))]

#[path = "support/replication.rs"]
mod replication_support;
mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy};
use futures::StreamExt;
use pgcachewatch_backends::memory::InMemorySource;
use pgcachewatch_backends::nats::wire::{WireKind, WireMessage};
use pgcachewatch_backends::nats::{NatsConnect, Relay, RelayHandle, StreamSettings};
use pgcachewatch_backends::postgres::PgListenerSource;
use pgcachewatch_backends::replication::PgReplicationSource;
use pgcachewatch_core::Lsn;
use pgcachewatch_testkit::env::{database_url, nats_url};
use replication_support::Fixture;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/wire")
}

fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(docs().join("relay-message.schema.json"))
        .expect("docs/wire/relay-message.schema.json");
    let schema: Value = serde_json::from_str(&text).expect("the schema is JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the schema compiles")
}

/// A relay over a new slot of `f`'s publication, beating every 100 ms.
async fn durable_relay(f: &Fixture, stream: &StreamSettings) -> (RelayHandle, PgReplicationSource) {
    let start = PgReplicationSource::builder(database_url())
        .slot(f.slot())
        .publication(&f.publication)
        .create_slot_if_missing(true)
        .connect_durable()
        .await
        .expect("replication source");
    Relay::builder(NatsConnect::new(nats_url()))
        .stream(stream.clone())
        .heartbeat_interval(Duration::from_millis(100))
        .start_durable(start)
        .await
        .expect("relay")
}

async fn wal_position(f: &Fixture) -> Lsn {
    replication_support::wal_position(&f.db).await
}

/// What a stored message is, for the coverage check.
fn kind_of(msg: &WireMessage) -> &'static str {
    match &msg.kind {
        WireKind::Event(e) if e.lsn.is_some() => "event from a slot",
        WireKind::Event(_) => "event from LISTEN",
        WireKind::Gap(_) => "gap",
        WireKind::Health(_) => "heartbeat",
        WireKind::Progress(_) => "progress",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_message_real_relays_write_holds_to_the_json_schema() {
    let validator = schema();
    let f = Fixture::new("pgcw_wire").await;
    let items = f.table("items");
    f.exec(&format!(
        "CREATE TABLE {items} (id bigint PRIMARY KEY, v text NOT NULL)"
    ))
    .await;
    let stream = support::fresh_stream();
    let js = jetstream::new(NatsConnect::new(nats_url()).connect().await.expect("NATS"));
    let (relay, source) = durable_relay(&f, &stream).await;
    let channel = format!("{}_ch", f.schema);
    let listen = PgListenerSource::builder(database_url())
        .channel(&channel)
        .connect()
        .await
        .expect("LISTEN source");
    let listen_relay = Relay::builder(NatsConnect::new(nats_url()))
        .stream(stream.clone())
        .heartbeat_interval(Duration::from_millis(100))
        .start(&listen)
        .await
        .expect("LISTEN relay");

    // Writes: rows through the slot, one notification as pgcachewatch's
    // triggers send it through LISTEN.
    f.exec(&format!("INSERT INTO {items} VALUES (1, 'a'), (2, 'b')"))
        .await;
    f.exec(&format!("UPDATE {items} SET v = 'c' WHERE id = 1"))
        .await;
    f.exec(&format!("DELETE FROM {items} WHERE id = 2")).await;
    f.exec(&format!(
        "SELECT pg_notify('{channel}', json_build_object('operation', 'update', 'schema', 'public', \
         'table', 'listened', 'sent_at', clock_timestamp(), 'txid', txid_current(), \
         'keys', json_build_array(json_build_object('id', 7)))::text)"
    ))
    .await;
    let last = wal_position(&f).await;

    // Read everything the stream holds, from its start, as any consumer would.
    let consumer = js
        .get_stream(stream.name())
        .await
        .expect("stream")
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let wanted: BTreeSet<&str> = [
        "event from a slot",
        "event from LISTEN",
        "gap",
        "heartbeat",
        "progress",
    ]
    .into();
    let mut seen = BTreeSet::new();
    let mut progress_reached_last = false;
    let mut checked = 0;
    let read = async {
        while !(seen.is_superset(&wanted) && progress_reached_last) {
            let m = messages
                .next()
                .await
                .expect("the stream goes on")
                .expect("a message");
            let json: Value = serde_json::from_slice(&m.payload).expect("JSON");
            let errors: Vec<String> = validator
                .iter_errors(&json)
                .map(|e| format!("{} at {}", e, e.instance_path()))
                .collect();
            assert!(
                errors.is_empty(),
                "a relay message on {} breaks the schema: {errors:?}\n{json}",
                m.subject
            );
            let msg = WireMessage::from_json(&m.payload).expect("a relay message");
            // The subject says what it is, as the docs promise.
            let subject = m.subject.as_str();
            let control = format!("{}.~relay.", stream.prefix());
            match &msg.kind {
                WireKind::Event(e) => assert_eq!(
                    subject,
                    pgcachewatch_backends::nats::subject::table_subject(
                        stream.prefix(),
                        e.schema.as_deref(),
                        &e.table
                    )
                ),
                WireKind::Gap(_) => assert_eq!(subject, format!("{control}gap")),
                WireKind::Health(_) => assert_eq!(subject, format!("{control}heartbeat")),
                WireKind::Progress(lsn) => {
                    assert!(
                        subject.starts_with(&format!("{control}progress.")),
                        "{subject}"
                    );
                    progress_reached_last |= *lsn >= last;
                }
            }
            if seen.insert(kind_of(&msg)) {
                eprintln!("{}: {json}", kind_of(&msg));
            }
            checked += 1;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .unwrap_or_else(|_| {
            panic!("saw only {seen:?} (progress past {last}: {progress_reached_last})")
        });
    eprintln!("{checked} relay messages hold to the schema");

    listen_relay.shutdown().await;
    listen.shutdown().await;
    relay.shutdown().await;
    source.shutdown().await;
    support::delete_stream(&nats_url(), &stream).await;
    f.cleanup().await;
}

/// A Python interpreter with nats-py (pinned in
/// `tests/python/requirements-nats.txt`), in a venv under the target
/// directory. `None` (the test skipped, saying why) when python3 is missing
/// or pip cannot install it, except in CI, where it fails instead.
async fn python_with_nats() -> Option<PathBuf> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let skip = |why: String| {
        assert!(
            !ci,
            "CI=true: the Python consumer must run in CI, but {why}"
        );
        eprintln!("SKIPPED: {why}");
        None
    };
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pgcw-nats-py");
    let status = tokio::process::Command::new("bash")
        .arg(here.join("setup_nats.sh"))
        .arg(&venv)
        .status()
        .await;
    match status {
        Ok(s) if s.success() => Some(venv.join("bin/python")),
        Ok(s) => skip(format!(
            "tests/python/setup_nats.sh failed ({s}): no python3, or pip could not install nats-py"
        )),
        Err(e) => skip(format!(
            "bash could not run tests/python/setup_nats.sh: {e}"
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_consumer_in_the_docs_reads_a_real_relay() {
    let Some(python) = python_with_nats().await else {
        return;
    };
    let f = Fixture::new("pgcw_wirepy").await;
    let items = f.table("items");
    f.exec(&format!(
        "CREATE TABLE {items} (id bigint PRIMARY KEY, v text NOT NULL)"
    ))
    .await;
    let stream = support::fresh_stream();
    let (relay, source) = durable_relay(&f, &stream).await;

    let mut child = tokio::process::Command::new(&python)
        .arg(docs().join("consumer.py"))
        .args([&nats_url(), stream.name(), stream.prefix()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the consumer printed nothing for 30 s")
            .expect("stdout")
            .expect("the consumer exited");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    };
    assert_eq!(next().await, serde_json::json!({"ready": true}));

    f.exec(&format!("INSERT INTO {items} VALUES (1, 'a'), (2, 'b')"))
        .await;
    f.exec(&format!("UPDATE {items} SET v = 'c' WHERE id = 2"))
        .await;
    let last = wal_position(&f).await;
    // Every row written is invalidated, by key, and the position reaches the
    // last write (as a number).
    let mut keys = BTreeSet::new();
    let mut position = 0u64;
    while keys.len() < 2 || position < last.as_u64() {
        let v = next().await;
        if let Some(inv) = v.get("invalidate") {
            assert_eq!(inv["table"], "items", "{v}");
            assert_eq!(inv["schema"], f.schema.as_str(), "{v}");
            for k in inv["keys"].as_array().expect("keys") {
                keys.insert(k["id"].as_i64().expect("an id"));
            }
        } else if let Some(p) = v.get("position") {
            position = position.max(p.as_u64().expect("a number"));
        } else {
            assert!(v.get("flush").is_none(), "a flush with nothing lost: {v}");
        }
    }
    assert_eq!(keys, BTreeSet::from([1, 2]));

    // Another relay starts a new epoch in the stream: the consumer flushes.
    let (upstream, _handle) = InMemorySource::pair();
    let other = Relay::builder(NatsConnect::new(nats_url()))
        .stream(stream.clone())
        .start(&upstream)
        .await
        .expect("another relay");
    loop {
        let v = next().await;
        if let Some(reason) = v.get("flush") {
            assert_eq!(reason, "injected", "the new epoch's gap marker: {v}");
            break;
        }
    }

    other.shutdown().await;
    let _ = child.kill().await;
    relay.shutdown().await;
    source.shutdown().await;
    support::delete_stream(&nats_url(), &stream).await;
    f.cleanup().await;
}
