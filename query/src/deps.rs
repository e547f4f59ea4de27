//! [`Dependencies`]: what a cached query depends on, and [`derive`](crate::derive()) from an
//! [`Analysis`] and a [`Catalog`].

use std::fmt;

use pgcachewatch_core::{Event, Operation, RowKey, TableRef};
use serde_json::Value;

use crate::analyze::{quote_ident, Analysis, RelationName, Shape};
use crate::catalog::{Catalog, KeyColumn, KeyType, RelationKind};
use crate::error::QueryError;
use crate::pins::{Pin, PinValue};

/// How [`derive`](crate::derive()) and [`resolve`](crate::resolve) decide.
///
/// ```
/// use pgcachewatch_query::ResolveOptions;
/// let options = ResolveOptions::new().strict(true);
/// assert!(options.is_strict());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveOptions {
    strict: bool,
    plan_check: bool,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        ResolveOptions::new()
    }
}

impl ResolveOptions {
    /// Not strict; the plan check on.
    pub fn new() -> Self {
        ResolveOptions {
            strict: false,
            plan_check: true,
        }
    }

    /// Strict: a query that is only table-level is an error
    /// ([`QueryError::NotRowLevel`]) instead of a fall-back.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Whether [`resolve`](crate::resolve) cross-checks the parser's relations with
    /// those of the statement's generic plan (default on; off only where the
    /// connection may not `PREPARE`, e.g. behind a transaction-mode pooler).
    pub fn plan_check(mut self, on: bool) -> Self {
        self.plan_check = on;
        self
    }

    /// Whether strict.
    pub fn is_strict(&self) -> bool {
        self.strict
    }

    /// Whether the plan check is on.
    pub fn is_plan_checked(&self) -> bool {
        self.plan_check
    }
}

/// What a cached query depends on: row-level (which rows of one table) or
/// table-level (every write to any of its tables), with the tables resolved.
///
/// Made once per statement ([`resolve`](crate::resolve) on a connection, or
/// [`derive`](crate::derive()) from a [`Catalog`]); then [`affects`](Self::affects) decides, per
/// event and per set of parameter values, whether a cached result may have
/// changed. That is the predicate an invalidation strategy over cached queries
/// needs.
///
/// ```
/// use pgcachewatch_core::{Event, Operation, RowKey};
/// use pgcachewatch_query::{analyze, derive, Catalog, KeyType, ResolveOptions};
/// use serde_json::json;
///
/// let catalog = Catalog::new().table("public.users", &[("id", KeyType::Int)]);
/// let deps = derive(&analyze("SELECT name FROM users WHERE id = $1")?, &catalog, &ResolveOptions::new())?;
/// assert_eq!(deps.explain(), "row-level on public.users(id) from $1");
///
/// let update = |id: i64| Event::new("ch", Operation::Update, "public", "users")
///     .with_keys(vec![RowKey::single("id", id)]);
/// assert!(deps.affects(&[json!(7)], &update(7)));
/// assert!(!deps.affects(&[json!(7)], &update(8)));
/// // No keys (a table-level trigger): any row may have changed.
/// assert!(deps.affects(&[json!(7)], &Event::new("ch", Operation::Update, "public", "users")));
/// # Ok::<_, pgcachewatch_query::QueryError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Dependencies {
    pub(crate) sql: String,
    pub(crate) level: Level,
    pub(crate) resolved: Vec<(RelationName, TableRef)>,
    pub(crate) warnings: Vec<String>,
    /// The catalog objects [`resolve`](crate::resolve) looked at, by kind
    /// (`'c'` relation, `'f'` function, `'o'` operator) and oid; empty from
    /// [`derive`](crate::derive()). What a cached query's re-check compares.
    pub(crate) objects: Vec<(char, i64)>,
}

/// Row-level or table-level, with what each needs.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Level {
    /// Only writes to the pinned rows of one table can change the result.
    Row(RowLevel),
    /// Any write to any of the tables can change the result.
    Table(TableLevel),
}

