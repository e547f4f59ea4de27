//! Where to connect: `--database-url`, `DATABASE_URL`, or libpq's `PG*` variables.
//!
//! Every connection error names where each setting came from, so that the
//! message says what to change: the URL, or the variable (`PGSSLMODE`,
//! `PGSSLROOTCERT`, …) sqlx reads when the URL does not say.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, Result};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::ConnectOptions as _;

/// The variables libpq (and sqlx's `PgConnectOptions::new()`) read.
const PG_VARIABLES: &str = "PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE";

/// Where the URL comes from, as messages name it.
const URL_ORIGIN: &str = "--database-url / DATABASE_URL";

/// The `sslmode` values PostgreSQL (and sqlx) know, as a message lists them.
const SSL_MODES: &str = "disable, allow, prefer, require, verify-ca, verify-full";

/// The TLS settings: their URL parameters (with sqlx's aliases) and the
/// variable read when the URL does not set them.
const TLS_SETTINGS: [TlsKind; 4] = [
    TlsKind {
        name: "sslmode",
        aliases: &["sslmode", "ssl-mode"],
        env: "PGSSLMODE",
        file: false,
    },
    TlsKind {
        name: "sslrootcert",
        aliases: &["sslrootcert", "ssl-root-cert", "ssl-ca"],
        env: "PGSSLROOTCERT",
        file: true,
    },
    TlsKind {
        name: "sslcert",
        aliases: &["sslcert", "ssl-cert"],
        env: "PGSSLCERT",
        file: true,
    },
    TlsKind {
        name: "sslkey",
        aliases: &["sslkey", "ssl-key"],
        env: "PGSSLKEY",
        file: true,
    },
];

#[derive(Debug, Clone, Copy)]
struct TlsKind {
    name: &'static str,
    aliases: &'static [&'static str],
    env: &'static str,
    /// Whether the value names a file.
    file: bool,
}

/// One TLS setting in effect, and who set it.
#[derive(Debug, Clone)]
struct TlsSetting {
    kind: TlsKind,
    value: String,
    /// [`URL_ORIGIN`] or the variable's name.
    from: &'static str,
}

impl TlsSetting {
    /// `sslmode=verify-ca from PGSSLMODE`, `sslrootcert /ca.pem from --database-url / DATABASE_URL`.
    fn describe(&self) -> String {
        let sep = if self.kind.file { " " } else { "=" };
        format!("{}{sep}{} from {}", self.kind.name, self.value, self.from)
    }

    /// What to change to point at another file: the URL's parameter, or the variable.
    fn fix_file(&self) -> String {
        if self.from == URL_ORIGIN {
            format!("fix the {} parameter of {URL_ORIGIN}", self.kind.name)
        } else {
            format!("point {} at the right file, or unset it", self.kind.env)
        }
    }
}

/// What the command line says about the database: the URL (from
/// `--database-url` or `DATABASE_URL`) and `--connect-timeout`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Database<'a> {
    pub(crate) url: Option<&'a str>,
    pub(crate) connect_timeout: Duration,
}

impl Database<'_> {
    /// The settings to connect with, checked (see [`Target::resolve`]).
    pub(crate) fn target(&self) -> Result<Target> {
        Target::resolve(self.url, self.connect_timeout)
    }
}

/// Connection settings and where they came from, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) options: PgConnectOptions,
    pub(crate) origin: &'static str,
    /// `sslmode`, `sslrootcert`, `sslcert`, `sslkey` where set, with their origin.
    tls: Vec<TlsSetting>,
    /// `--connect-timeout`.
    pub(crate) connect_timeout: Duration,
}

