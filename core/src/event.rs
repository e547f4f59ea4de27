//! The event model: what a watched table tells the application.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::name::Name;
use crate::position::Lsn;

/// The kind of write that produced an [`Event`].
///
/// Serialized in lower case (`"insert"`, `"update"`, …), which is what both
/// pgcachewatch's triggers and PGCacheWatch's (`lower(TG_OP)`) send.
///
/// ```
/// use pgcachewatch::Operation;
/// assert_eq!("UPDATE".parse::<Operation>().unwrap(), Operation::Update);
/// assert_eq!(Operation::Delete.as_str(), "delete");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Rows were inserted.
    Insert,
    /// Rows were updated.
    Update,
    /// Rows were deleted.
    Delete,
    /// The table was truncated.
    Truncate,
}

impl Operation {
    /// Every operation, in declaration order.
    pub const ALL: [Operation; 4] = [
        Operation::Insert,
        Operation::Update,
        Operation::Delete,
        Operation::Truncate,
    ];

    /// The lower-case name used in payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Truncate => "truncate",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Returned when a string names no [`Operation`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown operation {0:?}: expected insert, update, delete or truncate")]
pub struct UnknownOperation(pub String);

impl FromStr for Operation {
    type Err = UnknownOperation;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // What triggers send (`lower(TG_OP)`), compared whole first.
        match s {
            "update" => return Ok(Operation::Update),
            "insert" => return Ok(Operation::Insert),
            "delete" => return Ok(Operation::Delete),
            "truncate" => return Ok(Operation::Truncate),
            _ => {}
        }
        Operation::ALL
            .into_iter()
            .find(|op| op.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownOperation(s.to_owned()))
    }
}

/// The primary-key values of one affected row, column name → JSON value.
///
/// Row-level triggers send one `RowKey` per affected row (see ARCHITECTURE.md,
/// "Payload format"). Keyed strategies map them to cache keys.
///
/// ```
/// use pgcachewatch::RowKey;
/// let key: RowKey = serde_json::from_str(r#"{"id": 42}"#).unwrap();
/// assert_eq!(key.get("id").and_then(|v| v.as_i64()), Some(42));
/// assert_eq!(RowKey::single("id", 42), key);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RowKey(pub serde_json::Map<String, serde_json::Value>);

impl RowKey {
    /// A key of one column.
    pub fn single(column: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        let mut map = serde_json::Map::new();
        map.insert(column.into(), value.into());
        RowKey(map)
    }

    /// The value of `column`, if the key has it.
    pub fn get(&self, column: &str) -> Option<&serde_json::Value> {
        self.0.get(column)
    }
}

/// A notification that a watched table changed.
///
/// `schema` is `None` when the payload did not say (PGCacheWatch's payload
/// has no schema); table filters then match on the table name alone.
/// `keys` is `Some` only for row-level triggers that fitted the keys into the
/// payload; `None` means "some rows of the table", never "no rows".
///
/// ```
/// use pgcachewatch::{Event, Operation};
/// let e = Event::new("pgcachewatch", Operation::Update, "public", "users");
/// assert_eq!(e.table, "users");
/// assert!(e.keys.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The NOTIFY channel the event arrived on.
    pub channel: Name,
    /// What kind of write happened.
    pub operation: Operation,
    /// Schema of the table, when the payload carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Name>,
    /// Name of the table.
    pub table: Name,
    /// When the trigger ran (`clock_timestamp()` in pgcachewatch's trigger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime<Utc>>,
    /// When the source received the notification.
    pub received_at: DateTime<Utc>,
    /// Primary keys of the affected rows, for row-level triggers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<RowKey>>,
    /// The writing transaction's id (`txid_current()`), when sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txid: Option<i64>,
    /// The commit's position in the write-ahead log, from a lossless source (the
    /// logical-replication source, or a relay of it); `None` from `LISTEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<Lsn>,
}