/// A row-level dependency: the rows of `table` whose primary key passes every pin.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RowLevel {
    /// The table read.
    pub table: TableRef,
    /// `table` and, for a partitioned table, its partitions: events about any of
    /// them are matched by key (a write through a partition is named after it).
    pub tables: Vec<TableRef>,
    /// The primary key, in key order.
    pub key_columns: Vec<KeyColumn>,
    /// Every pin on a key column (a row must pass all of them).
    pub pins: Vec<KeyPin>,
}

/// A pin on a primary-key column, with the type its values are compared in.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct KeyPin {
    /// The key column's type.
    pub key_type: KeyType,
    /// The pin.
    pub pin: Pin,
}

/// A table-level dependency.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TableLevel {
    /// Every table whose writes can change the result (views expanded,
    /// partitioned tables with their partitions); empty when the query reads no
    /// table (its result never changes).
    pub tables: Vec<TableRef>,
    /// Why not row-level, in a few words (`"join"`, `"view"`, …).
    pub reason: String,
}

impl Dependencies {
    /// The statement.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// Row-level or table-level.
    pub fn level(&self) -> &Level {
        &self.level
    }

    /// Whether row-level.
    pub fn is_row_level(&self) -> bool {
        matches!(self.level, Level::Row(_))
    }

    /// Every table whose writes can change the result.
    pub fn tables(&self) -> &[TableRef] {
        match &self.level {
            Level::Row(r) => &r.tables,
            Level::Table(t) => &t.tables,
        }
    }

    /// How each name the query writes resolved (`users` → `public.users`).
    pub fn resolved_names(&self) -> &[(RelationName, TableRef)] {
        &self.resolved
    }

    /// The resolutions of the names the query writes unqualified, as one string
    /// (`"orgs=public.orgs;users=public.users"`; empty if every name is
    /// qualified). Part of a cache key, it keeps results read through different
    /// `search_path`s apart.
    ///
    /// ```
    /// use pgcachewatch_query::{analyze, derive, Catalog, KeyType, ResolveOptions};
    /// let catalog = Catalog::new().table("app.users", &[("id", KeyType::Int)]).search_path(["app"]);
    /// let deps = derive(&analyze("SELECT * FROM users")?, &catalog, &ResolveOptions::new())?;
    /// assert_eq!(deps.resolution_key(), "users=app.users");
    /// # Ok::<_, pgcachewatch_query::QueryError>(())
    /// ```
    pub fn resolution_key(&self) -> String {
        let mut parts: Vec<String> = self
            .resolved
            .iter()
            .filter(|(written, _)| written.schema.is_none())
            .map(|(written, table)| {
                // Every name not plain lower case is quoted: no two resolutions
                // print alike.
                let schema = table.schema.as_deref().map(quote_ident).unwrap_or_default();
                format!(
                    "{}={schema}.{}",
                    written.qualified(),
                    quote_ident(&table.table)
                )
            })
            .collect();
        parts.sort();
        parts.dedup();
        parts.join(";")
    }

