//! The transaction assembler: decoded pgoutput [`Message`]s in, [`Event`]s out at
//! each commit. No I/O.
//!
//! It buffers one transaction at a time. At `Commit` it hands out, per (table,
//! operation) in order of first appearance, one [`Event`] carrying the primary
//! key of every changed row as a [`RowKey`] (`{"column": value}`, values as
//! `to_jsonb` gives them: the shape and values pgcachewatch's row-level
//! triggers send).
//!
//! **Keys are the primary key, not the replica identity.** pgoutput flags the
//! replica-identity columns, which `REPLICA IDENTITY USING INDEX` and `FULL`
//! make something else; the task tells the assembler each relation's primary
//! key from the catalog ([`Assembler::describe`]). A key is read from a tuple
//! only when every key column is in it; an `UPDATE` that sends no old tuple
//! kept its key only if the key columns are part of the replica identity
//! (otherwise the key may have changed unseen). Anything else is a table-level
//! event for that table.
//!
//! Memory is bounded: past the per-transaction key cap (a count, and
//! [`KEY_BYTES_PER_KEY`] bytes of key text per allowed key), the table
//! receiving the next key degrades to a table-level event (keys `None`) and
//! its keys are freed.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use chrono::{DateTime, Utc};
use pgcachewatch_core::{Event, Lsn, Name, Operation, RowKey};

use super::pgoutput::{Begin, Commit, Datum, Message, Relation, Tuple};

/// PostgreSQL's epoch (2000-01-01 UTC) in Unix seconds.
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// Key text a transaction may buffer per key of its cap: a key cap of 10,000
/// allows 2.5 MiB of key text. Wide keys (long text) degrade a table sooner.
pub(crate) const KEY_BYTES_PER_KEY: usize = 256;

/// Type OIDs `to_jsonb` writes as JSON numbers: int2, int4, int8, float4,
/// float8, numeric (`NaN` and infinities as strings).
const NUMBER_TYPES: [u32; 6] = [21, 23, 20, 700, 701, 1700];
const BOOL: u32 = 16;
const JSON: u32 = 114;
const JSONB: u32 = 3802;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;

/// What a commit produced.
#[derive(Debug)]
pub(crate) enum Committed {
    /// The transaction's events (possibly none: it touched no published table).
    Events {
        /// The end of the commit record.
        end_lsn: Lsn,
        /// The transaction's (32-bit) id.
        xid: u32,
        /// One event per (table, operation).
        events: Vec<Event>,
        /// How many of them degraded to table level because of the key cap.
        degraded: usize,
    },
    /// Part of the transaction could not be read: whoever caches must assume
    /// anything changed.
    Unreadable {
        /// The end of the commit record.
        end_lsn: Lsn,
        /// The transaction's (32-bit) id.
        xid: u32,
        /// What went wrong first.
        detail: String,
    },
}

impl Committed {
    /// The end of the commit record.
    pub(crate) fn end_lsn(&self) -> Lsn {
        match self {
            Committed::Events { end_lsn, .. } | Committed::Unreadable { end_lsn, .. } => *end_lsn,
        }
    }

    /// The transaction's id.
    pub(crate) fn xid(&self) -> u32 {
        match self {
            Committed::Events { xid, .. } | Committed::Unreadable { xid, .. } => *xid,
        }
    }

    /// Whether publishing it changes what a cache may hold (events, or a gap),
    /// so it must wait until other sessions see the transaction.
    pub(crate) fn affects_caches(&self) -> bool {
        match self {
            Committed::Events { events, .. } => !events.is_empty(),
            Committed::Unreadable { .. } => true,
        }
    }
}

/// A message that makes no sense where it came (a change outside a transaction).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput stream out of order: {0}")]
pub(crate) struct OutOfOrder(pub(crate) String);

/// One (table, operation) of the open transaction.
#[derive(Debug)]
struct Change {
    relation: u32,
    operation: Operation,
    /// `None`: table level (no key, or past the key cap).
    keys: Option<Vec<RowKey>>,
    /// The key text of `keys`, in bytes.
    bytes: usize,
}

#[derive(Debug)]
struct Transaction {
    begin: Begin,
    changes: Vec<Change>,
    index: OidMap<(u32, Operation), usize>,
    /// Keys buffered, all tables together, and their text's bytes.
    keys: usize,
    key_bytes: usize,
    degraded: usize,
    unreadable: Option<String>,
}