impl Event {
    /// A table-level event received now, with no `sent_at`, keys or txid.
    pub fn new(
        channel: impl Into<Name>,
        operation: Operation,
        schema: impl Into<Name>,
        table: impl Into<Name>,
    ) -> Self {
        Event {
            channel: channel.into(),
            operation,
            schema: Some(schema.into()),
            table: table.into(),
            sent_at: None,
            received_at: Utc::now(),
            keys: None,
            txid: None,
            lsn: None,
        }
    }

    /// Sets the row keys (builder style).
    pub fn with_keys(mut self, keys: Vec<RowKey>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// Sets `sent_at` (builder style).
    pub fn with_sent_at(mut self, sent_at: DateTime<Utc>) -> Self {
        self.sent_at = Some(sent_at);
        self
    }

    /// Sets the transaction id (builder style).
    pub fn with_txid(mut self, txid: i64) -> Self {
        self.txid = Some(txid);
        self
    }

    /// Sets the commit position (builder style).
    pub fn with_lsn(mut self, lsn: Lsn) -> Self {
        self.lsn = Some(lsn);
        self
    }

    /// The table this event is about.
    pub fn table_ref(&self) -> TableRef {
        TableRef {
            schema: self.schema.clone(),
            table: self.table.clone(),
        }
    }

    /// Whether this event concerns `table` in `schema` (`schema: None` matches any schema;
    /// an event without a schema matches any `schema`).
    pub fn is_about(&self, schema: Option<&str>, table: &str) -> bool {
        self.table == table
            && match (schema, self.schema.as_deref()) {
                (Some(want), Some(got)) => want == got,
                _ => true,
            }
    }

    /// Notification latency: `received_at - sent_at`, when `sent_at` is known.
    pub fn latency(&self) -> Option<chrono::Duration> {
        self.sent_at.map(|sent| self.received_at - sent)
    }
}

/// A (possibly schema-less) table name, as carried by [`Targets::tables`](crate::Targets::tables).
///
/// ```
/// use pgcachewatch::TableRef;
/// let t = TableRef::new("public", "users");
/// assert_eq!(t.to_string(), "public.users");
/// assert!(t.matches(&TableRef::unqualified("users")));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableRef {
    /// Schema, if known.
    pub schema: Option<Name>,
    /// Table name.
    pub table: Name,
}

impl TableRef {
    /// A schema-qualified table.
    pub fn new(schema: impl Into<Name>, table: impl Into<Name>) -> Self {
        TableRef {
            schema: Some(schema.into()),
            table: table.into(),
        }
    }

    /// A table whose schema is unknown or irrelevant.
    pub fn unqualified(table: impl Into<Name>) -> Self {
        TableRef {
            schema: None,
            table: table.into(),
        }
    }

    /// Parses `table` or `schema.table` with PostgreSQL's rules for identifiers:
    /// unquoted parts fold to lower case (`Users` is `users`, as in SQL), quoted
    /// parts keep their case and may contain dots (`""` is a literal quote). An
    /// unqualified name has no schema (it matches the table in any schema).
    ///
    /// Every place that takes a table name as text (cache tags, strategies' table
    /// filters, row-key mappers) parses it with this, so a name written like SQL
    /// matches the events PostgreSQL sends.
    ///
    /// ```
    /// use pgcachewatch::TableRef;
    /// assert_eq!(TableRef::parse("public.Users")?, TableRef::new("public", "users"));
    /// assert_eq!(TableRef::parse(r#""App"."Odd.Name""#)?, TableRef::new("App", "Odd.Name"));
    /// assert_eq!(TableRef::parse("orders")?, TableRef::unqualified("orders"));
    /// assert!(TableRef::parse("a.b.c").is_err());
    /// # Ok::<_, pgcachewatch::InvalidTableName>(())
    /// ```
    pub fn parse(text: &str) -> Result<TableRef, InvalidTableName> {
        let mut parts = split_qualified(text)?.into_iter();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(table), None, None) => Ok(TableRef::unqualified(table)),
            (Some(schema), Some(table), None) => Ok(TableRef::new(schema, table)),
            _ => Err(InvalidTableName::new(
                text,
                "expected `table` or `schema.table` (quote names containing dots)",
            )),
        }
    }

    /// Whether two references may name the same table (an unknown schema matches any).
    pub fn matches(&self, other: &TableRef) -> bool {
        self.table == other.table
            && match (&self.schema, &other.schema) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl FromStr for TableRef {
    type Err = InvalidTableName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TableRef::parse(s)
    }
}

