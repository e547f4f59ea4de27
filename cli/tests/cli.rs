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
    let (_, stderr) = ok(&[&["uninstall", "--commit"][..], &common[..2]].concat());
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
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (status, _) = wait(child);
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
            format!("{url}{sep}sslmode=verify-ca&sslrootcert=/etc/ssl/certs/ssl-cert-snakeoil.pem"),
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