/// A relation as the stream described it, plus what keys need.
#[derive(Debug)]
struct Table {
    /// Shared by every event of the table (no copy per event): the table the
    /// user watches (a partition's root).
    schema: Name,
    name: Name,
    /// (column index, name, type oid) of the primary-key columns; empty when
    /// the table has no key usable here.
    key_columns: Vec<(usize, String, u32)>,
    /// Every key column is a replica-identity column: an `UPDATE` that sends
    /// no old tuple did not change the key.
    identity_holds_key: bool,
}

/// What the catalog says of a relation's key (see [`Assembler::describe`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct KeySpec {
    /// The table to name in events (schema, name); `None`: as the stream says.
    pub(crate) table: Option<(String, String)>,
    /// Primary-key columns in key order, each with the type `to_jsonb` sees
    /// (a domain's base type); empty: no primary key.
    pub(crate) columns: Vec<(String, u32)>,
}

/// Buffers one transaction; see the module docs.
#[derive(Debug)]
pub(crate) struct Assembler {
    channel: Name,
    key_cap: usize,
    tables: OidMap<u32, Table>,
    tx: Option<Transaction>,
    /// The last transaction's change list and index, emptied, for the next
    /// one: a stream of small transactions allocates neither.
    spare: Spare,
    /// `schema.table` of keyless tables already warned about.
    warned: HashSet<String>,
}

/// A map keyed by relation OIDs (and operations).
type OidMap<K, V> = HashMap<K, V, BuildHasherDefault<OidHasher>>;

/// The hasher of [`OidMap`]: a rotate, an exclusive or and a multiply per
/// word. Its keys come from the server, not from users, so SipHash's
/// resistance to chosen keys buys nothing here, and it cost a tenth of the
/// decode of a one-row transaction (two lookups per change).
#[derive(Debug, Default, Clone, Copy)]
struct OidHasher(u64);

