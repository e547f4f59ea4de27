//! The transaction assembler: decoded pgoutput [`Message`]s in, [`Event`]s out at
//! each commit. No I/O.
//!
//! It buffers one transaction at a time. At `Commit` it hands out, per (table,
//! operation) in order of first appearance, one [`Event`] carrying the replica
//! identity (normally the primary key) of every changed row as a [`RowKey`]
//! (`{"column": value}`, the shape pgcachewatch's row-level triggers send).
//! Memory is bounded: past the per-transaction key cap, the table receiving the
//! next key degrades to a table-level event (keys `None`) and its keys are freed.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use pgcachewatch_core::{Event, Lsn, Name, Operation, RowKey};

use super::pgoutput::{Begin, Commit, Datum, Message, Relation, Tuple};

/// PostgreSQL's epoch (2000-01-01 UTC) in Unix seconds.
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// Type OIDs whose text form becomes a JSON number: int2, int4, int8, oid.
const INT_TYPES: [u32; 4] = [21, 23, 20, 26];

/// What a commit produced.
#[derive(Debug)]
pub(crate) enum Committed {
    /// The transaction's events (possibly none: it touched no published table).
    Events {
        /// The end of the commit record.
        end_lsn: Lsn,
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
}

#[derive(Debug)]
struct Transaction {
    begin: Begin,
    changes: Vec<Change>,
    index: HashMap<(u32, Operation), usize>,
    /// Keys buffered, all tables together.
    keys: usize,
    degraded: usize,
    unreadable: Option<String>,
}

/// A relation as the stream described it, plus what keys need.
#[derive(Debug)]
struct Table {
    /// Shared by every event of the table (no copy per event).
    schema: Name,
    name: Name,
    /// (column index, name, type oid) of the replica-identity columns.
    key_columns: Vec<(usize, String, u32)>,
}

/// Buffers one transaction; see the module docs.
#[derive(Debug)]
pub(crate) struct Assembler {
    channel: Name,
    key_cap: usize,
    tables: HashMap<u32, Table>,
    tx: Option<Transaction>,
    /// `schema.table` of keyless tables already warned about.
    warned: HashSet<String>,
}

impl Assembler {
    /// Events are stamped with `channel` (the slot name); a transaction holds at
    /// most `key_cap` keys.
    pub(crate) fn new(channel: impl Into<Name>, key_cap: usize) -> Self {
        Assembler {
            channel: channel.into(),
            key_cap,
            tables: HashMap::new(),
            tx: None,
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
                self.tx = Some(Transaction {
                    begin,
                    changes: Vec::new(),
                    index: HashMap::new(),
                    keys: 0,
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

    fn relation(&mut self, rel: Relation) {
        let key_columns: Vec<(usize, String, u32)> = rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key())
            .map(|(i, c)| (i, c.name.clone(), c.type_oid))
            .collect();
        let qualified = format!("{}.{}", rel.namespace, rel.name);
        if key_columns.is_empty() && self.warned.insert(qualified.clone()) {
            tracing::warn!(
                table = %qualified,
                replica_identity = %char::from(rel.replica_identity),
                "table has no replica identity columns (no primary key, or REPLICA IDENTITY \
                 NOTHING): its changes invalidate the whole table; add a primary key or set \
                 REPLICA IDENTITY USING INDEX for row-level events"
            );
        }
        self.tables.insert(
            rel.id,
            Table {
                schema: rel.namespace.into(),
                name: rel.name.into(),
                key_columns,
            },
        );
    }

    /// Records a row change: the keys of `tuples` (the new row, and the old one
    /// when sent, so a changed key invalidates both).
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
        let mut table_level = table.key_columns.is_empty();
        for (slot, tuple) in keys.iter_mut().zip(tuples) {
            if let Some(tuple) = tuple {
                match row_key(table, tuple) {
                    Some(key) => *slot = Some(key),
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
            });
            tx.changes.len() - 1
        });
        let change = &mut tx.changes[at];
        let Some(list) = &mut change.keys else {
            return Ok(None);
        };
        let new_keys = keys.into_iter().flatten().filter(|_| !table_level);
        for key in new_keys {
            if list.last() == Some(&key) {
                continue;
            }
            if tx.keys >= key_cap {
                table_level = true;
                tx.degraded += 1;
                break;
            }
            list.push(key);
            tx.keys += 1;
        }
        if table_level {
            let freed = list.len();
            tx.keys -= freed;
            change.keys = None;
        }
        Ok(None)
    }

    fn commit(&mut self, tx: Transaction, commit: &Commit) -> Committed {
        if let Some(detail) = tx.unreadable {
            return Committed::Unreadable {
                end_lsn: commit.end_lsn,
                detail,
            };
        }
        let received_at = Utc::now();
        let sent_at = pg_timestamp(commit.commit_time);
        let events = tx
            .changes
            .into_iter()
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
        Committed::Events {
            end_lsn: commit.end_lsn,
            events,
            degraded: tx.degraded,
        }
    }
}

/// The replica-identity values of `tuple`; `None` if one is missing (NULL,
/// unchanged TOAST, binary) or the table has no key.
fn row_key(table: &Table, tuple: &Tuple) -> Option<RowKey> {
    if table.key_columns.is_empty() {
        return None;
    }
    let mut map = serde_json::Map::with_capacity(table.key_columns.len());
    for (index, name, type_oid) in &table.key_columns {
        let Some(Datum::Text(text)) = tuple.get(*index) else {
            return None;
        };
        map.insert(name.clone(), json_value(*type_oid, text));
    }
    Some(RowKey(map))
}

/// A column's text form as JSON: integers as numbers, anything else as a string.
pub(crate) fn json_value(type_oid: u32, text: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(text);
    if INT_TYPES.contains(&type_oid) {
        if let Ok(n) = text.parse::<i64>() {
            return serde_json::Value::from(n);
        }
    }
    serde_json::Value::String(text.into_owned())
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
            Datum::Text(id.as_bytes().to_vec()),
            Datum::Text(name.as_bytes().to_vec()),
        ]
    }

    /// Feeds messages through the encoder and decoder too, as the stream would.
    fn feed(a: &mut Assembler, msgs: Vec<Message>) -> Vec<Committed> {
        msgs.into_iter()
            .filter_map(|m| a.apply(decode(&encode(&m)).unwrap()).unwrap())
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
                    old: Some((OldKind::Key, vec![Datum::Text(b"3".to_vec()), Datum::Null])),
                    new: row("30", "cy"),
                },
                Message::Delete {
                    relation: USERS,
                    old: (OldKind::Key, vec![Datum::Text(b"1".to_vec()), Datum::Null]),
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
                    new: vec![Datum::Text(b"x".to_vec())],
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
