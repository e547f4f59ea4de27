//! The timestamp shapes PostgreSQL writes into a payload's `sent_at`, read by
//! hand: a trigger sends one per event. Also the times in events' JSON
//! (`received_at`, `sent_at` in relay messages and event logs), where
//! chrono's general parser was a seventh of the cost of a whole message.

use std::fmt;

use chrono::{DateTime, NaiveDateTime, Timelike, Utc};
use serde::de::{self, Deserializer, Visitor};

/// Parses the timestamp shapes PostgreSQL produces: RFC 3339 from
/// `json_build_object`, and the text form `2024-05-01 10:00:00.123+00`.
#[cfg(test)]
pub(super) fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    parse_timestamp_remembering(s, &mut LastSecond::default())
}

/// The last timestamp's whole second and offset, as text and as an instant: a
/// burst's timestamps mostly differ only in their fraction, and the next one of
/// the same second and offset is then that instant plus its fraction (no date
/// arithmetic).
#[derive(Debug, Default)]
pub(super) struct LastSecond {
    /// `YYYY-MM-DD?HH:MM:SS` followed by the offset's text (at most nine bytes).
    text: [u8; 28],
    len: usize,
    /// The instant of `text` (no fraction), in UTC; `None` until one is
    /// remembered. Kept naive: setting its fraction is then a field update.
    at: Option<NaiveDateTime>,
}

/// Parses the timestamp shapes PostgreSQL produces (RFC 3339 from
/// `json_build_object`, and the text form `2024-05-01 10:00:00.123+00`). A
/// timestamp of the same second and offset as the one remembered in `last` is
/// read from it; the one read is remembered.
pub(super) fn parse_timestamp_remembering(s: &str, last: &mut LastSecond) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    if let Some(t) = last.same_second(b) {
        return Some(t);
    }
    // `trim` removes nothing when the text starts with a digit and ends with
    // an ASCII letter or digit (no whitespace, ASCII or not, ends that way).
    let untrimmed = b.first().is_some_and(u8::is_ascii_digit)
        && b.last().is_some_and(u8::is_ascii_alphanumeric);
    let trimmed = if untrimmed { s } else { s.trim() };
    // The shapes PostgreSQL writes, read by hand: a trigger sends one per event.
    if let Some(t) = parse_postgres_timestamp(trimmed) {
        if untrimmed {
            last.remember(b, t);
        }
        return Some(t);
    }
    // Anything else RFC 3339 allows.
    DateTime::parse_from_rfc3339(trimmed)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

impl LastSecond {
    /// `b`'s instant if it is the remembered second and offset with a fraction
    /// of one to nine digits (or none); `None` for anything else.
    ///
    /// Such a text is valid exactly when the remembered one was (its date, time
    /// and offset are the same bytes, and `parse_postgres_timestamp` reads the
    /// offset from where the fraction ends), needs no trimming (same first and
    /// last byte), and means the remembered instant plus its fraction.
    fn same_second(&self, b: &[u8]) -> Option<DateTime<Utc>> {
        let at = self.at?;
        let (second, offset) = self.text[..self.len].split_at(19);
        if b.get(..19)? != second {
            return None;
        }
        let mut end = 19;
        let mut nanos = 0u32;
        if b.get(19) == Some(&b'.') {
            end = 20;
            while let Some(d) = b.get(end).map(|c| c.wrapping_sub(b'0')).filter(|d| *d < 10) {
                nanos = nanos.wrapping_mul(10).wrapping_add(u32::from(d));
                end += 1;
            }
            let digits = end - 20;
            if digits == 0 || digits > 9 {
                return None;
            }
            nanos *= 10u32.pow(u32::try_from(9 - digits).ok()?);
        }
        if &b[end..] != offset {
            return None;
        }
        Some(at.with_nanosecond(nanos)?.and_utc())
    }

    /// Remembers `b`, just read as `t` by `parse_postgres_timestamp` without
    /// trimming, if its offset fits.
    fn remember(&mut self, b: &[u8], t: DateTime<Utc>) {
        let mut end = 19;
        if b.get(19) == Some(&b'.') {
            end = 20 + b[20..].iter().take_while(|c| c.is_ascii_digit()).count();
        }
        let offset = &b[end..];
        let (Some(at), true) = (t.naive_utc().with_nanosecond(0), offset.len() <= 9) else {
            self.at = None;
            return;
        };
        self.text[..19].copy_from_slice(&b[..19]);
        self.text[19..19 + offset.len()].copy_from_slice(offset);
        self.len = 19 + offset.len();
        self.at = Some(at);
    }
}

