//! [`NatsConnect`]: where and how to connect to NATS (credentials, TLS).

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, ServerAddr};
use tokio::sync::mpsc;

use super::error::NatsError;

/// How to authenticate to NATS.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// User and password.
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// A token.
    Token(String),
    /// A `.creds` file (JWT and nkey seed, as `nsc` writes it).
    CredentialsFile(PathBuf),
    /// An nkey seed (`SU…`).
    NKey(String),
}

impl std::fmt::Debug for NatsAuth {
    /// Never prints secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
            NatsAuth::CredentialsFile(p) => write!(f, "CredentialsFile({})", p.display()),
            NatsAuth::NKey(_) => f.write_str("NKey(***)"),
        }
    }
}

/// Where a relay or a [`NatsSource`](super::NatsSource) connects, with which
/// credentials and TLS settings, through async-nats's `ConnectOptions`.
///
/// ```no_run
/// use pgcachewatch::nats::{NatsAuth, NatsConnect};
/// # async fn run() -> Result<(), pgcachewatch::nats::NatsError> {
/// let client = NatsConnect::new("tls://nats.example.com:4222")
///     .auth(NatsAuth::CredentialsFile("/etc/app/app.creds".into()))
///     .root_certificate("/etc/app/ca.pem")
///     .connect()
///     .await?;
/// # drop(client); Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct NatsConnect {
    url: String,
    auth: NatsAuth,
    require_tls: bool,
    root_certificates: Vec<PathBuf>,
    client_certificate: Option<(PathBuf, PathBuf)>,
    connect_timeout: Duration,
    ping_interval: Duration,
    name: Option<String>,
}

/// The default time to wait for the first connection.
pub const DEFAULT_NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The default interval between the client's pings (async-nats' own default
/// is 60 s): a connection silently cut is given up after about three.
pub const DEFAULT_NATS_PING_INTERVAL: Duration = Duration::from_secs(5);

impl NatsConnect {
    /// Connects to `url` (`nats://host:4222`, `tls://…`), or to any of
    /// several comma-separated servers of one cluster
    /// (`nats://a:4222,nats://b:4222`): async-nats tries them in turn and
    /// reconnects to another when one goes away.
    pub fn new(url: impl Into<String>) -> Self {
        NatsConnect {
            url: url.into(),
            auth: NatsAuth::None,
            require_tls: false,
            root_certificates: Vec::new(),
            client_certificate: None,
            connect_timeout: DEFAULT_NATS_CONNECT_TIMEOUT,
            ping_interval: DEFAULT_NATS_PING_INTERVAL,
            name: None,
        }
    }

