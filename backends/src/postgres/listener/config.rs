//! [`PgListenerBuilder`]: the settings of a [`PgListenerSource`] and their defaults.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use pgcachewatch_core::{Error, DEFAULT_HUB_CAPACITY};
use sqlx::postgres::PgConnectOptions;

use super::PgListenerSource;
use crate::postgres::DEFAULT_CHANNEL;

/// How often the listener sends itself a heartbeat NOTIFY, by default.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a heartbeat may take to come back before the connection is asked for
/// a round trip (and presumed half-open if that takes as long), by default.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// The first reconnect delay, by default (doubled per failed attempt, jittered).
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(100);
/// The longest reconnect delay, by default.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(10);
/// How long one connection attempt (connect, LISTEN) may take, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// PostgreSQL truncates identifiers, channel names included, to 63 bytes.
const MAX_CHANNEL_LEN: usize = 63;

/// What the listener does with a payload on a watched channel that is not an event
/// (not JSON, wrong shape, unknown operation, a foreign application's message).
///
/// Either way the payload is counted in [`ListenerStats::malformed`](super::ListenerStats)
/// and logged (`warn`, at most once a second), and the source keeps listening.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MalformedPolicy {
    /// Drop it (the default): other applications may share the channel.
    #[default]
    Ignore,
    /// Emit [`GapReason::MalformedPayload`](pgcachewatch_core::GapReason::MalformedPayload):
    /// the payload might have been a change we cannot read, so caches flush.
    Gap,
}

/// Where to connect: a URL parsed at `connect()`, or ready options.
#[derive(Clone)]
enum Target {
    Url(String),
    Options(Box<PgConnectOptions>),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a URL: it may hold a password.
        match self {
            Target::Url(_) => f.write_str("Url(..)"),
            Target::Options(o) => write!(f, "Options({})", crate::postgres::describe_target(o)),
        }
    }
}

/// Builds a [`PgListenerSource`]; [`connect`](Self::connect) starts it.
///
/// | setting | default | why |
/// |---|---|---|
/// | channels | [`DEFAULT_CHANNEL`] | what pgcachewatch's triggers send on |
/// | heartbeat interval | 1 s | a half-open connection is found within interval + 2 × timeout |
/// | heartbeat timeout | 2 s | a self-NOTIFY commits and returns in well under a millisecond on a LAN; 2 s tolerates a loaded server without flushing caches for nothing |
/// | reconnect backoff | 100 ms … 10 s | first retry fast (a killed backend is back at once), then back off with jitter |
/// | connect timeout | 10 s | a connection attempt into a black hole must not hang the reconnect loop |
/// | malformed payloads | [`MalformedPolicy::Ignore`] | foreign messages on a shared channel are not changes |
/// | buffer | [`DEFAULT_HUB_CAPACITY`] signals per subscriber | a subscriber further behind gets a `Lagged` gap |
///
/// ```no_run
/// use std::time::Duration;
/// use pgcachewatch::postgres::{MalformedPolicy, PgListenerSource};
/// # async fn run() -> Result<(), pgcachewatch::Error> {
/// let source = PgListenerSource::builder("postgres://app@db.internal/app")
///     .channels(["pgcachewatch", "legacy_cache_channel"])
///     .heartbeat_interval(Duration::from_millis(500))
///     .heartbeat_timeout(Duration::from_secs(1))
///     .reconnect_backoff(Duration::from_millis(50), Duration::from_secs(5))
///     .on_malformed(MalformedPolicy::Gap)
///     .buffer(8192)
///     .connect()
///     .await?;
/// # drop(source); Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `connect().await`"]
pub struct PgListenerBuilder {
    target: Target,
    channels: Vec<String>,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) heartbeat_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) on_malformed: MalformedPolicy,
    pub(crate) buffer: usize,
}

impl PgListenerBuilder {
    pub(crate) fn from_url(url: String) -> Self {
        Self::with_target(Target::Url(url))
    }

    pub(crate) fn from_options(options: PgConnectOptions) -> Self {
        Self::with_target(Target::Options(Box::new(options)))
    }

    fn with_target(target: Target) -> Self {
        PgListenerBuilder {
            target,
            channels: vec![DEFAULT_CHANNEL.to_owned()],
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            reconnect_min: DEFAULT_RECONNECT_MIN,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            on_malformed: MalformedPolicy::Ignore,
            buffer: DEFAULT_HUB_CAPACITY,
        }
    }