impl Hasher for OidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_isize(&mut self, n: isize) {
        self.write_u64(n as u64);
    }
    fn write_u64(&mut self, n: u64) {
        // The golden ratio's fraction (odd): spreads consecutive OIDs over
        // the high bits the table's probing reads.
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A transaction's buffers kept between transactions.
#[derive(Debug, Default)]
struct Spare {
    changes: Vec<Change>,
    index: OidMap<(u32, Operation), usize>,
}

impl Spare {
    /// Buffers larger than this many changes are freed, not kept: one large
    /// transaction does not hold its memory for ever.
    const MAX_CHANGES: usize = 64;

    /// Keeps the buffers of a finished transaction (emptied) if small.
    fn keep(&mut self, mut changes: Vec<Change>, mut index: OidMap<(u32, Operation), usize>) {
        if changes.capacity() <= Self::MAX_CHANGES {
            changes.clear();
            index.clear();
            *self = Spare { changes, index };
        }
    }
}

impl Assembler {
    /// Events are stamped with `channel` (the slot name); a transaction holds at
    /// most `key_cap` keys.
    pub(crate) fn new(channel: impl Into<Name>, key_cap: usize) -> Self {
        Assembler {
            channel: channel.into(),
            key_cap,
            tables: OidMap::default(),
            tx: None,
            spare: Spare::default(),
            warned: HashSet::new(),
        }
    }

    /// Whether a transaction is open (between `Begin` and `Commit`).
    pub(crate) fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// Keys buffered in the open transaction.
    #[cfg(test)]
    pub(crate) fn buffered_keys(&self) -> usize {
        self.tx.as_ref().map_or(0, |t| t.keys)
    }

    /// Forgets the open transaction and the relations: a new session starts
    /// (pgoutput describes every relation again before using it).
    pub(crate) fn reset(&mut self) {
        self.tx = None;
        self.tables.clear();
    }

    /// Marks the open transaction unreadable (a message in it could not be
    /// decoded). Returns `false` when no transaction is open.
    pub(crate) fn unreadable(&mut self, detail: String) -> bool {
        match &mut self.tx {
            Some(tx) => {
                tx.unreadable.get_or_insert(detail);
                tx.changes.clear();
                tx.index.clear();
                tx.keys = 0;
                tx.key_bytes = 0;
                true
            }
            None => false,
        }
    }

    /// Takes one message; returns what a `Commit` produced.
    pub(crate) fn apply(&mut self, msg: Message) -> Result<Option<Committed>, OutOfOrder> {
        match msg {
            Message::Begin(begin) => {
                if let Some(open) = self.tx.take() {
                    tracing::warn!(
                        xid = open.begin.xid,
                        "pgoutput: BEGIN inside an open transaction; discarding the open one"
                    );
                    return Err(OutOfOrder(format!(
                        "BEGIN of xid {} inside xid {}",
                        begin.xid, open.begin.xid
                    )));
                }
                let Spare { changes, index } = std::mem::take(&mut self.spare);
                self.tx = Some(Transaction {
                    begin,
                    changes,
                    index,
                    keys: 0,
                    key_bytes: 0,
                    degraded: 0,
                    unreadable: None,
                });
                Ok(None)
            }
            Message::Commit(commit) => {
                let tx = self.tx.take().ok_or_else(|| {
                    OutOfOrder(format!("COMMIT at {} without BEGIN", commit.end_lsn))
                })?;
                Ok(Some(self.commit(tx, &commit)))
            }
            Message::Relation(rel) => {
                self.relation(rel);
                Ok(None)
            }
            Message::Insert { relation, new } => {
                self.change(relation, Operation::Insert, [Some(&new), None])
            }
            Message::Update { relation, old, new } => {
                let old = old.as_ref().map(|(_, t)| t);
                self.change(relation, Operation::Update, [Some(&new), old])
            }
            Message::Delete {
                relation,
                old: (_, old),
            } => self.change(relation, Operation::Delete, [Some(&old), None]),
            Message::Truncate { relations, .. } => {
                let tx = self.open("TRUNCATE")?;
                for relation in relations {
                    let at = *tx
                        .index
                        .entry((relation, Operation::Truncate))
                        .or_insert_with(|| {
                            tx.changes.push(Change {
                                relation,
                                operation: Operation::Truncate,
                                keys: None,
                                bytes: 0,
                            });
                            tx.changes.len() - 1
                        });
                    tx.changes[at].keys = None;
                }
                Ok(None)
            }
            Message::Origin { .. }
            | Message::Type { .. }
            | Message::Logical { .. }
            | Message::Other(_) => Ok(None),
        }
    }

    fn open(&mut self, what: &str) -> Result<&mut Transaction, OutOfOrder> {
        self.tx
            .as_mut()
            .ok_or_else(|| OutOfOrder(format!("{what} outside a transaction")))
    }

    /// A relation message without catalog knowledge: its replica-identity
    /// columns stand for the key. The task uses [`describe`](Self::describe).
    fn relation(&mut self, rel: Relation) {
        let spec = KeySpec {
            table: None,
            columns: rel
                .columns
                .iter()
                .filter(|c| c.is_key())
                .map(|c| (c.name.clone(), c.type_oid))
                .collect(),
        };
        self.describe(rel, &spec);
    }

    /// Takes a relation message with what the catalog says of its key: events
    /// name `spec.table`, and keys are `spec.columns` read from each tuple.
    pub(crate) fn describe(&mut self, rel: Relation, spec: &KeySpec) {
        let (schema, name) = spec
            .table
            .clone()
            .unwrap_or_else(|| (rel.namespace.clone(), rel.name.clone()));
        let mut key_columns = Vec::with_capacity(spec.columns.len());
        let mut identity_holds_key = true;
        for (column, type_oid) in &spec.columns {
            match rel.columns.iter().position(|c| &c.name == column) {
                Some(i) => {
                    identity_holds_key &= rel.columns[i].is_key();
                    key_columns.push((i, column.clone(), *type_oid));
                }
                None => {
                    // The stream's row lacks a key column (a published column
                    // list): no key can be read.
                    key_columns.clear();
                    break;
                }
            }
        }
        let qualified = format!("{schema}.{name}");
        if key_columns.is_empty() && self.warned.insert(qualified.clone()) {
            tracing::warn!(
                table = %qualified,
                replica_identity = %char::from(rel.replica_identity),
                "table has no primary key (or the published columns leave it out): its \
                 changes invalidate the whole table; add a primary key for row-level events"
            );
        }
        self.tables.insert(
            rel.id,
            Table {
                schema: schema.into(),
                name: name.into(),
                key_columns,
                identity_holds_key,
            },
        );
    }

    /// Records a row change: the keys of `tuples` (the new row, and the old one
    /// when sent, so a changed key invalidates both). For an `UPDATE` without
    /// an old tuple the key is known unchanged only when the replica identity
    /// holds it.
    fn change(
        &mut self,
        relation: u32,
        operation: Operation,
        tuples: [Option<&Tuple>; 2],
    ) -> Result<Option<Committed>, OutOfOrder> {
        let key_cap = self.key_cap;
        let Some(table) = self.tables.get(&relation) else {
            let detail = format!("{operation} on relation {relation}, which was never described");
            if self.unreadable(detail.clone()) {
                return Ok(None);
            }
            return Err(OutOfOrder(detail));
        };
        let mut keys: [Option<RowKey>; 2] = [None, None];
        let mut table_level = table.key_columns.is_empty()
            || (operation == Operation::Update && tuples[1].is_none() && !table.identity_holds_key);
        let mut bytes = 0;
        for (slot, tuple) in keys.iter_mut().zip(tuples) {
            if let Some(tuple) = tuple {
                match row_key(table, tuple) {
                    Some((key, size)) => {
                        *slot = Some(key);
                        bytes += size;
                    }
                    None => table_level = true,
                }
            }
        }
        if keys[0] == keys[1] {
            keys[1] = None;
        }
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| OutOfOrder(format!("{operation} outside a transaction")))?;
        if tx.unreadable.is_some() {
            return Ok(None);
        }
        let at = *tx.index.entry((relation, operation)).or_insert_with(|| {
            tx.changes.push(Change {
                relation,
                operation,
                keys: Some(Vec::new()),
                bytes: 0,
            });
            tx.changes.len() - 1
        });
        let change = &mut tx.changes[at];
        let Some(list) = &mut change.keys else {
            return Ok(None);
        };
        let count = keys.iter().flatten().count().max(1);
        let new_keys = keys.into_iter().flatten().filter(|_| !table_level);
        for key in new_keys {
            if list.last() == Some(&key) {
                continue;
            }
            let size = bytes / count;
            if tx.keys >= key_cap || tx.key_bytes + size > key_cap.saturating_mul(KEY_BYTES_PER_KEY)
            {
                table_level = true;
                tx.degraded += 1;
                break;
            }
            list.push(key);
            tx.keys += 1;
            tx.key_bytes += size;
            change.bytes += size;
        }
        if table_level {
            tx.keys -= list.len();
            tx.key_bytes -= change.bytes;
            change.bytes = 0;
            change.keys = None;
        }
        Ok(None)
    }

    fn commit(&mut self, mut tx: Transaction, commit: &Commit) -> Committed {
        if let Some(detail) = tx.unreadable {
            self.spare.keep(tx.changes, tx.index);
            return Committed::Unreadable {
                end_lsn: commit.end_lsn,
                xid: tx.begin.xid,
                detail,
            };
        }
        let received_at = Utc::now();
        let sent_at = pg_timestamp(commit.commit_time);
        let events = tx
            .changes
            .drain(..)
            .filter_map(|change| {
                let table = self.tables.get(&change.relation);
                if table.is_none() {
                    tracing::warn!(
                        relation = change.relation,
                        "pgoutput: TRUNCATE of a relation never described; ignored"
                    );
                }
                let table = table?;
                Some(Event {
                    channel: self.channel.clone(),
                    operation: change.operation,
                    schema: Some(table.schema.clone()),
                    table: table.name.clone(),
                    sent_at,
                    received_at,
                    keys: change.keys,
                    txid: Some(i64::from(tx.begin.xid)),
                    lsn: Some(commit.end_lsn),
                })
            })
            .collect();
        self.spare.keep(tx.changes, tx.index);
        Committed::Events {
            end_lsn: commit.end_lsn,
            xid: tx.begin.xid,
            events,
            degraded: tx.degraded,
        }
    }
}

