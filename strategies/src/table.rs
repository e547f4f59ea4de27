//! Naming tables: [`IntoTableRef`] and [`TableFilter`].

use pgcachewatch_core::{Event, Operation, TableRef};

/// Anything that names a table: `"public.users"`, `"users"` (any schema), a
/// `(schema, table)` pair or a [`TableRef`].
///
/// A string is parsed like SQL, by the same rules as cache tags
/// ([`TableRef::parse`]): unquoted names fold to lower case (`"Users"` is `users`),
/// quoted ones keep their case and may contain dots (`r#""App"."a.b""#`); a name
/// without a schema names the table in any schema. Text that is not a valid name
/// is logged and taken literally as a table name. A pair is taken verbatim.
///
/// ```
/// use pgcachewatch::TableRef;
/// use pgcachewatch::strategies::IntoTableRef;
/// assert_eq!("public.Users".into_table_ref(), TableRef::new("public", "users"));
/// assert_eq!("users".into_table_ref(), TableRef::unqualified("users"));
/// assert_eq!(r#""App"."a.b""#.into_table_ref(), TableRef::new("App", "a.b"));
/// assert_eq!(("app", "a.b").into_table_ref(), TableRef::new("app", "a.b"));
/// ```
pub trait IntoTableRef {
    /// The table this names.
    fn into_table_ref(self) -> TableRef;
}

impl IntoTableRef for TableRef {
    fn into_table_ref(self) -> TableRef {
        self
    }
}

impl IntoTableRef for &TableRef {
    fn into_table_ref(self) -> TableRef {
        self.clone()
    }
}

impl IntoTableRef for &str {
    fn into_table_ref(self) -> TableRef {
        TableRef::parse(self).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "taking the table name literally");
            TableRef::unqualified(self)
        })
    }
}

impl IntoTableRef for String {
    fn into_table_ref(self) -> TableRef {
        self.as_str().into_table_ref()
    }
}

impl IntoTableRef for &String {
    fn into_table_ref(self) -> TableRef {
        self.as_str().into_table_ref()
    }
}

impl IntoTableRef for (&str, &str) {
    fn into_table_ref(self) -> TableRef {
        TableRef::new(self.0, self.1)
    }
}

/// Whether `event` concerns `table` (an unknown schema on either side matches any).
pub(crate) fn event_is_about(event: &Event, table: &TableRef) -> bool {
    event.is_about(table.schema.as_deref(), &table.table)
}

/// Selects events by table and operation: a predicate any strategy can use.
///
/// An empty table list matches every table, an empty operation list every
/// operation. Matching is conservative where the schema is unknown: `"users"`
/// matches `users` in any schema, and an event without a schema (PGCacheWatch's
/// payload) matches `"public.users"` and `"audit.users"` alike, because
/// invalidating too much is safe and too little is not.
///
/// Use it with [`Filter`](crate::Filter) to wrap any strategy, or as the predicate
/// of [`Greedy`](crate::Greedy), [`Windowed`](crate::Windowed) or
/// [`Timed`](crate::Timed):
///
/// ```
/// use std::time::Instant;
/// use pgcachewatch::{Decision, Event, InvalidationStrategy, Operation};
/// use pgcachewatch::strategies::{Greedy, TableFilter};
///
/// let writes_to_users = TableFilter::new()
///     .tables(["public.users"])
///     .operations([Operation::Update, Operation::Delete]);
/// assert!(writes_to_users.matches(&Event::new("ch", Operation::Delete, "public", "users")));
/// assert!(!writes_to_users.matches(&Event::new("ch", Operation::Insert, "public", "users")));
/// assert!(!writes_to_users.matches(&Event::new("ch", Operation::Delete, "public", "orders")));
///
/// let mut greedy = Greedy::with_predicate(writes_to_users.into_predicate());
/// let e = Event::new("ch", Operation::Update, "public", "users");
/// assert_eq!(InvalidationStrategy::<u32>::on_event(&mut greedy, &e, Instant::now()), Decision::All);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableFilter {
    tables: Vec<TableRef>,
    /// Bit `1 << op` set for each accepted operation; 0 accepts all.
    operations: u8,
}

fn op_bit(op: Operation) -> u8 {
    match op {
        Operation::Insert => 1,
        Operation::Update => 2,
        Operation::Delete => 4,
        Operation::Truncate => 8,
    }
}

impl TableFilter {
    /// A filter that matches every event.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also accepts these tables (see [`IntoTableRef`] for the accepted names).
    pub fn tables<T: IntoTableRef>(mut self, tables: impl IntoIterator<Item = T>) -> Self {
        self.tables
            .extend(tables.into_iter().map(IntoTableRef::into_table_ref));
        self
    }

    /// Also accepts these operations.
    pub fn operations(mut self, operations: impl IntoIterator<Item = Operation>) -> Self {
        for op in operations {
            self.operations |= op_bit(op);
        }
        self
    }

    /// Whether `event` passes the filter.
    #[inline]
    pub fn matches(&self, event: &Event) -> bool {
        (self.operations == 0 || self.operations & op_bit(event.operation) != 0)
            && (self.tables.is_empty() || self.tables.iter().any(|t| event_is_about(event, t)))
    }

    /// The filter as a closure, for strategies that take a predicate.
    pub fn into_predicate(self) -> impl Fn(&Event) -> bool + Send + Sync + Clone + 'static {
        move |event: &Event| self.matches(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(op: Operation, schema: Option<&str>, table: &str) -> Event {
        let mut e = Event::new("ch", op, "x", table);
        e.schema = schema.map(Into::into);
        e
    }

    #[test]
    fn empty_filter_matches_everything() {
        let f = TableFilter::new();
        for op in Operation::ALL {
            assert!(f.matches(&ev(op, Some("a"), "b")));
            assert!(f.matches(&ev(op, None, "b")));
        }
    }

    #[test]
    fn unqualified_names_match_any_schema_and_schemaless_events_match_any_name() {
        let f = TableFilter::new().tables(["users"]);
        assert!(f.matches(&ev(Operation::Insert, Some("public"), "users")));
        assert!(f.matches(&ev(Operation::Insert, Some("audit"), "users")));
        assert!(!f.matches(&ev(Operation::Insert, Some("public"), "orders")));

        let f = TableFilter::new().tables(["public.users"]);
        assert!(f.matches(&ev(Operation::Insert, None, "users")));
        assert!(!f.matches(&ev(Operation::Insert, Some("audit"), "users")));
    }

    #[test]
    fn operations_restrict() {
        let f = TableFilter::new().operations([Operation::Truncate]);
        assert!(f.matches(&ev(Operation::Truncate, None, "t")));
        assert!(!f.matches(&ev(Operation::Update, None, "t")));
    }
}