    /// Listens on this one channel instead of the channels set so far.
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::PgListenerSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // The triggers were installed with `pgcachewatch install --channel app_cache`.
    /// let source = PgListenerSource::builder("postgres://app@db.internal/app")
    ///     .channel("app_cache")
    ///     .connect()
    ///     .await?;
    /// assert_eq!(source.channels(), ["app_cache"]);
    /// # Ok(()) }
    /// ```
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channels = vec![channel.into()];
        self
    }

    /// Listens on these channels instead of the channels set so far.
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::PgListenerSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // pgcachewatch's triggers, and those a PGCacheWatch (Python) deployment installed.
    /// let source = PgListenerSource::builder("postgres://app@db.internal/app")
    ///     .channels(["pgcachewatch", "ch_pgcachewatch_table_change"])
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn channels<I, S>(mut self, channels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.channels = channels.into_iter().map(Into::into).collect();
        self
    }

    /// How often to send the heartbeat (a NOTIFY to a private channel of this source).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pgcachewatch::postgres::PgListenerSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // A half-open connection is noticed within 500 ms + 2 × the timeout.
    /// let source = PgListenerSource::builder("postgres://app@db.internal/app")
    ///     .heartbeat_interval(Duration::from_millis(500))
    ///     .connect()
    ///     .await?;
    /// println!("last heartbeat round trip: {:?}", source.stats().last_heartbeat_rtt);
    /// # Ok(()) }
    /// ```
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// How long a heartbeat may take to come back before the connection is asked
    /// for a round trip (`SELECT 1`, within the same timeout). A connection that
    /// does not answer is dropped as half-open (then: `Unhealthy`,
    /// `Gap(HeartbeatTimeout)`, reconnect); one that answers only waits behind a
    /// commit in progress, a stall ([`ListenerStats::queue_stalls`](super::ListenerStats::queue_stalls)).
    /// The heartbeat's commit waits at most half of it for the NOTIFY commit lock.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pgcachewatch::postgres::PgListenerSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // A server that is slow under load: give heartbeats 5 s before asking for a round trip.
    /// let source = PgListenerSource::builder("postgres://app@db.internal/app")
    ///     .heartbeat_timeout(Duration::from_secs(5))
    ///     .connect()
    ///     .await?;
    /// println!("{} heartbeats timed out", source.stats().heartbeat_timeouts);
    /// # Ok(()) }
    /// ```
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = timeout;
        self
    }

    /// Reconnect delays: `min`, doubled per failed attempt up to `max`, jittered.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pgcachewatch::postgres::PgListenerSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // Retry after 50 ms, then 100 ms, 200 ms, … at most every 5 s (jittered).
    /// let source = PgListenerSource::builder("postgres://app@db.internal/app")
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

    /// How long one connection attempt (TCP, authentication, LISTEN) may take.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pgcachewatch::postgres::PgListenerSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// let source = PgListenerSource::builder("postgres://app@db.internal/app")
    ///     .connect_timeout(Duration::from_secs(3)) // the first connection and every reconnect
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// What to do with payloads that are not events.
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::{MalformedPolicy, PgListenerSource};
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // The channel is ours alone: a payload we cannot read may have been a change.
    /// let source = PgListenerSource::builder("postgres://app@db.internal/app")
    ///     .channel("app_cache")
    ///     .on_malformed(MalformedPolicy::Gap) // caches flush instead of missing it
    ///     .connect()
    ///     .await?;
    /// println!("{} malformed payloads", source.stats().malformed);
    /// # Ok(()) }
    /// ```
    pub fn on_malformed(mut self, policy: MalformedPolicy) -> Self {
        self.on_malformed = policy;
        self
    }

    /// How many signals a subscriber may fall behind before it gets a `Lagged` gap.
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::PgListenerSource;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// // Subscribers that read in bursts may fall 8192 signals behind before a `Lagged` gap.
    /// let source = PgListenerSource::builder("postgres://app@db.internal/app")
    ///     .buffer(8192)
    ///     .connect()
    ///     .await?;
    /// # drop(source); Ok(()) }
    /// ```
    pub fn buffer(mut self, capacity: usize) -> Self {
        self.buffer = capacity;
        self
    }

    /// Checks the settings, connects, LISTENs on every channel, and starts the
    /// background task. Returns once listening: the source starts healthy.
    ///
    /// ```no_run
    /// use pgcachewatch::postgres::PgListenerSource;
    /// use pgcachewatch::Error;
    /// # async fn run() -> Result<(), pgcachewatch::Error> {
    /// match PgListenerSource::builder("postgres://app@db.internal/app").connect().await {
    ///     Ok(source) => println!("listening on {:?}", source.channels()),
    ///     Err(e @ Error::Config(_)) => panic!("fix the settings: {e}"),
    ///     Err(e) if e.is_temporary() => eprintln!("database unreachable, retry later: {e}"),
    ///     Err(e) => return Err(e), // a wrong password, a refused TLS certificate, …
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// * [`Error::Config`] for an invalid setting or URL, saying what to set;
    /// * [`Error::Connection`] if PostgreSQL cannot be reached or refuses the
    ///   connection or the LISTEN (`is_temporary()` tells a network problem from,
    ///   say, a wrong password). The first connection is not retried: bad
    ///   configuration fails loudly here instead of looping in the background.
    pub async fn connect(self) -> Result<PgListenerSource, Error> {
        let settings = self.validate()?;
        PgListenerSource::start(settings).await
    }

    fn validate(self) -> Result<Settings, Error> {
        let options = match &self.target {
            Target::Options(o) => (**o).clone(),
            Target::Url(url)
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) =>
            {
                return Err(Error::Config(
                    "the database URL given to PgListenerSource::builder must start with \
                     postgres:// or postgresql:// (e.g. the value of DATABASE_URL)"
                        .into(),
                ))
            }
            Target::Url(url) => {
                if let Some(mode) = bad_ssl_mode(url) {
                    return Err(Error::Config(format!(
                        "the database URL given to PgListenerSource::builder has an invalid \
                         sslmode {mode:?}: use one of {SSL_MODES}"
                    )));
                }
                PgConnectOptions::from_str(url).map_err(|e| {
                    Error::Config(format!(
                        "the database URL given to PgListenerSource::builder is not a valid \
                         PostgreSQL URL ({}); expected \
                         postgres://user[:password]@host[:port]/database, e.g. the value of \
                         DATABASE_URL",
                        configuration_text(&e)
                    ))
                })?
            }
        };
        if self.channels.is_empty() {
            return Err(Error::Config(
                "no channel to LISTEN on: set one with .channel(..) or .channels(..) \
                 (pgcachewatch's triggers send on \"pgcachewatch\")"
                    .into(),
            ));
        }
        for ch in &self.channels {
            if ch.is_empty() || ch.len() > MAX_CHANNEL_LEN || ch.contains('\0') {
                return Err(Error::Config(format!(
                    "channel {ch:?} is not a valid PostgreSQL channel name: it must be 1 to \
                     {MAX_CHANNEL_LEN} bytes without NUL; set another with .channel(..)"
                )));
            }
        }
        let positive = |name: &str, d: Duration| {
            if d.is_zero() {
                Err(Error::Config(format!("{name} must be greater than zero")))
            } else {
                Ok(())
            }
        };
        positive(".heartbeat_interval(..)", self.heartbeat_interval)?;
        positive(".heartbeat_timeout(..)", self.heartbeat_timeout)?;
        positive(
            "the minimum of .reconnect_backoff(min, max)",
            self.reconnect_min,
        )?;
        positive(".connect_timeout(..)", self.connect_timeout)?;
        if self.reconnect_max < self.reconnect_min {
            return Err(Error::Config(format!(
                ".reconnect_backoff(min, max): max ({:?}) is below min ({:?})",
                self.reconnect_max, self.reconnect_min
            )));
        }
        if self.buffer == 0 {
            return Err(Error::Config(
                ".buffer(..) must be at least 1 signal".into(),
            ));
        }
        let mut channels = self.channels.clone();
        channels.sort();
        channels.dedup();
        let options = if options.get_application_name().is_none() {
            options.application_name("pgcachewatch-listener")
        } else {
            options
        };
        Ok(Settings {
            options,
            channels,
            heartbeat_channel: heartbeat_channel_name(),
            builder: self,
        })
    }
}

