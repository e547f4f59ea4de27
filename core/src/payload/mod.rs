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
use std::sync::Arc;

mod scan;
pub(crate) mod timestamp;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::{Event, Operation, RowKey};
use crate::name::{Name, Names};
use timestamp::{parse_timestamp_remembering, LastSecond};

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

/// The payload as serde_json reads it: text fields borrowed from it where no
/// escape forces a copy, optional fields kept raw so that an unreadable one
/// degrades alone (and costs no `serde_json::Value` tree when it is fine).
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

/// A payload's fields, read by either path: the [`scan`] fast path or serde_json.
/// The optional ones are raw JSON text (`None` when absent or `null`).
#[derive(Debug)]
struct Fields<'a> {
    operation: Cow<'a, str>,
    schema: Option<Cow<'a, str>>,
    table: Cow<'a, str>,
    sent_at: Option<&'a str>,
    keys: Keys<'a>,
    txid: Option<&'a str>,
    /// Whether no string in the payload has an escape (the fast path's
    /// payloads): a raw string field is then its text between the quotes.
    plain: bool,
}

/// The `keys` field: absent (or `null`), raw JSON still to read, or already read
/// (the fast path reads them to know the payload is valid JSON).
#[derive(Debug)]
enum Keys<'a> {
    Absent,
    Raw(&'a str),
    Read(Vec<RowKey>),
}

impl<'a> From<Wire<'a>> for Fields<'a> {
    fn from(w: Wire<'a>) -> Self {
        Fields {
            operation: w.operation,
            schema: w.schema,
            table: w.table,
            sent_at: w.sent_at.map(RawValue::get).filter(|t| *t != "null"),
            keys: match w.keys.map(RawValue::get) {
                Some(t) if t != "null" => Keys::Raw(t),
                _ => Keys::Absent,
            },
            txid: w.txid.map(RawValue::get).filter(|t| *t != "null"),
            plain: false,
        }
    }
}

/// Parses one NOTIFY payload received on `channel` at `received_at`.
///
/// ```
/// use pgcachewatch_core::{parse_payload, Operation};
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
    event_alone(read(payload, &mut None)?, channel, received_at)
}

/// The event of `fields`, made without a parser's memory (new names, no
/// remembered second).
fn event_alone(
    fields: Fields<'_>,
    channel: &str,
    received_at: DateTime<Utc>,
) -> Result<Event, PayloadError> {
    event_of(
        fields,
        received_at,
        Name::new(channel),
        |_, text| Name::new(text),
        &mut LastSecond::default(),
        |event| event,
    )
}

/// Parses payloads as [`parse_payload`] does, giving the events it makes
/// interned [`Name`]s (the events of one table share one copy of each name
/// instead of allocating their own), and reading a payload that starts like the
/// last one on from where their leading fields end. Keep one per stream of
/// payloads (a source keeps one per connection); it remembers a few dozen
/// names at most.
///
/// ```
/// use pgcachewatch_core::PayloadParser;
/// let mut parser = PayloadParser::new();
/// let now = chrono::Utc::now();
/// let payload = r#"{"operation":"update","schema":"public","table":"users"}"#;
/// let (a, b) = (parser.parse("ch", payload, now)?, parser.parse("ch", payload, now)?);
/// assert_eq!((a.table.as_str(), a.schema.as_deref()), ("users", Some("public")));
/// assert_eq!(a, b);
/// # Ok::<(), pgcachewatch_core::PayloadError>(())
/// ```
#[derive(Debug, Default)]
pub struct PayloadParser {
    names: Names,
    /// The last channel, schema and table names given out: a burst repeats them.
    last: [Option<Name>; 3],
    /// The last `sent_at`'s second: a burst's differ in their fraction.
    second: LastSecond,
    /// The last payload's leading fields, read on from when the next one
    /// starts the same way (see [`scan::Prefix`]).
    prefix: Option<scan::Prefix>,
    /// Events given back by [`recycle`](PayloadParser::recycle), nobody else
    /// holding them: [`parse_shared`](PayloadParser::parse_shared) writes into
    /// them instead of allocating.
    spares: Spares,
}

