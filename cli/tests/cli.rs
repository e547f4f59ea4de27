//! The `pgcachewatch` binary, run as a user runs it, against the real local
//! PostgreSQL (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`).
//!
//! Each test has its own schema (holding its tables and its notify function) and
//! channel, so it can run in parallel with every other test binary.

use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod support;

use pgcachewatch::testkit::env::{database_url, unique_name as unique};
use pgcachewatch::testkit::eventlog::{EventLogReader, RecordKind};
use sqlx::PgPool;

const BIN: &str = env!("CARGO_BIN_EXE_pgcachewatch");
const PATIENCE: Duration = Duration::from_secs(20);

/// The binary with the test database in `DATABASE_URL` and nothing else set.
fn pgcachewatch() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("DATABASE_URL", database_url())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "the binary panicked:\n{stderr}"
    );
    (out, stdout, stderr)
}

fn ok(args: &[&str]) -> (String, String) {
    let (out, stdout, stderr) = run(pgcachewatch().args(args));
    assert!(out.status.success(), "{args:?} failed:\n{stderr}");
    (stdout, stderr)
}

/// A schema of the test's own with one table `t`, dropped when the guard drops.
struct Scratch {
    rt: tokio::runtime::Runtime,
    db: PgPool,
    schema: String,
}

impl Scratch {
    fn new(prefix: &str) -> Scratch {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let db = rt
            .block_on(PgPool::connect(&database_url()))
            .expect("PostgreSQL must be running at DATABASE_URL");
        let s = Scratch {
            rt,
            db,
            schema: unique(prefix),
        };
        s.exec(&format!(
            "CREATE SCHEMA \"{0}\"; CREATE TABLE \"{0}\".t (id int PRIMARY KEY, v text)",
            s.schema
        ));
        s
    }

    /// `schema.t`, as typed on the command line.
    fn table(&self) -> String {
        format!("{}.t", self.schema)
    }

    /// `install schema.t --commit` on `channel`, its function in the scratch
    /// schema, with `extra` arguments.
    fn install_on(&self, channel: &str, extra: &[&str]) {
        let table = self.table();
        let args = [
            "install",
            &table,
            "--commit",
            "--function-schema",
            &self.schema,
            "--channel",
            channel,
        ];
        ok(&[&args[..], extra].concat());
    }