/// Validated settings, as the background task uses them.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) options: PgConnectOptions,
    /// The watched channels, sorted, without duplicates.
    pub(crate) channels: Vec<String>,
    /// This source's private heartbeat channel.
    pub(crate) heartbeat_channel: String,
    pub(crate) builder: PgListenerBuilder,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not derived: `PgConnectOptions`' own Debug shows the password.
        f.debug_struct("Settings")
            .field("target", &self.describe_target())
            .field("channels", &self.channels)
            .field("heartbeat_channel", &self.heartbeat_channel)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// `user@host:port/database`, for errors and logs (never the password).
    pub(crate) fn describe_target(&self) -> String {
        crate::postgres::describe_target(&self.options)
    }
}

/// The `sslmode` values sqlx knows, as a message lists them.
const SSL_MODES: &str = "disable, allow, prefer, require, verify-ca, verify-full";

/// The URL's `sslmode` (or `ssl-mode`) if sqlx would refuse it.
fn bad_ssl_mode(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1.split('#').next().unwrap_or_default();
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(key, _)| matches!(*key, "sslmode" | "ssl-mode"))
        .map(|(_, value)| value)
        .next_back()
        // Encoded values are left to sqlx, which decodes them.
        .filter(|value| !value.contains(['%', '+']))
        .filter(|value| sqlx::postgres::PgSslMode::from_str(value).is_err())
        .map(str::to_owned)
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

