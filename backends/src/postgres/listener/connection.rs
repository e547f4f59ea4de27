//! Opening one listening connection: connect, LISTEN, learn the backend pid.

use std::sync::Arc;

use pgcachewatch_core::Error;
use sqlx::postgres::{PgConnection, PgListener, PgPoolOptions};
use sqlx::Connection;

use super::config::Settings;

/// Why a connection attempt failed. Private: mapped into [`pgcachewatch_core::Error`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ConnectError {
    /// Connecting or authenticating failed.
    #[error(
        "could not connect to PostgreSQL at {target} to LISTEN: {source}; check the \
         database URL (e.g. DATABASE_URL) or the PgConnectOptions: host, port, user, \
         password, database"
    )]
    Connect { target: String, source: sqlx::Error },
    /// The TLS handshake failed: the server's certificate was rejected, or TLS was
    /// required and the server does not offer it.
    #[error(
        "could not connect to PostgreSQL at {target} over TLS (sslmode={sslmode}): {source}; \
         check that sslrootcert names the certificate of the CA that signed the server's \
         certificate (for verify-full, also that the host name matches it), or the \
         server's TLS setup"
    )]
    Tls {
        target: String,
        sslmode: &'static str,
        source: sqlx::Error,
    },
    /// A certificate or key file named by the settings does not exist.
    #[error(
        "could not connect to PostgreSQL at {target}: the {setting} file {path} does not \
         exist ({source}); fix {setting} in the database URL or the {env} variable (or \
         PgConnectOptions::ssl_root_cert / ssl_client_cert / ssl_client_key): it must name a \
         readable PEM file"
    )]
    CertificateFile {
        target: String,
        setting: &'static str,
        env: &'static str,
        path: String,
        source: sqlx::Error,
    },
    /// Connected, but `LISTEN` or the first query failed.
    #[error("connected to {target}, but LISTEN {channels:?} failed: {source}")]
    Listen {
        target: String,
        channels: Vec<String>,
        source: sqlx::Error,
    },
    /// The attempt took longer than the connect timeout.
    #[error(
        "connecting to PostgreSQL at {target} timed out after {timeout:?}; is the server \
         reachable? (raise .connect_timeout(..) for a slow network)"
    )]
    Timeout {
        target: String,
        timeout: std::time::Duration,
    },
}

impl ConnectError {
    /// Whether retrying may help: network trouble yes, a wrong password or a
    /// missing database no.
    pub(crate) fn is_temporary(&self) -> bool {
        match self {
            ConnectError::Timeout { .. } => true,
            ConnectError::Tls { .. } | ConnectError::CertificateFile { .. } => false,
            ConnectError::Connect { source, .. } | ConnectError::Listen { source, .. } => {
                is_temporary(source)
            }
        }
    }
}

impl From<ConnectError> for Error {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Connect {
                source: sqlx::Error::Configuration(cause),
                target,
            } => Error::Config(format!(
                "the connect options for {target} are invalid: {cause}; fix the database \
                 URL (e.g. DATABASE_URL) or the PgConnectOptions"
            )),
            other => Error::Connection {
                temporary: other.is_temporary(),
                source: Box::new(other),
            },
        }
    }
}

/// Whether a driver error is worth retrying.
pub(crate) fn is_temporary(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 28: invalid authorization; 3D: no such database; 42: syntax or
            // access rule violation. Anything else (08 connection exception,
            // 53 insufficient resources, 57 operator intervention, …) may pass.
            !(code.starts_with("28") || code.starts_with("3D") || code.starts_with("42"))
        }
        sqlx::Error::Configuration(_) | sqlx::Error::Tls(_) => false,
        _ => true,
    }
}

/// A connection that listens on every channel of the source and its heartbeat channel.
pub(crate) struct Listening {
    pub(crate) listener: PgListener,
    pub(crate) backend_pid: u32,
}

/// Whether to make a plain connection first, to report why connecting fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The first connection, in `connect()`: sqlx's pool retries a refused
    /// connection until its timeout and then reports only "pool timed out";
    /// one direct attempt first surfaces the real cause at once.
    First,
    /// Reconnecting: the pool's own retry of a refused connection (a restarting
    /// server) is welcome, and the extra connection would only slow recovery.
    Reconnect,
}

/// Connects and LISTENs, within the connect timeout.
pub(crate) async fn open(settings: &Settings, probe: Probe) -> Result<Listening, ConnectError> {
    let timeout = settings.builder.connect_timeout;
    match tokio::time::timeout(timeout, open_unbounded(settings, probe)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout {
            target: settings.describe_target(),
            timeout,
        }),
    }
}