    fn exec(&self, sql: &str) {
        self.rt
            .block_on(sqlx::raw_sql(sql).execute(&self.db))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn trigger_count(&self) -> i64 {
        self.rt
            .block_on(
                sqlx::query_scalar(
                    "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                      JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1",
                )
                .bind(&self.schema)
                .fetch_one(&self.db),
            )
            .unwrap()
    }

    fn function_count(&self) -> i64 {
        self.rt
            .block_on(
                sqlx::query_scalar(
                    "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                      WHERE n.nspname = $1",
                )
                .bind(&self.schema)
                .fetch_one(&self.db),
            )
            .unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        let _ = self.rt.block_on(sqlx::raw_sql(&sql).execute(&self.db));
    }
}

/// Spawns the binary and waits until its stderr shows `ready` (it is listening).
fn spawn_until(args: &[&str], ready: &str) -> (Child, mpsc::Receiver<String>) {
    let (child, rx, _) = spawn_until_line(args, ready);
    (child, rx)
}

/// [`spawn_until`], also returning the line that showed `ready`.
fn spawn_until_line(args: &[&str], ready: &str) -> (Child, mpsc::Receiver<String>, String) {
    spawn_until_line_or_exit(args, ready)
        .unwrap_or_else(|| panic!("{args:?} never printed {ready:?} (it failed or exited)"))
}

/// Waits for the child to exit on its own, failing the test after [`PATIENCE`].
fn wait(mut child: Child) -> (std::process::ExitStatus, String) {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stdout = String::new();
            std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
            return (status, stdout);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the binary did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends the binary a Ctrl-C (SIGINT) and waits for it to exit ([`wait`]).
fn interrupt(child: Child) -> (std::process::ExitStatus, String) {
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -INT failed");
    wait(child)
}

#[test]
fn install_dry_run_prints_sql_and_changes_nothing() {
    let s = Scratch::new("pgcw_cli_dry");
    let (stdout, stderr) = ok(&[
        "install",
        &s.table(),
        "--function-schema",
        &s.schema,
        "--row-keys",
    ]);
    assert!(stdout.starts_with("BEGIN;\n") && stdout.ends_with("COMMIT;\n"));
    assert_eq!(stdout.matches("CREATE TRIGGER").count(), 4);
    assert!(stdout.contains(&format!("ON \"{}\".\"t\"", s.schema)));
    assert!(stderr.contains("dry run"), "{stderr}");
    assert_eq!((s.trigger_count(), s.function_count()), (0, 0));

    // The dry run needs no database at all.
    let (out, stdout, _) = run(pgcachewatch()
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .args(["install", "some_table"]));
    assert!(out.status.success());
    assert!(stdout.contains("CREATE TRIGGER"));
}

#[test]
fn commit_installs_status_shows_it_and_uninstall_removes_it() {
    let s = Scratch::new("pgcw_cli_commit");
    let channel = unique("pgcw_cli_commit");
    let common = [
        "--function-schema",
        s.schema.as_str(),
        "--channel",
        &channel,
    ];
    let table = s.table();

    let (_, stderr) = ok(&[&["install", &table, "--commit"][..], &common].concat());
    assert!(stderr.contains("installed"), "{stderr}");
    assert_eq!((s.trigger_count(), s.function_count()), (4, 1));
    // Twice is fine and changes nothing.
    ok(&[&["install", &table, "--commit"][..], &common].concat());
    assert_eq!((s.trigger_count(), s.function_count()), (4, 1));

    let (text, _) = ok(&["status"]);
    assert!(
        text.contains(&format!(
            "\"{}\".\"t\"  insert,update,delete,truncate",
            s.schema
        )),
        "{text}"
    );
    let (json, _) = ok(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mine: Vec<_> = json["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["schema"] == s.schema.as_str())
        .collect();
    assert_eq!(mine.len(), 4);
    assert!(mine.iter().all(|t| t["channel"] == channel.as_str()));

    // Uninstall: a dry run first, which removes nothing.
    let (plan, stderr) = ok(&[&["uninstall", &table][..], &common[..2]].concat());
    assert_eq!(plan.matches("DROP TRIGGER").count(), 4);
    assert!(plan.contains("DROP FUNCTION"));
    assert!(stderr.contains("dry run"));
    assert_eq!((s.trigger_count(), s.function_count()), (4, 1));
    ok(&[&["uninstall", &table, "--commit"][..], &common[..2]].concat());
    assert_eq!((s.trigger_count(), s.function_count()), (0, 0));
    let (_, stderr) = ok(&[&["uninstall", "--all", "--commit"][..], &common[..2]].concat());
    assert!(stderr.contains("nothing to uninstall"), "{stderr}");
}

#[test]
fn connection_problems_give_a_clear_error_and_a_non_zero_exit() {
    let unreachable = "postgres://postgres@127.0.0.1:1/test";
    for args in [
        &["status"][..],
        &["uninstall"],
        &["listen"],
        &["install", "t", "--commit"],
    ] {
        let (out, _, stderr) = run(pgcachewatch().env("DATABASE_URL", unreachable).args(args));
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
        assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    }

    let (out, _, stderr) = run(pgcachewatch()
        .env("DATABASE_URL", "mysql://x@y/z")
        .arg("status"));
    assert!(!out.status.success());
    assert!(stderr.contains("postgres://"), "{stderr}");

    // Without a URL, the PG* variables are used, and the error says so.
    let (out, _, stderr) = run(pgcachewatch()
        .env_remove("DATABASE_URL")
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", "1")
        .arg("status"));
    assert!(!out.status.success());
    assert!(stderr.contains("PG* environment variables"), "{stderr}");
    assert!(stderr.contains("PGHOST"), "{stderr}");

    // Bad input is an error too, not a panic.
    let (out, _, stderr) = run(pgcachewatch().args(["install", "a b"]));
    assert!(!out.status.success());
    assert!(stderr.contains("quote the name"), "{stderr}");
}

#[test]
fn pg_variables_alone_are_enough() {
    let url = database_url();
    let opts: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let (out, stdout, stderr) = run(pgcachewatch()
        .env_remove("DATABASE_URL")
        .env("PGHOST", opts.get_host())
        .env("PGPORT", opts.get_port().to_string())
        .env("PGUSER", opts.get_username())
        .env("PGDATABASE", opts.get_database().unwrap_or("test"))
        .arg("status"));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("NOTIFY queue usage"), "{stdout}");
}

#[test]
fn listen_prints_events_with_latency() {
    let s = Scratch::new("pgcw_cli_listen");
    let channel = unique("pgcw_cli_listen");
    s.install_on(&channel, &[]);

    let (child, _stderr) = spawn_until(
        &["listen", "--channel", &channel, "--count", "2"],
        "listening on",
    );
    s.exec(&format!("INSERT INTO \"{}\".t VALUES (1, 'a')", s.schema));
    s.exec(&format!("DELETE FROM \"{}\".t", s.schema));
    let (status, stdout) = wait(child);
    assert!(status.success());
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].contains("insert") && lines[1].contains("delete"),
        "{stdout}"
    );
    assert!(lines
        .iter()
        .all(|l| l.contains(&format!("{}.t", s.schema)) && l.contains("latency")));
}

#[test]
fn record_writes_a_replayable_log_and_flushes_on_ctrl_c() {
    let s = Scratch::new("pgcw_cli_record");
    let channel = unique("pgcw_cli_record");
    s.install_on(&channel, &["--row-keys"]);
    let dir = std::env::temp_dir();
    let file = dir.join(format!("{}.jsonl", unique("pgcw_cli_record")));
    let path = file.to_str().unwrap();

    let (child, stderr) = spawn_until(&["record", path, "--channel", &channel], "recording");
    s.exec(&format!(
        "INSERT INTO \"{}\".t VALUES (1, 'a'), (2, 'b')",
        s.schema
    ));
    s.exec(&format!(
        "UPDATE \"{}\".t SET v = 'c' WHERE id = 2",
        s.schema
    ));
    // Wait until the second event is on disk, then interrupt like Ctrl-C does.
    let deadline = std::time::Instant::now() + PATIENCE;
    while std::fs::read_to_string(&file)
        .unwrap_or_default()
        .matches("\"event\"")
        .count()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "events never recorded"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, _) = interrupt(child);
    assert!(status.success(), "record exited with {status}");
    let summary: Vec<String> = stderr.try_iter().collect();
    assert!(
        summary.iter().any(|l| l.contains("stopped: interrupted")),
        "{summary:?}"
    );
    assert!(
        summary
            .iter()
            .any(|l| summary_row(l, "events") == Some("2")),
        "{summary:?}"
    );