/// `pgcachewatch_hb_` and 16 random hex digits: private to one source, so two
/// sources (or processes) never answer each other's heartbeats.
fn heartbeat_channel_name() -> String {
    format!("pgcachewatch_hb_{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_error(b: PgListenerBuilder) -> String {
        match b.validate() {
            Err(Error::Config(msg)) => msg,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    fn builder() -> PgListenerBuilder {
        PgListenerBuilder::from_url("postgres://u@localhost/db".into())
    }

    #[test]
    fn bad_settings_say_what_to_set() {
        assert!(
            config_error(PgListenerBuilder::from_url("mysql://x".into())).contains("DATABASE_URL")
        );
        assert!(config_error(builder().channels(Vec::<String>::new())).contains(".channel("));
        assert!(config_error(builder().channel("")).contains("1 to 63 bytes"));
        assert!(config_error(builder().channel("x".repeat(64))).contains("63 bytes"));
        assert!(config_error(builder().heartbeat_timeout(Duration::ZERO))
            .contains(".heartbeat_timeout"));
        assert!(config_error(builder().heartbeat_interval(Duration::ZERO))
            .contains(".heartbeat_interval"));
        assert!(config_error(
            builder().reconnect_backoff(Duration::from_secs(2), Duration::from_secs(1))
        )
        .contains("below min"));
        assert!(config_error(builder().buffer(0)).contains(".buffer"));
    }

    #[test]
    fn a_bad_sslmode_is_one_clear_sentence() {
        let e = config_error(PgListenerBuilder::from_url(
            "postgres://u@h/db?sslmode=bogus".into(),
        ));
        assert_eq!(
            e,
            "the database URL given to PgListenerSource::builder has an invalid sslmode \
             \"bogus\": use one of disable, allow, prefer, require, verify-ca, verify-full"
        );
        let e = config_error(PgListenerBuilder::from_url(
            "postgres://u@h/db?statement-cache-capacity=x".into(),
        ));
        assert!(!e.contains("error with configuration"), "{e}");
        assert!(builder().validate().is_ok());
        assert!(
            PgListenerBuilder::from_url("postgres://u@h/db?sslmode=Verify-CA".into())
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn good_settings_dedup_channels_and_pick_a_private_heartbeat_channel() {
        let s = builder().channels(["b", "a", "b"]).validate().unwrap();
        assert_eq!(s.channels, ["a", "b"]);
        assert!(s.heartbeat_channel.starts_with("pgcachewatch_hb_"));
        assert!(s.heartbeat_channel.len() <= MAX_CHANNEL_LEN);
        assert_ne!(
            s.heartbeat_channel,
            builder().validate().unwrap().heartbeat_channel
        );
        assert_eq!(s.describe_target(), "u@localhost:5432/db");
        assert_eq!(
            s.options.get_application_name(),
            Some("pgcachewatch-listener")
        );
    }

    #[test]
    fn debug_never_prints_the_url() {
        let b = PgListenerBuilder::from_url("postgres://u:secret@h/db".into());
        assert!(!format!("{b:?}").contains("secret"));
    }
}
