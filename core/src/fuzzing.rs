//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, not a
//! stable API).

use chrono::{DateTime, Utc};

use crate::{Event, PayloadError};

/// [`parse_payload`](crate::parse_payload) without its fast path: every payload
/// through serde_json. The fuzz target checks that both agree on every input.
pub fn parse_payload_with_serde(
    channel: &str,
    payload: &str,
    received_at: DateTime<Utc>,
) -> Result<Event, PayloadError> {
    crate::payload::parse_payload_with_serde(channel, payload, received_at)
}