/// A parser's spare events (shown by their count).
#[derive(Default)]
struct Spares(Vec<Arc<Event>>);

impl std::fmt::Debug for Spares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} spare events", self.0.len())
    }
}

/// The most events a parser keeps for reuse: more than a listener's batch.
const MAX_SPARES: usize = 1024;

impl PayloadParser {
    /// A parser that remembers no names yet.
    pub fn new() -> Self {
        PayloadParser::default()
    }

    /// Parses one NOTIFY payload received on `channel` at `received_at`, as
    /// [`parse_payload`] does.
    ///
    /// # Errors
    ///
    /// [`PayloadError`] when the payload is not an event (see [`parse_payload`]).
    pub fn parse(
        &mut self,
        channel: &str,
        payload: &str,
        received_at: DateTime<Utc>,
    ) -> Result<Event, PayloadError> {
        self.parse_into(channel, payload, received_at, |event| event)
    }

    /// [`parse`](Self::parse), the event in the `Arc` a
    /// [`Signal::Event`](crate::Signal::Event) holds: for sources, which
    /// publish every event they parse. It is written into a spare event given
    /// back by [`recycle`](Self::recycle) when there is one, else allocated.
    ///
    /// # Errors
    ///
    /// [`PayloadError`] when the payload is not an event (see [`parse_payload`]).
    pub fn parse_shared(
        &mut self,
        channel: &str,
        payload: &str,
        received_at: DateTime<Utc>,
    ) -> Result<Arc<Event>, PayloadError> {
        let mut spare = self.spares.0.pop();
        let parsed = self.parse_into(channel, payload, received_at, |event| match spare.take() {
            // A spare is nobody else's (`recycle` keeps only those).
            Some(mut spare) => match Arc::get_mut(&mut spare) {
                Some(slot) => {
                    *slot = event;
                    spare
                }
                None => Arc::new(event),
            },
            None => Arc::new(event),
        });
        // Not taken (the payload was not an event): still a spare.
        self.spares.0.extend(spare);
        parsed
    }

    /// Gives back an event [`parse_shared`](Self::parse_shared) made, once it
    /// was published: if nobody else holds it any more, the next event is
    /// written into it instead of into a new allocation (a source publishing
    /// with [`SignalHub::send_batch`](crate::SignalHub::send_batch) keeps its
    /// events, so a burst allocates none). One still shared elsewhere is simply
    /// dropped; the parser keeps at most a thousand or so.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use pgcachewatch_core::PayloadParser;
    /// let mut parser = PayloadParser::new();
    /// let now = chrono::Utc::now();
    /// let first = parser.parse_shared("ch", r#"{"operation":"insert","table":"a"}"#, now)?;
    /// let at = Arc::as_ptr(&first);
    /// parser.recycle(first);
    /// let second = parser.parse_shared("ch", r#"{"operation":"delete","table":"b"}"#, now)?;
    /// assert_eq!(Arc::as_ptr(&second), at, "written into the first one's allocation");
    /// assert_eq!(second.table, "b");
    /// # Ok::<(), pgcachewatch_core::PayloadError>(())
    /// ```
    pub fn recycle(&mut self, mut event: Arc<Event>) {
        if self.spares.0.len() < MAX_SPARES && Arc::get_mut(&mut event).is_some() {
            self.spares.0.push(event);
        }
    }

    #[inline]
    fn parse_into<T>(
        &mut self,
        channel: &str,
        payload: &str,
        received_at: DateTime<Utc>,
        make: impl FnOnce(Event) -> T,
    ) -> Result<T, PayloadError> {
        let fields = read(payload, &mut self.prefix)?;
        let PayloadParser {
            names,
            last,
            second,
            ..
        } = self;
        let [last_channel, last_schema, last_table] = last;
        let channel = shared(names, last_channel, channel);
        event_of(
            fields,
            received_at,
            channel,
            |role, text| {
                let slot = match role {
                    Role::Schema => &mut *last_schema,
                    Role::Table => &mut *last_table,
                };
                shared(names, slot, text)
            },
            second,
            make,
        )
    }
}

