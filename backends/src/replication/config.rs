//! [`PgReplicationBuilder`]: the settings of a [`PgReplicationSource`] and their defaults.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use pgcachewatch_core::{Error, SignalHub, DEFAULT_HUB_CAPACITY};
use pgwire_replication::{SslMode, TlsConfig};
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::PgReplicationSource;

/// The slot name used unless [`slot`](PgReplicationBuilder::slot) says otherwise.
pub const DEFAULT_SLOT: &str = "pgcachewatch";
/// The publication used unless [`publication`](PgReplicationBuilder::publication) says otherwise.
pub const DEFAULT_PUBLICATION: &str = "pgcachewatch";
/// Keys one transaction may buffer before tables degrade to table-level events.
pub const DEFAULT_KEY_CAP: usize = 10_000;
/// How often the confirmed position is reported to the server, at most.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// The first reconnect delay (doubled per failed attempt, jittered).
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(100);
/// The longest reconnect delay.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(10);
/// How long one connection attempt (connect, checks, START_REPLICATION) may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// PostgreSQL truncates identifiers to 63 bytes.
const MAX_NAME_LEN: usize = 63;

/// Where to connect.
#[derive(Clone)]
enum Target {
    Url(String),
    Options(Box<PgConnectOptions>),
}

/// Builds a [`PgReplicationSource`]; [`connect`](Self::connect) starts it.
///
/// | setting | default | why |
/// |---|---|---|
/// | slot | [`DEFAULT_SLOT`] | the name `pgcachewatch replication setup` creates |
/// | publication | [`DEFAULT_PUBLICATION`] | likewise |
/// | create slot if missing | no | a slot retains WAL until it is consumed: creating one is a decision, made by the setup command |
/// | temporary slot | no | development only: a temporary slot dies with its connection, and every reconnect is then a `Gap` |
/// | key cap | [`DEFAULT_KEY_CAP`] keys per transaction | bounds memory; a bigger transaction invalidates whole tables |
/// | status interval | 1 s | how soon the server learns the confirmed position (frees WAL, answers read-your-writes waits after foreign WAL); `pg_recvlogical` uses 10 s |
/// | reconnect backoff | 100 ms … 10 s | first retry fast, then back off with jitter |
/// | connect timeout | 10 s | a connection attempt into a black hole must not hang the reconnect loop |
/// | buffer | [`DEFAULT_HUB_CAPACITY`] signals per subscriber | a subscriber further behind gets a `Lagged` gap |
///
/// TLS follows the URL's `sslmode` and `sslrootcert` (or, for ready-made options,
/// their `sslmode` and [`ssl_root_cert`](Self::ssl_root_cert)).
///
/// ```no_run
/// use std::time::Duration;
/// use pgcachewatch_backends::replication::PgReplicationSource;
/// # async fn run() -> Result<(), pgcachewatch::Error> {
/// let source = PgReplicationSource::builder("postgres://app@db.internal/app?sslmode=verify-full")
///     .slot("app_cache")
///     .publication("app_cache")
///     .key_cap(50_000)
///     .status_interval(Duration::from_millis(500))
///     .reconnect_backoff(Duration::from_millis(50), Duration::from_secs(5))
///     .connect()
///     .await?;
/// # drop(source); Ok(()) }
/// ```
#[derive(Clone)]
#[must_use = "a builder does nothing until `connect().await`"]
pub struct PgReplicationBuilder {
    target: Target,
    pub(crate) slot: String,
    pub(crate) publication: String,
    pub(crate) create_slot_if_missing: bool,
    pub(crate) temporary_slot: bool,
    pub(crate) key_cap: usize,
    pub(crate) status_interval: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) buffer: usize,
    password: Option<String>,
    ssl_root_cert: Option<PathBuf>,
}

impl fmt::Debug for PgReplicationBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL or the password.
        f.debug_struct("PgReplicationBuilder")
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("create_slot_if_missing", &self.create_slot_if_missing)
            .field("temporary_slot", &self.temporary_slot)
            .field("key_cap", &self.key_cap)
            .finish_non_exhaustive()
    }
}

impl PgReplicationBuilder {
    pub(crate) fn from_url(url: String) -> Self {
        Self::with_target(Target::Url(url))
    }