/// Text that is not a table name (see [`TableRef::parse`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid table name {text:?}: {reason}")]
pub struct InvalidTableName {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

impl InvalidTableName {
    fn new(text: &str, reason: impl Into<String>) -> Self {
        InvalidTableName {
            text: text.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Splits `a.b` into its identifiers, unquoting and case-folding each as
/// PostgreSQL does: unquoted names fold ASCII letters to lower case and may hold
/// letters, digits (not first), `_` and `$`; quoted ones are taken as written
/// (`""` is a quote).
fn split_qualified(text: &str) -> Result<Vec<String>, InvalidTableName> {
    let bad = |reason: String| InvalidTableName::new(text, reason);
    let mut parts = Vec::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(bad("unterminated quoted identifier".into())),
                }
            }
            if part.is_empty() {
                return Err(bad("empty quoted identifier".into()));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                let ok = c == '_'
                    || c.is_alphabetic()
                    || (!part.is_empty() && (c.is_ascii_digit() || c == '$'));
                if !ok {
                    return Err(bad(format!(
                        "{c:?} is not allowed in an unquoted name; \
                         quote the name in double quotes, e.g. '\"{}\"'",
                        text.trim().replace('"', "\"\"")
                    )));
                }
                // PostgreSQL folds only ASCII letters in unquoted identifiers.
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
            if part.is_empty() {
                return Err(bad("empty name".into()));
            }
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => continue,
            Some(c) => return Err(bad(format!("unexpected {c:?} after a name"))),
        }
    }
}

/// Anything that names a table: a [`TableRef`], SQL-style text parsed by
/// [`TableRef::parse`] (`"users"`, `"public.users"`), or a `(schema, table)` pair
/// taken verbatim.
///
/// ```
/// use pgcachewatch::{IntoTableRef, TableRef};
/// assert_eq!("public.Users".into_table_ref()?, TableRef::new("public", "users"));
/// assert_eq!(("public", "Users").into_table_ref()?, TableRef::new("public", "Users"));
/// # Ok::<_, pgcachewatch::InvalidTableName>(())
/// ```
pub trait IntoTableRef {
    /// The table this names.
    fn into_table_ref(self) -> Result<TableRef, InvalidTableName>;
}

impl IntoTableRef for TableRef {
    fn into_table_ref(self) -> Result<TableRef, InvalidTableName> {
        Ok(self)
    }
}

impl IntoTableRef for &TableRef {
    fn into_table_ref(self) -> Result<TableRef, InvalidTableName> {
        Ok(self.clone())
    }
}

impl IntoTableRef for &str {
    fn into_table_ref(self) -> Result<TableRef, InvalidTableName> {
        TableRef::parse(self)
    }
}

impl IntoTableRef for &&str {
    fn into_table_ref(self) -> Result<TableRef, InvalidTableName> {
        TableRef::parse(self)
    }
}

impl IntoTableRef for String {
    fn into_table_ref(self) -> Result<TableRef, InvalidTableName> {
        TableRef::parse(&self)
    }
}

impl IntoTableRef for &String {
    fn into_table_ref(self) -> Result<TableRef, InvalidTableName> {
        TableRef::parse(self)
    }
}

impl IntoTableRef for (&str, &str) {
    fn into_table_ref(self) -> Result<TableRef, InvalidTableName> {
        Ok(TableRef::new(self.0, self.1))
    }
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.table),
            None => f.write_str(&self.table),
        }
    }
}

// ---- the JSON record form --------------------------------------------------

