//! `record` and `listen` under bursts, against the real local PostgreSQL
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`): every
//! event of a burst is kept, and warnings stay bounded.
//!
//! Each test uses its own channel, so it can run in parallel with every other test.

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod support;

use pgcachewatch::testkit::env::{database_url, unique_name as unique};
use pgcachewatch::testkit::eventlog::{EventLogReader, RecordKind};
use sqlx::PgPool;

const BIN: &str = env!("CARGO_BIN_EXE_pgcachewatch");
/// How long a burst may take to go through an unoptimized build on a busy machine.
const PATIENCE: Duration = Duration::from_secs(120);

/// The binary with the test database in `DATABASE_URL`, `RUST_LOG` as given.
fn pgcachewatch(rust_log: Option<&str>) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("DATABASE_URL", database_url()).stdin(Stdio::null());
    match rust_log {
        Some(filter) => cmd.env("RUST_LOG", filter),
        None => cmd.env_remove("RUST_LOG"),
    };
    cmd
}

/// Spawns the binary; returns once its stderr shows `ready`, with the rest of
/// stderr's lines to come on the receiver.
fn spawn_until(cmd: &mut Command, ready: &str) -> (Child, mpsc::Receiver<String>) {
    let (child, rx, _) = support::spawn_ready(cmd, ready, PATIENCE)
        .unwrap_or_else(|| panic!("never printed {ready:?}"));
    (child, rx)
}

/// Waits (bounded) for the child to exit by itself; its status and stdout.
fn wait(mut child: Child) -> (std::process::ExitStatus, String) {
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).unwrap();
        text
    });
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, reader.join().unwrap());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the binary did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `garbage` payloads that are not events, then `events` distinct events,
/// on `channel`, in one transaction: delivered together at commit.
fn burst(channel: &str, events: u32, garbage: u32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = PgPool::connect(&database_url())
            .await
            .expect("PostgreSQL must be running at DATABASE_URL");
        let mut tx = db.begin().await.unwrap();
        sqlx::query("SELECT pg_notify($1, 'not an event ' || g) FROM generate_series(1, $2) g")
            .bind(channel)
            .bind(i64::from(garbage))
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(
            "SELECT pg_notify($1, json_build_object('operation', 'insert', 'schema', 'public', \
             'table', 'burst', 'sent_at', clock_timestamp(), 'txid', g)::text) \
             FROM generate_series(1, $2) g",
        )
        .bind(channel)
        .bind(i64::from(events))
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
    });
}

#[test]
fn record_keeps_every_event_of_a_50000_notification_transaction() {
    const N: u32 = 50_000;
    let channel = unique("pgcw_burst_record");
    let file = std::env::temp_dir().join(format!("{}.jsonl", unique("pgcw_burst_record")));
    let path = file.to_str().unwrap();
    let count = N.to_string();
    let (child, stderr) = spawn_until(
        pgcachewatch(None).args(["record", path, "--channel", &channel, "--count", &count]),
        "recording",
    );
    burst(&channel, N, 0);
    let (status, _) = wait(child);
    let summary: Vec<String> = stderr.try_iter().collect();
    assert!(status.success(), "record exited with {status}: {summary:?}");

    let text = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    let (mut events, mut gaps, mut txids) = (0u32, 0u32, Vec::new());
    for record in EventLogReader::new(text.as_bytes()).unwrap() {
        match record.unwrap().kind {
            RecordKind::Event(e) => {
                events += 1;
                txids.push(e.txid.unwrap());
            }
            RecordKind::Gap(_) => gaps += 1,
            _ => {}
        }
    }
    assert_eq!((events, gaps), (N, 0), "{summary:?}");
    // Every one of them, in commit order.
    assert!(txids.iter().copied().eq(1..=i64::from(N)));
    assert!(
        summary
            .iter()
            .any(|l| l.trim_start().strip_prefix("events").map(str::trim) == Some(&N.to_string())),
        "{summary:?}"
    );
}

#[test]
fn listen_prints_every_event_of_a_burst_and_a_bounded_number_of_warnings() {
    const EVENTS: u32 = 20_000;
    const GARBAGE: u32 = 20_000;
    let channel = unique("pgcw_burst_listen");
    let count = EVENTS.to_string();
    let started = std::time::Instant::now();
    let (child, stderr) = spawn_until(
        pgcachewatch(Some("warn")).args(["listen", "--channel", &channel, "--count", &count]),
        "listening on",
    );
    burst(&channel, EVENTS, GARBAGE);
    let (status, stdout) = wait(child);
    let elapsed = started.elapsed();
    let stderr: Vec<String> = stderr.try_iter().collect();
    assert!(status.success(), "listen exited with {status}: {stderr:?}");
    assert_eq!(stdout.lines().count(), EVENTS as usize);
    assert!(!stderr.iter().any(|l| l.contains("-- gap")), "{stderr:?}");

    // The malformed-payload warning: at most one a second, plus a summary when
    // the listener stops; each line says how many it stands for, and together
    // they account for every payload that was not an event.
    assert!(
        !stderr.iter().any(|l| l.contains('\u{1b}')),
        "colours on a pipe"
    );
    let warnings: Vec<&String> = stderr.iter().filter(|l| l.contains("WARN")).collect();
    assert!(
        warnings.len() as u64 <= elapsed.as_secs() + 2,
        "{} warning lines in {elapsed:?}: {warnings:?}",
        warnings.len()
    );
    let accounted: u64 = warnings
        .iter()
        .map(|l| {
            let logged = u64::from(l.contains("not an event"));
            let suppressed = l
                .split("suppressed_since_last_warning=")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .map_or(0, |n| n.parse::<u64>().unwrap());
            logged + suppressed
        })
        .sum();
    assert_eq!(accounted, u64::from(GARBAGE), "{warnings:?}");
}