    /// What [`resolve`](crate::resolve) noticed on the way (the parser and the
    /// plan disagreeing); each was also logged.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// One line saying what was derived:
    /// `"row-level on public.users(id) from $1"`,
    /// `"row-level on public.t(a, b) from a = $1, b IN ($2, 'x')"`,
    /// `"table-level on public.orgs, public.users: join"`.
    pub fn explain(&self) -> String {
        match &self.level {
            Level::Row(r) => {
                let key: Vec<&str> = r.key_columns.iter().map(|k| k.name.as_str()).collect();
                let from = if r.key_columns.len() == 1 {
                    r.pins
                        .iter()
                        .map(|p| match (p.pin.any, p.pin.values.as_slice()) {
                            (false, [single]) => single.to_string(),
                            _ => p.pin.rhs(),
                        })
                        .collect::<Vec<_>>()
                        .join(" and ")
                } else {
                    r.pins
                        .iter()
                        .map(|p| p.pin.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let partitions = match r.tables.len() {
                    0 | 1 => String::new(),
                    2 => " and its partition".to_owned(),
                    n => format!(" and its {} partitions", n - 1),
                };
                format!(
                    "row-level on {}({}){partitions} from {from}",
                    r.table,
                    key.join(", ")
                )
            }
            Level::Table(t) if t.tables.is_empty() => {
                format!("table-level on no table: {}", t.reason)
            }
            Level::Table(t) => {
                let tables: Vec<String> = t.tables.iter().map(ToString::to_string).collect();
                format!("table-level on {}: {}", tables.join(", "), t.reason)
            }
        }
    }

    /// Whether `event` may change the result of the query run with `params`
    /// (`params[0]` is `$1`, as JSON).
    ///
    /// * an event about none of the query's tables: no;
    /// * table-level: any event about one of its tables: yes;
    /// * row-level: an event without keys (table-level triggers, too many keys,
    ///   `TRUNCATE`): yes; otherwise yes iff one of its keys passes every pin with
    ///   these parameters (an `IN` list or `= ANY` array: any element). An `UPDATE`
    ///   that changes a key carries the old and the new key, so a cached "not
    ///   found" for the new key is dropped too.
    ///
    /// Where a value cannot be compared (a missing parameter, a key value of
    /// another type), the answer is yes: unsure means invalidate.
    ///
    /// ```
    /// use pgcachewatch_core::{Event, Operation, RowKey};
    /// use pgcachewatch_query::{analyze, derive, Catalog, KeyType, ResolveOptions};
    /// use serde_json::json;
    /// let catalog = Catalog::new().table("users", &[("id", KeyType::Int)]);
    /// let deps = derive(&analyze("SELECT * FROM users WHERE id = ANY($1)")?, &catalog, &ResolveOptions::new())?;
    /// let delete = Event::new("ch", Operation::Delete, "public", "users").with_keys(vec![RowKey::single("id", 3)]);
    /// assert!(deps.affects(&[json!([1, 2, 3])], &delete));
    /// assert!(!deps.affects(&[json!([1, 2])], &delete));
    /// # Ok::<_, pgcachewatch_query::QueryError>(())
    /// ```
    pub fn affects(&self, params: &[Value], event: &Event) -> bool {
        match &self.level {
            Level::Table(t) => t.tables.iter().any(|table| about(event, table)),
            Level::Row(r) => r.affects(params, event),
        }
    }
}

impl fmt::Display for Dependencies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.explain())
    }
}

fn about(event: &Event, table: &TableRef) -> bool {
    event.is_about(table.schema.as_deref(), &table.table)
}

impl RowLevel {
    /// [`Dependencies::affects`] for a row-level query.
    pub fn affects(&self, params: &[Value], event: &Event) -> bool {
        if !self.tables.iter().any(|t| about(event, t)) {
            return false;
        }
        match &event.keys {
            Some(keys) if event.operation != Operation::Truncate => {
                keys.iter().any(|key| self.admits(params, key))
            }
            _ => true,
        }
    }

    /// Whether a row with primary key `key` can be read by the query with
    /// `params`: it passes every pin (unsure counts as passing).
    pub fn admits(&self, params: &[Value], key: &RowKey) -> bool {
        self.pins.iter().all(|p| p.admits(params, key))
    }

    /// The parameter values under which the query reads the row with primary
    /// key `key`, when they are determined by it: every key column pinned by
    /// exactly one `= $n` (then `Some([(n, value), …])`), `None` otherwise (an `IN`
    /// list, an array, a literal). With it a cache of such queries can find the
    /// entries a row-level event drops without scanning them.
    ///
    /// ```
    /// use pgcachewatch_core::RowKey;
    /// use pgcachewatch_query::{analyze, derive, Catalog, KeyType, Level, ResolveOptions};
    /// use serde_json::json;
    /// let catalog = Catalog::new().table("users", &[("id", KeyType::Int)]);
    /// let deps = derive(&analyze("SELECT * FROM users WHERE id = $2 AND active = $1")?, &catalog, &ResolveOptions::new())?;
    /// let Level::Row(row) = deps.level() else { panic!() };
    /// assert_eq!(row.row_params(&RowKey::single("id", 7)), Some(vec![(2, json!(7))]));
    /// # Ok::<_, pgcachewatch_query::QueryError>(())
    /// ```
    pub fn row_params(&self, key: &RowKey) -> Option<Vec<(usize, Value)>> {
        let mut out = Vec::with_capacity(self.key_columns.len());
        for column in &self.key_columns {
            let mut pins = self.pins.iter().filter(|p| p.pin.column == column.name);
            let (Some(pin), None) = (pins.next(), pins.next()) else {
                return None;
            };
            let [PinValue::Param { index, .. }] = pin.pin.values.as_slice() else {
                return None;
            };
            if pin.pin.any {
                return None;
            }
            out.push((*index, key.get(&column.name)?.clone()));
        }
        Some(out)
    }
}

