//! `pgcachewatch explain "SQL"`, run as a user runs it, against the real
//! PostgreSQL (`DATABASE_URL`): what a cached query would depend on, its exit
//! code, and `--strict`.

use std::process::{Command, Output, Stdio};

use pgcachewatch::testkit::env::{database_url, unique_name};
use sqlx::PgPool;

const BIN: &str = env!("CARGO_BIN_EXE_pgcachewatch");

/// A schema of the test's own, dropped when the guard drops.
struct Scratch {
    rt: tokio::runtime::Runtime,
    db: PgPool,
    schema: String,
}

impl Scratch {
    fn new() -> Scratch {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let db = rt
            .block_on(PgPool::connect(&database_url()))
            .expect("PostgreSQL must be running at DATABASE_URL");
        let schema = unique_name("pgcw_explain");
        let s = Scratch { rt, db, schema };
        s.exec(&format!(
            "CREATE SCHEMA {0};
             CREATE TABLE {0}.users (id int8 PRIMARY KEY, org_id int8, name text);
             CREATE TABLE {0}.orgs (id int8 PRIMARY KEY, name text);
             CREATE MATERIALIZED VIEW {0}.names AS SELECT name FROM {0}.users;",
            s.schema
        ));
        s
    }

    fn exec(&self, sql: &str) {
        self.rt
            .block_on(sqlx::raw_sql(sql).execute(&self.db))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// `pgcachewatch explain --search-path <schema> <args…>`.
    fn explain(&self, args: &[&str]) -> (Output, String, String) {
        let out = Command::new(BIN)
            .env("DATABASE_URL", database_url())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .args(["explain", "--search-path", &self.schema])
            .args(args)
            .output()
            .expect("the binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{stderr}");
        (out, stdout, stderr)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
        let _ = self.rt.block_on(sqlx::raw_sql(&sql).execute(&self.db));
    }
}

#[test]
fn explain_prints_what_was_derived_and_strict_fails_on_a_fall_back() {
    let s = Scratch::new();
    let schema = &s.schema;

    let (out, stdout, stderr) = s.explain(&["SELECT name FROM users WHERE id = $1"]);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, format!("row-level on {schema}.users(id) from $1\n"));
    // --strict accepts a row-level query.
    let (out, stdout, _) = s.explain(&["--strict", "SELECT name FROM users WHERE id = ANY($1)"]);
    assert!(out.status.success());
    assert_eq!(
        stdout,
        format!("row-level on {schema}.users(id) from = ANY($1)\n")
    );

    let join = "SELECT u.name, o.name FROM users u JOIN orgs o ON o.id = u.org_id WHERE u.id = $1";
    let (out, stdout, stderr) = s.explain(&[join]);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout,
        format!("table-level on {schema}.users, {schema}.orgs: join\n")
    );
    // --strict: a fall-back to table-level is an error, with the reason.
    let (out, stdout, stderr) = s.explain(&["--strict", join]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.starts_with("error: not row-level (--strict): table-level on")
            && stderr.contains(": join"),
        "{stderr}"
    );
    // A filter on a non-key column: table-level, and why.
    let (out, stdout, _) = s.explain(&["--strict", "SELECT id FROM users WHERE name = $1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.is_empty());

    // JSON.
    let (out, stdout, _) = s.explain(&["--json", join]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(json["level"], "table");
    assert_eq!(json["reason"], "join");
    assert_eq!(json["tables"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        json["resolution_key"],
        format!("orgs={schema}.orgs;users={schema}.users")
    );
}

#[test]
fn explain_refuses_what_cannot_be_cached_with_the_way_out() {
    let s = Scratch::new();
    // Refused from the text alone.
    for sql in [
        "SELECT * FROM users WHERE id = $1 FOR UPDATE",
        "SELECT now(), name FROM users WHERE id = $1",
        "SELECT random()",
    ] {
        let (out, stdout, stderr) = s.explain(&[sql]);
        assert_eq!(out.status.code(), Some(1), "{sql}: {stderr}");
        assert!(stdout.is_empty());
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains("tables = [...]"), "{sql}: {stderr}");
    }
    // Refused by the server: a materialized view sends no events.
    let (out, _, stderr) = s.explain(&["SELECT * FROM names"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("materialized view") && stderr.contains("tables = [...]"),
        "{stderr}"
    );
    // A name that does not resolve says where it looked.
    let (out, _, stderr) = s.explain(&["SELECT * FROM nowhere"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("nowhere") && stderr.contains(&s.schema),
        "{stderr}"
    );
    // Not SQL at all.
    let (out, _, stderr) = s.explain(&["SELEC 1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("parser"), "{stderr}");
}