/// `YYYY-MM-DD[T ]HH:MM:SS[.f{1,9}][Z | ±HH[:MM[:SS]] | ±HHMM]`; no offset
/// (a `timestamp` without time zone) is read as UTC.
///
/// Computed directly from the digits (days from the civil date, then seconds),
/// with chrono's own validity rules: a burst parses one per event, and going
/// through `NaiveDate`/`NaiveTime` cost more than the rest of the payload.
fn parse_postgres_timestamp(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    // The fixed fields, at fixed places (the length is checked above).
    let two = |i: usize| two_digits(b, i);
    let (year, month, day) = (two(0)? * 100 + two(2)?, two(5)?, two(8)?);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let (hour, minute, second) = (two(11)?, two(14)?, two(17)?);
    if hour >= 24 || minute >= 60 || second >= 60 {
        return None;
    }
    let mut at = 19;
    let mut nanos = 0u32;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while let Some(d) = b.get(at).map(|c| c.wrapping_sub(b'0')).filter(|d| *d < 10) {
            // Ten digits or more fail below; their value does not matter.
            nanos = nanos.wrapping_mul(10).wrapping_add(u32::from(d));
            at += 1;
        }
        let n = at - start;
        if n == 0 || n > 9 {
            return None;
        }
        nanos *= 10u32.pow(u32::try_from(9 - n).ok()?);
    }
    let offset_seconds: i64 = match b.get(at) {
        None => 0,
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let (h, m, sec) = match b.len() - (at + 1) {
                2 => (two(at + 1)?, 0, 0),
                4 => (two(at + 1)?, two(at + 3)?, 0),
                5 if b[at + 3] == b':' => (two(at + 1)?, two(at + 4)?, 0),
                8 if b[at + 3] == b':' && b[at + 6] == b':' => {
                    (two(at + 1)?, two(at + 4)?, two(at + 7)?)
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
    let days = days_from_civil(i64::from(year), month, day);
    let local = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    DateTime::from_timestamp(local - offset_seconds, nanos)
}

/// The two ASCII digits at `at` as a number.
#[inline(always)]
fn two_digits(b: &[u8], at: usize) -> Option<u32> {
    let &[tens, ones] = b.get(at..at + 2)? else {
        return None;
    };
    let (tens, ones) = (tens.wrapping_sub(b'0'), ones.wrapping_sub(b'0'));
    (tens < 10 && ones < 10).then(|| u32::from(tens) * 10 + u32::from(ones))
}

fn is_leap(year: u32) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`); `month` is 1 to 12.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let m = i64::from(month);
    let day_of_year = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Parses `text` as `DateTime<Utc>`'s own `FromStr` (and so its
/// `Deserialize`) does, with what the relay and the event log write
/// (`2025-01-01T12:00:00.001520Z`: a `T`, up to nine fractional digits, `Z`)
/// read by hand. Anything else, a leap second among it, goes to chrono: what
/// is accepted, and what it means, is chrono's.
pub(crate) fn parse_rfc3339_utc(text: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    let b = text.as_bytes();
    if b.len() >= 20 && b[10] == b'T' && b[b.len() - 1] == b'Z' {
        if let Some(t) = parse_postgres_timestamp(text) {
            return Ok(t);
        }
    }
    text.parse()
}

struct TimeVisitor;

impl Visitor<'_> for TimeVisitor {
    type Value = DateTime<Utc>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an RFC 3339 date and time")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<DateTime<Utc>, E> {
        parse_rfc3339_utc(v).map_err(E::custom)
    }
}

/// For `#[serde(deserialize_with)]` on a `DateTime<Utc>` field: what chrono's
/// `Deserialize` accepts, faster ([`parse_rfc3339_utc`]).
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    d.deserialize_str(TimeVisitor)
}

/// [`deserialize`] for an `Option<DateTime<Utc>>` field (`null`: `None`).
pub(crate) fn deserialize_option<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    struct OptionVisitor;
    impl<'de> Visitor<'de> for OptionVisitor {
        type Value = Option<DateTime<Utc>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an RFC 3339 date and time, or null")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            deserialize(d).map(Some)
        }
    }
    d.deserialize_option(OptionVisitor)
}

