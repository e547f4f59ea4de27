//! Preparing the database: the demo table, its rows, its triggers.

use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use pgcachewatch::postgres::install::{Installer, TableName};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::Connection as _;

use super::app::TABLE;

/// Rows the demo table starts with.
pub const USERS: i32 = 100;

/// Connects, with an error that says what to set when PostgreSQL is not there.
pub async fn connect(url: &str) -> Result<PgPool> {
    let hint = || {
        format!(
            "could not connect to PostgreSQL at {}; start it, or set DATABASE_URL \
             (postgres://user[:password]@host[:port]/database)",
            redact(url)
        )
    };
    // One plain connection first: it reports the real cause (refused, unknown
    // user, …) where a pool would only time out.
    let probe = tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(url))
        .await
        .map_err(|_| anyhow!("no answer within 5 s"))
        .with_context(hint)?
        .with_context(hint)?;
    probe.close().await.ok();
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(hint)
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Creates and fills the table if missing, and installs (commits) its triggers.
pub async fn prepare(db: &PgPool, channel: &str) -> Result<TableName> {
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {TABLE} (
             id int PRIMARY KEY,
             name text NOT NULL,
             version bigint NOT NULL DEFAULT 0
         );
         INSERT INTO {TABLE} (id, name)
         SELECT g, 'user-' || g FROM generate_series(1, {USERS}) g
         ON CONFLICT (id) DO NOTHING;"
    ))
    .execute(db)
    .await
    .with_context(|| format!("creating the demo table {TABLE}"))?;
    let table = TableName::new("public", TABLE)?;
    Installer::new()
        .channel(channel)
        .install(db, std::slice::from_ref(&table))
        .await
        .context("installing the demo table's triggers")?;
    Ok(table)
}

/// Removes the triggers and the table (on exit, unless `--keep`).
pub async fn cleanup(db: &PgPool, channel: &str, table: &TableName) -> Result<()> {
    Installer::new()
        .channel(channel)
        .uninstall(db, std::slice::from_ref(table))
        .await
        .context("removing the demo triggers")?;
    sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {}", table.quoted()))
        .execute(db)
        .await
        .context("dropping the demo table")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            super::redact("postgres://u:secret@h:1/d"),
            "postgres://u:***@h:1/d"
        );
        assert_eq!(super::redact("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(super::redact("nonsense"), "nonsense");
    }
}
