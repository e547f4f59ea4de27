//! The demo binary as a user runs it, against the test database
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`) or a
//! throw-away cluster of its own: it leaves nothing behind however it ends
//! (done, Ctrl-C while driving, Ctrl-C while serving), two runs on one database
//! do not clash, and without a usable database it starts its own cluster.

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pgcachewatch::testkit::env::database_url;

/// The demo binary with `args`, at the test database.
fn demo(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_demo"));
    command
        .args(["--port", "0"])
        .args(args)
        .env("DATABASE_URL", database_url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A running demo, its output read as it comes.
struct Running {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Option<JoinHandle<String>>,
}

/// How it ended.
#[derive(Debug)]
struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child = command.spawn().expect("the demo binary starts");
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Waits for a line of stdout containing `text`; panics with the output so far.
    fn wait_for(&mut self, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => {
                    self.interrupt();
                    let finished = self.finish();
                    panic!("no line with {text:?} within {within:?}: {finished:#?}");
                }
            }
        }
    }

    /// Sends SIGINT, as Ctrl-C in a terminal does.
    fn interrupt(&self) {
        let sent = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent || std::thread::panicking(), "kill -INT failed");
    }

    /// Waits for the exit (killing it after 60 s) and collects the output.
    fn finish(&mut self) -> Finished {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        Finished {
            code: status.code(),
            stdout: self.seen.join("\n"),
            stderr: self
                .stderr
                .take()
                .map(|h| h.join().unwrap())
                .unwrap_or_default(),
        }
    }
}

impl Drop for Running {
    /// A test that failed half-way still lets its demo clean up.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.interrupt();
            let _ = self.finish();
        }
    }
}

fn run_to_end(command: Command) -> Finished {
    Running::spawn(command).finish()
}

/// The run's table and channel, from the header it prints.
fn names(stdout: &str) -> (String, String) {
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("table:"))
        .unwrap_or_else(|| panic!("no table line in:\n{stdout}"));
    let table = line
        .split('"')
        .find(|part| part.starts_with("pgcachewatch_demo_users_"))
        .unwrap_or_else(|| panic!("no table name in {line:?}"))
        .to_owned();
    let channel = line
        .rsplit("channel \"")
        .next()
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no channel in {line:?}"))
        .to_owned();
    (table, channel)
}

/// What of a run is in the database: its table, and triggers notifying its channel.
fn leftovers(url: &str, table: &str, channel: &str) -> Vec<String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let db = sqlx::PgPool::connect(url)
                .await
                .expect("PostgreSQL at DATABASE_URL");
            let tables: Vec<String> =
                sqlx::query_scalar("SELECT oid::regclass::text FROM pg_class WHERE relname = $1")
                    .bind(table)
                    .fetch_all(&db)
                    .await
                    .unwrap();
            let triggers: Vec<String> = sqlx::query_scalar(
                "SELECT tgname || ' on ' || tgrelid::regclass::text FROM pg_trigger \
                 WHERE position(convert_to($1, 'UTF8') in tgargs) > 0",
            )
            .bind(channel)
            .fetch_all(&db)
            .await
            .unwrap();
            db.close().await;
            tables.into_iter().chain(triggers).collect()
        })
}

fn assert_ended(finished: &Finished, code: i32) {
    assert_eq!(finished.code, Some(code), "{finished:#?}");
}

#[test]
fn driven_once_it_exits_0_and_leaves_nothing_behind() {
    let finished = run_to_end(demo(&["--drive-and-exit", "--rounds", "20"]));
    assert_ended(&finished, 0);
    assert!(finished.stdout.contains("6. GET /metrics"), "{finished:#?}");
    // The cached query: derived row-level from its SQL; a write to user 1 left
    // user 2's entry (the demo fails itself otherwise).
    assert!(
        finished
            .stdout
            .contains("5. GET /users/{id}/card: row-level on public.pgcachewatch_demo_users_"),
        "{finished:#?}"
    );
    assert!(finished.stdout.contains("user 1 miss"), "{finished:#?}");
    assert!(finished.stdout.contains("user 2 hit"), "{finished:#?}");
    assert!(finished
        .stdout
        .contains("removed the demo triggers and table"));
    let (table, channel) = names(&finished.stdout);
    assert_eq!(
        leftovers(&database_url(), &table, &channel),
        Vec::<String>::new()
    );
}

#[test]
fn ctrl_c_while_it_drives_itself_cleans_up_and_exits_130() {
    // Rounds enough to be driving for minutes: the signal lands mid-drive.
    let mut demo = Running::spawn(demo(&["--drive-and-exit", "--rounds", "10000000"]));
    let header = demo.wait_for("table:", Duration::from_secs(60));
    let (table, channel) = names(&header);
    demo.wait_for("1. GET /users/1..20", Duration::from_secs(60));
    let before = leftovers(&database_url(), &table, &channel);
    assert!(
        before.contains(&table)
            && before
                .iter()
                .any(|o| o.starts_with("pgcachewatch_update on")),
        "the table and its triggers exist while it runs: {before:?}"
    );
    demo.interrupt();
    let finished = demo.finish();
    assert_ended(&finished, 130);
    assert!(finished.stderr.contains("interrupted"), "{finished:#?}");
    assert!(
        finished
            .stdout
            .contains("removed the demo triggers and table"),
        "{finished:#?}"
    );
    assert_eq!(
        leftovers(&database_url(), &table, &channel),
        Vec::<String>::new()
    );
}

#[test]
fn ctrl_c_while_it_serves_exits_0_and_cleans_up() {
    let mut demo = Running::spawn(demo(&["--rounds", "5"]));
    let header = demo.wait_for("table:", Duration::from_secs(60));
    let (table, channel) = names(&header);
    demo.wait_for("until Ctrl-C", Duration::from_secs(120));
    demo.interrupt();
    let finished = demo.finish();
    assert_ended(&finished, 0);
    assert!(finished.stdout.contains("stopping"), "{finished:#?}");
    assert_eq!(
        leftovers(&database_url(), &table, &channel),
        Vec::<String>::new()
    );
}

#[test]
fn two_runs_on_one_database_at_once_do_not_clash() {
    let mut a = Running::spawn(demo(&["--drive-and-exit", "--rounds", "20"]));
    let mut b = Running::spawn(demo(&["--drive-and-exit", "--rounds", "20"]));
    let (a, b) = (a.finish(), b.finish());
    assert_ended(&a, 0);
    assert_ended(&b, 0);
    let (a_table, a_channel) = names(&a.stdout);
    let (b_table, b_channel) = names(&b.stdout);
    assert_ne!(a_table, b_table);
    assert_ne!(a_channel, b_channel);
    // Each saw only its own writes as events: 20 rounds + 5 PUTs + the PUT of
    // the cached-query step, no more.
    for run in [&a, &b] {
        assert!(run.stdout.contains("listener: 26 events"), "{}", run.stdout);
    }
}

#[test]
fn a_given_database_url_that_cannot_be_used_is_an_error_not_a_fallback() {
    let mut command = demo(&["--drive-and-exit"]);
    command.env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/test");
    let finished = run_to_end(command);
    assert_ended(&finished, 1);
    assert!(
        finished
            .stderr
            .contains("could not connect to PostgreSQL at postgres://postgres@127.0.0.1:1/test")
            && finished.stderr.contains("DATABASE_URL"),
        "{finished:#?}"
    );
    assert!(!finished.stdout.contains("throw-away"), "{finished:#?}");
}

/// The throw-away cluster's directory, from the line the demo prints.
fn cluster_dir(stdout: &str) -> PathBuf {
    let line = stdout
        .lines()
        .find(|l| l.contains("throw-away cluster: 127.0.0.1:"))
        .unwrap_or_else(|| panic!("no cluster line in:\n{stdout}"));
    PathBuf::from(line.rsplit("directory ").next().unwrap().trim())
}

#[test]
fn without_a_usable_database_it_starts_a_throwaway_cluster_and_removes_it() {
    // As on a machine where PostgreSQL is installed but nothing answers on the
    // default port (here: a port nothing listens on).
    let mut command = demo(&[
        "--drive-and-exit",
        "--rounds",
        "20",
        "--default-database-url",
        "postgres://postgres@127.0.0.1:1/test",
    ]);
    command.env_remove("DATABASE_URL");
    let finished = run_to_end(command);
    assert_ended(&finished, 0);
    assert!(
        finished
            .stdout
            .contains("No DATABASE_URL, and postgres://postgres@127.0.0.1:1/test cannot be used"),
        "{finished:#?}"
    );
    assert!(finished
        .stdout
        .contains("a throw-away cluster of the demo's own"));
    let dir = cluster_dir(&finished.stdout);
    assert!(finished
        .stdout
        .contains("stopped and removed the throw-away"));
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

#[test]
fn ctrl_c_with_a_throwaway_cluster_stops_and_removes_it() {
    let mut demo = Running::spawn(demo(&[
        "--own-postgres",
        "--drive-and-exit",
        "--rounds",
        "10000000",
    ]));
    let line = demo.wait_for("throw-away cluster: 127.0.0.1:", Duration::from_secs(120));
    let dir = cluster_dir(&line);
    let port: u16 = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    demo.wait_for("1. GET /users/1..20", Duration::from_secs(60));
    assert!(dir.exists());
    demo.interrupt();
    let finished = demo.finish();
    assert_ended(&finished, 130);
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the throw-away server still answers on {port}"
    );
}