async fn open_unbounded(settings: &Settings, probe: Probe) -> Result<Listening, ConnectError> {
    let target = settings.describe_target();
    if probe == Probe::First {
        let direct = PgConnection::connect_with(&settings.options)
            .await
            .map_err(|source| connect_error(settings, &target, source))?;
        let _ = direct.close().await;
    }
    // A pool of one connection per attempt, dropped with the listener: sqlx's
    // PgListener needs a pool, and a fresh one means nothing is reconnected
    // behind our back (PgListener::recv would do that silently).
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .test_before_acquire(false)
        .acquire_timeout(settings.builder.connect_timeout)
        .connect_with(settings.options.clone())
        .await
        .map_err(|source| connect_error(settings, &target, source))?;
    let listen_err = |source| ConnectError::Listen {
        target: target.clone(),
        channels: settings.channels.clone(),
        source,
    };
    let mut listener = PgListener::connect_with(&pool).await.map_err(listen_err)?;
    // Never reconnect inside try_recv: a lost connection must surface as Ok(None).
    listener.eager_reconnect(false);
    // The pool is this listener's own and nothing else closes it, so its close
    // event needs no watching: without it, try_recv registers no close-event
    // listener per call (measured: part of the per-notification cost in a burst).
    listener.ignore_pool_close_event(true);
    let mut channels: Vec<&str> = settings.channels.iter().map(String::as_str).collect();
    channels.push(&settings.heartbeat_channel);
    listener.listen_all(channels).await.map_err(listen_err)?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut listener)
        .await
        .map_err(listen_err)?;
    Ok(Listening {
        listener,
        backend_pid: u32::try_from(pid).unwrap_or_default(),
    })
}

fn connect_error(settings: &Settings, target: &str, source: sqlx::Error) -> ConnectError {
    let not_found =
        matches!(&source, sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound);
    if not_found || crate::postgres::is_tls_error(&source) {
        if let Some((setting, env, path)) = missing_certificate_file(&settings.options) {
            return ConnectError::CertificateFile {
                target: target.to_owned(),
                setting,
                env,
                path,
                source,
            };
        }
    }
    if crate::postgres::is_tls_error(&source) {
        ConnectError::Tls {
            target: target.to_owned(),
            sslmode: crate::postgres::ssl_mode_name(&settings.options),
            source,
        }
    } else {
        ConnectError::Connect {
            target: target.to_owned(),
            source,
        }
    }
}

/// The first certificate or key file the options name that does not exist: its
/// setting, the variable that can set it, and its path.
fn missing_certificate_file(
    options: &sqlx::postgres::PgConnectOptions,
) -> Option<(&'static str, &'static str, String)> {
    use sqlx::ConnectOptions as _;
    let url = options.to_url_lossy();
    url.query_pairs().find_map(|(key, value)| {
        let (setting, env) = match &*key {
            "sslrootcert" => ("sslrootcert", "PGSSLROOTCERT"),
            "sslcert" => ("sslcert", "PGSSLCERT"),
            "sslkey" => ("sslkey", "PGSSLKEY"),
            _ => return None,
        };
        // Files are shown as `file: PATH`; inline PEM is not a file.
        let path = value.strip_prefix("file: ")?;
        (!std::path::Path::new(path).exists()).then(|| (setting, env, path.to_owned()))
    })
}

/// The detail carried by a `ConnectionLost` gap.
pub(crate) fn loss_detail(e: Option<&sqlx::Error>) -> Arc<str> {
    match e {
        Some(e) => e.to_string().into(),
        None => "the server closed the connection".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_certificate_file_is_named() {
        let options: sqlx::postgres::PgConnectOptions =
            "postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/pgcw-ca.pem"
                .parse()
                .unwrap();
        assert_eq!(
            missing_certificate_file(&options),
            Some((
                "sslrootcert",
                "PGSSLROOTCERT",
                "/nonexistent/pgcw-ca.pem".to_owned()
            ))
        );
        let error = ConnectError::CertificateFile {
            target: "u@h:5432/db".into(),
            setting: "sslrootcert",
            env: "PGSSLROOTCERT",
            path: "/nonexistent/pgcw-ca.pem".into(),
            source: sqlx::Error::Io(std::io::ErrorKind::NotFound.into()),
        };
        let text = error.to_string();
        assert!(
            text.contains("the sslrootcert file /nonexistent/pgcw-ca.pem does not exist")
                && text.contains("PGSSLROOTCERT"),
            "{text}"
        );
        assert!(!error.is_temporary());
        // An existing file, or an inline certificate, is not missing.
        let options = options.ssl_root_cert("/etc/hostname");
        assert_eq!(missing_certificate_file(&options), None);
    }
}