    let text = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    let mut reader = EventLogReader::new(text.as_bytes()).unwrap();
    assert!(reader
        .header()
        .source
        .as_deref()
        .unwrap_or("")
        .contains(&channel));
    let events: Vec<_> = reader
        .by_ref()
        .map(|r| r.unwrap())
        .filter_map(|r| match r.kind {
            RecordKind::Event(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].operation.as_str(), "insert");
    assert_eq!(events[0].keys.as_ref().map(Vec::len), Some(2));
    assert_eq!(events[1].operation.as_str(), "update");
    assert!(text.ends_with('\n'));

    // --count stops by itself.
    let (child, _) = spawn_until(
        &["record", path, "--channel", &channel, "--count", "1"],
        "recording",
    );
    s.exec(&format!("TRUNCATE \"{}\".t", s.schema));
    let (status, _) = wait(child);
    assert!(status.success());
    let text = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    assert_eq!(text.matches("\"truncate\"").count(), 1, "{text}");
}

/// Runs and expects failure: exit code `code` (None: any non-zero), `error: ` first.
fn fails(cmd: &mut Command, code: Option<i32>) -> (String, String) {
    let (out, stdout, stderr) = run(cmd);
    assert!(!out.status.success(), "succeeded:\n{stdout}\n{stderr}");
    if let Some(code) = code {
        assert_eq!(out.status.code(), Some(code), "{stderr}");
    }
    assert!(
        stderr.starts_with("error: "),
        "the error is not first:\n{stderr}"
    );
    (stdout, stderr)
}

#[test]
fn failures_exit_non_zero_with_the_error_first_and_no_sql() {
    let s = Scratch::new("pgcw_cli_fail");
    let missing = format!("{}.missing", s.schema);
    let schema = ["--function-schema", s.schema.as_str()];

    // A dry run that can connect checks the tables, as --commit would.
    let (stdout, stderr) = fails(
        pgcachewatch().args([&["install", &missing][..], &schema].concat()),
        Some(1),
    );
    assert!(
        stdout.is_empty(),
        "SQL printed despite the error:\n{stdout}"
    );
    assert!(stderr.contains("does not exist"), "{stderr}");

    // --commit: the error alone, no SQL before it.
    let (stdout, stderr) = fails(
        pgcachewatch().args([&["install", &missing, "--commit"][..], &schema].concat()),
        Some(1),
    );
    assert!(stdout.is_empty(), "{stdout}");
    assert!(!stderr.contains("COMMIT;"), "{stderr}");
    assert_eq!((s.trigger_count(), s.function_count()), (0, 0));

    // Success with --commit prints no SQL either, unless -v.
    let table = s.table();
    let (stdout, stderr) = ok(&[&["install", &table, "--commit"][..], &schema].concat());
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("installed"), "{stderr}");
    let (stdout, _) = ok(&[&["install", &table, "--commit", "-v"][..], &schema].concat());
    assert!(stdout.contains("CREATE TRIGGER"), "{stdout}");
    let (stdout, _) = ok(&[&["uninstall", &table, "--commit"][..], &schema].concat());
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(s.trigger_count(), 0);
}

#[test]
fn argument_errors_speak_the_command_lines_words() {
    for args in [
        &["install", "t", "--channel", ""][..],
        &["listen", "--channel", ""],
        &["record", "out.jsonl", "--channel", ""],
    ] {
        let (_, stderr) = fails(pgcachewatch().args(args), Some(2));
        assert!(
            stderr.contains("--channel must not be empty"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains(".channel("), "builder words: {stderr}");
        assert!(!stderr.contains("DATABASE_URL"), "unrelated hint: {stderr}");
    }
    let long = "c".repeat(64);
    let (_, stderr) = fails(pgcachewatch().args(["listen", "--channel", &long]), Some(2));
    assert!(
        stderr.contains("--channel must be at most 63 bytes"),
        "{stderr}"
    );
}

#[test]
fn install_never_silently_switches_a_tables_mode() {
    let s = Scratch::new("pgcw_cli_mode");
    let table = s.table();
    let schema = ["--function-schema", s.schema.as_str()];
    ok(&[&["install", &table, "--row-keys", "--commit"][..], &schema].concat());
    let row_mode_triggers = || {
        s.rt.block_on(
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                  JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND pg_get_triggerdef(t.oid) LIKE '%''rows''%'",
            )
            .bind(&s.schema)
            .fetch_one(&s.db),
        )
        .unwrap()
    };
    assert_eq!(row_mode_triggers(), 4);

    // Forgetting --row-keys: refused, in a dry run and with --commit, saying what
    // would change and how to allow it; nothing changes.
    for commit in [&[][..], &["--commit"]] {
        let (stdout, stderr) = fails(
            pgcachewatch().args([&["install", &table][..], commit, &schema].concat()),
            Some(1),
        );
        assert!(stdout.is_empty(), "{stdout}");
        assert!(
            stderr.contains("row-key events -> table-level events"),
            "{stderr}"
        );
        assert!(
            stderr.contains("--row-keys") && stderr.contains("--change-mode"),
            "{stderr}"
        );
        assert_eq!(row_mode_triggers(), 4);
    }
    // The same mode again is fine.
    ok(&[&["install", &table, "--row-keys", "--commit"][..], &schema].concat());
    // Asked for explicitly: the dry run reports it, --commit applies and reports it.
    let (_, stderr) = ok(&[&["install", &table, "--change-mode"][..], &schema].concat());
    assert!(stderr.contains("would change"), "{stderr}");
    assert_eq!(row_mode_triggers(), 4);
    let (_, stderr) = ok(&[
        &["install", &table, "--change-mode", "--commit"][..],
        &schema,
    ]
    .concat());
    assert!(
        stderr.contains("changed") && stderr.contains("table-level"),
        "{stderr}"
    );
    assert_eq!(row_mode_triggers(), 0);
    assert_eq!(s.trigger_count(), 4);
}

