//! The pgoutput logical-replication protocol, version 1: bytes in, [`Message`]s
//! out. No I/O, no allocation sized by untrusted counts, never a panic: anything
//! malformed is a [`DecodeError`].
//!
//! Reference: PostgreSQL's "Logical Replication Message Formats". Version 1 sends
//! whole transactions only (no streaming), so the stream-related messages of later
//! versions are reported as [`Message::Other`], like any tag this decoder does not
//! need.

use bytes::Bytes;
use pgcachewatch_core::Lsn;

/// Why a pgoutput message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum DecodeError {
    /// The message is empty: not even a tag.
    #[error("empty pgoutput message")]
    Empty,
    /// The message ended in the middle of a field.
    #[error("pgoutput message {tag:?} truncated while reading {what}")]
    Truncated {
        /// The message's tag.
        tag: char,
        /// The field being read.
        what: &'static str,
    },
    /// A string was not NUL-terminated UTF-8.
    #[error("pgoutput message {tag:?}: {what} is not NUL-terminated UTF-8")]
    BadString {
        /// The message's tag.
        tag: char,
        /// The field being read.
        what: &'static str,
    },
    /// A byte that selects a variant had an unknown value.
    #[error("pgoutput message {tag:?}: unexpected byte {byte:#04x} for {what}")]
    Unexpected {
        /// The message's tag.
        tag: char,
        /// The field being read.
        what: &'static str,
        /// The byte found.
        byte: u8,
    },
    /// A count was negative.
    #[error("pgoutput message {tag:?}: negative {what}")]
    Negative {
        /// The message's tag.
        tag: char,
        /// The field being read.
        what: &'static str,
    },
}

/// `B`: a transaction starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Begin {
    /// The commit record's LSN (where the transaction's commit starts).
    pub(crate) final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub(crate) commit_time: i64,
    /// The transaction id.
    pub(crate) xid: u32,
}

/// `C`: the transaction committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Commit {
    /// Flags (unused, 0).
    pub(crate) flags: u8,
    /// The commit record's LSN.
    pub(crate) commit_lsn: Lsn,
    /// The end of the commit record: what a consumer confirms.
    pub(crate) end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub(crate) commit_time: i64,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Column {
    /// Bit 1: part of the replica identity (the key).
    pub(crate) flags: u8,
    pub(crate) name: String,
    pub(crate) type_oid: u32,
    pub(crate) type_modifier: i32,
}

impl Column {
    /// Whether this column is part of the replica identity.
    pub(crate) fn is_key(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// `R`: a table's description, sent before its first change in a session and
/// after it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Relation {
    pub(crate) id: u32,
    pub(crate) namespace: String,
    pub(crate) name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub(crate) replica_identity: u8,
    pub(crate) columns: Vec<Column>,
}

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Datum {
    /// `n`: NULL.
    Null,
    /// `u`: an unchanged TOASTed value, not sent.
    Unchanged,
    /// `t`: the value in text format (a view of the message's bytes: no copy).
    Text(Bytes),
    /// `b`: the value in binary format (only with the `binary` option).
    Binary(Bytes),
}

/// A row's column values, in the relation's column order.
pub(crate) type Tuple = Vec<Datum>;

/// Which old row an update or delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OldKind {
    /// `K`: only the replica-identity columns (the others are NULL).
    Key,
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Full,
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    Begin(Begin),
    Commit(Commit),
    /// `O`: the transaction came from another origin.
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    /// `Y`: a user-defined type's name.
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        old: Option<(OldKind, Tuple)>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: (OldKind, Tuple),
    },
    Truncate {
        /// Bit 1: CASCADE; bit 2: RESTART IDENTITY.
        options: u8,
        relations: Vec<u32>,
    },
    /// `M`: `pg_logical_emit_message`.
    Logical {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
    /// A message this decoder does not need (by tag).
    Other(u8),
}

