//! What the catalog says about the relations a query names: the facts
//! [`derive`](crate::derive()) needs, read from a server by
//! [`resolve`](crate::resolve) or given by hand.

use std::fmt;

use pgcachewatch_core::TableRef;
use serde_json::Value;

use crate::analyze::RelationName;
use crate::pins::{Literal, TypeName};

/// The type of a primary-key column, as far as row-level matching is concerned.
///
/// Row-level invalidation compares the values of the query's pins with the key
/// values events carry (`to_jsonb` of the row's key). That is exact only where
/// PostgreSQL's `=` on the type is equality of the values as JSON carries them:
/// the integers, `text`/`varchar` under a deterministic collation, `uuid`,
/// `bool`. Other key types (`numeric`: `1.0 = 1.00`; `char(n)`: trailing blanks;
/// `citext`; floats; time stamps written in a session's zone; a nondeterministic
/// collation) make the query table-level.
///
/// ```
/// use pgcachewatch_query::{KeyType, KeyValue};
/// use serde_json::json;
/// assert_eq!(KeyType::Int.value(&json!("7")), Some(KeyValue::Int(7)));
/// assert_eq!(
///     KeyType::Uuid.value(&json!("{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}")),
///     KeyType::Uuid.value(&json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
/// );
/// assert_eq!(KeyType::Text.value(&json!(7)), None); // not comparable: matches anything
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyType {
    /// `int2`, `int4`, `int8`.
    Int,
    /// `text`, `varchar` with a deterministic collation.
    Text,
    /// `uuid`.
    Uuid,
    /// `bool`.
    Bool,
}

/// A key value in the form pins and event keys are compared in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyValue {
    /// An integer.
    Int(i64),
    /// A string, byte for byte.
    Text(String),
    /// A UUID, as 32 lower-case hex digits.
    Uuid(String),
    /// A boolean.
    Bool(bool),
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyType::Int => "integer",
            KeyType::Text => "text",
            KeyType::Uuid => "uuid",
            KeyType::Bool => "bool",
        })
    }
}

impl KeyType {
    /// The key type of a built-in type name (`int8`, `pg_catalog.varchar`, …),
    /// `None` for any other.
    pub fn of_type_name(name: &TypeName) -> Option<KeyType> {
        if name.schema.as_deref().is_some_and(|s| s != "pg_catalog") {
            return None;
        }
        Some(match name.name.as_str() {
            "int2" | "int4" | "int8" => KeyType::Int,
            "text" | "varchar" => KeyType::Text,
            "uuid" => KeyType::Uuid,
            "bool" => KeyType::Bool,
            _ => return None,
        })
    }

    /// The key type of a column of PostgreSQL type `oid`, `None` when its `=` is
    /// not compared exactly here. `deterministic` is the collation's
    /// `collisdeterministic` (true for non-collatable types).
    pub fn of_type_oid(oid: u32, deterministic: bool) -> Option<KeyType> {
        match oid {
            20 | 21 | 23 => Some(KeyType::Int),
            25 | 1043 if deterministic => Some(KeyType::Text),
            2950 => Some(KeyType::Uuid),
            16 => Some(KeyType::Bool),
            _ => None,
        }
    }

    /// A JSON value (a parameter, or an event's key value) as a value of this
    /// type; `None` when it is not one (the caller then assumes it matches).
    pub fn value(self, value: &Value) -> Option<KeyValue> {
        match (self, value) {
            (KeyType::Int, Value::Number(n)) => n
                .as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18)
                        .map(|f| f as i64)
                })
                .map(KeyValue::Int),
            (KeyType::Int, Value::String(s)) => s.trim().parse().ok().map(KeyValue::Int),
            (KeyType::Text, Value::String(s)) => Some(KeyValue::Text(s.clone())),
            (KeyType::Uuid, Value::String(s)) => uuid(s).map(KeyValue::Uuid),
            (KeyType::Bool, Value::Bool(b)) => Some(KeyValue::Bool(*b)),
            (KeyType::Bool, Value::String(s)) => boolean(s).map(KeyValue::Bool),
            _ => None,
        }
    }

    /// A literal of the query as a value of this type: `Some(None)` when it
    /// equals no value of the type (`7.5` for an integer column), `None` when it
    /// cannot be told (the caller then assumes it matches).
    pub(crate) fn literal(self, literal: &Literal) -> Option<Option<KeyValue>> {
        match (self, literal) {
            (KeyType::Int, Literal::Integer(i)) => Some(Some(KeyValue::Int(*i))),
            (KeyType::Int, Literal::Numeric(n)) => numeric_integer(n),
            (KeyType::Int, Literal::String(s)) => {
                s.trim().parse().ok().map(|i| Some(KeyValue::Int(i)))
            }
            (KeyType::Text, Literal::String(s)) => Some(Some(KeyValue::Text(s.clone()))),
            (KeyType::Uuid, Literal::String(s)) => uuid(s).map(|u| Some(KeyValue::Uuid(u))),
            (KeyType::Bool, Literal::Bool(b)) => Some(Some(KeyValue::Bool(*b))),
            (KeyType::Bool, Literal::String(s)) => boolean(s).map(|b| Some(KeyValue::Bool(b))),
            _ => None,
        }
    }
}

