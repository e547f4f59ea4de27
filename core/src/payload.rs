//! Parsing NOTIFY payloads into [`Event`]s.
//!
//! Two payload shapes are accepted unchanged:
//!
//! * pgcachewatch's: `{"operation","schema","table","sent_at","txid","keys"?}`;
//! * PGCacheWatch's (the Python library): `{"operation","table","sent_at"}`,
//!   so triggers it installed keep working.
//!
//! `operation` and `table` are required; anything else missing them is a
//! [`PayloadError`], which sources count and log, never panic on. The optional
//! fields degrade instead of failing: an unreadable `sent_at`, `txid` or `keys` is
//! dropped with a warning, so the event still invalidates (at table level when the
//! keys are unreadable) rather than being lost.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;

use crate::event::{Event, Operation, RowKey};

/// Why a payload could not be turned into an [`Event`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The payload is not a JSON object of the expected shape.
    #[error("payload is not a pgcachewatch or PGCacheWatch event: {0}")]
    Malformed(String),
    /// The `operation` field names no known operation.
    #[error("unknown operation {0:?}")]
    UnknownOperation(String),
}

#[derive(Deserialize)]
struct Wire {
    operation: String,
    #[serde(default)]
    schema: Option<String>,
    table: String,
    #[serde(default)]
    sent_at: Option<serde_json::Value>,
    #[serde(default)]
    keys: Option<serde_json::Value>,
    #[serde(default)]
    txid: Option<serde_json::Value>,
}

/// Parses one NOTIFY payload received on `channel` at `received_at`.
///
/// ```
/// use pgcachewatch::{parse_payload, Operation};
/// let now = chrono::Utc::now();
/// // PGCacheWatch's payload, unchanged:
/// let e = parse_payload("ch", r#"{"operation":"update","table":"users","sent_at":"2024-05-01T10:00:00.5+00:00"}"#, now).unwrap();
/// assert_eq!((e.operation, e.table.as_str(), e.schema), (Operation::Update, "users", None));
/// // pgcachewatch's own, with row keys:
/// let e = parse_payload("ch", r#"{"operation":"delete","schema":"app","table":"t","sent_at":"2024-05-01 10:00:00.123456+00","txid":7,"keys":[{"id":1}]}"#, now).unwrap();
/// assert_eq!(e.keys.unwrap().len(), 1);
/// // Garbage is an error, not a panic:
/// assert!(parse_payload("ch", "not json", now).is_err());
/// ```
pub fn parse_payload(
    channel: &str,
    payload: &str,
    received_at: DateTime<Utc>,
) -> Result<Event, PayloadError> {
    let wire: Wire = serde_json::from_str(payload).map_err(|e| {
        let mut shown: String = payload.chars().take(80).collect();
        if shown.len() < payload.len() {
            shown.push('…');
        }
        PayloadError::Malformed(format!("{e} in {shown:?}"))
    })?;
    let operation: Operation = wire
        .operation
        .parse()
        .map_err(|_| PayloadError::UnknownOperation(wire.operation.clone()))?;
    if wire.table.is_empty() {
        return Err(PayloadError::Malformed("empty table name".into()));
    }
    let sent_at = wire.sent_at.and_then(|v| {
        let parsed = v.as_str().and_then(parse_timestamp);
        if parsed.is_none() {
            static LIMIT: crate::rate_limit::RateLimit = crate::rate_limit::RateLimit::new();
            if let Some(suppressed) = LIMIT.check() {
                tracing::warn!(table = %wire.table, sent_at = %v, suppressed,
                    "ignoring unreadable sent_at (at most one such warning a second; `suppressed` were not logged)");
            }
        }
        parsed
    });
    let keys = wire.keys.filter(|v| !v.is_null()).and_then(|v| {
        let keys = serde_json::from_value::<Vec<RowKey>>(v).ok();
        if keys.is_none() {
            static LIMIT: crate::rate_limit::RateLimit = crate::rate_limit::RateLimit::new();
            if let Some(suppressed) = LIMIT.check() {
                tracing::warn!(table = %wire.table, suppressed,
                    "ignoring unreadable row keys; invalidating the whole table (at most one such warning a second)");
            }
        }
        keys
    });
    let txid = wire.txid.and_then(|v| match &v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    });
    Ok(Event {
        channel: channel.to_owned(),
        operation,
        schema: wire.schema.filter(|s| !s.is_empty()),
        table: wire.table,
        sent_at,
        received_at,
        keys,
        txid,
        lsn: None,
    })
}

/// Parses the timestamp shapes PostgreSQL produces: RFC 3339 from
/// `json_build_object`, and the text form `2024-05-01 10:00:00.123+00`.
fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    let mut normal = s.trim().replacen(' ', "T", 1);
    // "+00" / "-05" → "+00:00" / "-05:00"
    if let Some(pos) = normal.rfind(['+', '-']).filter(|&p| p > 10) {
        if normal.len() - pos == 3 {
            normal.push_str(":00");
        }
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(&normal) {
        return Some(t.with_timezone(&Utc));
    }
    // No offset at all: PostgreSQL `timestamp` (without time zone); read as UTC.
    NaiveDateTime::parse_from_str(&normal, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_every_postgres_shape() {
        for s in [
            "2024-05-01T10:00:00+00:00",
            "2024-05-01T10:00:00.123456+00:00",
            "2024-05-01 10:00:00.123456+00",
            "2024-05-01 12:00:00.123456+02",
            "2024-05-01 10:00:00.123456",
            "2024-05-01T10:00:00Z",
        ] {
            let t = parse_timestamp(s).unwrap_or_else(|| panic!("{s} did not parse"));
            assert_eq!(t.format("%Y-%m-%d %H").to_string(), "2024-05-01 10", "{s}");
        }
        assert!(parse_timestamp("yesterday").is_none());
        assert!(parse_timestamp("").is_none());
    }

    #[test]
    fn rejects_foreign_payloads_without_panicking() {
        let now = Utc::now();
        for p in [
            "",
            "null",
            "[]",
            "{}",
            r#"{"operation":"upsert","table":"t"}"#,
            r#"{"operation":"insert","table":""}"#,
            r#"{"operation":"insert"}"#,
            "\u{0}\u{ffff}",
        ] {
            assert!(parse_payload("c", p, now).is_err(), "{p:?} accepted");
        }
    }

    #[test]
    fn unreadable_optional_fields_degrade_instead_of_losing_the_event() {
        let p = r#"{"operation":"insert","table":"t","sent_at":"soon","keys":"x","txid":[1]}"#;
        let e = parse_payload("c", p, Utc::now()).unwrap();
        assert_eq!(
            (e.table.as_str(), e.sent_at, e.keys, e.txid),
            ("t", None, None, None)
        );
        let e = parse_payload(
            "c",
            r#"{"operation":"insert","table":"t","txid":"42"}"#,
            Utc::now(),
        )
        .unwrap();
        assert_eq!(e.txid, Some(42));
    }

    #[test]
    fn long_garbage_is_truncated_in_the_error() {
        let p = "x".repeat(10_000);
        let err = parse_payload("c", &p, Utc::now()).unwrap_err().to_string();
        assert!(err.len() < 300, "{err}");
    }
}