/// Decodes one pgoutput message (the payload of one `XLogData`). Column values
/// are views of `bytes`, not copies.
pub(crate) fn decode(bytes: &Bytes) -> Result<Message, DecodeError> {
    let (&tag, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader {
        tag: char::from(tag),
        message: bytes,
        bytes: rest,
    };
    let msg = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: Lsn(r.u64("final LSN")?),
            commit_time: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: Lsn(r.u64("commit LSN")?),
            end_lsn: Lsn(r.u64("end LSN")?),
            commit_time: r.i64("commit timestamp")?,
        }),
        b'O' => Message::Origin {
            commit_lsn: Lsn(r.u64("origin commit LSN")?),
            name: r.string("origin name")?,
        },
        b'R' => {
            let id = r.u32("relation id")?;
            let namespace = r.string("namespace")?;
            let name = r.string("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let count = r.count("column count")?;
            // Each column takes at least 10 bytes: never reserve more than could follow.
            let mut columns = Vec::with_capacity(count.min(r.bytes.len() / 10));
            for _ in 0..count {
                columns.push(Column {
                    flags: r.u8("column flags")?,
                    name: r.string("column name")?,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("column type modifier")?,
                });
            }
            Message::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            oid: r.u32("type oid")?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        },
        b'I' => {
            let relation = r.u32("relation id")?;
            r.expect(b'N', "new tuple marker")?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32("relation id")?;
            let old = match r.u8("tuple marker")? {
                b'N' => None,
                marker => {
                    let kind = old_kind(&r, marker)?;
                    let tuple = r.tuple()?;
                    r.expect(b'N', "new tuple marker")?;
                    Some((kind, tuple))
                }
            };
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32("relation id")?;
            let marker = r.u8("old tuple marker")?;
            let kind = old_kind(&r, marker)?;
            Message::Delete {
                relation,
                old: (kind, r.tuple()?),
            }
        }
        b'T' => {
            let count = r.u32("relation count")? as usize;
            let options = r.u8("truncate options")?;
            let mut relations = Vec::with_capacity(count.min(r.bytes.len() / 4));
            for _ in 0..count {
                relations.push(r.u32("truncated relation id")?);
            }
            Message::Truncate { options, relations }
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            let lsn = Lsn(r.u64("message LSN")?);
            let prefix = r.string("message prefix")?;
            let len = r.u32("message length")? as usize;
            let content = r.take(len, "message content")?.to_vec();
            Message::Logical {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content,
            }
        }
        other => Message::Other(other),
    };
    Ok(msg)
}

fn old_kind(r: &Reader<'_>, marker: u8) -> Result<OldKind, DecodeError> {
    match marker {
        b'K' => Ok(OldKind::Key),
        b'O' => Ok(OldKind::Full),
        byte => Err(DecodeError::Unexpected {
            tag: r.tag,
            what: "old tuple marker (K or O)",
            byte,
        }),
    }
}

/// A cursor over one message; every read is bounds-checked.
struct Reader<'a> {
    tag: char,
    /// The whole message, which column values are views of.
    message: &'a Bytes,
    /// What is left to read of it.
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated {
                tag: self.tag,
                what,
            });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    /// An Int16 count that must not be negative.
    fn count(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = i16::from_be_bytes(self.array(what)?);
        usize::try_from(n).map_err(|_| DecodeError::Negative {
            tag: self.tag,
            what,
        })
    }

    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), DecodeError> {
        match self.u8(what)? {
            b if b == byte => Ok(()),
            b => Err(DecodeError::Unexpected {
                tag: self.tag,
                what,
                byte: b,
            }),
        }
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let bad = DecodeError::BadString {
            tag: self.tag,
            what,
        };
        let end = self.bytes.iter().position(|&b| b == 0).ok_or(bad.clone())?;
        let s = std::str::from_utf8(&self.bytes[..end]).map_err(|_| bad)?;
        let s = s.to_owned();
        self.bytes = &self.bytes[end + 1..];
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.count("tuple column count")?;
        // Each column takes at least one byte.
        let mut tuple = Vec::with_capacity(count.min(self.bytes.len()));
        for _ in 0..count {
            let datum = match self.u8("column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                kind @ (b't' | b'b') => {
                    let len = self.i32("column length")?;
                    let len = usize::try_from(len).map_err(|_| DecodeError::Negative {
                        tag: self.tag,
                        what: "column length",
                    })?;
                    let value = self.message.slice_ref(self.take(len, "column value")?);
                    if kind == b't' {
                        Datum::Text(value)
                    } else {
                        Datum::Binary(value)
                    }
                }
                byte => {
                    return Err(DecodeError::Unexpected {
                        tag: self.tag,
                        what: "column kind (n, u, t or b)",
                        byte,
                    })
                }
            };
            tuple.push(datum);
        }
        Ok(tuple)
    }
}