/// A numeric constant compared with an integer column: the integer it equals,
/// `Some(None)` for a fraction (equal to no integer), `None` if unreadable.
fn numeric_integer(text: &str) -> Option<Option<KeyValue>> {
    let text = text.trim();
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (negative, digits) = match mantissa.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, mantissa.strip_prefix('+').unwrap_or(mantissa)),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if !int_part
        .chars()
        .chain(frac_part.chars())
        .all(|c| c.is_ascii_digit())
        || int_part.len() + frac_part.len() == 0
        || exponent.unsigned_abs() > 40
    {
        return None;
    }
    let mut all: String = format!("{int_part}{frac_part}");
    let mut point = i64::try_from(int_part.len()).ok()? + i64::from(exponent);
    if point < 0 {
        all.insert_str(0, &"0".repeat(usize::try_from(-point).ok()?));
        point = 0;
    }
    let point = usize::try_from(point).ok()?;
    while all.len() < point {
        all.push('0');
    }
    let (whole, fraction) = all.split_at(point);
    if fraction.chars().any(|c| c != '0') {
        return Some(None);
    }
    let whole = whole.trim_start_matches('0');
    let magnitude: i128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let value = if negative { -magnitude } else { magnitude };
    Some(i64::try_from(value).ok().map(KeyValue::Int))
}

/// PostgreSQL's `uuid` input: 32 hex digits, optionally in braces, with a hyphen
/// after any group of four.
fn uuid(text: &str) -> Option<String> {
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(text);
    if inner.starts_with('-') || inner.ends_with('-') || inner.contains("--") {
        return None;
    }
    let hex: String = inner.chars().filter(|c| *c != '-').collect();
    (hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

fn boolean(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// One column of a primary key.
///
/// ```
/// use pgcachewatch_query::{KeyColumn, KeyType};
/// let id = KeyColumn::new("id", KeyType::Int);
/// assert_eq!(id.key_type, Some(KeyType::Int));
/// let price = KeyColumn::unsupported("price", "numeric");
/// assert_eq!(price.key_type, None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyColumn {
    /// The column's name.
    pub name: String,
    /// Its type for row-level matching, `None` if it cannot be matched exactly.
    pub key_type: Option<KeyType>,
    /// The type's name in PostgreSQL (for messages).
    pub type_name: String,
}

impl KeyColumn {
    /// A key column of a type row-level matching compares exactly.
    pub fn new(name: impl Into<String>, key_type: KeyType) -> Self {
        KeyColumn {
            name: name.into(),
            key_type: Some(key_type),
            type_name: key_type.to_string(),
        }
    }

    /// A key column whose type row-level matching cannot compare exactly.
    pub fn unsupported(name: impl Into<String>, type_name: impl Into<String>) -> Self {
        KeyColumn {
            name: name.into(),
            key_type: None,
            type_name: type_name.into(),
        }
    }
}

/// What a relation named in a query is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RelationKind {
    /// A plain table.
    Table,
    /// A partitioned table: its rows live in its partitions.
    PartitionedTable,
    /// A view: reads its base tables.
    View,
}

/// A relation named in a query, resolved: what it is and every table whose
/// writes can change what reading it returns.
///
/// ```
/// use pgcachewatch_query::{KeyColumn, KeyType, RelationKind, ResolvedRelation};
/// use pgcachewatch_core::TableRef;
/// let users = ResolvedRelation::table(TableRef::new("public", "users"), vec![KeyColumn::new("id", KeyType::Int)]);
/// assert_eq!(users.kind, RelationKind::Table);
/// assert_eq!(users.tables, [TableRef::new("public", "users")]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResolvedRelation {
    /// The relation, schema-qualified.
    pub relation: TableRef,
    /// What it is.
    pub kind: RelationKind,
    /// Every table whose writes reach it: the table itself, a partitioned
    /// table's partitions, inheritance children (unless read with `ONLY`), a
    /// view's base tables (through other views too).
    pub tables: Vec<TableRef>,
    /// Whether reading it also reads inheritance children.
    pub inheritance_children: bool,
    /// The primary key, for a table; `None` without one (or for a view).
    pub primary_key: Option<Vec<KeyColumn>>,
}