/// Which name of an event [`event_of`] asks for.
#[derive(Debug, Clone, Copy)]
enum Role {
    Schema,
    Table,
}

/// The name `text`: the one in `slot` if it has that text, else a shared one
/// from `names` (then kept in `slot`).
fn shared(names: &mut Names, slot: &mut Option<Name>, text: &str) -> Name {
    match slot {
        Some(name) if same_bytes(name.as_bytes(), text.as_bytes()) => name.clone(),
        _ => {
            let name = names.get(text);
            *slot = Some(name.clone());
            name
        }
    }
}

/// `a == b`, for the short names a burst repeats: compared a word at a time in
/// line, where `==` calls the C library's `memcmp` (three calls per event were a
/// burst's largest cost after parsing itself).
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = scan::word_at;
    let half = |s: &[u8], at: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&s[at..at + 4]);
        u32::from_le_bytes(w)
    };
    match n {
        0..=3 => a.iter().zip(b).all(|(x, y)| x == y),
        // Two overlapping halves cover four to eight bytes.
        4..=8 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        _ => {
            let mut at = 0;
            while at + 8 < n {
                if word(a, at) != word(b, at) {
                    return false;
                }
                at += 8;
            }
            // The last eight bytes, overlapping those already compared.
            word(a, n - 8) == word(b, n - 8)
        }
    }
}

/// A payload's fields: by the fast path when it can (resuming after `prefix`,
/// see [`scan::scan`]), else by serde_json.
fn read<'a>(
    payload: &'a str,
    prefix: &mut Option<scan::Prefix>,
) -> Result<Fields<'a>, PayloadError> {
    match scan::scan(payload, prefix) {
        Some(fields) => Ok(fields),
        None => read_with_serde(payload),
    }
}

/// The slow path alone: every payload through serde_json (what the fast path
/// must agree with).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn parse_payload_with_serde(
    channel: &str,
    payload: &str,
    received_at: DateTime<Utc>,
) -> Result<Event, PayloadError> {
    event_alone(read_with_serde(payload)?, channel, received_at)
}

fn read_with_serde(payload: &str) -> Result<Fields<'_>, PayloadError> {
    let wire: Wire = serde_json::from_str(payload).map_err(|e| {
        let mut shown: String = payload.chars().take(80).collect();
        if shown.len() < payload.len() {
            shown.push('…');
        }
        PayloadError::Malformed(format!("{e} in {shown:?}"))
    })?;
    Ok(wire.into())
}

/// The event a payload's fields describe, its names made by `name`; the
/// optional fields degrade alone.
#[inline]
fn event_of<T>(
    wire: Fields<'_>,
    received_at: DateTime<Utc>,
    channel: Name,
    mut name: impl FnMut(Role, &str) -> Name,
    second: &mut LastSecond,
    make: impl FnOnce(Event) -> T,
) -> Result<T, PayloadError> {
    let operation: Operation = wire
        .operation
        .parse()
        .map_err(|_| PayloadError::UnknownOperation(wire.operation.clone().into_owned()))?;
    if wire.table.is_empty() {
        return Err(PayloadError::Malformed("empty table name".into()));
    }
    let sent_at = wire.sent_at.and_then(|raw| {
        let parsed =
            raw_str(raw, wire.plain).and_then(|s| parse_timestamp_remembering(&s, second));
        if parsed.is_none() {
            static LIMIT: crate::rate_limit::RateLimit = crate::rate_limit::RateLimit::new();
            if let Some(suppressed) = LIMIT.check() {
                tracing::warn!(table = %wire.table, sent_at = %raw, suppressed,
                    "ignoring unreadable sent_at (at most one such warning a second; `suppressed` were not logged)");
            }
        }
        parsed
    });
    let keys = match wire.keys {
        Keys::Absent => None,
        Keys::Read(keys) => Some(keys),
        Keys::Raw(raw) => read_keys(raw, &wire.table),
    };
    let txid = wire.txid.and_then(|raw| match raw_str(raw, wire.plain) {
        Some(s) => s.parse().ok(),
        None => raw.parse().ok(),
    });
    let schema = wire
        .schema
        .filter(|s| !s.is_empty())
        .map(|s| name(Role::Schema, &s));
    let table = name(Role::Table, &wire.table);
    Ok(make(Event {
        channel,
        operation,
        schema,
        table,
        sent_at,
        received_at,
        keys,
        txid,
        lsn: None,
    }))
}

