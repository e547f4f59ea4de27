//! [`WsError`]: what can go wrong starting the WebSocket server.

use std::net::SocketAddr;

/// An error starting the WebSocket server ([`WsServerBuilder::start`](super::WsServerBuilder::start)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WsError {
    /// A setting is invalid (the message says which and why).
    #[error("invalid WebSocket server setting: {0}")]
    Config(String),
    /// The server would listen on a non-loopback address without a bearer token.
    #[error(
        "refusing to serve {addr} without a bearer token: a non-loopback address needs one (set a token, or bind 127.0.0.1)"
    )]
    TokenRequired {
        /// The address it was asked to listen on.
        addr: SocketAddr,
    },
    /// Binding the listening socket failed.
    #[error("could not listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}