/// One signal in the JSON form pgcachewatch writes it: a line of the event log
/// (the testkit's `eventlog`, after the line's `offset_us`) and the body of a
/// NATS relay message (after the message's `v` and `epoch`). Both write it
/// with this one definition.
///
/// The record is a JSON object with exactly one of these fields:
///
/// * `event`: an [`Event`]: `operation`, `table`, `received_at` (RFC 3339),
///   and as the event has them `schema`, `sent_at`, `keys` (an array of
///   objects, column → value as `to_jsonb` gives it). Which source it came
///   from decides the rest, so that no field means two things:
///   * an event **without a position** (the `LISTEN` source): `channel`, the
///     NOTIFY channel, and `txid`, the writing transaction's 64-bit id
///     (`txid_current()`, as the triggers send it);
///   * an event **with a position** (the logical-replication source, or a
///     relay of it): `slot`, the replication slot it was read from; `lsn`, the
///     commit's end in PostgreSQL's text form (`"16/B374D848"`), with
///     `lsn_u64`, the same position as a number (compare these, not the
///     text); and `xid32`, the 32-bit transaction id logical replication
///     reports (it wraps: it equals `txid_current() % 2^32`, or
///     `pg_current_xact_id()::xid`, of the writing transaction). An id that
///     does not fit 32 bits is written as `txid`.
/// * `gap`: events may have been lost: `{"reason": …}`, one of `lagged` (with
///   `missed`), `connection_lost` (with `detail`), `heartbeat_timeout`,
///   `reconnected`, `malformed_payload`, `slot_lost` (with `detail`),
///   `injected` (with `detail`); `other` (with `detail`) for reasons newer than
///   the writer knows how to name.
/// * `health`: `"healthy"` or `"unhealthy"`.
/// * `progress`: a lossless source passed this position: every change
///   committed before it was emitted. Text form, with `progress_u64`, the
///   number.
///
/// Readers accept what earlier writers wrote: `channel` in place of `slot`,
/// `txid` in place of `xid32`, a position in its text form alone; unknown
/// fields are ignored.
///
/// ```
/// use pgcachewatch_core::{Event, Lsn, Operation, SignalRecord};
/// let e = Event::new("slot1", Operation::Update, "public", "users")
///     .with_lsn(Lsn(0x16_B374_D848))
///     .with_txid(741);
/// let json = serde_json::to_value(SignalRecord::Event(e.clone()))?;
/// assert_eq!(json["event"]["slot"], "slot1");
/// assert_eq!(json["event"]["xid32"], 741);
/// assert_eq!(json["event"]["lsn"], "16/B374D848");
/// assert_eq!(json["event"]["lsn_u64"], 0x16_B374_D848_u64);
/// let back: SignalRecord = serde_json::from_value(json)?;
/// assert_eq!(back, SignalRecord::Event(e));
/// # Ok::<_, serde_json::Error>(())
/// ```
///
/// The four kinds are the format: a fifth would be a new version of it (of the
/// event log and of the relay's messages), so matching them all is fine.
#[derive(Debug, Clone, PartialEq)]
pub enum SignalRecord {
    /// A table changed.
    Event(Event),
    /// Events may have been lost.
    Gap(crate::signal::GapReason),
    /// The source's health changed (a relay's heartbeat).
    Health(crate::signal::Health),
    /// A lossless source passed this position (see
    /// [`Signal::Progress`](crate::Signal::Progress)).
    Progress(Lsn),
}