/// Row keys from their raw JSON; `None` (and a rate-limited warning) when they
/// are not a list of objects: the event then invalidates the whole table.
fn read_keys(raw: &str, table: &str) -> Option<Vec<RowKey>> {
    let keys = serde_json::from_str::<Vec<RowKey>>(raw).ok();
    if keys.is_none() {
        static LIMIT: crate::rate_limit::RateLimit = crate::rate_limit::RateLimit::new();
        if let Some(suppressed) = LIMIT.check() {
            tracing::warn!(table = %table, suppressed,
                "ignoring unreadable row keys; invalidating the whole table (at most one such warning a second)");
        }
    }
    keys
}

/// The text of a raw JSON string (`None` for any other JSON value).
fn raw_str(text: &str, plain: bool) -> Option<Cow<'_, str>> {
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if !plain && inner.contains('\\') {
        serde_json::from_str::<String>(text).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The payloads triggers send take the fast path (else it buys nothing).
    #[test]
    fn the_common_shapes_take_the_fast_path() {
        for p in [
            r#"{"operation":"update","table":"users","sent_at":"2024-05-01T10:00:00.5+00:00"}"#,
            r#"{"operation" : "INSERT", "schema" : "public", "table" : "t", "sent_at" : "2024-05-01 10:00:00.123456+00", "txid" : 123}"#,
            r#"{"operation":"delete","schema":"app","table":"t","sent_at":"2024-05-01 10:00:00+00","txid":7,"keys":[{"id":1},{"id":"x","n":2.5}]}"#,
            r#"{"operation":"insert","table":"t","schema":null,"keys":null,"txid":null,"sent_at":null}"#,
        ] {
            assert!(scan::scan(p, &mut None).is_some(), "{p}");
            let now = Utc::now();
            assert_eq!(
                parse_payload("c", p, now),
                parse_payload_with_serde("c", p, now)
            );
        }
    }

    /// One token of a generated payload: what the fast path reads, and
    /// everything it must hand to serde_json instead.
    fn token() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just(r#""operation""#.to_owned()),
            Just(r#""schema""#.to_owned()),
            Just(r#""table""#.to_owned()),
            Just(r#""sent_at""#.to_owned()),
            Just(r#""keys""#.to_owned()),
            Just(r#""txid""#.to_owned()),
            Just(r#""t\u0061ble""#.to_owned()),
            Just(r#""other""#.to_owned()),
            Just(r#""update""#.to_owned()),
            Just(r#""DELETE""#.to_owned()),
            Just(r#""users""#.to_owned()),
            Just(r#""a\"b""#.to_owned()),
            Just("\"tab\there\"".to_owned()),
            Just(r#""2024-05-01 10:00:00.5+02""#.to_owned()),
            Just(r#""2024-05-01T10:00:00Z""#.to_owned()),
            Just(r#""""#.to_owned()),
            Just(r#""é✓""#.to_owned()),
            // Longer than a word of the fast path's string search, with what
            // ends or spoils a plain string past its first eight bytes.
            Just(r#""a_rather_long_name\"quoted""#.to_owned()),
            Just("\"a_rather_long_name\twith_tab\"".to_owned()),
            Just("\"a_rather_long_name_\u{7f}_é✓_done\"".to_owned()),
            Just(r#""2024-05-01 10:00:00.123456+00\u0041""#.to_owned()),
            "-?(0|[1-9][0-9]{0,22})(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,3})?",
            "-?0[0-9]|1\\.|1e|-|\\.5|\\+1",
            Just("null".to_owned()),
            Just("nul".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            Just(r#"[{"id":1}]"#.to_owned()),
            Just(r#"[{"id":"]}"},{"k":[1,{"x":null}]}]"#.to_owned()),
            Just(r#"[{"id":1},]"#.to_owned()),
            Just("[1,2]".to_owned()),
            Just("[]".to_owned()),
            Just(r#"{"id":1}"#.to_owned()),
            Just("[}".to_owned()),
            Just(r#"[{"a":"\"]"}]"#.to_owned()),
            Just("{".to_owned()),
            Just("}".to_owned()),
            Just(":".to_owned()),
            Just(",".to_owned()),
            Just(" ".to_owned()),
            Just("\n\t\r".to_owned()),
            Just("\u{a0}".to_owned()),
            Just("x".to_owned()),
        ]
    }

    /// A field of an object: a known name (mostly) and any token as its value,
    /// with any whitespace around them.
    fn field() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let ws = proptest::sample::select(vec!["", "", " ", "\n", "\t ", "\r\n"]);
        let name = prop_oneof![
            4 => proptest::sample::select(vec![
                "operation", "schema", "table", "sent_at", "keys", "txid"
            ])
            .prop_map(|n| format!("\"{n}\"")),
            1 => token(),
        ];
        (ws.clone(), name, ws.clone(), token(), ws)
            .prop_map(|(a, k, b, v, c)| format!("{a}{k}{b}:{c}{v}"))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// The fast path reads every payload exactly as serde_json does, or
        /// leaves it to serde_json: a valid payload with generated fields mixed
        /// in (valid, escaped, duplicated, unknown, nested, broken), and any
        /// token soup.
        #[test]
        fn the_fast_path_agrees_with_serde_json(
            extra in proptest::collection::vec(field(), 0..4),
            at in 0..3usize,
            soup in proptest::collection::vec(token(), 0..6),
            shape in 0..4u8,
        ) {
            let mut fields = vec![
                r#""operation":"update""#.to_owned(),
                r#""table":"users""#.to_owned(),
            ];
            for f in extra {
                fields.insert(at.min(fields.len()), f);
            }
            let payload = match shape {
                0 => format!("{{{}}}", fields.join(",")),
                1 => format!(" {{{}}} \n", fields.join(",")),
                2 => format!("{{{}}}{}", fields.join(","), soup.concat()),
                _ => soup.concat(),
            };
            let now = Utc::now();
            proptest::prop_assert_eq!(
                parse_payload("c", &payload, now),
                parse_payload_with_serde("c", &payload, now),
                "{}", payload
            );
        }

        /// Valid payloads with the required fields and any of the optional ones
        /// in any order: the fast path takes them (unless a string needs
        /// serde_json's unescaping) and agrees.
        #[test]
        fn valid_payloads_agree(
            order in proptest::sample::subsequence(vec![0usize, 1, 2, 3, 4, 5], 0..=6),
            op in proptest::sample::select(vec!["insert", "UPDATE", "delete", "truncate", "upsert"]),
            table in "[a-z_\\\\\"é]{0,6}",
            txid in proptest::option::of(0u64..u64::MAX),
            spaced in proptest::bool::ANY,
        ) {
            let mut parts = vec![
                format!(r#""operation":"{op}""#),
                format!(r#""table":{}"#, serde_json::Value::from(table.clone())),
            ];
            let optional = [
                r#""schema":"public""#.to_owned(),
                r#""sent_at":"2024-05-01 10:00:00.123+00""#.to_owned(),
                txid.map_or(r#""txid":null"#.to_owned(), |t| format!(r#""txid":{t}"#)),
                r#""keys":[{"id":1,"name":"a"}]"#.to_owned(),
                r#""keys":null"#.to_owned(),
                r#""schema":"""#.to_owned(),
            ];
            let (mut keys, mut schema) = (false, false);
            for i in order {
                let repeated = match i {
                    3 | 4 => std::mem::replace(&mut keys, true),
                    0 | 5 => std::mem::replace(&mut schema, true),
                    _ => false,
                };
                if !repeated {
                    parts.push(optional[i].clone());
                }
            }
            let payload = format!("{{{}}}", parts.join(if spaced { ", " } else { "," }));
            let now = Utc::now();
            let fast = parse_payload("c", &payload, now);
            proptest::prop_assert_eq!(&fast, &parse_payload_with_serde("c", &payload, now), "{}", payload);
            if !table.contains(['\\', '"']) {
                proptest::prop_assert!(scan::scan(&payload, &mut None).is_some(), "{}", payload);
            }
        }

        /// `same_bytes` is `==`, whatever the lengths and wherever two strings
        /// first differ.
        #[test]
        fn same_bytes_is_equality(
            a in proptest::collection::vec(proptest::sample::select(vec![b'a', b'b', 0, 0xff]), 0..40),
            flip in proptest::option::of(0usize..40),
            extra in proptest::option::of(proptest::sample::select(vec![b'a', b'b'])),
        ) {
            let mut b = a.clone();
            if let Some(i) = flip.filter(|&i| i < b.len()) {
                b[i] = if b[i] == b'a' { b'b' } else { b'a' };
            }
            b.extend(extra);
            proptest::prop_assert_eq!(same_bytes(&a, &b), a == b, "{:?} vs {:?}", a, b);
            proptest::prop_assert!(same_bytes(&a, &a));
        }

        /// A parser reading a stream of payloads (which share their leading
        /// fields, as a trigger's do, or differ anywhere) reads each exactly as
        /// `parse_payload` does: resuming after a remembered prefix never
        /// changes what a payload means.
        #[test]
        fn a_parser_reads_a_stream_as_parse_payload_does(
            stream in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        r#"{"operation":"update","table":"users""#,
                        r#"{"operation":"update","table":"users2""#,
                        r#"{"operation" : "update", "schema" : "public", "table" : "burst""#,
                        r#"{"operation" : "update", "schema" : null, "table" : "burst""#,
                        r#" {"table":"t","operation":"INSERT""#,
                        r#"{"operation":"delete""#,
                        r#"{"operation":"upsert","table":"t""#,
                        r#"{"schema":"s""#,
                        r#"{"operation":"update","table":"users"x"#,
                    ]),
                    proptest::sample::select(vec![
                        "}",
                        " } ",
                        r#", "sent_at" : "2024-05-01 10:00:00.5+02", "txid" : 7}"#,
                        r#", "sent_at" : "2024-05-01 10:00:00.123456+02", "txid" : 8}"#,
                        r#", "sent_at" : "2024-05-01 10:00:00.1234567891+02"}"#,
                        r#", "sent_at" : "2024-05-01 10:00:00+02"}"#,
                        r#", "sent_at" : "2024-05-01 10:00:01.5+02"}"#,
                        r#", "sent_at" : "2024-05-01 10:00:00.5"}"#,
                        r#","txid":1}"#,
                        r#","table":"again"}"#,
                        r#","operation":"insert"}"#,
                        r#","schema":"again"}"#,
                        r#","keys":[{"id":1}]}"#,
                        r#","table":"x","sent_at":null}"#,
                        "}x",
                        ",}",
                        "\"",
                        "",
                    ]),
                    proptest::option::of(token()),
                    // How the event is made and given back: 0 `parse`; 1
                    // `parse_shared`, then recycled; 2 `parse_shared`, kept
                    // (and recycled while kept: it must not be written over).
                    0..3u8,
                ),
                1..10,
            ),
        ) {
            let mut parser = PayloadParser::new();
            let now = Utc::now();
            let mut kept = Vec::new();
            for (head, tail, soup, how) in stream {
                let payload = format!("{head}{tail}{}", soup.unwrap_or_default());
                let expected = parse_payload("c", &payload, now);
                if how == 0 {
                    proptest::prop_assert_eq!(parser.parse("c", &payload, now), expected, "{}", payload);
                    continue;
                }
                let shared = parser.parse_shared("c", &payload, now);
                proptest::prop_assert_eq!(
                    shared.as_ref().map(|e| Event::clone(e)).map_err(Clone::clone),
                    expected.clone(),
                    "{}", payload
                );
                if let (Ok(event), Ok(expected)) = (shared, expected) {
                    if how == 2 {
                        kept.push((event.clone(), expected));
                    }
                    parser.recycle(event);
                }
            }
            for (event, expected) in kept {
                proptest::prop_assert_eq!(&*event, &expected, "a kept event was written over");
            }
        }
    }
}