/// The key of `tuple` and the bytes of its text; `None` if a key column is
/// missing (NULL, unchanged TOAST, binary) or the table has no key.
fn row_key(table: &Table, tuple: &Tuple) -> Option<(RowKey, usize)> {
    if table.key_columns.is_empty() {
        return None;
    }
    let mut map = serde_json::Map::with_capacity(table.key_columns.len());
    let mut bytes = 0;
    for (index, name, type_oid) in &table.key_columns {
        let Some(Datum::Text(text)) = tuple.get(*index) else {
            return None;
        };
        bytes += name.len() + text.len();
        map.insert(name.clone(), json_value(*type_oid, text));
    }
    Some((RowKey(map), bytes))
}

/// A column's text form (as the walsender prints it: `DateStyle` ISO) as the
/// JSON value `to_jsonb` gives the triggers: numbers as numbers (`NaN` and
/// infinities as strings), booleans, `json`/`jsonb` as themselves, timestamps in
/// JSON's form (`timestamptz` in UTC, `+00:00`, as the triggers write it),
/// anything else as its text.
pub(crate) fn json_value(type_oid: u32, text: &[u8]) -> serde_json::Value {
    use serde_json::Value;
    let text = String::from_utf8_lossy(text);
    let typed = match type_oid {
        t if NUMBER_TYPES.contains(&t) => serde_json::from_str::<serde_json::Number>(&text)
            .ok()
            .map(Value::Number),
        BOOL => match &*text {
            "t" => Some(Value::Bool(true)),
            "f" => Some(Value::Bool(false)),
            _ => None,
        },
        JSON | JSONB => serde_json::from_str::<Value>(&text).ok(),
        TIMESTAMP => timestamp_json(&text).map(Value::String),
        TIMESTAMPTZ => timestamptz_json(&text).map(Value::String),
        _ => None,
    };
    typed.unwrap_or_else(|| Value::String(text.into_owned()))
}