    pub(crate) fn from_options(options: PgConnectOptions) -> Self {
        Self::with_target(Target::Options(Box::new(options)))
    }

    fn with_target(target: Target) -> Self {
        PgReplicationBuilder {
            target,
            slot: DEFAULT_SLOT.into(),
            publication: DEFAULT_PUBLICATION.into(),
            create_slot_if_missing: false,
            temporary_slot: false,
            key_cap: DEFAULT_KEY_CAP,
            status_interval: DEFAULT_STATUS_INTERVAL,
            reconnect_min: DEFAULT_RECONNECT_MIN,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            buffer: DEFAULT_HUB_CAPACITY,
            password: None,
            ssl_root_cert: None,
        }
    }

    /// The replication slot to stream from (lower-case letters, digits and
    /// underscores, at most 63): its position survives restarts.
    ///
    /// ```no_run
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // The slot made by `ReplicationSetup::new().slot("orders_service")`.
    /// let source = PgReplicationSource::builder("postgres://app@db.internal/app")
    ///     .slot("orders_service")
    ///     .publication("orders_service")
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn slot(mut self, name: impl Into<String>) -> Self {
        self.slot = name.into();
        self
    }

    /// The publication naming the watched tables.
    ///
    /// ```no_run
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // Only the tables this service caches: `CREATE PUBLICATION orders_tables FOR TABLE orders, order_lines`.
    /// let source = PgReplicationSource::builder("postgres://app@db.internal/app")
    ///     .slot("orders_service")
    ///     .publication("orders_tables")
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn publication(mut self, name: impl Into<String>) -> Self {
        self.publication = name.into();
        self
    }

    /// Creates the slot (pgoutput) when it does not exist, and recreates it when
    /// the server invalidated it (`wal_status = 'lost'`), emitting a `Gap`.
    ///
    /// ```no_run
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // A development database: make the slot on first run (in production, the setup does).
    /// let source = PgReplicationSource::builder("postgres://postgres@localhost/dev")
    ///     .create_slot_if_missing(true)
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn create_slot_if_missing(mut self, yes: bool) -> Self {
        self.create_slot_if_missing = yes;
        self
    }

    /// Uses a temporary slot (development only): created on each connection and
    /// dropped by the server when it ends, so nothing outlives the process, but
    /// every reconnect loses what was written meanwhile and emits a `Gap`.
    ///
    /// ```no_run
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // A test run: the slot dies with the connection, nothing is left on the server.
    /// let source = PgReplicationSource::builder("postgres://postgres@localhost/test")
    ///     .slot("test_run_42")
    ///     .temporary_slot(true)
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn temporary_slot(mut self, yes: bool) -> Self {
        self.temporary_slot = yes;
        self
    }

    /// At most `keys` row keys buffered per transaction; past that, the table
    /// receiving more keys gets a table-level event (keys `None`).
    ///
    /// ```no_run
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // Nightly imports touch millions of rows: past 1 000 keys, invalidate the table.
    /// let source = PgReplicationSource::builder("postgres://app@db.internal/app")
    ///     .key_cap(1_000)
    ///     .connect()
    ///     .await?;
    /// println!("{} tables invalidated whole", source.stats().degraded_tables);
    /// # Ok(()) }
    /// ```
    pub fn key_cap(mut self, keys: usize) -> Self {
        self.key_cap = keys;
        self
    }

    /// How often, at most, the confirmed position is sent to the server.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// let source = PgReplicationSource::builder("postgres://app@db.internal/app")
    ///     .status_interval(Duration::from_millis(200)) // the server frees WAL sooner
    ///     .connect()
    ///     .await?;
    /// println!("confirmed up to {:?}", source.stats().confirmed_lsn);
    /// # Ok(()) }
    /// ```
    pub fn status_interval(mut self, interval: Duration) -> Self {
        self.status_interval = interval;
        self
    }

