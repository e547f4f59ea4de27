//! [`Keyed`]: row-level invalidation, from row keys to cache keys.

use std::fmt;
use std::time::Instant;

use pgcachewatch_core::{Decision, Event, InvalidationStrategy, Operation, RowKey, TableRef};

use crate::table::{event_is_about, IntoTableRef};

/// Appends the cache keys depending on one row to the output.
type Mapper<K> = Box<dyn Fn(&Event, &RowKey, &mut Vec<K>) + Send>;

/// What [`Keyed`] does with an event about a table it has no mapper for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OtherTables {
    /// Drop the entries depending on that table ([`Decision::tables`]); untagged
    /// entries depend on every table, so this is always safe. The default.
    #[default]
    Table,
    /// Keep everything: the cache depends on no other table. Wrong if it does.
    Ignore,
    /// Drop everything.
    All,
}

/// Row-level invalidation: maps the row keys an event carries to the cache keys
/// that depend on those rows, so an update of one row drops only the entries
/// built from it.
///
/// # Row keys need row-mode triggers
///
/// Events carry row keys only from triggers installed in row mode:
/// [`Installer::row_keys(true)`](https://docs.rs/pgcachewatch-backends/latest/pgcachewatch_backends/postgres/install/struct.Installer.html#method.row_keys)
/// in code, `pgcachewatch install TABLE --row-keys --commit` on the command line.
/// With the default table-level triggers every event is keyless, and `Keyed`
/// drops the whole table on each one: correct, but no better than
/// [`Greedy`](crate::Greedy). The table needs a primary key.
///
/// # Mappers
///
/// A mapper is `Fn(&Event, &RowKey) -> impl IntoIterator<Item = K>`, called once per
/// affected row. **It must return every key whose value depends on that row**,
/// including aggregate entries: a "list users" entry showing names depends on
/// every column of every user row, so every insert, update and delete of a user
/// must drop it. (Only a list that shows nothing an update can change, say just the
/// ids of an insert-only table, may skip updates; the mapper sees the event and its
/// operation for such cases.)
///
/// Mappers are given for every table ([`Keyed::new`]) or per table
/// ([`Keyed::per_table`] + [`table`](Keyed::table)); an event about a table without a
/// mapper is handled by [`OtherTables`] (default: drop that table's entries).
///
/// When an event carries **no keys** — a table-level trigger, PGCacheWatch's payload,
/// a statement whose keys did not fit in the 8000-byte payload — or is a `TRUNCATE`
/// (which removes rows it cannot list), `Keyed` drops the entries depending on the
/// whole table, [`Decision::tables([event.table_ref()])`](Decision::tables), rather
/// than [`Decision::All`]: it is exactly as safe (entries loaded without table tags
/// depend on every table and are dropped too) and keeps the entries tagged with
/// other tables. An event whose key list is empty touched no row and drops nothing.
///
/// ```text
/// users: update id=7      insert id=9         update (no keys)     orders: delete
/// drops: User(7), AllUsers User(9), AllUsers  table "users"        table "orders" (OtherTables::Table)
/// ```
///
/// Gaps answer [`Decision::All`] (the trait's default). `Keyed` holds no pending
/// state and never asks for a tick.
///
/// # Example
///
/// ```
/// use std::time::Instant;
/// use pgcachewatch::{Decision, Event, InvalidationStrategy, Operation, RowKey, TableRef};
/// use pgcachewatch::strategies::{Keyed, OtherTables};
///
/// // One cache for single users and the list of all users (with their names).
/// #[derive(Debug, Clone, PartialEq)]
/// enum Key { User(i64), AllUsers }
///
/// let mut keyed = Keyed::per_table()
///     .table("public.users", |_: &Event, row: &RowKey| {
///         let id = row.get("id").and_then(|v| v.as_i64());
///         // The list shows every user's name: any write to any user changes it.
///         id.map(Key::User).into_iter().chain([Key::AllUsers])
///     })
///     .other_tables(OtherTables::Ignore);
///
/// let now = Instant::now();
/// let update = Event::new("ch", Operation::Update, "public", "users")
///     .with_keys(vec![RowKey::single("id", 7)]);
/// assert_eq!(keyed.on_event(&update, now), Decision::keys([Key::User(7), Key::AllUsers]));
///
/// let insert = Event::new("ch", Operation::Insert, "public", "users")
///     .with_keys(vec![RowKey::single("id", 9)]);
/// assert_eq!(keyed.on_event(&insert, now), Decision::keys([Key::User(9), Key::AllUsers]));
///
/// // No keys in the payload: the whole table.
/// let no_keys = Event::new("ch", Operation::Update, "public", "users");
/// assert_eq!(keyed.on_event(&no_keys, now), Decision::tables([TableRef::new("public", "users")]));
///
/// // A table this cache does not depend on.
/// let orders = Event::new("ch", Operation::Delete, "public", "orders");
/// assert_eq!(keyed.on_event(&orders, now), Decision::Nothing);
/// ```
pub struct Keyed<K> {
    tables: Vec<(TableRef, Mapper<K>)>,
    every_table: Option<Mapper<K>>,
    other_tables: OtherTables,
}