#[test]
fn tls_settings_in_the_url_are_honoured() {
    let url = database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let (out, stdout, stderr) = run(pgcachewatch()
        .env("DATABASE_URL", format!("{url}{sep}sslmode=require"))
        .arg("status"));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("NOTIFY queue usage"), "{stdout}");
    let (out, _, stderr) = run(pgcachewatch()
        .env(
            "DATABASE_URL",
            format!(
                "{url}{sep}sslmode=verify-ca&sslrootcert={}",
                pgcachewatch::testkit::env::server_root_cert()
            ),
        )
        .arg("status"));
    assert!(out.status.success(), "{stderr}");
}

#[test]
fn relay_serves_pgcachewatch_websocket_clients_without_nats() {
    use std::io::{Read, Write};

    // Off loopback without a token: refused before anything is served.
    let (_, stderr) = fails(
        pgcachewatch().args(["relay", "--no-nats", "--ws-listen", "0.0.0.0:0"]),
        Some(1),
    );
    assert!(stderr.contains("bearer token"), "{stderr}");
    // --no-nats needs --ws-listen.
    fails(pgcachewatch().args(["relay", "--no-nats"]), Some(2));

    let s = Scratch::new("pgcw_cli_ws");
    let channel = unique("pgcw_cli_ws");
    s.install_on(&channel, &[]);
    let (mut child, _stderr, serving) = spawn_until_line(
        &[
            "relay",
            "--no-nats",
            "--channel",
            &channel,
            "--ws-listen",
            "127.0.0.1:0",
        ],
        "serving",
    );
    // "serving [..] at ws://ADDR/pgpubsub/{channel} (no token)"
    let addr = serving
        .split("ws://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no address in {serving:?}"))
        .to_owned();
    let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        tcp,
        "GET /pgpubsub/{channel} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    s.exec(&format!("INSERT INTO \"{}\".t VALUES (1, 'a')", s.schema));
    // One unmasked text frame (FIN + opcode 1), its length in 7 or 7+16 bits.
    let mut h = [0u8; 2];
    tcp.read_exact(&mut h).unwrap();
    assert_eq!(h[0], 0x81, "a text frame");
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            tcp.read_exact(&mut l).unwrap();
            usize::from(u16::from_be_bytes(l))
        }
        n => usize::from(n),
    };
    let mut body = vec![0u8; len];
    tcp.read_exact(&mut body).unwrap();
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(event["operation"], "insert");
    assert_eq!(event["table"], "t");
    assert_eq!(event["channel"], channel.as_str());
    assert!(event["sent_at"].is_string());

    let _ = child.kill();
    let _ = child.wait();
}

/// Waits for a relay report line that counts at least one acknowledged event;
/// returns the epoch it reports.
fn until_events_acknowledged(child: &mut Child, rx: &mpsc::Receiver<String>) -> String {
    loop {
        let line = match rx.recv_timeout(PATIENCE) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                panic!("the relay never acknowledged an event: {e}");
            }
        };
        let acked = line
            .split(", ")
            .find_map(|part| part.strip_suffix(" events acknowledged"))
            .and_then(|n| n.parse::<u64>().ok());
        if acked.is_some_and(|n| n > 0) {
            return line
                .split(", ")
                .find_map(|part| part.strip_prefix("epoch "))
                .unwrap_or_else(|| panic!("no epoch in {line:?}"))
                .to_owned();
        }
    }
}

#[test]
fn relay_streams_a_replication_slot_and_resumes_it_after_a_kill() {
    let s = Scratch::new("pgcw_cli_rrel");
    let table = s.table();
    let slot = unique("pgcw_slot");
    let publication = unique("pgcw_cli_rpub");
    let prefix = unique("pgcw_cli_rrel");
    let stream = prefix.to_uppercase();
    ok(&[
        "replication",
        "setup",
        &table,
        "--slot",
        &slot,
        "--publication",
        &publication,
        "--commit",
    ]);
    let args = [
        "relay",
        "--slot",
        &slot,
        "--publication",
        &publication,
        "--stream",
        &stream,
        "--prefix",
        &prefix,
        "--max-age",
        "10m",
        "--report-every",
        "100ms",
    ];
    let (mut child, rx, _) = spawn_until_line(&args, "relaying slot");
    s.exec(&format!("INSERT INTO {table} VALUES (1, 'a')"));
    let epoch = until_events_acknowledged(&mut child, &rx);
    // Killed, as a crash: a write while it is down is kept by the slot.
    child.kill().unwrap();
    child.wait().unwrap();
    s.exec(&format!("INSERT INTO {table} VALUES (2, 'b')"));
    let (mut child, rx, line) = (0..100)
        .find_map(|_| {
            // The server lets go of the slot a moment after the relay died.
            std::thread::sleep(Duration::from_millis(100));
            let (out_child, rx, line) = spawn_until_line_or_exit(&args, "relaying slot")?;
            Some((out_child, rx, line))
        })
        .expect("the relay restarts on its slot");
    assert!(line.contains("resumed"), "{line}");
    // The write made while it was down arrives, in the same epoch: the
    // stream's subscribers see no gap.
    assert_eq!(until_events_acknowledged(&mut child, &rx), epoch);
    child.kill().unwrap();
    child.wait().unwrap();
    // Drop the slot once the server has let go of it.
    let teardown = [
        "replication",
        "teardown",
        "--slot",
        &slot,
        "--publication",
        &publication,
        "--commit",
    ];
    let dropped = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        run(pgcachewatch().args(teardown)).0.status.success()
    });
    assert!(dropped, "replication teardown failed");
}