    /// The server URL(s), as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The servers in [`url`](Self::url): each comma-separated entry,
    /// whitespace around it ignored.
    ///
    /// # Errors
    ///
    /// [`NatsError::Config`] naming an entry that is not a NATS URL, or when
    /// there is none.
    ///
    /// ```
    /// use pgcachewatch_backends::nats::NatsConnect;
    /// let servers = NatsConnect::new("nats://a:4222, nats://b:4222").servers().unwrap();
    /// assert_eq!(servers.len(), 2);
    /// assert!(NatsConnect::new("nats://a:4222,,").servers().is_ok());
    /// assert!(NatsConnect::new(" , ").servers().is_err());
    /// ```
    pub fn servers(&self) -> Result<Vec<ServerAddr>, NatsError> {
        let servers = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<ServerAddr>()
                    .map_err(|e| NatsError::Config(format!("NATS server URL {s:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(NatsError::Config(format!(
                "no NATS server URL in {:?} (give nats://host:port, several comma-separated)",
                self.url
            )));
        }
        Ok(servers)
    }

    /// Sets the credentials.
    pub fn auth(mut self, auth: NatsAuth) -> Self {
        self.auth = auth;
        self
    }

    /// Requires TLS even if the URL does not say `tls://`.
    pub fn require_tls(mut self, yes: bool) -> Self {
        self.require_tls = yes;
        self
    }

    /// Trusts the CA certificate(s) in this PEM file.
    pub fn root_certificate(mut self, pem: impl Into<PathBuf>) -> Self {
        self.root_certificates.push(pem.into());
        self
    }

    /// Presents this client certificate and key (mutual TLS).
    pub fn client_certificate(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_certificate = Some((cert.into(), key.into()));
        self
    }

    /// How long to wait for the first connection (default 5 s): a wrong
    /// credential or an unreachable server is then an error, never a hang.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How often the client pings the server (default
    /// [`DEFAULT_NATS_PING_INTERVAL`], 5 s). A connection that stops
    /// answering without being closed (a silent partition) is given up, and
    /// reconnected, after about three unanswered pings. The relay and
    /// [`NatsSource`](super::NatsSource) also probe their connection as soon
    /// as an acknowledgement or the consumer's heartbeat is missing, which
    /// is usually sooner.
    pub fn ping_interval(mut self, every: Duration) -> Self {
        self.ping_interval = every;
        self
    }

    /// The connection name the server shows.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The async-nats options these settings make.
    ///
    /// # Errors
    ///
    /// [`NatsError::Credentials`] if a credentials file cannot be read.
    pub async fn options(&self) -> Result<ConnectOptions, NatsError> {
        let mut o = match &self.auth {
            NatsAuth::None => ConnectOptions::new(),
            NatsAuth::UserPassword { user, password } => {
                ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            NatsAuth::Token(t) => ConnectOptions::with_token(t.clone()),
            NatsAuth::NKey(seed) => ConnectOptions::with_nkey(seed.clone()),
            NatsAuth::CredentialsFile(path) => ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| NatsError::Credentials {
                    path: path.display().to_string(),
                    source,
                })?,
        };
        o = o
            .require_tls(self.require_tls)
            .connection_timeout(self.connect_timeout.min(ATTEMPT_TIMEOUT))
            .ping_interval(self.ping_interval.max(Duration::from_millis(100)))
            .reconnect_delay_callback(reconnect_delay)
            .name(self.name.as_deref().unwrap_or("pgcachewatch"));
        for ca in &self.root_certificates {
            o = o.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.client_certificate {
            o = o.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(o)
    }

    /// Connects, with `extra` applied to the options last (event callbacks).
    ///
    /// Each TCP connection attempt lasts at most [`ATTEMPT_TIMEOUT`]; attempts
    /// that time out are made again until the connect timeout has passed.
    pub(crate) async fn connect_with(
        &self,
        extra: impl Fn(ConnectOptions) -> ConnectOptions,
    ) -> Result<Client, NatsError> {
        let servers = self.servers()?;
        let err = |detail: String| NatsError::Connect {
            url: self.url.clone(),
            detail,
        };
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        loop {
            let options = extra(self.options().await?);
            // The outer bound also covers the handshake after the TCP
            // connection (a refused credential answers fast).
            let attempt = tokio::time::timeout_at(
                deadline + Duration::from_secs(1),
                options.connect(servers.clone()),
            );
            match attempt.await {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e))
                    if e.kind() == async_nats::ConnectErrorKind::TimedOut
                        && tokio::time::Instant::now() < deadline => {}
                Ok(Err(e)) => return Err(err(e.to_string())),
                Err(_) => return Err(err(format!("no answer within {:?}", self.connect_timeout))),
            }
        }
    }

    /// Connects, and passes on the client's events (disconnected, connected
    /// again, …) as they happen: the relay and the source act on a reconnect
    /// at once rather than when a timeout runs out.
    pub(crate) async fn connect_with_events(
        &self,
    ) -> Result<(Client, mpsc::UnboundedReceiver<async_nats::Event>), NatsError> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let client = self
            .connect_with(|o| {
                let events_tx = events_tx.clone();
                o.event_callback(move |event| {
                    let tx = events_tx.clone();
                    async move {
                        let _ = tx.send(event);
                    }
                })
            })
            .await?;
        Ok((client, events_rx))
    }

    /// Connects.
    ///
    /// # Errors
    ///
    /// [`NatsError::Connect`] (unreachable, TLS, authorization violation),
    /// within the connect timeout.
    pub async fn connect(&self) -> Result<Client, NatsError> {
        self.connect_with(|o| o).await
    }
}

/// The longest one TCP connection attempt lasts. An attempt made while the
/// network is cut waits on the kernel's retransmissions of its first packet
/// (1 s, 3 s and 7 s after it began): after the network heals, a long attempt
/// would keep the client away for seconds. A new attempt every second sends a
/// new one, so a client is back within about a second of healing. (A TCP
/// handshake is one round trip: a second covers links far slower than any
/// between a service and its NATS.)
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// The wait before reconnect attempt `attempts`: at once, then doubling from
/// 2 ms up to 250 ms (async-nats' own default goes up to 4 s, which after a
/// partition of a few seconds kept the relay away for seconds after healing).
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempts - 1).unwrap_or(u32::MAX).min(16);
    Duration::from_millis(2_u64.saturating_pow(exp)).min(Duration::from_millis(250))
}

/// How long a connection may take to answer a probe before it is taken for
/// silently cut.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the server answers on `client`'s connection within `within`: a
/// request to a subject nobody serves is answered ("no responders") by the
/// server itself, so any answer is a round trip.
pub(crate) async fn answers(client: &Client, within: Duration) -> bool {
    let subject = format!("_INBOX.pgcw_probe.{:016x}", rand::random::<u64>());
    tokio::time::timeout(within, client.request(subject, bytes::Bytes::new()))
        .await
        .is_ok()
}

/// Forces `client` to reconnect if its connection claims to be up but does
/// not answer within [`PROBE_TIMEOUT`] (a silent partition: no reset, no
/// close, nothing until the client's own pings run out, which takes minutes
/// at async-nats' defaults). True if it was told to reconnect.
pub(crate) async fn reconnect_if_silent(client: &Client) -> bool {
    if client.connection_state() != async_nats::connection::State::Connected
        || answers(client, PROBE_TIMEOUT).await
    {
        return false;
    }
    tracing::warn!("the NATS connection does not answer (a silent partition?): reconnecting now");
    if let Err(e) = client.force_reconnect().await {
        tracing::warn!(error = %e, "could not force a NATS reconnect");
    }
    true
}
