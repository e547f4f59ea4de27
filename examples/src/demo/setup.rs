//! Preparing the database: the demo table, its rows, its triggers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use pgcachewatch::postgres::{Installer, TableName};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::Connection as _;

use super::app::table;

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

/// What this run may have created, so that clean-up drops only its own objects.
#[derive(Debug, Default)]
pub struct Created {
    table: AtomicBool,
}

impl Created {
    /// Whether the demo table may exist (its CREATE was sent, and did not fail
    /// because a table of that name was there before).
    pub fn table(&self) -> bool {
        self.table.load(Ordering::SeqCst)
    }
}

/// Creates and fills this run's table and installs (commits) its triggers.
///
/// The table's name is this run's own ([`super::app::table`]): a table of
/// that name that already exists is an error, and is never dropped.
pub async fn prepare(db: &PgPool, channel: &str, created: &Created) -> Result<TableName> {
    let name = table();
    // From here on it may exist, even if this future is dropped mid-statement.
    created.table.store(true, Ordering::SeqCst);
    let create = sqlx::raw_sql(&format!(
        "CREATE TABLE {name} (
             id int PRIMARY KEY,
             name text NOT NULL,
             version bigint NOT NULL DEFAULT 0
         )"
    ))
    .execute(db)
    .await;
    if let Err(e) = create {
        if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P07") {
            created.table.store(false, Ordering::SeqCst);
            return Err(anyhow!(
                "a table {name} already exists; it is not this run's, so the demo leaves it \
                 alone: run the demo again (every run picks a new name)"
            ));
        }
        return Err(e).with_context(|| format!("creating the demo table {name}"));
    }
    sqlx::raw_sql(&format!(
        "INSERT INTO {name} (id, name) SELECT g, 'user-' || g FROM generate_series(1, {USERS}) g"
    ))
    .execute(db)
    .await
    .with_context(|| format!("filling the demo table {name}"))?;
    let table = TableName::new("public", name)?;
    // Row keys: the cached query of `GET /users/{id}/card` drops only the rows
    // written (the `Greedy` strategy of `GET /users/{id}` drops everything anyway).
    Installer::new()
        .channel(channel)
        .row_keys(true)
        .install(db, std::slice::from_ref(&table))
        .await
        .context("installing the demo table's triggers")?;
    Ok(table)
}

/// Removes this run's triggers and table (on exit, unless `--keep`), if
/// [`prepare`] may have created them.
pub async fn cleanup(db: &PgPool, channel: &str, created: &Created) -> Result<()> {
    if !created.table() {
        return Ok(());
    }
    let table = TableName::new("public", table())?;
    Installer::new()
        .channel(channel)
        .uninstall(db, std::slice::from_ref(&table))
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
