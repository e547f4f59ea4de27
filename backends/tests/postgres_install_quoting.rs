//! Quoting against the real PostgreSQL: for names built from every troublesome
//! fragment, the quoted form the installer generates is read back by the server as
//! exactly the same name, and parsing that form gives the same [`TableName`].
#![cfg(feature = "postgres")]

use pgcachewatch_backends::postgres::install::TableName;
use sqlx::{Column, PgPool, Row};

const FRAGMENTS: &[&str] = &[
    "a",
    "Z",
    "\"",
    "\"\"",
    "'",
    "\\",
    ";",
    " ",
    ".",
    "$$",
    "$pgcachewatch$",
    "--",
    "/*",
    "é",
    "日本",
    "DROP TABLE x",
    "%I",
    "\t",
    "select",
];

fn names() -> Vec<String> {
    let mut names: Vec<String> = FRAGMENTS.iter().map(|f| f.to_string()).collect();
    for a in FRAGMENTS {
        for b in FRAGMENTS {
            names.push(format!("{a}{b}"));
        }
    }
    names.push("x".repeat(63));
    names.push(format!("{}\"", "y".repeat(62)));
    names
}

#[tokio::test]
async fn postgres_reads_every_quoted_name_back_unchanged() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let db = PgPool::connect(&url)
        .await
        .expect("PostgreSQL at DATABASE_URL");
    let names = names();
    assert!(names.len() > 300);
    for name in &names {
        let table = TableName::new(name.clone(), name.clone()).unwrap();
        assert_eq!(
            TableName::parse(&table.to_string()).unwrap(),
            table,
            "{name:?}"
        );

        // `"n"."n"` is schema.table; as a column reference into a subquery aliased
        // "n" with a column "n", it resolves only if both halves mean `name`.
        let quoted = table.quoted();
        let half = &quoted[..(quoted.len() - 1) / 2];
        let sql = format!("SELECT {quoted} FROM (SELECT 1 AS {half}) AS {half}");
        let row = sqlx::query(&sql)
            .fetch_one(&db)
            .await
            .unwrap_or_else(|e| panic!("{name:?}: {sql}: {e}"));
        assert_eq!(row.columns()[0].name(), name.as_str(), "{sql}");
        assert_eq!(row.get::<i32, _>(0), 1);
    }
}
