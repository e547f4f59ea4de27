//! The one public error type.

use std::sync::Arc;

use crate::payload::PayloadError;

/// A boxed error as a loader or a driver returns it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything pgcachewatch can fail with.
///
/// [`is_temporary`](Error::is_temporary) says whether retrying may help; the
/// PostgreSQL source's reconnect loop branches on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The loader passed to [`Cache::get_or_load`](crate::Cache::get_or_load) failed.
    /// Every caller waiting on the same load gets the same error; it is never cached.
    #[error("loader failed: {source}")]
    Load {
        /// The loader's own error; `downcast_ref` it to the type it returned.
        source: Arc<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// A NOTIFY payload could not be parsed.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// Connecting to, or talking to, the database failed.
    #[error("database connection failed: {source}")]
    Connection {
        /// The driver's error.
        source: BoxError,
        /// Whether retrying may succeed (network trouble) or not (bad credentials).
        temporary: bool,
    },
    /// A setting is missing or invalid; the message says which and what to do.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The event source has shut down.
    #[error("the event source has shut down")]
    Closed,
}

impl Error {
    /// Whether retrying the operation may succeed.
    pub fn is_temporary(&self) -> bool {
        match self {
            Error::Connection { temporary, .. } => *temporary,
            Error::Load { .. } => true,
            Error::Payload(_) | Error::Config(_) | Error::Closed => false,
        }
    }

    /// The loader's error, for [`Error::Load`].
    pub fn load_error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            Error::Load { source } => Some(&**source),
            _ => None,
        }
    }
}
