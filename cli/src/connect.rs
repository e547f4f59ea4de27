//! Where to connect: `--database-url`, `DATABASE_URL`, or libpq's `PG*` variables.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, Result};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::ConnectOptions as _;

/// The variables libpq (and sqlx's `PgConnectOptions::new()`) read.
const PG_VARIABLES: &str = "PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE";

/// How long connecting may take before the command gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection settings and where they came from, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) options: PgConnectOptions,
    pub(crate) origin: &'static str,
}

impl Target {
    /// From the URL given on the command line or in `DATABASE_URL` (clap fills
    /// both into `url`), else from the `PG*` variables.
    pub(crate) fn resolve(url: Option<&str>) -> Result<Target> {
        match url {
            Some(url) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(anyhow!(
                        "the database URL must start with postgres:// or postgresql:// \
                         (from --database-url or DATABASE_URL); expected \
                         postgres://user[:password]@host[:port]/database"
                    ));
                }
                let options = PgConnectOptions::from_str(url).map_err(|e| {
                    anyhow!(
                        "the database URL is not valid ({e}); expected \
                         postgres://user[:password]@host[:port]/database \
                         (from --database-url or DATABASE_URL)"
                    )
                })?;
                Ok(Target {
                    options,
                    origin: "--database-url / DATABASE_URL",
                })
            }
            None => Ok(Target {
                options: PgConnectOptions::new(),
                origin:
                    "the PG* environment variables (none of --database-url, DATABASE_URL given)",
            }),
        }
        .map(|t| Target {
            options: t.options.application_name("pgcachewatch-cli"),
            ..t
        })
    }

    /// `user@host:port/database`, without the password.
    pub(crate) fn describe(&self) -> String {
        pgcachewatch::postgres::describe_target(&self.options)
    }

    /// One connection: commands run a handful of statements, and connecting once
    /// reports the real cause (refused, bad password, …) rather than a pool timeout.
    pub(crate) async fn connect(&self) -> Result<PgConnection> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.options.connect()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) if pgcachewatch::postgres::is_tls_error(&e) => Err(anyhow!(
                "could not connect to PostgreSQL at {} over TLS (sslmode={}, settings from {}): {e}\n\
                 hint: check sslmode and sslrootcert (in the URL, or PGSSLMODE / PGSSLROOTCERT): \
                 sslrootcert must name the certificate of the CA that signed the server's \
                 certificate, and verify-full also needs the host name to match it",
                self.describe(),
                pgcachewatch::postgres::ssl_mode_name(&self.options),
                self.origin
            )),
            Ok(Err(e)) => Err(anyhow!(self.failure(&e.to_string()))),
            Err(_) => Err(anyhow!(self.failure(&format!(
                "no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            )))),
        }
    }

    /// What failed, why, and what to set.
    pub(crate) fn failure(&self, cause: &str) -> String {
        format!(
            "could not connect to PostgreSQL at {} (settings from {}): {cause}\n{}",
            self.describe(),
            self.origin,
            Self::hint()
        )
    }

    /// What to set to connect elsewhere.
    pub(crate) fn hint() -> String {
        format!(
            "hint: set --database-url or DATABASE_URL \
             (postgres://user[:password]@host[:port]/database), or {PG_VARIABLES}"
        )
    }
}