    /// Reconnect delays: `min`, doubled per failed attempt up to `max`, jittered.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // Retry after 50 ms, then 100 ms, 200 ms, … at most every 5 s (jittered).
    /// let source = PgReplicationSource::builder("postgres://app@db.internal/app")
    ///     .reconnect_backoff(Duration::from_millis(50), Duration::from_secs(5))
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }

    /// How long one connection attempt may take.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// let source = PgReplicationSource::builder("postgres://app@db.internal/app")
    ///     .connect_timeout(Duration::from_secs(3)) // the first connection and every reconnect
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How many signals a subscriber may fall behind before it gets a `Lagged` gap.
    ///
    /// ```no_run
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // Subscribers that read in bursts may fall 8192 signals behind before a `Lagged` gap.
    /// let source = PgReplicationSource::builder("postgres://app@db.internal/app")
    ///     .buffer(8192)
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn buffer(mut self, capacity: usize) -> Self {
        self.buffer = capacity;
        self
    }

    /// The password, when the target came as ready-made options (sqlx does not
    /// hand them back). Default: the URL's, else `PGPASSWORD`.
    ///
    /// ```no_run
    /// use pgcachewatch::sqlx::postgres::PgConnectOptions;
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let options = PgConnectOptions::new().host("db.internal").username("app").database("app");
    /// let source = PgReplicationSource::builder_with_options(options)
    ///     .password(std::env::var("APP_DB_PASSWORD")?)
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// The CA certificate(s) for `sslmode=verify-ca|verify-full`, when the target
    /// came as ready-made options. Default: the URL's `sslrootcert`, else
    /// `PGSSLROOTCERT`, else the public web roots.
    ///
    /// ```no_run
    /// use pgcachewatch::sqlx::postgres::{PgConnectOptions, PgSslMode};
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// let options = PgConnectOptions::new()
    ///     .host("db.internal")
    ///     .username("app")
    ///     .database("app")
    ///     .ssl_mode(PgSslMode::VerifyFull);
    /// let source = PgReplicationSource::builder_with_options(options)
    ///     .ssl_root_cert("/etc/ssl/db-ca.pem")
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn ssl_root_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ssl_root_cert = Some(path.into());
        self
    }

    /// Checks the settings, connects, checks the slot (creating it if told to) and
    /// the publication, and starts streaming. Returns once the server accepted
    /// `START_REPLICATION`. The source is `Unhealthy` until it has caught up with
    /// the server's WAL position at connect, then `Healthy`.
    ///
    /// ```no_run
    /// use pgcachewatch::Error;
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// let source = match PgReplicationSource::builder("postgres://app@db.internal/app").connect().await {
    ///     Ok(source) => source, // Unhealthy until it has caught up with the server, then Healthy
    ///     // No slot or publication yet, `wal_level` not `logical`, …: the message says what to do.
    ///     Err(Error::Config(what_to_do)) => panic!("{what_to_do}"),
    ///     Err(e) => return Err(e), // unreachable (e.is_temporary()), or refused
    /// };
    /// # drop(source); Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// * [`Error::Config`] for an invalid setting or URL, a missing slot or
    ///   publication, `wal_level` not `logical`, saying what to do;
    /// * [`Error::Connection`] if PostgreSQL cannot be reached or refuses.
    ///   The first connection is not retried.
    pub async fn connect(self) -> Result<PgReplicationSource, Error> {
        let settings = self.validate()?;
        PgReplicationSource::start(settings).await
    }

    /// Like [`connect`](Self::connect), for a consumer that must see every
    /// event and confirm what it has stored (the NATS relay, an outbox writer):
    /// the returned [`DurableStart`](super::DurableStart) holds a subscription and a
    /// [`ConfirmGate`](super::ConfirmGate) made before the first message was
    /// read, and says whether the slot resumed where it was confirmed.
    ///
    /// ```no_run
    /// use pgcachewatch::Signal;
    /// use pgcachewatch_backends::replication::PgReplicationSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// let start = PgReplicationSource::builder("postgres://postgres@127.0.0.1/test")
    ///     .connect_durable()
    ///     .await?;
    /// let (_source, mut events, gate) = start.into_parts();
    /// while let Some(signal) = events.recv().await {
    ///     if let Signal::Event(e) = signal {
    ///         // … store `e` durably, then:
    ///         if let Some(lsn) = e.lsn {
    ///             gate.applied(lsn);
    ///         }
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    pub async fn connect_durable(self) -> Result<super::DurableStart, Error> {
        let settings = self.validate()?;
        PgReplicationSource::start_with(settings, true).await
    }

    pub(crate) fn validate(self) -> Result<Settings, Error> {
        let (options, url_parts) = match &self.target {
            Target::Options(o) => ((**o).clone(), UrlParts::default()),
            Target::Url(url) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(Error::Config(
                        "the database URL given to PgReplicationSource::builder must start with \
                         postgres:// or postgresql:// (e.g. the value of DATABASE_URL)"
                            .into(),
                    ));
                }
                let options = PgConnectOptions::from_str(url).map_err(|e| {
                    Error::Config(format!(
                        "the database URL given to PgReplicationSource::builder is not a valid \
                         PostgreSQL URL ({e}); expected postgres://user[:password]@host[:port]/database"
                    ))
                })?;
                (options, UrlParts::parse(url))
            }
        };
        if !valid_slot_name(&self.slot) {
            return Err(Error::Config(format!(
                "slot {:?} is not a valid replication slot name: use 1 to {MAX_NAME_LEN} \
                 lower-case letters, digits and underscores (.slot(..))",
                self.slot
            )));
        }
        if self.publication.is_empty()
            || self.publication.len() > MAX_NAME_LEN
            || self.publication.contains('\0')
        {
            return Err(Error::Config(format!(
                "publication {:?} is not a valid name: 1 to {MAX_NAME_LEN} bytes without NUL \
                 (.publication(..))",
                self.publication
            )));
        }
        let positive = |name: &str, d: Duration| {
            if d.is_zero() {
                Err(Error::Config(format!("{name} must be greater than zero")))
            } else {
                Ok(())
            }
        };
        positive(".status_interval(..)", self.status_interval)?;
        positive(".connect_timeout(..)", self.connect_timeout)?;
        positive(
            "the minimum of .reconnect_backoff(min, max)",
            self.reconnect_min,
        )?;
        if self.reconnect_max < self.reconnect_min {
            return Err(Error::Config(format!(
                ".reconnect_backoff(min, max): max ({:?}) is below min ({:?})",
                self.reconnect_max, self.reconnect_min
            )));
        }
        if self.key_cap == 0 {
            return Err(Error::Config(".key_cap(..) must be at least 1".into()));
        }
        SignalHub::check_capacity(self.buffer)
            .map_err(|e| Error::Config(format!(".buffer(..): {e}")))?;
        let password = self
            .password
            .clone()
            .or(url_parts.password)
            .or_else(|| std::env::var("PGPASSWORD").ok())
            .unwrap_or_default();
        let root_cert = self
            .ssl_root_cert
            .clone()
            .or(url_parts.ssl_root_cert)
            .or_else(|| std::env::var_os("PGSSLROOTCERT").map(PathBuf::from));
        let tls = tls_config(options.get_ssl_mode(), root_cert.clone());
        let mut side = options
            .clone()
            .application_name("pgcachewatch-replication-side");
        if let Some(explicit) = &self.password {
            side = side.password(explicit);
        }
        if let Some(path) = &root_cert {
            side = side.ssl_root_cert(path);
        }
        let host = match options.get_socket() {
            Some(dir) => dir.to_string_lossy().into_owned(),
            None => options.get_host().to_owned(),
        };
        Ok(Settings {
            host,
            port: options.get_port(),
            user: options.get_username().to_owned(),
            password,
            database: options
                .get_database()
                .unwrap_or(options.get_username())
                .to_owned(),
            tls,
            application_name: options
                .get_application_name()
                .unwrap_or("pgcachewatch-replication")
                .to_owned(),
            side,
            builder: self,
        })
    }
}