/// [`spawn_until_line`], or `None` if the process exits (or reports an error)
/// before printing `ready`.
fn spawn_until_line_or_exit(
    args: &[&str],
    ready: &str,
) -> Option<(Child, mpsc::Receiver<String>, String)> {
    support::spawn_ready(pgcachewatch().args(args), ready, PATIENCE)
}

/// The value of an aligned summary row (`  label   value`), if `line` is that row.
fn summary_row<'a>(line: &'a str, label: &str) -> Option<&'a str> {
    line.trim_start().strip_prefix(label).map(str::trim)
}

/// A slot and a publication of a test's own for `replication setup`; whatever
/// of them exists is dropped with it (also when the test fails).
struct Replication<'a> {
    s: &'a Scratch,
    slot: String,
    publication: String,
}

impl<'a> Replication<'a> {
    fn new(s: &'a Scratch) -> Self {
        Replication {
            s,
            slot: unique("pgcw_slot"),
            publication: unique("pgcw_cli_rpub"),
        }
    }

    /// `replication setup TABLE --slot … --publication …` with `extra` arguments.
    fn setup(&self, table: &str, extra: &[&str]) -> Command {
        let mut cmd = pgcachewatch();
        cmd.args([
            "replication",
            "setup",
            table,
            "--slot",
            &self.slot,
            "--publication",
            &self.publication,
        ])
        .args(extra);
        cmd
    }

    /// Whether the publication and the slot exist.
    fn exists(&self) -> (bool, bool) {
        (
            self.s.scalar(&format!(
                "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '{}')",
                self.publication
            )),
            self.s.scalar(&format!(
                "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{}')",
                self.slot
            )),
        )
    }
}

impl Drop for Replication<'_> {
    fn drop(&mut self) {
        let _ = self.s.rt.block_on(
            sqlx::query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1",
            )
            .bind(&self.slot)
            .execute(&self.s.db),
        );
        let sql = format!("DROP PUBLICATION IF EXISTS \"{}\"", self.publication);
        let _ = self.s.rt.block_on(sqlx::raw_sql(&sql).execute(&self.s.db));
    }
}

impl Scratch {
    /// The one value `sql` returns.
    fn scalar<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        self.rt
            .block_on(sqlx::query_scalar(sql).fetch_one(&self.db))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// `pg_class.relreplident` of `table` in the scratch schema.
    fn replica_identity(&self, table: &str) -> String {
        self.scalar(&format!(
            "SELECT relreplident::text FROM pg_class WHERE oid = '\"{}\".\"{table}\"'::regclass",
            self.schema
        ))
    }
}

#[test]
fn replication_setup_refuses_a_keyless_table_unless_told_to_log_whole_rows() {
    let s = Scratch::new("pgcw_cli_rkey");
    s.exec(&format!(
        "CREATE TABLE \"{0}\".logs (v text); INSERT INTO \"{0}\".logs VALUES ('a')",
        s.schema
    ));
    let logs = format!("{}.logs", s.schema);
    let r = Replication::new(&s);

    // The dry run refuses as --commit does: exit 1, the error and its fix, no SQL.
    for extra in [&[][..], &["--commit"]] {
        let (stdout, stderr) = fails(&mut r.setup(&logs, extra), Some(1));
        assert!(
            stdout.is_empty(),
            "SQL printed despite the error:\n{stdout}"
        );
        assert!(
            stderr.contains(&format!("\"{}\".\"logs\"", s.schema))
                && stderr.contains("no primary key")
                && stderr.contains("--replica-identity-full"),
            "{extra:?}: {stderr}"
        );
    }
    assert_eq!(r.exists(), (false, false));
    // The application's writes still work: nothing was published.
    s.exec(&format!("UPDATE {logs} SET v = 'b'"));

    // --replica-identity-full: the dry run shows the ALTER TABLE, changes nothing.
    let (stdout, _) = ok_cmd(&mut r.setup(&logs, &["--replica-identity-full"]));
    assert!(
        stdout.contains(&format!(
            "ALTER TABLE \"{}\".\"logs\" REPLICA IDENTITY FULL;",
            s.schema
        )),
        "{stdout}"
    );
    assert_eq!(s.replica_identity("logs"), "d");
    assert_eq!(r.exists(), (false, false));
    ok_cmd(&mut r.setup(&logs, &["--replica-identity-full", "--commit"]));
    assert_eq!(s.replica_identity("logs"), "f");
    assert_eq!(r.exists(), (true, true));
    s.exec(&format!("UPDATE {logs} SET v = 'c'"));
    s.exec(&format!("DELETE FROM {logs}"));
}

#[test]
fn replication_setup_dry_run_refuses_what_cannot_be_published() {
    let s = Scratch::new("pgcw_cli_rkind");
    s.exec(&format!(
        "CREATE VIEW \"{0}\".v AS SELECT id FROM \"{0}\".t",
        s.schema
    ));
    let r = Replication::new(&s);
    for (name, says) in [("missing", "does not exist"), ("v", "is a view")] {
        let table = format!("{}.{name}", s.schema);
        let (stdout, stderr) = fails(&mut r.setup(&table, &[]), Some(1));
        assert!(stdout.is_empty(), "{stdout}");
        assert!(
            stderr.contains(&format!("\"{}\".\"{name}\"", s.schema)) && stderr.contains(says),
            "{name}: {stderr}"
        );
    }
    assert_eq!(r.exists(), (false, false));
}

