//! The PostgreSQL backend (feature `postgres`): a `LISTEN` source with reconnect
//! and heartbeat, and the trigger SQL with its installer.

pub mod install;
pub mod listener;

pub use self::install::{InstallError, Installer, ModeChange, TableName};
pub use self::listener::{ListenerStats, MalformedPolicy, PgListenerBuilder, PgListenerSource};

/// The NOTIFY channel pgcachewatch's triggers send on and its listener listens on,
/// unless configured otherwise.
pub const DEFAULT_CHANNEL: &str = "pgcachewatch";

/// `user@host:port/database` of a connection target, for errors and logs: never
/// the password.
///
/// ```
/// use pgcachewatch_backends::postgres::describe_target;
/// let o: sqlx::postgres::PgConnectOptions = "postgres://ann:secret@db:5433/app".parse().unwrap();
/// assert_eq!(describe_target(&o), "ann@db:5433/app");
/// ```
#[doc(hidden)] // for the `pgcachewatch` command
pub fn describe_target(options: &sqlx::postgres::PgConnectOptions) -> String {
    format!(
        "{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("<default database>")
    )
}

/// Whether a connection error comes from TLS (a rejected server certificate, a
/// failed handshake, TLS required but not offered): then check `sslmode` and
/// `sslrootcert` rather than the host, user or password.
///
/// sqlx reports a rejected certificate as an I/O error wrapping the TLS
/// library's error, and other TLS trouble as `sqlx::Error::Tls`.
///
/// ```
/// use pgcachewatch_backends::postgres::is_tls_error;
/// assert!(is_tls_error(&sqlx::Error::Tls("handshake failed".into())));
/// assert!(!is_tls_error(&sqlx::Error::PoolTimedOut));
/// ```
#[doc(hidden)] // for the `pgcachewatch` command
pub fn is_tls_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Io(io) => io.get_ref().is_some_and(|inner| {
            let text = inner.to_string().to_ascii_lowercase();
            ["certificate", "tls", "ssl"]
                .iter()
                .any(|word| text.contains(word))
        }),
        _ => false,
    }
}

/// The `sslmode` of `options` as PostgreSQL spells it (`prefer`, `verify-ca`, …).
///
/// ```
/// use pgcachewatch_backends::postgres::ssl_mode_name;
/// let o: sqlx::postgres::PgConnectOptions =
///     "postgres://db.example/app?sslmode=verify-ca".parse().unwrap();
/// assert_eq!(ssl_mode_name(&o), "verify-ca");
/// ```
#[doc(hidden)] // for the `pgcachewatch` command
pub fn ssl_mode_name(options: &sqlx::postgres::PgConnectOptions) -> &'static str {
    use sqlx::postgres::PgSslMode;
    match options.get_ssl_mode() {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}