/// What the URL says that sqlx's options do not hand back.
#[derive(Default)]
struct UrlParts {
    password: Option<String>,
    ssl_root_cert: Option<PathBuf>,
}

impl UrlParts {
    fn parse(url: &str) -> Self {
        let Ok(url) = url::Url::parse(url) else {
            return UrlParts::default();
        };
        let password = url.password().map(percent_decode);
        let ssl_root_cert = url
            .query_pairs()
            .find(|(k, _)| k == "sslrootcert" || k == "ssl-root-cert")
            .map(|(_, v)| PathBuf::from(v.into_owned()));
        UrlParts {
            password,
            ssl_root_cert,
        }
    }
}

/// `%40` → `@`, as URLs encode passwords (`+` stays `+`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// sqlx's `sslmode` as pgwire-replication's TLS settings.
fn tls_config(mode: PgSslMode, root_cert: Option<PathBuf>) -> TlsConfig {
    match mode {
        PgSslMode::Disable => TlsConfig::disabled(),
        PgSslMode::Require => TlsConfig::require(),
        PgSslMode::VerifyCa => TlsConfig::verify_ca(root_cert),
        PgSslMode::VerifyFull => TlsConfig::verify_full(root_cert),
        // `allow` and `prefer`: TLS when the server offers it.
        _ => TlsConfig {
            mode: SslMode::Prefer,
            ..TlsConfig::disabled()
        },
    }
}