impl KeyPin {
    /// Whether the row with `key` passes this pin under `params`.
    fn admits(&self, params: &[Value], key: &RowKey) -> bool {
        let Some(value) = key
            .get(&self.pin.column)
            .and_then(|v| self.key_type.value(v))
        else {
            return true; // the event's key cannot be compared: unsure
        };
        let ty = self.key_type;
        let param = |index: usize| index.checked_sub(1).and_then(|i| params.get(i));
        // `Some(true)`: it passes; `None`: unsure (passes); `Some(false)`: not this one.
        let scalar = |v: &Value| -> Option<bool> {
            match v {
                Value::Null => Some(false),
                v => ty.value(v).map(|x| x == value),
            }
        };
        for candidate in &self.pin.values {
            let verdict = match candidate {
                PinValue::Null => Some(false),
                PinValue::Literal { value: lit, .. } => match ty.literal(lit) {
                    Some(Some(x)) => Some(x == value),
                    Some(None) => Some(false),
                    None => None,
                },
                PinValue::Param { index, .. } => param(*index).and_then(scalar),
                PinValue::ParamArray { index, .. } => match param(*index) {
                    Some(Value::Null) => Some(false),
                    Some(Value::Array(items)) => {
                        let mut verdict = Some(false);
                        for item in items {
                            match scalar(item) {
                                Some(false) => {}
                                other => {
                                    verdict = other;
                                    break;
                                }
                            }
                        }
                        verdict
                    }
                    _ => None,
                },
            };
            if verdict != Some(false) {
                return true;
            }
        }
        false
    }
}

/// Whether every value of a pin has a type the key column's values compare with
/// exactly: no cast, or a cast to a type of the same [`KeyType`] (an array type for
/// `= ANY($n::type[])`).
fn pin_fits(pin: &Pin, ty: KeyType) -> bool {
    pin.values.iter().all(|v| match v {
        PinValue::Null => true,
        PinValue::ParamArray { cast, .. } => cast
            .as_ref()
            .is_none_or(|c| c.array && KeyType::of_type_name(c) == Some(ty)),
        PinValue::Param { cast, .. } | PinValue::Literal { cast, .. } => cast
            .as_ref()
            .is_none_or(|c| !c.array && KeyType::of_type_name(c) == Some(ty)),
    })
}

/// Derives a query's [`Dependencies`] from its [`Analysis`] and catalog facts:
/// pure, no I/O (what [`resolve`](crate::resolve) does after reading the facts
/// from a server).
///
/// Row-level exactly when the analysis is a [`Shape::Row`] candidate on a plain
/// or partitioned table (not a view, not an inheritance parent read with its
/// children) whose every primary-key column has a type compared exactly
/// ([`KeyType`]) and is pinned by a conjunct whose values are of that type. A
/// candidate that misses any of these is table-level, and the reason says which;
/// with [`ResolveOptions::strict`] that is an error instead.
///
/// ```
/// use pgcachewatch_query::{analyze, derive, Catalog, KeyType, ResolveOptions};
/// let catalog = Catalog::new()
///     .table("users", &[("id", KeyType::Int)])
///     .table("orgs", &[("id", KeyType::Int)]);
/// let join = analyze("SELECT * FROM users u JOIN orgs o ON o.id = u.org_id WHERE u.id = $1")?;
/// let deps = derive(&join, &catalog, &ResolveOptions::new())?;
/// assert_eq!(deps.explain(), "table-level on public.users, public.orgs: join");
/// assert!(derive(&join, &catalog, &ResolveOptions::new().strict(true)).is_err());
///
/// let by_name = analyze("SELECT * FROM users WHERE name = $1")?;
/// assert_eq!(
///     derive(&by_name, &catalog, &ResolveOptions::new())?.explain(),
///     "table-level on public.users: the WHERE does not pin key column id with =, IN (…) or = ANY",
/// );
/// # Ok::<_, pgcachewatch_query::QueryError>(())
/// ```
pub fn derive(
    analysis: &Analysis,
    catalog: &Catalog,
    options: &ResolveOptions,
) -> Result<Dependencies, QueryError> {
    derive_checked(analysis, catalog, options, None, Vec::new())
}

