//! [`NatsError`]: what can go wrong talking to NATS.

/// An error of the NATS relay or source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// A setting is invalid (the message says which and why).
    #[error("invalid NATS setting: {0}")]
    Config(String),
    /// Connecting failed: unreachable server, TLS failure, or refused credentials.
    #[error("could not connect to NATS at {url}: {detail}")]
    Connect {
        /// Where.
        url: String,
        /// What async-nats said (an authorization failure says so).
        detail: String,
    },
    /// Reading a credentials file failed.
    #[error("could not read NATS credentials {path}: {source}")]
    Credentials {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JetStream request (stream or consumer management, publish) failed.
    #[error("JetStream {what} failed: {detail}")]
    JetStream {
        /// What was being done.
        what: &'static str,
        /// The server's or client's answer.
        detail: String,
    },
    /// The stream does not exist (a relay creates it when it starts).
    #[error(
        "stream {stream} does not exist on this NATS server: a relay creates it when it starts \
         (is one running with this stream name and NATS account?)"
    )]
    StreamNotFound {
        /// The stream name.
        stream: String,
    },
    /// The stream exists with settings that do not fit the relay.
    #[error("stream {stream}: {detail}")]
    StreamMismatch {
        /// The stream name.
        stream: String,
        /// What does not fit.
        detail: String,
    },
}

impl NatsError {
    pub(crate) fn js(what: &'static str, e: impl std::fmt::Display) -> Self {
        NatsError::JetStream {
            what,
            detail: e.to_string(),
        }
    }
}