/// A replication slot name PostgreSQL accepts.
pub(crate) fn valid_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Validated settings, as the task uses them.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    pub(crate) password: String,
    pub(crate) database: String,
    pub(crate) tls: TlsConfig,
    pub(crate) application_name: String,
    /// For the source's side connection (a plain session: visibility checks
    /// and catalog lookups), with the same target, password and TLS.
    pub(crate) side: PgConnectOptions,
    pub(crate) builder: PgReplicationBuilder,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("target", &self.describe_target())
            .field("slot", &self.builder.slot)
            .field("publication", &self.builder.publication)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// `user@host:port/database`, for errors and logs (never the password).
    pub(crate) fn describe_target(&self) -> String {
        format!(
            "{}@{}:{}/{}",
            self.user, self.host, self.port, self.database
        )
    }

    /// The TLS mode, for logs.
    pub(crate) fn tls_mode(&self) -> SslMode {
        self.tls.mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_error(b: PgReplicationBuilder) -> String {
        match b.validate() {
            Err(Error::Config(msg)) => msg,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    fn builder() -> PgReplicationBuilder {
        PgReplicationBuilder::from_url("postgres://u@localhost/db".into())
    }

    #[test]
    fn bad_settings_say_what_to_set() {
        assert!(
            config_error(PgReplicationBuilder::from_url("mysql://x".into()))
                .contains("DATABASE_URL")
        );
        assert!(config_error(builder().slot("Bad-Name")).contains(".slot("));
        assert!(config_error(builder().slot("")).contains(".slot("));
        assert!(config_error(builder().publication("")).contains(".publication("));
        assert!(config_error(builder().key_cap(0)).contains(".key_cap"));
        assert!(
            config_error(builder().status_interval(Duration::ZERO)).contains(".status_interval")
        );
        assert!(config_error(
            builder().reconnect_backoff(Duration::from_secs(2), Duration::from_secs(1))
        )
        .contains("below min"));
        assert!(config_error(builder().buffer(0)).contains(".buffer"));
    }

    #[test]
    fn url_password_and_tls_are_honoured() {
        let s = PgReplicationBuilder::from_url(
            "postgres://ann:p%40ss@db:5433/app?sslmode=verify-full&sslrootcert=/ca.pem".into(),
        )
        .validate()
        .unwrap();
        assert_eq!(s.password, "p@ss");
        assert_eq!(s.describe_target(), "ann@db:5433/app");
        assert_eq!(s.tls.mode, SslMode::VerifyFull);
        assert_eq!(s.tls.ca_pem_path, Some(PathBuf::from("/ca.pem")));
        assert_eq!(s.application_name, "pgcachewatch-replication");
        let s = PgReplicationBuilder::from_url("postgres://u@h/d?sslmode=disable".into())
            .validate()
            .unwrap();
        assert_eq!(s.tls_mode(), SslMode::Disable);
        let s = builder().validate().unwrap();
        assert_eq!(s.tls_mode(), SslMode::Prefer);
    }

    #[test]
    fn debug_never_prints_the_url_or_password() {
        let b = PgReplicationBuilder::from_url("postgres://u:secret@h/db".into()).password("pw2");
        assert!(!format!("{b:?}").contains("secret"));
        assert!(!format!("{b:?}").contains("pw2"));
        let s = b.validate().unwrap();
        assert!(!format!("{s:?}").contains("secret"));
    }
}