/// [`derive`](crate::derive()), with a reason forcing table level (the plan read more than the
/// parser found) and the warnings collected on the way.
pub(crate) fn derive_checked(
    analysis: &Analysis,
    catalog: &Catalog,
    options: &ResolveOptions,
    forced: Option<(String, Vec<TableRef>)>,
    warnings: Vec<String>,
) -> Result<Dependencies, QueryError> {
    let mut resolved = Vec::with_capacity(analysis.relations.len());
    let mut tables: Vec<TableRef> = Vec::new();
    for written in &analysis.relations {
        let Some(relation) = catalog.lookup(written) else {
            return Err(QueryError::UnknownRelation {
                name: written.qualified(),
                search_path: catalog.search_path.join(", "),
            });
        };
        resolved.push((written.clone(), relation.relation.clone()));
        for t in &relation.tables {
            if !tables.contains(t) {
                tables.push(t.clone());
            }
        }
    }
    let mut level = row_level(analysis, catalog, &tables);
    if let Some((reason, extra)) = forced {
        for t in extra {
            if !tables.contains(&t) {
                tables.push(t);
            }
        }
        level = Err(reason);
    }
    let level = match level {
        Ok(row) => Level::Row(row),
        Err(reason) => Level::Table(TableLevel { tables, reason }),
    };
    let deps = Dependencies {
        sql: analysis.sql.clone(),
        level,
        resolved,
        warnings,
        objects: Vec::new(),
    };
    if options.strict && !deps.is_row_level() {
        return Err(QueryError::NotRowLevel {
            explanation: deps.explain(),
        });
    }
    Ok(deps)
}

fn row_level(
    analysis: &Analysis,
    catalog: &Catalog,
    tables: &[TableRef],
) -> Result<RowLevel, String> {
    let candidate = match &analysis.shape {
        Shape::Row(candidate) => candidate,
        Shape::Table { reason } => return Err(reason.clone()),
    };
    let relation = catalog
        .lookup(&candidate.relation)
        .ok_or_else(|| "unresolved".to_owned())?;
    match relation.kind {
        RelationKind::View => return Err("view".into()),
        RelationKind::Table | RelationKind::PartitionedTable => {}
    }
    if relation.inheritance_children && !candidate.relation.only {
        return Err("reads inheritance children".into());
    }
    let Some(key) = relation.primary_key.as_ref().filter(|k| !k.is_empty()) else {
        return Err(format!("{} has no primary key", relation.relation));
    };
    let mut pins = Vec::new();
    let mut missing = Vec::new();
    for column in key {
        let Some(ty) = column.key_type else {
            return Err(format!(
                "key column {} is {}, whose equality is not compared exactly \
                 (row-level needs integer, text, varchar, uuid or bool keys)",
                column.name, column.type_name
            ));
        };
        let before = pins.len();
        pins.extend(
            candidate
                .pins
                .iter()
                .filter(|p| p.column == column.name && pin_fits(p, ty))
                .map(|p| KeyPin {
                    key_type: ty,
                    pin: p.clone(),
                }),
        );
        if pins.len() == before {
            missing.push(column.name.as_str());
        }
    }
    if !missing.is_empty() {
        let plural = if missing.len() > 1 { "s" } else { "" };
        return Err(format!(
            "the WHERE does not pin key column{plural} {} with =, IN (…) or = ANY",
            missing.join(", ")
        ));
    }
    Ok(RowLevel {
        table: relation.relation.clone(),
        tables: tables.to_vec(),
        key_columns: key.clone(),
        pins,
    })
}