impl SignalRecord {
    /// The record of a signal; `None` for a signal kind it has no form for.
    pub fn from_signal(signal: &crate::signal::Signal) -> Option<Self> {
        use crate::signal::Signal;
        match signal {
            Signal::Event(e) => Some(SignalRecord::Event((**e).clone())),
            Signal::Gap(reason) => Some(SignalRecord::Gap(reason.clone())),
            Signal::Health(h) => Some(SignalRecord::Health(*h)),
            Signal::Progress(lsn) => Some(SignalRecord::Progress(*lsn)),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The signal this record stands for.
    pub fn to_signal(&self) -> crate::signal::Signal {
        use crate::signal::Signal;
        match self {
            SignalRecord::Event(e) => Signal::Event(std::sync::Arc::new(e.clone())),
            SignalRecord::Gap(reason) => Signal::Gap(reason.clone()),
            SignalRecord::Health(h) => Signal::Health(*h),
            SignalRecord::Progress(lsn) => Signal::Progress(*lsn),
        }
    }
}

/// The record's fields as written.
#[derive(Serialize)]
struct RecordOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<EventOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gap: Option<GapJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    health: Option<HealthJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<Lsn>,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress_u64: Option<u64>,
}

/// The record's fields as read (see [`SignalRecord`] for what is accepted),
/// with the envelope fields of a relay message beside them (absent in an
/// event log's lines): one pass over the object, where `#[serde(flatten)]`
/// would first copy it whole into a buffer.
#[derive(Deserialize)]
struct RecordIn {
    #[serde(default)]
    v: Option<u64>,
    #[serde(default)]
    epoch: Option<Name>,
    #[serde(default)]
    event: Option<EventIn>,
    #[serde(default)]
    gap: Option<GapJson>,
    #[serde(default)]
    health: Option<HealthJson>,
    #[serde(default)]
    progress: Option<Lsn>,
    #[serde(default)]
    progress_u64: Option<u64>,
}

#[derive(Serialize)]
struct EventOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a Name>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slot: Option<&'a Name>,
    operation: Operation,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<&'a Name>,
    table: &'a Name,
    #[serde(skip_serializing_if = "Option::is_none")]
    sent_at: Option<&'a DateTime<Utc>>,
    received_at: &'a DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keys: Option<&'a Vec<RowKey>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    txid: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    xid32: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lsn: Option<Lsn>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lsn_u64: Option<u64>,
}

impl<'a> From<&'a Event> for EventOut<'a> {
    fn from(e: &'a Event) -> Self {
        // An event with a position came from a replication slot: its
        // "channel" is the slot and its transaction id the 32-bit xid.
        let positioned = e.lsn.is_some();
        let xid32 = e
            .txid
            .filter(|_| positioned)
            .and_then(|t| u32::try_from(t).ok());
        EventOut {
            channel: (!positioned).then_some(&e.channel),
            slot: positioned.then_some(&e.channel),
            operation: e.operation,
            schema: e.schema.as_ref(),
            table: &e.table,
            sent_at: e.sent_at.as_ref(),
            received_at: &e.received_at,
            keys: e.keys.as_ref(),
            txid: if xid32.is_some() { None } else { e.txid },
            xid32,
            lsn: e.lsn,
            lsn_u64: e.lsn.map(Lsn::as_u64),
        }
    }
}

#[derive(Deserialize)]
struct EventIn {
    #[serde(default)]
    channel: Option<Name>,
    #[serde(default)]
    slot: Option<Name>,
    operation: Operation,
    #[serde(default)]
    schema: Option<Name>,
    table: Name,
    #[serde(
        default,
        deserialize_with = "crate::payload::timestamp::deserialize_option"
    )]
    sent_at: Option<DateTime<Utc>>,
    #[serde(deserialize_with = "crate::payload::timestamp::deserialize")]
    received_at: DateTime<Utc>,
    #[serde(default)]
    keys: Option<Vec<RowKey>>,
    #[serde(default)]
    txid: Option<i64>,
    #[serde(default)]
    xid32: Option<u32>,
    #[serde(default)]
    lsn: Option<Lsn>,
    #[serde(default)]
    lsn_u64: Option<u64>,
}

/// A position in its text form, its number, or both (which must agree).
fn position(text: Option<Lsn>, number: Option<u64>, what: &str) -> Result<Option<Lsn>, String> {
    match (text, number.map(Lsn)) {
        (Some(t), Some(n)) if t != n => Err(format!(
            "`{what}` ({t}) and `{what}_u64` ({}) disagree",
            n.as_u64()
        )),
        (t, n) => Ok(t.or(n)),
    }
}

impl TryFrom<EventIn> for Event {
    type Error = String;

    fn try_from(e: EventIn) -> Result<Self, String> {
        let channel = e
            .channel
            .or(e.slot)
            .ok_or("an event has `channel` (LISTEN) or `slot` (replication)")?;
        Ok(Event {
            channel,
            operation: e.operation,
            schema: e.schema,
            table: e.table,
            sent_at: e.sent_at,
            received_at: e.received_at,
            keys: e.keys,
            txid: e.txid.or(e.xid32.map(i64::from)),
            lsn: position(e.lsn, e.lsn_u64, "lsn")?,
        })
    }
}

