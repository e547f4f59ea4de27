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
            schema: self.schema.as_deref().map(str::to_owned),
            table: self.table.to_string(),
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
    pub schema: Option<String>,
    /// Table name.
    pub table: String,
}

impl TableRef {
    /// A schema-qualified table.
    pub fn new(schema: impl Into<String>, table: impl Into<String>) -> Self {
        TableRef {
            schema: Some(schema.into()),
            table: table.into(),
        }
    }

    /// A table whose schema is unknown or irrelevant.
    pub fn unqualified(table: impl Into<String>) -> Self {
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