/// An encoder for tests: the inverse of [`decode`].
#[cfg(test)]
pub(crate) mod encode {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    fn tuple(out: &mut Vec<u8>, t: &Tuple) {
        out.extend_from_slice(&(t.len() as i16).to_be_bytes());
        for d in t {
            match d {
                Datum::Null => out.push(b'n'),
                Datum::Unchanged => out.push(b'u'),
                Datum::Text(v) | Datum::Binary(v) => {
                    out.push(if matches!(d, Datum::Text(_)) {
                        b't'
                    } else {
                        b'b'
                    });
                    out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    out.extend_from_slice(v);
                }
            }
        }
    }

    fn old(out: &mut Vec<u8>, kind: OldKind, t: &Tuple) {
        out.push(match kind {
            OldKind::Key => b'K',
            OldKind::Full => b'O',
        });
        tuple(out, t);
    }

    /// Encodes `msg` as the server would.
    pub(crate) fn encode(msg: &Message) -> Vec<u8> {
        let mut o = Vec::new();
        match msg {
            Message::Begin(b) => {
                o.push(b'B');
                o.extend_from_slice(&b.final_lsn.0.to_be_bytes());
                o.extend_from_slice(&b.commit_time.to_be_bytes());
                o.extend_from_slice(&b.xid.to_be_bytes());
            }
            Message::Commit(c) => {
                o.push(b'C');
                o.push(c.flags);
                o.extend_from_slice(&c.commit_lsn.0.to_be_bytes());
                o.extend_from_slice(&c.end_lsn.0.to_be_bytes());
                o.extend_from_slice(&c.commit_time.to_be_bytes());
            }
            Message::Origin { commit_lsn, name } => {
                o.push(b'O');
                o.extend_from_slice(&commit_lsn.0.to_be_bytes());
                string(&mut o, name);
            }
            Message::Relation(r) => {
                o.push(b'R');
                o.extend_from_slice(&r.id.to_be_bytes());
                string(&mut o, &r.namespace);
                string(&mut o, &r.name);
                o.push(r.replica_identity);
                o.extend_from_slice(&(r.columns.len() as i16).to_be_bytes());
                for c in &r.columns {
                    o.push(c.flags);
                    string(&mut o, &c.name);
                    o.extend_from_slice(&c.type_oid.to_be_bytes());
                    o.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            Message::Type {
                oid,
                namespace,
                name,
            } => {
                o.push(b'Y');
                o.extend_from_slice(&oid.to_be_bytes());
                string(&mut o, namespace);
                string(&mut o, name);
            }
            Message::Insert { relation, new } => {
                o.push(b'I');
                o.extend_from_slice(&relation.to_be_bytes());
                o.push(b'N');
                tuple(&mut o, new);
            }
            Message::Update {
                relation,
                old: o2,
                new,
            } => {
                o.push(b'U');
                o.extend_from_slice(&relation.to_be_bytes());
                if let Some((kind, t)) = o2 {
                    old(&mut o, *kind, t);
                }
                o.push(b'N');
                tuple(&mut o, new);
            }
            Message::Delete {
                relation,
                old: (kind, t),
            } => {
                o.push(b'D');
                o.extend_from_slice(&relation.to_be_bytes());
                old(&mut o, *kind, t);
            }
            Message::Truncate { options, relations } => {
                o.push(b'T');
                o.extend_from_slice(&(relations.len() as u32).to_be_bytes());
                o.push(*options);
                for r in relations {
                    o.extend_from_slice(&r.to_be_bytes());
                }
            }
            Message::Logical {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                o.push(b'M');
                o.push(u8::from(*transactional));
                o.extend_from_slice(&lsn.0.to_be_bytes());
                string(&mut o, prefix);
                o.extend_from_slice(&(content.len() as u32).to_be_bytes());
                o.extend_from_slice(content);
            }
            Message::Other(tag) => o.push(*tag),
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::encode::encode;
    use super::*;
    use proptest::prelude::*;

    /// [`decode`] of a copy of `bytes`.
    fn decode_slice(bytes: &[u8]) -> Result<Message, DecodeError> {
        decode(&Bytes::copy_from_slice(bytes))
    }

    #[test]
    fn decodes_what_postgresql_sends() {
        // BEGIN of xid 0x2A, final LSN 0/16B3748, commit time 1.
        let mut begin = vec![b'B'];
        begin.extend_from_slice(&0x16B_3748u64.to_be_bytes());
        begin.extend_from_slice(&1i64.to_be_bytes());
        begin.extend_from_slice(&42u32.to_be_bytes());
        assert_eq!(
            decode_slice(&begin).unwrap(),
            Message::Begin(Begin {
                final_lsn: Lsn(0x16B_3748),
                commit_time: 1,
                xid: 42
            })
        );
        // INSERT into relation 16384 of (1, NULL, unchanged-toast).
        let insert = [
            b'I', 0, 0, 0x40, 0, b'N', 0, 3, b't', 0, 0, 0, 1, b'1', b'n', b'u',
        ];
        assert_eq!(
            decode_slice(&insert).unwrap(),
            Message::Insert {
                relation: 16384,
                new: vec![
                    Datum::Text(Bytes::from_static(b"1")),
                    Datum::Null,
                    Datum::Unchanged
                ]
            }
        );
        // An update with no old tuple.
        let update = [b'U', 0, 0, 0, 7, b'N', 0, 1, b'n'];
        assert!(matches!(
            decode_slice(&update).unwrap(),
            Message::Update {
                relation: 7,
                old: None,
                ..
            }
        ));
        assert_eq!(decode_slice(b"S\x00\x00").unwrap(), Message::Other(b'S'));
    }

    #[test]
    fn malformed_bytes_are_errors() {
        assert_eq!(decode_slice(b""), Err(DecodeError::Empty));
        assert!(matches!(
            decode_slice(b"B\x00"),
            Err(DecodeError::Truncated { tag: 'B', .. })
        ));
        // A relation name without its NUL.
        assert!(matches!(
            decode_slice(b"R\x00\x00\x00\x01public\x00users"),
            Err(DecodeError::BadString { .. })
        ));
        // A negative column count.
        assert!(matches!(
            decode_slice(b"I\x00\x00\x00\x01N\xff\xff"),
            Err(DecodeError::Negative { .. })
        ));
        // An unknown column kind.
        assert!(matches!(
            decode_slice(b"I\x00\x00\x00\x01N\x00\x01x"),
            Err(DecodeError::Unexpected { byte: b'x', .. })
        ));
        // A column claiming 2 GB.
        assert!(matches!(
            decode_slice(b"I\x00\x00\x00\x01N\x00\x01t\x7f\xff\xff\xff"),
            Err(DecodeError::Truncated { .. })
        ));
        // A delete whose old-tuple marker is N.
        assert!(matches!(
            decode_slice(b"D\x00\x00\x00\x01N\x00\x00"),
            Err(DecodeError::Unexpected { .. })
        ));
    }

    fn datum() -> impl Strategy<Value = Datum> {
        prop_oneof![
            Just(Datum::Null),
            Just(Datum::Unchanged),
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(|v| Datum::Text(v.into())),
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(|v| Datum::Binary(v.into())),
        ]
    }

    fn tuple() -> impl Strategy<Value = Tuple> {
        proptest::collection::vec(datum(), 0..6)
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_ é\"']{0,12}"
    }

    fn old() -> impl Strategy<Value = (OldKind, Tuple)> {
        (
            prop_oneof![Just(OldKind::Key), Just(OldKind::Full)],
            tuple(),
        )
    }

    fn message() -> impl Strategy<Value = Message> {
        let lsn = any::<u64>().prop_map(Lsn);
        prop_oneof![
            (lsn.clone(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
                Message::Begin(Begin {
                    final_lsn,
                    commit_time,
                    xid,
                })
            }),
            (any::<u8>(), lsn.clone(), lsn.clone(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_time)| Message::Commit(Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time
                })
            ),
            (lsn.clone(), name())
                .prop_map(|(commit_lsn, name)| Message::Origin { commit_lsn, name }),
            (
                any::<u32>(),
                name(),
                name(),
                any::<u8>(),
                proptest::collection::vec((any::<u8>(), name(), any::<u32>(), any::<i32>()), 0..5)
            )
                .prop_map(|(id, namespace, name, replica_identity, cols)| {
                    Message::Relation(Relation {
                        id,
                        namespace,
                        name,
                        replica_identity,
                        columns: cols
                            .into_iter()
                            .map(|(flags, name, type_oid, type_modifier)| Column {
                                flags,
                                name,
                                type_oid,
                                type_modifier,
                            })
                            .collect(),
                    })
                }),
            (any::<u32>(), name(), name()).prop_map(|(oid, namespace, name)| Message::Type {
                oid,
                namespace,
                name
            }),
            (any::<u32>(), tuple()).prop_map(|(relation, new)| Message::Insert { relation, new }),
            (any::<u32>(), proptest::option::of(old()), tuple())
                .prop_map(|(relation, old, new)| Message::Update { relation, old, new }),
            (any::<u32>(), old()).prop_map(|(relation, old)| Message::Delete { relation, old }),
            (any::<u8>(), proptest::collection::vec(any::<u32>(), 0..6))
                .prop_map(|(options, relations)| Message::Truncate { options, relations }),
            (
                any::<bool>(),
                lsn,
                name(),
                proptest::collection::vec(any::<u8>(), 0..16)
            )
                .prop_map(|(transactional, lsn, prefix, content)| Message::Logical {
                    transactional,
                    lsn,
                    prefix,
                    content
                }),
            prop_oneof![Just(b'S'), Just(b'E'), Just(b'c'), Just(b'A'), Just(b'P')]
                .prop_map(Message::Other),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_slice(&bytes);
        }

        #[test]
        fn known_tags_with_arbitrary_bodies_never_panic(
            tag in prop_oneof![Just(b'B'), Just(b'C'), Just(b'O'), Just(b'R'), Just(b'Y'),
                               Just(b'I'), Just(b'U'), Just(b'D'), Just(b'T'), Just(b'M')],
            body in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut bytes = vec![tag];
            bytes.extend(body);
            let _ = decode_slice(&bytes);
        }

        #[test]
        fn encoded_messages_round_trip(msg in message()) {
            let bytes = encode(&msg);
            prop_assert_eq!(decode_slice(&bytes), Ok(msg));
        }

        #[test]
        fn every_truncation_is_an_error_not_a_panic(msg in message(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&msg);
            let cut = cut.index(bytes.len().max(1));
            if cut < bytes.len() && !matches!(msg, Message::Other(_)) {
                prop_assert!(decode_slice(&bytes[..cut]).is_err());
            }
        }
    }
}