#[cfg(test)]
mod rfc3339_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_written_form_is_read_by_hand_and_the_rest_as_chrono_reads_it() {
        for text in [
            "2025-01-01T12:00:00Z",
            "2025-01-01T12:00:00.001520Z",
            "2025-01-01T12:00:00.1Z",
            "2025-01-01T12:00:00.123456789Z",
            // Not read by hand: chrono decides.
            "2025-01-01T12:00:00+02:00",
            "2025-01-01 12:00:00Z",
            "2025-01-01t12:00:00z",
            "2025-01-01T12:00:00z",
            "2025-01-01T12:00:00",
            "2016-12-31T23:59:60Z",
            "2025-02-30T12:00:00Z",
            "2024-02-29T12:00:00Z",
            "2025-01-01T12:00:00.Z",
            "2025-01-01T12:00:00.1234567890Z",
            "2025-01-01T24:00:00Z",
            "garbage",
            "",
        ] {
            assert_eq!(
                parse_rfc3339_utc(text).ok(),
                text.parse::<DateTime<Utc>>().ok(),
                "{text}"
            );
        }
    }

    proptest! {
        /// Every time as chrono writes it reads back the same.
        #[test]
        fn written_times_read_back(secs in -62_000_000_000_i64..250_000_000_000, nanos in 0_u32..1_000_000_000) {
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            let json = serde_json::to_string(&t).unwrap();
            let text = json.trim_matches('"');
            prop_assert_eq!(parse_rfc3339_utc(text).ok(), Some(t));
        }

        /// On any text of the right shape, the result is chrono's.
        #[test]
        fn the_result_is_chronos(
            date in "[0-9]{4}-[0-9]{2}-[0-9]{2}",
            time in "[0-9]{2}:[0-9]{2}:[0-9]{2}",
            fraction in "(\\.[0-9]{0,10})?",
            end in "(Z|z|\\+01:00|)",
        ) {
            let text = format!("{date}T{time}{fraction}{end}");
            prop_assert_eq!(parse_rfc3339_utc(&text).ok(), text.parse::<DateTime<Utc>>().ok(), "{}", text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, NaiveDateTime, NaiveTime};

    /// The former parser, through chrono's types: what the direct one must equal.
    /// `YYYY-MM-DD[T ]HH:MM:SS[.f{1,9}][Z | ±HH[:MM[:SS]] | ±HHMM]`; no offset
    /// (a `timestamp` without time zone) is read as UTC.
    fn reference_postgres_timestamp(s: &str) -> Option<DateTime<Utc>> {
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

        /// The direct parser equals the former one through chrono's types on
        /// anything shaped like a timestamp: valid, out of range (month 13,
        /// February 30th, hour 24), odd fractions and offsets.
        #[test]
        fn the_direct_parser_equals_chronos(
            year in 0u32..10_000,
            month in 0u32..14,
            day in 0u32..33,
            hour in 0u32..26,
            minute in 0u32..62,
            second in 0u32..62,
            fraction in proptest::option::of("[0-9]{0,10}"),
            offset in proptest::sample::select(vec![
                "", "Z", "z", "+00", "-05", "+0530", "+05:30", "-00:00:00", "+14:59:59",
                "+99", "+0", "+5:30", "Zx", " ", "+00:00:0",
            ]),
            separator in proptest::sample::select(vec!["T", "t", " ", "_"]),
        ) {
            let fraction = fraction.map_or(String::new(), |f| format!(".{f}"));
            let text = format!(
                "{year:04}-{month:02}-{day:02}{separator}{hour:02}:{minute:02}:{second:02}{fraction}{offset}"
            );
            proptest::prop_assert_eq!(
                parse_postgres_timestamp(&text),
                reference_postgres_timestamp(&text),
                "{}", text
            );
        }

        /// Reading a stream of timestamps (most of them in the same second, as
        /// a burst's are) with a remembered second gives what reading each
        /// alone gives: odd fractions, offsets, whitespace and other shapes
        /// included.
        #[test]
        fn remembering_the_last_second_changes_nothing(
            stream in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "2024-05-01 10:00:00", "2024-05-01T10:00:00", "2024-05-01 10:00:01",
                        "2024-02-30 10:00:00", "2024-05-01 10:00:61", " 2024-05-01 10:00:00",
                        "2024-05-01X10:00:00",
                    ]),
                    proptest::option::of("[0-9]{0,11}"),
                    proptest::sample::select(vec![
                        "", "+00", "+00:00", "-05:30", "Z", "z", "+99", "+0", " ", "+00:00 ",
                        "+00:00:00", "+14:59:59x",
                    ]),
                ),
                1..12,
            ),
        ) {
            let mut last = LastSecond::default();
            for (second, fraction, offset) in stream {
                let fraction = fraction.map_or(String::new(), |f| format!(".{f}"));
                let text = format!("{second}{fraction}{offset}");
                proptest::prop_assert_eq!(
                    parse_timestamp_remembering(&text, &mut last),
                    parse_timestamp(&text),
                    "{}", text
                );
            }
        }
    }
}