impl ResolvedRelation {
    /// A plain table with the given primary key (no partitions, no children).
    pub fn table(relation: TableRef, primary_key: Vec<KeyColumn>) -> Self {
        ResolvedRelation {
            tables: vec![relation.clone()],
            relation,
            kind: RelationKind::Table,
            inheritance_children: false,
            primary_key: Some(primary_key).filter(|k| !k.is_empty()),
        }
    }

    /// A view reading `tables`.
    pub fn view(relation: TableRef, tables: Vec<TableRef>) -> Self {
        ResolvedRelation {
            relation,
            kind: RelationKind::View,
            tables,
            inheritance_children: false,
            primary_key: None,
        }
    }

    /// A partitioned table with its partitions (at any depth) and primary key.
    pub fn partitioned(
        relation: TableRef,
        partitions: Vec<TableRef>,
        primary_key: Vec<KeyColumn>,
    ) -> Self {
        let mut tables = vec![relation.clone()];
        tables.extend(partitions);
        ResolvedRelation {
            relation,
            kind: RelationKind::PartitionedTable,
            tables,
            inheritance_children: false,
            primary_key: Some(primary_key).filter(|k| !k.is_empty()),
        }
    }
}

/// The catalog facts [`derive`](crate::derive()) reads: how each name a query
/// uses resolves. [`resolve`](crate::resolve) builds one from the server; build
/// one by hand where there is no server (a compile-time check, a test).
///
/// A name is looked up as written first (what `resolve` records), then, for an
/// unqualified name, through `search_path` (default `public`).
///
/// ```
/// use pgcachewatch_query::{Catalog, KeyType};
/// let catalog = Catalog::new()
///     .table("public.users", &[("id", KeyType::Int)])
///     .table("app.orgs", &[("id", KeyType::Int)])
///     .search_path(["app", "public"]);
/// # let _ = catalog;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    pub(crate) entries: Vec<(Option<RelationName>, ResolvedRelation)>,
    pub(crate) search_path: Vec<String>,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog::new()
    }
}

impl Catalog {
    /// An empty catalog with `search_path` `public`.
    pub fn new() -> Self {
        Catalog {
            entries: Vec::new(),
            search_path: vec!["public".to_owned()],
        }
    }

    /// Adds a plain table (`"schema.table"`, parsed like SQL; unqualified means
    /// `public`; text that is no SQL name is taken as a table name in `public`)
    /// with its primary-key columns.
    pub fn table(self, name: &str, key: &[(&str, KeyType)]) -> Self {
        let relation = table_ref(name);
        let key = key
            .iter()
            .map(|(column, ty)| KeyColumn::new(*column, *ty))
            .collect();
        self.relation(ResolvedRelation::table(relation, key))
    }

    /// Adds a resolved relation, found by its own name.
    pub fn relation(mut self, relation: ResolvedRelation) -> Self {
        self.entries.push((None, relation));
        self
    }

    /// Adds how a name, exactly as a query writes it, resolves (what
    /// [`resolve`](crate::resolve) records from the server).
    pub fn named(mut self, written: RelationName, relation: ResolvedRelation) -> Self {
        self.entries.push((Some(written), relation));
        self
    }

    /// Sets the schemas searched for unqualified names, in order.
    pub fn search_path<I, S>(mut self, schemas: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.search_path = schemas.into_iter().map(Into::into).collect();
        self
    }

    /// How `written` resolves, if the catalog knows.
    pub fn lookup(&self, written: &RelationName) -> Option<&ResolvedRelation> {
        let same_name = |w: &RelationName| {
            w.catalog == written.catalog && w.schema == written.schema && w.name == written.name
        };
        if let Some((_, r)) = self
            .entries
            .iter()
            .find(|(w, _)| w.as_ref().is_some_and(same_name))
        {
            return Some(r);
        }
        let by_name = |schema: &str| {
            self.entries.iter().find_map(|(_, r)| {
                (r.relation.table == written.name && r.relation.schema.as_deref() == Some(schema))
                    .then_some(r)
            })
        };
        match &written.schema {
            Some(schema) => by_name(schema),
            None => self.search_path.iter().find_map(|s| by_name(s)),
        }
    }
}

fn table_ref(name: &str) -> TableRef {
    match TableRef::parse(name) {
        Ok(TableRef {
            schema: None,
            table,
        }) => TableRef::new("public", table),
        Ok(t) => t,
        Err(_) => TableRef::new("public", name),
    }
}
