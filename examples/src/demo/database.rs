//! Which PostgreSQL the demo uses: `DATABASE_URL` if given; else the local
//! default if it can be used; else a throw-away cluster of the demo's own
//! (`initdb` in a temporary directory, a free port, trust authentication),
//! stopped and removed on exit, so the demo runs on a machine where PostgreSQL
//! is installed but not set up.

use std::path::PathBuf;

use anyhow::{anyhow, Context as _, Result};
use pgcachewatch::testkit::cluster::OwnPostgres;
use sqlx::PgPool;

use super::setup::{connect, redact};
use super::stop::Stop;

/// The URL tried when no `DATABASE_URL` is given.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Where to go, from the arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// `DATABASE_URL` / `--database-url`: that server, or an error.
    Given(String),
    /// Nothing given: the default URL, else a throw-away cluster.
    Default(String),
    /// `--own-postgres`: a throw-away cluster, whatever else is set.
    Own,
}

impl Choice {
    /// `given` is `DATABASE_URL`/`--database-url`, `default` the URL tried without it.
    pub fn new(given: Option<&str>, default: &str, own: bool) -> Choice {
        match (own, given) {
            (true, _) => Choice::Own,
            (false, Some(url)) => Choice::Given(url.to_owned()),
            (false, None) => Choice::Default(default.to_owned()),
        }
    }
}

/// The demo's database: a pool, and the throw-away cluster if it is one.
#[derive(Debug)]
pub struct Database {
    pub pool: PgPool,
    pub url: String,
    own: Option<OwnPostgres>,
}

impl Database {
    /// Whether this is a throw-away cluster of the demo's own.
    pub fn is_own(&self) -> bool {
        self.own.is_some()
    }

    /// Closes the pool; stops and removes the throw-away cluster, or with
    /// `keep` leaves it running and says how to remove it.
    pub async fn close(self, keep: bool) {
        self.pool.close().await;
        let Some(pg) = self.own else { return };
        if keep {
            let stop = pg.keep();
            say!("kept the throw-away cluster running (--keep); remove it with:\n  {stop}");
            return;
        }
        let dir = pg.dir().to_owned();
        // Stopping runs pg_ctl: off the async threads.
        let _ = tokio::task::spawn_blocking(move || drop(pg)).await;
        say!(
            "stopped and removed the throw-away PostgreSQL cluster ({})",
            dir.display()
        );
    }
}

/// Opens the demo's database as `choice` says; `None` if interrupted first.
pub async fn open(choice: Choice, stop: &Stop) -> Result<Option<Database>> {
    match choice {
        Choice::Own => {
            println!(
                "--own-postgres: starting a throw-away PostgreSQL cluster of the demo's own \
                 (initdb in a temporary directory; removed on exit)"
            );
            own(stop).await
        }
        Choice::Given(url) => {
            Ok(stop
                .race(connect(&url))
                .await
                .transpose()?
                .map(|pool| Database {
                    pool,
                    url,
                    own: None,
                }))
        }
        Choice::Default(url) => match stop.race(connect(&url)).await {
            None => Ok(None),
            Some(Ok(pool)) => Ok(Some(Database {
                pool,
                url,
                own: None,
            })),
            Some(Err(e)) => {
                println!(
                    "No DATABASE_URL, and {} cannot be used ({}):\n  starting a throw-away \
                     PostgreSQL cluster of the demo's own (initdb in a temporary directory; \
                     removed on exit). Set DATABASE_URL to use a server of yours.",
                    redact(&url),
                    e.root_cause()
                );
                own(stop).await.with_context(|| {
                    format!("{} cannot be used ({})", redact(&url), e.root_cause())
                })
            }
        },
    }
}

/// Starts a throw-away cluster and connects to it.
async fn own(stop: &Stop) -> Result<Option<Database>> {
    let mut start = tokio::task::spawn_blocking(|| OwnPostgres::start(&[]));
    let pg = tokio::select! {
        started = &mut start => started
            .context("the task starting the throw-away cluster")?
            .map_err(|e| anyhow!(e))
            .context(
                "could not start a throw-away PostgreSQL cluster; set DATABASE_URL to a server \
                 of yours instead",
            )?,
        () = stop.wait() => {
            tell!("interrupted: removing the throw-away cluster once it has started");
            // Dropping the cluster stops and removes it.
            let _ = start.await;
            return Ok(None);
        }
    };
    let dir: PathBuf = pg.dir().to_owned();
    println!(
        "  throw-away cluster: 127.0.0.1:{}, directory {}",
        pg.port(),
        dir.display()
    );
    let url = pg.url("postgres");
    let pool = match stop.race(connect(&url)).await {
        Some(Ok(pool)) => pool,
        outcome => {
            let _ = tokio::task::spawn_blocking(move || drop(pg)).await;
            return outcome.transpose().map(|_| None);
        }
    };
    Ok(Some(Database {
        pool,
        url,
        own: Some(pg),
    }))
}

#[cfg(test)]
mod tests {
    use super::{Choice, DEFAULT_URL};

    #[test]
    fn a_given_url_is_used_as_is_and_own_wins() {
        assert_eq!(
            Choice::new(Some("postgres://a@b/c"), DEFAULT_URL, false),
            Choice::Given("postgres://a@b/c".into())
        );
        assert_eq!(
            Choice::new(None, DEFAULT_URL, false),
            Choice::Default(DEFAULT_URL.into())
        );
        assert_eq!(
            Choice::new(Some("postgres://a@b/c"), DEFAULT_URL, true),
            Choice::Own
        );
        assert_eq!(Choice::new(None, DEFAULT_URL, true), Choice::Own);
    }
}