#[test]
fn replication_setup_publishes_a_partitioned_table_via_its_root() {
    let s = Scratch::new("pgcw_cli_rpart");
    s.exec(&format!(
        "CREATE TABLE \"{0}\".orders (id int, region text, PRIMARY KEY (id, region)) \
           PARTITION BY LIST (region);
         CREATE TABLE \"{0}\".orders_eu PARTITION OF \"{0}\".orders FOR VALUES IN ('eu');
         CREATE TABLE \"{0}\".orders_us PARTITION OF \"{0}\".orders FOR VALUES IN ('us')",
        s.schema
    ));
    let orders = format!("{}.orders", s.schema);
    let r = Replication::new(&s);
    let (stdout, _) = ok_cmd(&mut r.setup(&orders, &[]));
    assert!(
        stdout.contains("WITH (publish_via_partition_root = true);"),
        "{stdout}"
    );
    ok_cmd(&mut r.setup(&orders, &["--commit"]));
    let via_root: bool = s.scalar(&format!(
        "SELECT pubviaroot FROM pg_publication WHERE pubname = '{}'",
        r.publication
    ));
    assert!(via_root, "the publication does not publish via the root");
    s.exec(&format!("INSERT INTO {orders} VALUES (1, 'eu')"));
    s.exec(&format!("UPDATE {orders} SET id = 2"));
}

/// Runs `cmd` and expects success.
fn ok_cmd(cmd: &mut Command) -> (String, String) {
    let (out, stdout, stderr) = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed:\n{stderr}");
    (stdout, stderr)
}

// Issue 20, item 4: no destructive or silent defaults.

#[test]
fn record_refuses_to_replace_an_existing_file_without_force() {
    let channel = unique("pgcw_cli_rforce");
    let file = std::env::temp_dir().join(format!("{}.jsonl", unique("pgcw_cli_rforce")));
    let path = file.to_str().unwrap();
    std::fs::write(&file, "a capture worth keeping\n").unwrap();

    let (stdout, stderr) = fails(
        pgcachewatch().args(["record", path, "--channel", &channel, "--count", "0"]),
        Some(1),
    );
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains(path) && stderr.contains("already exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "a capture worth keeping\n",
        "the existing file was touched"
    );

    // --force replaces it, and says so.
    let (_, stderr) = ok(&[
        "record",
        path,
        "--channel",
        &channel,
        "--count",
        "0",
        "--force",
    ]);
    assert!(stderr.contains("replacing"), "{stderr}");
    let text = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(!text.contains("worth keeping"), "{text}");
    EventLogReader::new(text.as_bytes()).expect("a new event log");
}

#[test]
fn uninstall_commit_without_a_table_needs_all() {
    let s = Scratch::new("pgcw_cli_unall");
    let channel = unique("pgcw_cli_unall");
    s.install_on(&channel, &[]);
    let schema = ["--function-schema", s.schema.as_str()];

    let (stdout, stderr) = fails(
        pgcachewatch().args([&["uninstall", "--commit"][..], &schema].concat()),
        Some(2),
    );
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("every table") && stderr.contains("--all") && stderr.contains("TABLE"),
        "{stderr}"
    );
    assert_eq!((s.trigger_count(), s.function_count()), (4, 1));
    // The dry run still lists everything, and says what --commit needs.
    let (plan, stderr) = ok(&[&["uninstall"][..], &schema].concat());
    assert_eq!(plan.matches("DROP TRIGGER").count(), 4, "{plan}");
    assert!(stderr.contains("--all"), "{stderr}");
    // A table and --all together make no sense.
    fails(
        pgcachewatch()
            .args([&["uninstall", &s.table(), "--all", "--commit"][..], &schema].concat()),
        Some(2),
    );
    assert_eq!(s.trigger_count(), 4);
    ok(&[&["uninstall", "--all", "--commit"][..], &schema].concat());
    assert_eq!((s.trigger_count(), s.function_count()), (0, 0));
}

#[test]
fn install_row_keys_warns_about_a_table_without_a_primary_key() {
    let s = Scratch::new("pgcw_cli_nopk");
    s.exec(&format!("CREATE TABLE \"{}\".logs (line text)", s.schema));
    let logs = format!("{}.logs", s.schema);
    let schema = ["--function-schema", s.schema.as_str()];
    for commit in [&[][..], &["--commit"]] {
        let (_, stderr) = ok(&[&["install", &logs, "--row-keys"][..], commit, &schema].concat());
        let warnings: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("no primary key"))
            .collect();
        assert_eq!(
            warnings.len(),
            1,
            "{commit:?}: one warning, in the CLI's words:\n{stderr}"
        );
        let warning = warnings[0];
        assert!(
            warning.starts_with("warning: ")
                && warning.contains(&format!("\"{}\".\"logs\"", s.schema))
                && warning.contains("table-level")
                && warning.contains("primary key"),
            "{warning}"
        );
    }
    // A table with a primary key: no warning.
    let (_, stderr) = ok(&[&["install", &s.table(), "--row-keys"][..], &schema].concat());
    assert!(!stderr.contains("warning"), "{stderr}");
}

// Issue 20, item 5: every message says what to do.

#[test]
fn a_missing_certificate_file_is_named_with_where_it_was_set() {
    let url = database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let missing = "/nonexistent/pgcw-ca.pem";
    let (_, stderr) = fails(
        pgcachewatch()
            .env(
                "DATABASE_URL",
                format!("{url}{sep}sslmode=verify-ca&sslrootcert={missing}"),
            )
            .arg("status"),
        Some(1),
    );
    assert!(
        stderr.contains(missing)
            && stderr.contains("does not exist")
            && stderr.contains("sslrootcert")
            && stderr.contains("--database-url"),
        "{stderr}"
    );
    // From PGSSLROOTCERT: the variable is named, not the URL.
    let (_, stderr) = fails(
        pgcachewatch()
            .env("PGSSLMODE", "verify-ca")
            .env("PGSSLROOTCERT", missing)
            .args(["listen", "--count", "1"]),
        Some(1),
    );
    assert!(
        stderr.contains(missing)
            && stderr.contains("does not exist")
            && stderr.contains("PGSSLROOTCERT"),
        "{stderr}"
    );
}