/// A gap reason's form.
#[derive(Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
enum GapJson {
    Lagged { missed: u64 },
    ConnectionLost { detail: String },
    HeartbeatTimeout,
    Reconnected,
    MalformedPayload,
    SlotLost { detail: String },
    Injected { detail: String },
    Other { detail: String },
}

#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum HealthJson {
    Healthy,
    Unhealthy,
}

impl From<&crate::signal::GapReason> for GapJson {
    fn from(r: &crate::signal::GapReason) -> Self {
        use crate::signal::GapReason;
        match r {
            GapReason::Lagged { missed } => GapJson::Lagged { missed: *missed },
            GapReason::ConnectionLost { detail } => GapJson::ConnectionLost {
                detail: detail.to_string(),
            },
            GapReason::HeartbeatTimeout => GapJson::HeartbeatTimeout,
            GapReason::Reconnected => GapJson::Reconnected,
            GapReason::MalformedPayload => GapJson::MalformedPayload,
            GapReason::SlotLost { detail } => GapJson::SlotLost {
                detail: detail.to_string(),
            },
            GapReason::Injected { detail } => GapJson::Injected {
                detail: detail.to_string(),
            },
            #[allow(unreachable_patterns)]
            other => GapJson::Other {
                detail: other.to_string(),
            },
        }
    }
}

impl From<GapJson> for crate::signal::GapReason {
    fn from(w: GapJson) -> Self {
        use crate::signal::GapReason;
        match w {
            GapJson::Lagged { missed } => GapReason::Lagged { missed },
            GapJson::ConnectionLost { detail } => GapReason::ConnectionLost {
                detail: detail.into(),
            },
            GapJson::HeartbeatTimeout => GapReason::HeartbeatTimeout,
            GapJson::Reconnected => GapReason::Reconnected,
            GapJson::MalformedPayload => GapReason::MalformedPayload,
            GapJson::SlotLost { detail } => GapReason::SlotLost {
                detail: detail.into(),
            },
            GapJson::Injected { detail } | GapJson::Other { detail } => GapReason::Injected {
                detail: detail.into(),
            },
        }
    }
}

impl Serialize for SignalRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out = RecordOut {
            event: None,
            gap: None,
            health: None,
            progress: None,
            progress_u64: None,
        };
        match self {
            SignalRecord::Event(e) => out.event = Some(e.into()),
            SignalRecord::Gap(g) => out.gap = Some(g.into()),
            SignalRecord::Health(h) => {
                out.health = Some(if h.is_healthy() {
                    HealthJson::Healthy
                } else {
                    HealthJson::Unhealthy
                });
            }
            SignalRecord::Progress(lsn) => {
                out.progress = Some(*lsn);
                out.progress_u64 = Some(lsn.as_u64());
            }
        }
        out.serialize(s)
    }
}