/// `2024-05-01 10:00:00.5` → `2024-05-01T10:00:00.5`; `None` for anything
/// else (infinity, BC: kept as printed).
fn timestamp_json(text: &str) -> Option<String> {
    let naive = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").ok()?;
    json_time(naive)
}

/// `2024-05-01 12:00:00.5+02` → `2024-05-01T10:00:00.5+00:00`.
fn timestamptz_json(text: &str) -> Option<String> {
    // The offset: the last sign after the time (`+HH`, `+HH:MM`, `+HH:MM:SS`).
    let at = text.rfind(['+', '-']).filter(|at| *at > 10)?;
    let (stamp, offset) = text.split_at(at);
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let mut seconds = 0i64;
    for (part, scale) in offset[1..].split(':').zip([3600, 60, 1]) {
        if part.len() != 2 {
            return None;
        }
        seconds += part.parse::<i64>().ok()? * scale;
    }
    let naive = chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S%.f").ok()?;
    let utc = naive.checked_sub_signed(chrono::TimeDelta::seconds(sign * seconds))?;
    Some(format!("{}+00:00", json_time(utc)?))
}

/// PostgreSQL's JSON form of a time: `YYYY-MM-DDTHH:MM:SS`, then the
/// fraction with trailing zeros cut (none when whole). `None` outside years
/// 1–9999, which PostgreSQL prints differently (callers keep the text).
fn json_time(t: chrono::NaiveDateTime) -> Option<String> {
    use chrono::{Datelike, Timelike};
    if !(1..=9999).contains(&t.year()) {
        return None;
    }
    let mut out = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let micros = t.nanosecond() / 1_000;
    if micros > 0 {
        let fraction = format!("{micros:06}");
        out.push('.');
        out.push_str(fraction.trim_end_matches('0'));
    }
    Some(out)
}

/// Microseconds since 2000-01-01 UTC as a timestamp (`None` if out of range).
pub(crate) fn pg_timestamp(micros: i64) -> Option<DateTime<Utc>> {
    let secs = micros
        .div_euclid(1_000_000)
        .checked_add(PG_EPOCH_UNIX_SECS)?;
    let nanos = u32::try_from(micros.rem_euclid(1_000_000) * 1_000).ok()?;
    DateTime::from_timestamp(secs, nanos)
}

#[cfg(test)]
mod tests {
    use super::super::pgoutput::{decode, encode::encode, Column, OldKind};
    use super::*;

    const USERS: u32 = 16384;
    const LOG: u32 = 16390;

