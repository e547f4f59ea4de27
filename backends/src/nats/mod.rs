//! NATS JetStream: the [`Relay`] that publishes any [`EventSource`](pgcachewatch_core::EventSource)'s
//! signals to a stream, and the [`NatsSource`] that services read them from.
//!
//! One relay listens to PostgreSQL; any number of services subscribe through
//! NATS, each with a [`NatsSource`] filtered to the tables it caches. PostgreSQL
//! then serves one listening connection instead of one per service, and a
//! service that was away resumes from its stream sequence instead of flushing.
//!
//! * [`subject`]: `<prefix>.<schema>.<table>`, with a reversible escape.
//! * [`wire`]: the payload, the event log's JSON form plus the relay's epoch.
//! * [`NatsConnect`]: URL, credentials (user/password, token, `.creds`, nkey), TLS.
//! * [`StreamSettings`]: the stream's name, prefix and limits.
//! * [`Relay`]: publish, deduplicate, confirm, beat.
//! * [`NatsSource`]: consume, resume, detect loss.
//! * [`report`]: a relay's health and lag, read from its stream (`pgcachewatch relay status`).

mod connect;
mod error;
pub mod relay;
pub mod report;
pub mod source;
mod stream;
pub mod subject;
pub mod wire;

pub use self::connect::{
    NatsAuth, NatsConnect, DEFAULT_NATS_CONNECT_TIMEOUT, DEFAULT_NATS_PING_INTERVAL,
};
pub use self::error::NatsError;
pub use self::relay::{
    Confirm, Relay, RelayBuilder, RelayHandle, RelayStatus, DEFAULT_ACK_TIMEOUT,
};
pub use self::source::{NatsSource, NatsSourceBuilder, NatsSourceStats};
pub use self::stream::{
    StreamSettings, DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES, DEFAULT_PREFIX, DEFAULT_REPLICAS,
    DEFAULT_STREAM, MAX_REPLICAS,
};