impl RecordIn {
    fn into_record<E: serde::de::Error>(self) -> Result<SignalRecord, E> {
        const FIELDS: &str = "`event`, `gap`, `health`, `progress`";
        let progress = position(self.progress, self.progress_u64, "progress").map_err(E::custom)?;
        match (self.event, self.gap, self.health, progress) {
            (Some(e), None, None, None) => Event::try_from(e)
                .map(SignalRecord::Event)
                .map_err(E::custom),
            (None, Some(g), None, None) => Ok(SignalRecord::Gap(g.into())),
            (None, None, Some(h), None) => Ok(SignalRecord::Health(match h {
                HealthJson::Healthy => crate::signal::Health::Healthy,
                HealthJson::Unhealthy => crate::signal::Health::Unhealthy,
            })),
            (None, None, None, Some(lsn)) => Ok(SignalRecord::Progress(lsn)),
            (None, None, None, None) => Err(E::custom(format!(
                "expected one of the fields {FIELDS}; found none"
            ))),
            _ => Err(E::custom(format!(
                "expected exactly one of the fields {FIELDS}; found several"
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for SignalRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RecordIn::deserialize(d)?.into_record()
    }
}

/// A [`SignalRecord`] read together with the fields a relay message puts
/// beside it: its contract version `v` and its `epoch` (both optional here;
/// the relay's reader says which it requires). Read in one pass over the
/// object.
///
/// ```
/// use pgcachewatch_core::{EnvelopedRecord, Health, SignalRecord};
/// let m: EnvelopedRecord = serde_json::from_str(r#"{"v":2,"epoch":"e1","health":"healthy"}"#)?;
/// assert_eq!(m.version, Some(2));
/// assert_eq!(m.epoch.as_deref(), Some("e1"));
/// assert_eq!(m.record, SignalRecord::Health(Health::Healthy));
/// # Ok::<_, serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EnvelopedRecord {
    /// The contract version (`v`), if given.
    pub version: Option<u64>,
    /// The relay epoch (`epoch`), if given: a [`Name`], as every message of an
    /// epoch names the same one (shared, not copied per message).
    pub epoch: Option<Name>,
    /// The record.
    pub record: SignalRecord,
}

impl<'de> Deserialize<'de> for EnvelopedRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut r = RecordIn::deserialize(d)?;
        let (version, epoch) = (r.v, r.epoch.take());
        Ok(EnvelopedRecord {
            version,
            epoch,
            record: r.into_record()?,
        })
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;
    use crate::signal::{GapReason, Health};

    fn round_trip(r: &SignalRecord) -> serde_json::Value {
        let json = serde_json::to_value(r).unwrap();
        let back: SignalRecord = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(&back, r, "{json}");
        json
    }

    #[test]
    fn every_kind_round_trips_and_fields_say_one_thing() {
        let listen = Event::new("ch", Operation::Insert, "public", "t")
            .with_txid(5_000_000_000)
            .with_keys(vec![RowKey::single("id", 1)]);
        let j = round_trip(&SignalRecord::Event(listen));
        assert_eq!(j["event"]["channel"], "ch");
        assert_eq!(j["event"]["txid"], 5_000_000_000_i64);
        assert!(j["event"].get("slot").is_none() && j["event"].get("xid32").is_none());

        let slot = Event::new("s", Operation::Delete, "public", "t")
            .with_lsn(Lsn(0x1_0000_0002))
            .with_txid(7);
        let j = round_trip(&SignalRecord::Event(slot));
        assert_eq!(j["event"]["slot"], "s");
        assert_eq!(j["event"]["xid32"], 7);
        assert_eq!(j["event"]["lsn"], "1/2");
        assert_eq!(j["event"]["lsn_u64"], 0x1_0000_0002_u64);
        assert!(j["event"].get("channel").is_none() && j["event"].get("txid").is_none());

        for g in [
            GapReason::Lagged { missed: 3 },
            GapReason::SlotLost { detail: "x".into() },
            GapReason::Reconnected,
        ] {
            round_trip(&SignalRecord::Gap(g));
        }
        round_trip(&SignalRecord::Health(Health::Unhealthy));
        let j = round_trip(&SignalRecord::Progress(Lsn(0x2_0000_0001)));
        assert_eq!(j["progress"], "2/1");
        assert_eq!(j["progress_u64"], 0x2_0000_0001_u64);
    }

    #[test]
    fn earlier_forms_are_read_and_contradictions_refused() {
        let old = r#"{"event":{"channel":"s","operation":"update","table":"t","received_at":"2025-01-01T00:00:00Z","txid":9,"lsn":"0/10"}}"#;
        let SignalRecord::Event(e) = serde_json::from_str(old).unwrap() else {
            panic!("an event")
        };
        assert_eq!((e.txid, e.lsn), (Some(9), Some(Lsn(16))));
        let r: SignalRecord = serde_json::from_str(r#"{"progress":"0/10"}"#).unwrap();
        assert_eq!(r, SignalRecord::Progress(Lsn(16)));
        for bad in [
            r#"{"progress":"0/10","progress_u64":17}"#,
            r#"{}"#,
            r#"{"health":"healthy","progress":"0/1"}"#,
            r#"{"event":{"operation":"update","table":"t","received_at":"2025-01-01T00:00:00Z"}}"#,
        ] {
            assert!(serde_json::from_str::<SignalRecord>(bad).is_err(), "{bad}");
        }
    }
}