impl Target {
    /// From the URL given on the command line or in `DATABASE_URL` (clap fills
    /// both into `url`), else from the `PG*` variables.
    pub(crate) fn resolve(url: Option<&str>, connect_timeout: Duration) -> Result<Target> {
        let query: Vec<(String, String)> = url.map(query_pairs).unwrap_or_default();
        let tls = tls_settings(&query);
        if let Some(mode) = tls.iter().find(|s| s.kind.name == "sslmode") {
            if !is_ssl_mode(&mode.value) {
                return Err(anyhow!(
                    "invalid sslmode {:?} in {}: use one of {SSL_MODES}{}",
                    mode.value,
                    mode.from,
                    if mode.from == URL_ORIGIN {
                        String::new()
                    } else {
                        format!(", or unset {}", mode.kind.env)
                    }
                ));
            }
        }
        let (options, origin) = match url {
            Some(url) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(anyhow!(
                        "the database URL must start with postgres:// or postgresql:// \
                         (from {URL_ORIGIN}); expected \
                         postgres://user[:password]@host[:port]/database"
                    ));
                }
                let options = PgConnectOptions::from_str(url).map_err(|e| {
                    anyhow!(
                        "the database URL is not valid ({}); expected \
                         postgres://user[:password]@host[:port]/database (from {URL_ORIGIN})",
                        configuration_text(&e)
                    )
                })?;
                (options, URL_ORIGIN)
            }
            None => (
                PgConnectOptions::new(),
                "the PG* environment variables (none of --database-url, DATABASE_URL given)",
            ),
        };
        Ok(Target {
            options: options.application_name("pgcachewatch-cli"),
            origin,
            tls,
            connect_timeout,
        })
    }

    /// `user@host:port/database`, without the password.
    pub(crate) fn describe(&self) -> String {
        pgcachewatch_backends::postgres::describe_target(&self.options)
    }

    /// One connection: commands run a handful of statements, and connecting once
    /// reports the real cause (refused, bad password, …) rather than a pool timeout.
    pub(crate) async fn connect(&self) -> Result<PgConnection> {
        match tokio::time::timeout(self.connect_timeout, self.options.connect()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(self.explain(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// A failed connection attempt in the command line's words.
    pub(crate) fn explain(&self, e: &sqlx::Error) -> anyhow::Error {
        let not_found =
            matches!(e, sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound);
        let tls = pgcachewatch_backends::postgres::is_tls_error(e);
        if not_found || tls {
            if let Some(missing) = self.missing_file() {
                return anyhow!(
                    "could not connect to PostgreSQL at {}: the {} file {} does not exist \
                     ({} from {})\nhint: {}: it must name a readable PEM file{}",
                    self.describe(),
                    missing.kind.name,
                    missing.value,
                    missing.kind.name,
                    missing.from,
                    missing.fix_file(),
                    if missing.kind.name == "sslrootcert" {
                        ", the certificate of the CA that signed the server's certificate"
                    } else {
                        ""
                    }
                );
            }
        }
        if tls {
            return anyhow!(
                "could not connect to PostgreSQL at {} over TLS ({}): {e}\nhint: {}",
                self.describe(),
                self.tls_summary(),
                self.tls_hint()
            );
        }
        anyhow!(self.failure(&e.to_string()))
    }

    /// No answer within `--connect-timeout`.
    pub(crate) fn timed_out(&self) -> anyhow::Error {
        anyhow!(
            "could not connect to PostgreSQL at {} (settings from {}): no answer within {}\n\
             hint: check that the server is reachable at that address; on a slow network \
             raise --connect-timeout (e.g. --connect-timeout 30s)",
            self.describe(),
            self.origin,
            crate::output::duration(Some(self.connect_timeout))
        )
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

    /// `sslmode=verify-ca from PGSSLMODE, sslrootcert /ca.pem from PGSSLROOTCERT;
    /// the rest from --database-url / DATABASE_URL`, or, when every setting came
    /// from one place, `sslmode=verify-ca; settings from …`.
    fn tls_summary(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if !self.tls.iter().any(|s| s.kind.name == "sslmode") {
            parts.push(format!(
                "sslmode={} (the default)",
                pgcachewatch_backends::postgres::ssl_mode_name(&self.options)
            ));
        }
        if self.tls.iter().all(|s| s.from == self.origin) {
            parts.extend(self.tls.iter().map(|s| {
                let sep = if s.kind.file { " " } else { "=" };
                format!("{}{sep}{}", s.kind.name, s.value)
            }));
            format!("{}; settings from {}", parts.join(", "), self.origin)
        } else {
            parts.extend(self.tls.iter().map(TlsSetting::describe));
            format!("{}; the rest from {}", parts.join(", "), self.origin)
        }
    }

    /// What to change about the TLS settings in effect, and where.
    fn tls_hint(&self) -> String {
        let in_url: Vec<&str> = self
            .tls
            .iter()
            .filter(|s| s.from == URL_ORIGIN)
            .map(|s| s.kind.name)
            .collect();
        let in_env: Vec<&str> = self
            .tls
            .iter()
            .filter(|s| s.from != URL_ORIGIN)
            .map(|s| s.kind.env)
            .collect();
        let mut fixes: Vec<String> = Vec::new();
        if !in_url.is_empty() {
            fixes.push(format!(
                "check the {} parameter(s) of {URL_ORIGIN}",
                in_url.join(" and ")
            ));
        }
        if !in_env.is_empty() {
            fixes.push(format!(
                "check or unset {} (set in the environment; the same parameter in \
                 {URL_ORIGIN} takes precedence)",
                in_env.join(" and ")
            ));
        }
        if fixes.is_empty() {
            fixes.push(format!(
                "set sslmode and sslrootcert in {URL_ORIGIN} \
                 (?sslmode=verify-ca&sslrootcert=/path/to/ca.pem) or PGSSLMODE and PGSSLROOTCERT"
            ));
        }
        let verifies = matches!(
            self.options.get_ssl_mode(),
            sqlx::postgres::PgSslMode::VerifyCa | sqlx::postgres::PgSslMode::VerifyFull
        );
        let rootcert = self.tls.iter().any(|s| s.kind.name == "sslrootcert");
        let advice = if verifies && !rootcert {
            format!(
                "no sslrootcert is set, so the server's certificate was checked against the \
                 public roots: add &sslrootcert=/path/to/ca.pem to {URL_ORIGIN} or set \
                 PGSSLROOTCERT to the certificate of the CA that signed the server's certificate"
            )
        } else {
            "sslrootcert must name the certificate of the CA that signed the server's \
             certificate, and verify-full also needs the host name to match it"
                .to_owned()
        };
        format!("{}: {advice}", fixes.join("; "))
    }

    /// The first certificate or key file that is set and does not exist.
    fn missing_file(&self) -> Option<&TlsSetting> {
        self.tls
            .iter()
            .find(|s| s.kind.file && !Path::new(&s.value).exists())
    }
}

/// The TLS settings in effect: the URL's, else the variables' (as sqlx reads them).
fn tls_settings(query: &[(String, String)]) -> Vec<TlsSetting> {
    TLS_SETTINGS
        .iter()
        .filter_map(|kind| {
            // The last occurrence wins, as in sqlx.
            let in_url = query
                .iter()
                .rev()
                .find(|(k, _)| kind.aliases.contains(&k.as_str()));
            match in_url {
                Some((_, value)) => Some(TlsSetting {
                    kind: *kind,
                    value: value.clone(),
                    from: URL_ORIGIN,
                }),
                None => std::env::var(kind.env)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(|value| TlsSetting {
                        kind: *kind,
                        value,
                        from: kind.env,
                    }),
            }
        })
        .collect()
}

/// Whether sqlx knows `value` as an `sslmode` (it compares case-insensitively).
fn is_ssl_mode(value: &str) -> bool {
    sqlx::postgres::PgSslMode::from_str(value).is_ok()
}

/// The query of a URL as decoded key–value pairs (`+` is a space, `%XX` a byte).
fn query_pairs(url: &str) -> Vec<(String, String)> {
    let Some((_, query)) = url.split_once('?') else {
        return Vec::new();
    };
    let query = query.split('#').next().unwrap_or_default();
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = text
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// sqlx's configuration error without its repeated "error with configuration: ".
fn configuration_text(e: &sqlx::Error) -> String {
    let text = e.to_string();
    let mut rest = text.as_str();
    while let Some(inner) = rest.strip_prefix("error with configuration: ") {
        rest = inner;
    }
    rest.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_are_decoded() {
        assert_eq!(
            query_pairs("postgres://h/db?sslmode=verify-ca&sslrootcert=%2Ftmp%2Fmy+ca.pem#x"),
            vec![
                ("sslmode".to_owned(), "verify-ca".to_owned()),
                ("sslrootcert".to_owned(), "/tmp/my ca.pem".to_owned()),
            ]
        );
        assert!(query_pairs("postgres://h/db").is_empty());
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }

    #[test]
    fn a_bad_sslmode_in_the_url_is_one_clear_line() {
        let e = Target::resolve(
            Some("postgres://h/db?sslmode=bogus"),
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "invalid sslmode \"bogus\" in --database-url / DATABASE_URL: use one of \
             disable, allow, prefer, require, verify-ca, verify-full"
        );
        let e = Target::resolve(
            Some("postgres://h/db?statement-cache-capacity=x"),
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("error with configuration"), "{e}");
    }
}