fn boxed<K, F, I>(mapper: F) -> Mapper<K>
where
    F: Fn(&Event, &RowKey) -> I + Send + 'static,
    I: IntoIterator<Item = K>,
{
    Box::new(move |event, row, out| out.extend(mapper(event, row)))
}

impl<K: 'static> Keyed<K> {
    /// One mapper for the rows of every table.
    pub fn new<F, I>(mapper: F) -> Self
    where
        F: Fn(&Event, &RowKey) -> I + Send + 'static,
        I: IntoIterator<Item = K>,
    {
        Keyed {
            tables: Vec::new(),
            every_table: Some(boxed(mapper)),
            other_tables: OtherTables::default(),
        }
    }

    /// No mapper yet: add one per table with [`table`](Self::table).
    pub fn per_table() -> Self {
        Keyed {
            tables: Vec::new(),
            every_table: None,
            other_tables: OtherTables::default(),
        }
    }

    /// Maps the rows of `table` (`"schema.table"`, or `"table"` for any schema) with
    /// `mapper`. If several mappers match an event (an event without a schema, or
    /// overlapping names), all of them contribute keys. A mapper given here takes
    /// precedence over the one of [`Keyed::new`].
    pub fn table<F, I>(mut self, table: impl IntoTableRef, mapper: F) -> Self
    where
        F: Fn(&Event, &RowKey) -> I + Send + 'static,
        I: IntoIterator<Item = K>,
    {
        self.tables.push((table.into_table_ref(), boxed(mapper)));
        self
    }

    /// What to do with events about tables without a mapper (default
    /// [`OtherTables::Table`]). Irrelevant with [`Keyed::new`], which maps every table.
    pub fn other_tables(mut self, policy: OtherTables) -> Self {
        self.other_tables = policy;
        self
    }

    fn map_rows(&self, event: &Event, rows: &[RowKey], mapper: &Mapper<K>, out: &mut Vec<K>) {
        for row in rows {
            mapper(event, row, out);
        }
    }
}

impl<K> fmt::Debug for Keyed<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tables: Vec<String> = self.tables.iter().map(|(t, _)| t.to_string()).collect();
        f.debug_struct("Keyed")
            .field("tables", &tables)
            .field("every_table", &self.every_table.is_some())
            .field("other_tables", &self.other_tables)
            .finish()
    }
}

