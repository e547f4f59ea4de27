//! The timestamp shapes PostgreSQL writes into a payload's `sent_at`, read by
//! hand: a trigger sends one per event.

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};

/// Parses the timestamp shapes PostgreSQL produces: RFC 3339 from
/// `json_build_object`, and the text form `2024-05-01 10:00:00.123+00`.
pub(super) fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
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
}
