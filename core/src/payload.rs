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

use std::borrow::Cow;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

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

/// The payload as read: text fields borrowed from it where no escape forces a
/// copy, optional fields kept raw so that an unreadable one degrades alone (and
/// costs no `serde_json::Value` tree when it is fine).
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    operation: Cow<'a, str>,
    #[serde(default, borrow)]
    schema: Option<Cow<'a, str>>,
    #[serde(borrow)]
    table: Cow<'a, str>,
    #[serde(default, borrow)]
    sent_at: Option<&'a RawValue>,
    #[serde(default, borrow)]
    keys: Option<&'a RawValue>,
    #[serde(default, borrow)]
    txid: Option<&'a RawValue>,
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
        .map_err(|_| PayloadError::UnknownOperation(wire.operation.clone().into_owned()))?;
    if wire.table.is_empty() {
        return Err(PayloadError::Malformed("empty table name".into()));
    }
    let sent_at = wire.sent_at.and_then(|raw| {
        let parsed = raw_str(raw).and_then(|s| parse_timestamp(&s));
        if parsed.is_none() {
            static LIMIT: crate::rate_limit::RateLimit = crate::rate_limit::RateLimit::new();
            if let Some(suppressed) = LIMIT.check() {
                tracing::warn!(table = %wire.table, sent_at = %raw.get(), suppressed,
                    "ignoring unreadable sent_at (at most one such warning a second; `suppressed` were not logged)");
            }
        }
        parsed
    });
    let keys = wire.keys.filter(|raw| raw.get() != "null").and_then(|raw| {
        let keys = serde_json::from_str::<Vec<RowKey>>(raw.get()).ok();
        if keys.is_none() {
            static LIMIT: crate::rate_limit::RateLimit = crate::rate_limit::RateLimit::new();
            if let Some(suppressed) = LIMIT.check() {
                tracing::warn!(table = %wire.table, suppressed,
                    "ignoring unreadable row keys; invalidating the whole table (at most one such warning a second)");
            }
        }
        keys
    });
    let txid = wire.txid.and_then(|raw| match raw_str(raw) {
        Some(s) => s.parse().ok(),
        None => raw.get().parse().ok(),
    });
    Ok(Event {
        channel: channel.to_owned(),
        operation,
        schema: wire.schema.filter(|s| !s.is_empty()).map(Cow::into_owned),
        table: wire.table.into_owned(),
        sent_at,
        received_at,
        keys,
        txid,
        lsn: None,
    })
}

/// The text of a raw JSON string (`None` for any other JSON value).
fn raw_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(text).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