impl<K: Send + 'static> InvalidationStrategy<K> for Keyed<K> {
    fn on_event(&mut self, event: &Event, _now: Instant) -> Decision<K> {
        let mut mappers = self
            .tables
            .iter()
            .filter(|(t, _)| event_is_about(event, t))
            .map(|(_, m)| m)
            .peekable();
        let known = mappers.peek().is_some() || self.every_table.is_some();
        if !known {
            return match self.other_tables {
                OtherTables::Table => Decision::tables([event.table_ref()]),
                OtherTables::Ignore => Decision::Nothing,
                OtherTables::All => Decision::All,
            };
        }
        let rows = match &event.keys {
            Some(rows) if event.operation != Operation::Truncate => rows,
            _ => return Decision::tables([event.table_ref()]),
        };
        let mut keys = Vec::new();
        let mut any_specific = false;
        for mapper in mappers {
            any_specific = true;
            self.map_rows(event, rows, mapper, &mut keys);
        }
        if !any_specific {
            if let Some(mapper) = &self.every_table {
                self.map_rows(event, rows, mapper, &mut keys);
            }
        }
        Decision::keys(keys)
    }

    fn reads_clock(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgcachewatch_core::GapReason;

    fn ev(op: Operation, table: &str, ids: Option<&[i64]>) -> Event {
        let e = Event::new("ch", op, "public", table);
        match ids {
            Some(ids) => e.with_keys(ids.iter().map(|&id| RowKey::single("id", id)).collect()),
            None => e,
        }
    }

    fn id(row: &RowKey) -> Option<i64> {
        row.get("id").and_then(|v| v.as_i64())
    }

    #[test]
    fn maps_each_row_to_its_keys() {
        let mut k = Keyed::new(|_: &Event, row: &RowKey| id(row));
        let d = k.on_event(
            &ev(Operation::Update, "users", Some(&[1, 2])),
            Instant::now(),
        );
        assert_eq!(d, Decision::keys([1, 2]));
    }

    #[test]
    fn falls_back_to_the_table_without_keys_or_on_truncate() {
        let mut k = Keyed::new(|_: &Event, row: &RowKey| id(row));
        let table = Decision::tables([TableRef::new("public", "users")]);
        let now = Instant::now();
        assert_eq!(
            k.on_event(&ev(Operation::Update, "users", None), now),
            table
        );
        assert_eq!(
            k.on_event(&ev(Operation::Truncate, "users", Some(&[1])), now),
            table
        );
    }

    #[test]
    fn an_empty_key_list_drops_nothing() {
        let mut k = Keyed::new(|_: &Event, row: &RowKey| id(row));
        let d = k.on_event(&ev(Operation::Delete, "users", Some(&[])), Instant::now());
        assert_eq!(d, Decision::Nothing);
    }

    #[test]
    fn per_table_mappers_and_other_tables_policy() {
        let now = Instant::now();
        let build = |policy| {
            Keyed::per_table()
                .table("public.users", |_: &Event, row: &RowKey| id(row))
                .table("orders", |_: &Event, row: &RowKey| {
                    id(row).map(|i| i + 1000)
                })
                .other_tables(policy)
        };
        let mut k = build(OtherTables::Table);
        assert_eq!(
            k.on_event(&ev(Operation::Insert, "users", Some(&[3])), now),
            Decision::keys([3])
        );
        assert_eq!(
            k.on_event(&ev(Operation::Insert, "orders", Some(&[3])), now),
            Decision::keys([1003])
        );
        assert_eq!(
            k.on_event(&ev(Operation::Insert, "audit", Some(&[3])), now),
            Decision::tables([TableRef::new("public", "audit")])
        );
        let mut k = build(OtherTables::Ignore);
        assert_eq!(
            k.on_event(&ev(Operation::Insert, "audit", Some(&[3])), now),
            Decision::Nothing
        );
        let mut k = build(OtherTables::All);
        assert_eq!(
            k.on_event(&ev(Operation::Insert, "audit", None), now),
            Decision::All
        );
    }

    #[test]
    fn a_specific_mapper_overrides_the_general_one() {
        let mut k = Keyed::new(|_: &Event, row: &RowKey| id(row))
            .table("public.users", |_: &Event, row: &RowKey| {
                id(row).map(|i| -i)
            });
        let now = Instant::now();
        assert_eq!(
            k.on_event(&ev(Operation::Update, "users", Some(&[5])), now),
            Decision::keys([-5])
        );
        assert_eq!(
            k.on_event(&ev(Operation::Update, "orders", Some(&[5])), now),
            Decision::keys([5])
        );
    }

    #[test]
    fn gap_drops_everything() {
        let mut k = Keyed::new(|_: &Event, row: &RowKey| id(row));
        assert_eq!(
            k.on_gap(&GapReason::Reconnected, Instant::now()),
            Decision::All
        );
        assert_eq!(InvalidationStrategy::<i64>::next_deadline(&k), None);
    }
}