#[test]
fn listen_timeout_names_the_command_line_flag() {
    // Accepts TCP connections and never answers (the kernel completes the
    // handshake; nothing reads).
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = black_hole.local_addr().unwrap();
    let started = std::time::Instant::now();
    let (_, stderr) = fails(
        pgcachewatch()
            .env("DATABASE_URL", format!("postgres://postgres@{addr}/test"))
            .args(["listen", "--connect-timeout", "300ms"]),
        Some(1),
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains(&addr.to_string()) && stderr.contains("--connect-timeout"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(".connect_timeout("),
        "library words: {stderr}"
    );
    drop(black_hole);
}

#[test]
fn a_bad_sslmode_is_one_line_listing_the_valid_values() {
    let url = database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let valid = "disable, allow, prefer, require, verify-ca, verify-full";
    let (_, stderr) = fails(
        pgcachewatch()
            .env("DATABASE_URL", format!("{url}{sep}sslmode=bogus"))
            .arg("status"),
        Some(1),
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("sslmode \"bogus\"")
            && stderr.contains(valid)
            && stderr.contains("--database-url"),
        "{stderr}"
    );
    assert!(!stderr.contains("error with configuration"), "{stderr}");

    // From PGSSLMODE (which sqlx alone would silently ignore): the variable is blamed.
    let (_, stderr) = fails(
        pgcachewatch().env("PGSSLMODE", "bogus").arg("status"),
        Some(1),
    );
    assert!(
        stderr.contains("PGSSLMODE") && stderr.contains("\"bogus\"") && stderr.contains(valid),
        "{stderr}"
    );
    assert!(
        !stderr.contains("--database-url"),
        "the URL is not at fault: {stderr}"
    );
}

#[test]
fn tls_settings_from_the_environment_are_blamed_on_the_environment() {
    // verify-full fails whichever certificate the test server has: Debian's
    // snakeoil one names the machine, not 127.0.0.1 (and with native-tls the
    // system's CA directory, where Debian links it, is trusted as well, so
    // verify-ca would pass), and a certificate made for the run is signed by a
    // CA that is not among the public roots.
    let roots = "/etc/ssl/certs/ca-certificates.crt";
    let url = database_url();
    let (_, stderr) = fails(
        pgcachewatch()
            .env("DATABASE_URL", &url)
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", roots)
            .arg("status"),
        Some(1),
    );
    assert!(
        stderr.contains("sslmode=verify-full from PGSSLMODE")
            && stderr.contains(&format!("sslrootcert {roots} from PGSSLROOTCERT")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("settings from --database-url / DATABASE_URL)"),
        "the URL is blamed for the variables' settings: {stderr}"
    );
    // The URL's own setting wins over the variable, and is named as the URL's.
    let sep = if url.contains('?') { '&' } else { '?' };
    let (_, stderr) = fails(
        pgcachewatch()
            .env("DATABASE_URL", format!("{url}{sep}sslmode=verify-full"))
            .env("PGSSLMODE", "disable")
            .env("PGSSLROOTCERT", roots)
            .arg("status"),
        Some(1),
    );
    assert!(
        stderr.contains("sslmode=verify-full from --database-url / DATABASE_URL")
            && stderr.contains(&format!("sslrootcert {roots} from PGSSLROOTCERT")),
        "{stderr}"
    );
}

#[test]
fn relay_help_says_replication_is_the_default_source() {
    let (top, _) = ok(&["--help"]);
    let relay_line = top
        .lines()
        .find(|l| l.trim_start().starts_with("relay"))
        .unwrap_or_else(|| panic!("no relay line in:\n{top}"));
    assert!(
        relay_line.contains("replication slot") && !relay_line.contains("of the LISTEN channels"),
        "{relay_line}"
    );
    let (help, _) = ok(&["relay", "--help"]);
    assert!(
        help.contains("logical-replication slot (the default") && help.contains("--source listen"),
        "{help}"
    );
}

// Issue 20, item 6: PGCacheWatch's users.

/// `bench/python/.venv`'s interpreter with PGCacheWatch 0.4.2, made
/// (idempotently, with pip) by `bench/python/setup.sh`; `None`, with the reason
/// printed, only when Python or pip is missing outside CI.
fn pgcachewatch_python() -> Option<std::path::PathBuf> {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let works = |args: &[&str]| {
        Command::new(&python)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // setup.sh makes a venv, whose pip comes from ensurepip.
    if !works(&["-c", "import ensurepip, venv"]) {
        assert!(
            !in_ci,
            "CI=true but {python} has no venv/pip: the PGCacheWatch test must run in CI"
        );
        eprintln!(
            "SKIPPED: {python} or its pip (ensurepip, venv) is missing, so PGCacheWatch 0.4.2 \
             cannot be installed (Debian: apt-get install python3-venv)"
        );
        return None;
    }
    let bench = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/python");
    let status = Command::new("bash")
        .arg(bench.join("setup.sh"))
        .status()
        .expect("bash runs");
    assert!(
        status.success(),
        "bench/python/setup.sh failed: PGCacheWatch 0.4.2 could not be installed"
    );
    Some(bench.join(".venv/bin/python"))
}

#[test]
fn pgcachewatch_compat_invalidates_a_pgcachewatch_service_on_its_default_channel() {
    let Some(python) = pgcachewatch_python() else {
        return;
    };
    let s = Scratch::new("pgcw_cli_py");
    let table_name = unique("pgcw_py");
    s.exec(&format!(
        "CREATE TABLE \"{}\".{table_name} (id int PRIMARY KEY, v text)",
        s.schema
    ));
    let table = format!("{}.{table_name}", s.schema);
    // The one flag: PGCacheWatch's channel, with pgcachewatch's payload.
    let (_, stderr) = ok(&[
        "install",
        &table,
        "--pgcachewatch-compat",
        "--commit",
        "--function-schema",
        &s.schema,
    ]);
    assert!(
        stderr.contains("channel \"ch_pgcachewatch_table_change\""),
        "{stderr}"
    );
    // --channel and the flag together make no sense.
    fails(
        pgcachewatch().args(["install", &table, "--pgcachewatch-compat", "--channel", "x"]),
        Some(2),
    );

    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../backends/tests/python/pgeventqueue_client.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .arg(database_url())
        .arg(&table_name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut next = || {
        lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| {
                let _ = child.kill();
                panic!("no line from the PGCacheWatch service: {e}")
            })
    };
    assert_eq!(next(), "cached 1");
    assert_eq!(next(), "ready");
    s.exec(&format!("INSERT INTO {table} VALUES (1, 'a')"));
    let line = next();
    let event: serde_json::Value = serde_json::from_str(&line).expect(&line);
    assert_eq!(event["channel"], "ch_pgcachewatch_table_change", "{line}");
    assert_eq!(event["operation"], "insert", "{line}");
    assert_eq!(event["table"], table_name.as_str(), "{line}");
    assert_eq!(next(), "invalidated 2");
    let status = child.wait().expect("python exits");
    assert!(
        status.success(),
        "the PGCacheWatch service failed: {status}"
    );
}

// Issue 18, item 7: what operators read when NATS is not there.

/// `relay status` for a stream that does not exist names it, says what to
/// check, and exits 1: no raw JetStream error code.
#[test]
fn relay_status_for_a_missing_stream_names_the_stream() {
    let stream = unique("PGCW_NO_SUCH_STREAM").to_uppercase();
    let nats = pgcachewatch::testkit::env::nats_url();
    let (stdout, stderr) = fails(
        pgcachewatch().args(["relay", "status", "--nats-url", &nats, "--stream", &stream]),
        Some(1),
    );
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains(&format!("stream {stream} does not exist"))
            && stderr.contains("a relay creates it"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("10059") && !stderr.contains("code 404"),
        "a raw JetStream error: {stderr}"
    );
}

/// A nats-server of the test's own (JetStream, a free port, a temporary
/// store), killed with the guard.
struct OwnNats {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnNats {
    fn start() -> OwnNats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let dir = std::env::temp_dir().join(unique("pgcw_cli_nats"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| {
            [
                "/usr/sbin/nats-server",
                "/usr/bin/nats-server",
                "/usr/local/bin/nats-server",
            ]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nats-server")
            .to_owned()
        });
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed");
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnNats { child, port, dir }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// NATS goes away under a running relay: its report says NATS is
/// unreachable (not "source healthy" with a growing in-flight count), and
/// Ctrl-C still stops it cleanly.
#[test]
fn relay_report_says_nats_is_unreachable_when_it_is() {
    let mut nats = OwnNats::start();
    let url = nats.url();
    let channel = unique("pgcw_cli_down");
    let stream = unique("PGCW_CLI_DOWN").to_uppercase();
    let (mut child, rx, _) = spawn_until_line(
        &[
            "relay",
            "--source",
            "listen",
            "--channel",
            &channel,
            "--nats-url",
            &url,
            "--stream",
            &stream,
            "--prefix",
            &channel,
            "--heartbeat",
            "100ms",
            "--report-every",
            "200ms",
        ],
        "relaying",
    );
    // Report lines keep coming: a deadline for the one awaited, not for each.
    let until = |child: &mut Child, what: &str, pred: &dyn Fn(&str) -> bool| -> String {
        let deadline = std::time::Instant::now() + PATIENCE;
        let mut last = String::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(line) => last = line,
                Err(e) => {
                    let _ = child.kill();
                    panic!("the relay never reported {what} ({e}); its last line: {last}");
                }
            }
        }
    };
    until(&mut child, "a healthy source", &|l| {
        l.starts_with("-- source healthy")
    });
    nats.kill();
    let line = until(&mut child, "NATS unreachable", &|l| {
        l.starts_with("-- NATS UNREACHABLE")
    });
    assert!(
        line.contains(&url) && line.contains("messages waiting") && line.contains("source healthy"),
        "{line}"
    );
    let (status, _) = interrupt(child);
    assert_eq!(status.code(), Some(0), "Ctrl-C with NATS down: {status:?}");
}

/// Ctrl-C stops the relay whenever it comes, also while the relay prints a
/// report: a report every millisecond makes that the likely moment, and a
/// Ctrl-C lost there would leave the relay running for ever.
#[test]
fn relay_stops_on_a_ctrl_c_that_comes_while_it_reports() {
    let channel = unique("pgcw_cli_int");
    for round in 0..25 {
        let (child, rx, _) = spawn_until_line(
            &[
                "relay",
                "--no-nats",
                "--channel",
                &channel,
                "--ws-listen",
                "127.0.0.1:0",
                "--report-every",
                "1ms",
            ],
            "serving",
        );
        // Reports are coming.
        let mut reports = 0;
        while reports < 3 {
            let line = rx
                .recv_timeout(PATIENCE)
                .unwrap_or_else(|e| panic!("round {round}: no report ({e})"));
            reports += usize::from(line.starts_with("-- websocket"));
        }
        let (status, _) = interrupt(child);
        assert_eq!(status.code(), Some(0), "round {round}: {status:?}");
    }
}