/// Parses the timestamp shapes PostgreSQL produces: RFC 3339 from
/// `json_build_object`, and the text form `2024-05-01 10:00:00.123+00`.
fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    // The shapes PostgreSQL writes, read by hand: a trigger sends one per event.
    if let Some(t) = parse_postgres_timestamp(s.trim()) {
        return Some(t);
    }
    // Anything else RFC 3339 allows.
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// `YYYY-MM-DD[T ]HH:MM:SS[.f{1,9}][Z | ±HH[:MM[:SS]] | ±HHMM]`; no offset
/// (a `timestamp` without time zone) is read as UTC.
fn parse_postgres_timestamp(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    let digits = |from: usize, len: usize| -> Option<u32> {
        let part = b.get(from..from + len)?;
        part.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(
        i32::try_from(digits(0, 4)?).ok()?,
        digits(5, 2)?,
        digits(8, 2)?,
    )?;
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    let mut at = 19;
    let mut nanos = 0u32;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while at < b.len() && b[at].is_ascii_digit() {
            at += 1;
        }
        let n = at - start;
        if n == 0 || n > 9 {
            return None;
        }
        nanos = digits(start, n)? * 10u32.pow(u32::try_from(9 - n).ok()?);
    }
    let offset_seconds: i64 = match b.get(at) {
        None => 0,
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let rest = &s[at + 1..];
            let (h, m, sec) = match rest.len() {
                2 => (digits(at + 1, 2)?, 0, 0),
                4 => (digits(at + 1, 2)?, digits(at + 3, 2)?, 0),
                5 if b[at + 3] == b':' => (digits(at + 1, 2)?, digits(at + 4, 2)?, 0),
                8 if b[at + 3] == b':' && b[at + 6] == b':' => {
                    (digits(at + 1, 2)?, digits(at + 4, 2)?, digits(at + 7, 2)?)
                }
                _ => return None,
            };
            let magnitude = i64::from(h * 3600 + m * 60 + sec);
            if sign == b'-' {
                -magnitude
            } else {
                magnitude
            }
        }
        Some(_) => return None,
    };
    let time = NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)?;
    let local = NaiveDateTime::new(date, time).and_utc();
    local.checked_sub_signed(chrono::TimeDelta::try_seconds(offset_seconds)?)
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
    fn timestamps_read_to_the_nanosecond_and_offset() {
        let cases = [
            (
                "2024-05-01 10:00:00.123456+00",
                "2024-05-01T10:00:00.123456Z",
            ),
            ("2024-05-01 12:30:00.5+02:30", "2024-05-01T10:00:00.5Z"),
            ("2024-05-01 05:00:00-05", "2024-05-01T10:00:00Z"),
            (
                "2024-05-01T10:00:00.000000001Z",
                "2024-05-01T10:00:00.000000001Z",
            ),
            ("2024-05-01 10:00:00", "2024-05-01T10:00:00Z"),
            ("2024-05-01 10:00:00+0100", "2024-05-01T09:00:00Z"),
            (
                "1999-12-31 23:59:59.999+00:00:00",
                "1999-12-31T23:59:59.999Z",
            ),
        ];
        for (text, utc) in cases {
            let want = DateTime::parse_from_rfc3339(utc)
                .unwrap()
                .with_timezone(&Utc);
            assert_eq!(parse_timestamp(text), Some(want), "{text}");
        }
        for bad in [
            "2024-13-01 10:00:00+00",
            "2024-05-01 25:00:00+00",
            "2024-05-01 10:00:00.+00",
            "2024-05-01 10:00:00.1234567890+00",
            "2024-05-01 10:00:00+0",
            "2024-05-01 10:00:00 +00",
            "2024-05-01 10:00",
            "２０２４-05-01 10:00:00",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        /// Any instant, written as PostgreSQL writes `timestamptz` (text form
        /// at any whole-minute offset) and as RFC 3339, reads back exactly.
        #[test]
        fn any_timestamp_reads_back(
            secs in 0i64..4_102_444_800,
            nanos in 0u32..1_000_000_000,
            offset_minutes in -(14 * 60)..=(14 * 60),
        ) {
            let at = DateTime::from_timestamp(secs, nanos).unwrap();
            let offset = chrono::FixedOffset::east_opt(offset_minutes * 60).unwrap();
            let local = at.with_timezone(&offset);
            let text = local.format("%Y-%m-%d %H:%M:%S%.f%:z").to_string();
            proptest::prop_assert_eq!(parse_timestamp(&text), Some(at), "{}", text);
            let rfc = local.to_rfc3339();
            proptest::prop_assert_eq!(parse_timestamp(&rfc), Some(at), "{}", rfc);
        }
    }

    #[test]
    fn escaped_and_unusual_fields_still_parse() {
        let p = r#"{"operation":"insert","schema":"a\"b","table":"t\u00e9","sent_at":"2024-05-01 10:00:00+00","txid":"9","keys":null}"#;
        let e = parse_payload("c", p, Utc::now()).unwrap();
        assert_eq!(
            (e.schema.as_deref(), e.table.as_str()),
            (Some("a\"b"), "té")
        );
        assert_eq!((e.txid, e.keys), (Some(9), None));
        assert!(e.sent_at.is_some());
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