    fn users() -> Message {
        Message::Relation(Relation {
            id: USERS,
            namespace: "public".into(),
            name: "users".into(),
            replica_identity: b'd',
            columns: vec![
                Column {
                    flags: 1,
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                },
                Column {
                    flags: 0,
                    name: "name".into(),
                    type_oid: 25,
                    type_modifier: -1,
                },
            ],
        })
    }

    fn keyless() -> Message {
        Message::Relation(Relation {
            id: LOG,
            namespace: "app".into(),
            name: "log".into(),
            replica_identity: b'n',
            columns: vec![Column {
                flags: 0,
                name: "line".into(),
                type_oid: 25,
                type_modifier: -1,
            }],
        })
    }

    fn begin(xid: u32) -> Message {
        Message::Begin(Begin {
            final_lsn: Lsn(100),
            commit_time: 0,
            xid,
        })
    }

    fn commit(end: u64) -> Message {
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(end - 8),
            end_lsn: Lsn(end),
            commit_time: 1_000_000,
        })
    }

    fn row(id: &str, name: &str) -> Tuple {
        vec![
            Datum::Text(id.as_bytes().to_vec().into()),
            Datum::Text(name.as_bytes().to_vec().into()),
        ]
    }

    /// Feeds messages through the encoder and decoder too, as the stream would.
    fn feed(a: &mut Assembler, msgs: Vec<Message>) -> Vec<Committed> {
        msgs.into_iter()
            .filter_map(|m| a.apply(decode(&encode(&m).into()).unwrap()).unwrap())
            .collect()
    }

    fn events(c: &Committed) -> &[Event] {
        match c {
            Committed::Events { events, .. } => events,
            other => panic!("expected events, got {other:?}"),
        }
    }

    #[test]
    fn one_event_per_table_and_operation_with_typed_keys() {
        let mut a = Assembler::new("slot", 100);
        let out = feed(
            &mut a,
            vec![
                begin(7),
                users(),
                Message::Insert {
                    relation: USERS,
                    new: row("1", "ann"),
                },
                Message::Insert {
                    relation: USERS,
                    new: row("2", "bob"),
                },
                Message::Update {
                    relation: USERS,
                    old: Some((
                        OldKind::Key,
                        vec![Datum::Text(bytes::Bytes::from_static(b"3")), Datum::Null],
                    )),
                    new: row("30", "cy"),
                },
                Message::Delete {
                    relation: USERS,
                    old: (
                        OldKind::Key,
                        vec![Datum::Text(bytes::Bytes::from_static(b"1")), Datum::Null],
                    ),
                },
                commit(500),
            ],
        );
        assert_eq!(out.len(), 1);
        let ev = events(&out[0]);
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].operation, Operation::Insert);
        assert_eq!(
            ev[0].keys,
            Some(vec![RowKey::single("id", 1), RowKey::single("id", 2)])
        );
        // A changed key invalidates the new and the old row.
        assert_eq!(
            ev[1].keys,
            Some(vec![RowKey::single("id", 30), RowKey::single("id", 3)])
        );
        assert_eq!(ev[2].operation, Operation::Delete);
        for e in ev {
            assert_eq!(e.channel, "slot");
            assert_eq!(e.schema.as_deref(), Some("public"));
            assert_eq!(e.table, "users");
            assert_eq!(e.txid, Some(7));
            assert_eq!(e.lsn, Some(Lsn(500)));
            assert_eq!(e.sent_at, pg_timestamp(1_000_000));
        }
        assert!(!a.in_transaction());
    }

    #[test]
    fn keyless_tables_truncates_and_missing_keys_are_table_level() {
        let mut a = Assembler::new("slot", 100);
        let out = feed(
            &mut a,
            vec![
                begin(1),
                users(),
                keyless(),
                Message::Insert {
                    relation: LOG,
                    new: vec![Datum::Text(bytes::Bytes::from_static(b"x"))],
                },
                // An update whose new key is an unchanged TOAST value.
                Message::Update {
                    relation: USERS,
                    old: None,
                    new: vec![Datum::Unchanged, Datum::Null],
                },
                Message::Insert {
                    relation: USERS,
                    new: row("5", "e"),
                },
                Message::Truncate {
                    options: 0,
                    relations: vec![USERS, USERS],
                },
                commit(900),
            ],
        );
        let ev = events(&out[0]);
        let summary: Vec<_> = ev
            .iter()
            .map(|e| (e.table.as_str(), e.operation, e.keys.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("log", Operation::Insert, None),
                ("users", Operation::Update, None),
                (
                    "users",
                    Operation::Insert,
                    Some(vec![RowKey::single("id", 5)])
                ),
                ("users", Operation::Truncate, None),
            ]
        );
    }

    #[test]
    fn the_key_cap_degrades_a_table_and_frees_its_keys() {
        let mut a = Assembler::new("slot", 10);
        a.apply(begin(1)).unwrap();
        a.apply(users()).unwrap();
        for i in 0..1_000 {
            a.apply(Message::Insert {
                relation: USERS,
                new: row(&i.to_string(), "n"),
            })
            .unwrap();
            assert!(a.buffered_keys() <= 10);
        }
        assert_eq!(a.buffered_keys(), 0, "the degraded table's keys are freed");
        let out = a.apply(commit(64)).unwrap().unwrap();
        let Committed::Events {
            events, degraded, ..
        } = &out
        else {
            panic!("{out:?}")
        };
        assert_eq!(*degraded, 1);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].keys, None);
    }

    #[test]
    fn out_of_order_and_unreadable_messages_are_reported() {
        let mut a = Assembler::new("slot", 10);
        assert!(a.apply(commit(10)).is_err());
        assert!(a
            .apply(Message::Insert {
                relation: USERS,
                new: vec![]
            })
            .is_err());
        assert!(!a.unreadable("x".into()));
        a.apply(begin(1)).unwrap();
        // A change of a relation never described makes the transaction unreadable.
        a.apply(Message::Insert {
            relation: 99,
            new: vec![],
        })
        .unwrap();
        let out = a.apply(commit(20)).unwrap().unwrap();
        assert!(matches!(
            out,
            Committed::Unreadable {
                end_lsn: Lsn(20),
                ..
            }
        ));
        // An empty transaction (nothing published) commits with no events.
        a.apply(begin(2)).unwrap();
        let out = a.apply(commit(30)).unwrap().unwrap();
        assert!(events(&out).is_empty());
        assert_eq!(out.end_lsn(), Lsn(30));
    }

    #[test]
    fn values_and_timestamps() {
        assert_eq!(json_value(23, b"-42"), serde_json::json!(-42));
        assert_eq!(
            json_value(20, b"9223372036854775807"),
            serde_json::json!(i64::MAX)
        );
        assert_eq!(json_value(25, b"42"), serde_json::json!("42"));
        assert_eq!(json_value(2950, b"a-uuid"), serde_json::json!("a-uuid"));
        // As to_jsonb: numerics and floats are numbers, oid is not.
        assert_eq!(json_value(1700, b"7"), serde_json::json!(7));
        assert_eq!(json_value(1700, b"1.50"), serde_json::json!(1.5));
        assert_eq!(json_value(1700, b"NaN"), serde_json::json!("NaN"));
        assert_eq!(
            json_value(701, b"-Infinity"),
            serde_json::json!("-Infinity")
        );
        assert_eq!(json_value(26, b"26"), serde_json::json!("26"));
        assert_eq!(json_value(16, b"t"), serde_json::json!(true));
        assert_eq!(
            json_value(3802, br#"{"a": [1]}"#),
            serde_json::json!({"a": [1]})
        );
        assert_eq!(
            json_value(1114, b"2024-05-01 10:00:00.120"),
            serde_json::json!("2024-05-01T10:00:00.12")
        );
        assert_eq!(
            json_value(1184, b"2024-05-01 01:30:00+05:30"),
            serde_json::json!("2024-04-30T20:00:00+00:00")
        );
        assert_eq!(
            json_value(1184, b"2024-05-01 10:00:00.000001-01"),
            serde_json::json!("2024-05-01T11:00:00.000001+00:00")
        );
        assert_eq!(json_value(1184, b"infinity"), serde_json::json!("infinity"));
        assert_eq!(
            pg_timestamp(0).unwrap().to_rfc3339(),
            "2000-01-01T00:00:00+00:00"
        );
        assert_eq!(
            pg_timestamp(-1).unwrap().timestamp(),
            PG_EPOCH_UNIX_SECS - 1
        );
        assert!(pg_timestamp(i64::MAX).is_none());
    }
}
