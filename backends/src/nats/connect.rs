//! [`NatsConnect`]: where and how to connect to NATS (credentials, TLS).

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectOptions};

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
    name: Option<String>,
}

/// The default time to wait for the first connection.
pub const DEFAULT_NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl NatsConnect {
    /// Connects to `url` (`nats://host:4222`, `tls://…`; several comma-separated).
    pub fn new(url: impl Into<String>) -> Self {
        NatsConnect {
            url: url.into(),
            auth: NatsAuth::None,
            require_tls: false,
            root_certificates: Vec::new(),
            client_certificate: None,
            connect_timeout: DEFAULT_NATS_CONNECT_TIMEOUT,
            name: None,
        }
    }

    /// The server URL(s).
    pub fn url(&self) -> &str {
        &self.url
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
            .connection_timeout(self.connect_timeout)
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
    pub(crate) async fn connect_with(
        &self,
        extra: impl FnOnce(ConnectOptions) -> ConnectOptions,
    ) -> Result<Client, NatsError> {
        let options = extra(self.options().await?);
        let err = |detail: String| NatsError::Connect {
            url: self.url.clone(),
            detail,
        };
        // async-nats bounds each attempt by the connection timeout; the outer
        // timeout also covers the handshake (a refused credential answers fast).
        match tokio::time::timeout(
            self.connect_timeout + Duration::from_secs(1),
            options.connect(self.url.as_str()),
        )
        .await
        {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(err(e.to_string())),
            Err(_) => Err(err(format!("no answer within {:?}", self.connect_timeout))),
        }
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
