//! [`RelayReport`]: a relay's health and lag, read from its stream.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;

use super::connect::NatsConnect;
use super::error::NatsError;
use super::stream::StreamSettings;
use super::subject;
use super::wire::{WireKind, WireMessage};

/// What a relay's stream says about it: its last heartbeat and the stream's state.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayReport {
    /// The stream name.
    pub stream: String,
    /// Messages in the stream.
    pub messages: u64,
    /// Bytes in the stream.
    pub bytes: u64,
    /// The first sequence the stream still holds.
    pub first_seq: u64,
    /// The last sequence.
    pub last_seq: u64,
    /// Consumers reading it (each `NatsSource` has one).
    pub consumers: usize,
    /// The last heartbeat, if any: its message.
    pub heartbeat: Option<WireMessage>,
    /// How long ago the last heartbeat was stored (a relay that is down stops beating).
    pub heartbeat_age: Option<Duration>,
}

impl RelayReport {
    /// Whether the relay beat within `timeout` and said its source is healthy.
    pub fn is_healthy(&self, timeout: Duration) -> bool {
        let beating = self.heartbeat_age.is_some_and(|a| a < timeout);
        let healthy = matches!(
            self.heartbeat.as_ref().map(|h| &h.kind),
            Some(WireKind::Health(health)) if health.is_healthy()
        );
        beating && healthy
    }

    /// Reads the report of the relay publishing into `stream`.
    ///
    /// ```no_run
    /// use pgcachewatch::nats::{NatsConnect, StreamSettings};
    /// use pgcachewatch::nats::report::RelayReport;
    /// # async fn run() -> Result<(), pgcachewatch::nats::NatsError> {
    /// let report = RelayReport::read(&NatsConnect::new("nats://127.0.0.1:4222"), &StreamSettings::new()).await?;
    /// println!("healthy: {}", report.is_healthy(std::time::Duration::from_secs(5)));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`NatsError`] if NATS cannot be reached or the stream does not exist.
    pub async fn read(connect: &NatsConnect, stream: &StreamSettings) -> Result<Self, NatsError> {
        let client = connect.connect().await?;
        let js = jetstream::new(client);
        let s = stream.open(&js).await?;
        let info = s
            .get_info()
            .await
            .map_err(|e| NatsError::js("stream info", e))?;
        let last = s
            .get_last_raw_message_by_subject(&subject::control_subject(
                stream.prefix(),
                "heartbeat",
            ))
            .await
            .ok();
        let (heartbeat, heartbeat_age) = match last {
            Some(m) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as i128);
                let age = u64::try_from(now - m.time.unix_timestamp_nanos()).unwrap_or(0);
                (
                    WireMessage::from_json(&m.payload).ok(),
                    Some(Duration::from_nanos(age)),
                )
            }
            None => (None, None),
        };
        Ok(RelayReport {
            stream: stream.name().to_owned(),
            messages: info.state.messages,
            bytes: info.state.bytes,
            first_seq: info.state.first_sequence,
            last_seq: info.state.last_sequence,
            consumers: info.state.consumer_count,
            heartbeat,
            heartbeat_age,
        })
    }
}
