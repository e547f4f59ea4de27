//! [`analyze`]: what a statement reads, from its text alone (no I/O).

use std::collections::BTreeSet;
use std::fmt;

use pg_query::protobuf::{self, AExprKind, BoolExprType, SetOperation};
use pg_query::NodeEnum;
use serde_json::{Map, Value};

use crate::error::QueryError;
use crate::pins::{self, Pin};

/// A relation as the query names it: not resolved yet (an unqualified name is
/// found through the connection's `search_path` by
/// [`resolve`](crate::resolve)).
///
/// Names are as PostgreSQL reads them: unquoted parts folded to lower case,
/// quoted parts as written.
///
/// ```
/// use pgcachewatch_query::analyze;
/// let a = analyze(r#"SELECT * FROM app."Users" u JOIN ONLY orgs o ON o.id = u.org"#)?;
/// let names: Vec<String> = a.relations().iter().map(|r| r.to_string()).collect();
/// assert_eq!(names, ["app.\"Users\"", "ONLY orgs"]);
/// # Ok::<_, pgcachewatch_query::QueryError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub struct RelationName {
    /// The database part of a three-part name (`db.schema.table`), if written.
    pub catalog: Option<String>,
    /// The schema, if written.
    pub schema: Option<String>,
    /// The relation's name.
    pub name: String,
    /// Whether every mention of it says `ONLY` (inheritance children are then not read).
    pub only: bool,
}

impl RelationName {
    /// A name as written (`schema: None` for an unqualified one), without `ONLY`.
    ///
    /// ```
    /// use pgcachewatch_query::RelationName;
    /// assert_eq!(RelationName::new(Some("public"), "users").to_string(), "public.users");
    /// ```
    pub fn new(schema: Option<&str>, name: &str) -> Self {
        RelationName {
            catalog: None,
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
            only: false,
        }
    }

    /// The name as SQL text for people, each part quoted unless it is plain
    /// lower case (`app."Users"`; a reserved word such as `order` is left bare),
    /// without `ONLY`.
    pub fn qualified(&self) -> String {
        let mut out = String::new();
        for part in [&self.catalog, &self.schema].into_iter().flatten() {
            out.push_str(&quote_ident(part));
            out.push('.');
        }
        out.push_str(&quote_ident(&self.name));
        out
    }

    /// The name with every part quoted, for SQL sent to a server
    /// (`"app"."users"`): a reserved word or an odd name is read as a name there.
    ///
    /// ```
    /// use pgcachewatch_query::RelationName;
    /// assert_eq!(RelationName::new(None, "order").sql_name(), r#""order""#);
    /// assert_eq!(RelationName::new(Some("app"), "a\"b").sql_name(), r#""app"."a""b""#);
    /// ```
    pub fn sql_name(&self) -> String {
        [&self.catalog, &self.schema]
            .into_iter()
            .flatten()
            .chain(std::iter::once(&self.name))
            .map(|part| always_quote(part))
            .collect::<Vec<_>>()
            .join(".")
    }

    fn same_relation(&self, other: &RelationName) -> bool {
        self.catalog == other.catalog && self.schema == other.schema && self.name == other.name
    }
}

impl fmt::Display for RelationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.only {
            f.write_str("ONLY ")?;
        }
        f.write_str(&self.qualified())
    }
}

/// A function or operator as the query names it (`schema: None` when unqualified).
///
/// ```
/// use pgcachewatch_query::analyze;
/// let a = analyze("SELECT lower(name), pg_catalog.upper(name) FROM users WHERE id = $1")?;
/// let f: Vec<String> = a.functions().iter().map(|f| f.to_string()).collect();
/// assert_eq!(f, ["lower", "pg_catalog.upper"]);
/// # Ok::<_, pgcachewatch_query::QueryError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub struct RoutineName {
    /// The schema, if written.
    pub schema: Option<String>,
    /// The name (for an operator, its symbol).
    pub name: String,
}

impl fmt::Display for RoutineName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Whether a statement may be row-level, as far as its text tells.
///
/// The text cannot tell the primary key (the catalog does): a
/// [`RowCandidate`] lists every column the `WHERE` pins, and
/// [`derive`](crate::derive()) / [`resolve`](crate::resolve) check that the
/// pinned columns cover the key.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Shape {
    /// One plain relation, no join, subquery, CTE or set operation, and a `WHERE`
    /// whose top-level conjunction pins at least one column.
    Row(RowCandidate),
    /// Table-level whatever the catalog says; `reason` says why (e.g. `"join"`).
    Table {
        /// Why, in a few words.
        reason: String,
    },
}

/// The one relation a row-level candidate reads and the columns its `WHERE` pins.
///
/// ```
/// use pgcachewatch_query::{analyze, PinValue, Shape};
/// let a = analyze("SELECT * FROM users u WHERE u.id = ANY($1) AND u.active")?;
/// let Shape::Row(row) = a.shape() else { panic!() };
/// assert_eq!(row.relation.name, "users");
/// assert_eq!(row.pins[0].column, "id");
/// assert_eq!(row.pins[0].values, [PinValue::ParamArray { index: 1, cast: None }]);
/// # Ok::<_, pgcachewatch_query::QueryError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RowCandidate {
    /// The relation.
    pub relation: RelationName,
    /// One entry per pinning conjunct, in the order written (a column may be
    /// pinned more than once: a row must then pass each).
    pub pins: Vec<Pin>,
}

/// What [`analyze`] read from a statement: the relations it can read, the
/// functions and operators it calls, how many parameters it takes, and whether
/// it may be row-level.
///
/// Pure: derived from the text alone, so it can run at compile time (in a
/// macro) and once per statement. [`resolve`](crate::resolve) checks it against
/// a server; [`derive`](crate::derive()) against a [`Catalog`](crate::Catalog)
/// given by hand.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    pub(crate) sql: String,
    pub(crate) relations: Vec<RelationName>,
    pub(crate) functions: Vec<RoutineName>,
    pub(crate) operators: Vec<RoutineName>,
    pub(crate) params: usize,
    pub(crate) shape: Shape,
}

impl Analysis {
    /// The statement's text.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// Every base relation the statement names outside CTE scope (FROM, JOINs,
    /// subqueries anywhere, CTE bodies), once each, in order of first mention. Views
    /// and partitioned tables are expanded by [`resolve`](crate::resolve).
    pub fn relations(&self) -> &[RelationName] {
        &self.relations
    }

    /// Every function the statement calls by name (including aggregates and
    /// the functions behind SQL syntax such as `EXTRACT`), once each.
    pub fn functions(&self) -> &[RoutineName] {
        &self.functions
    }

    /// Every operator the statement uses, once each.
    pub fn operators(&self) -> &[RoutineName] {
        &self.operators
    }

    /// The highest parameter number (`$n`) the statement uses; 0 for none.
    pub fn param_count(&self) -> usize {
        self.params
    }

    /// Whether the statement may be row-level.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }
}

/// Reads a statement with PostgreSQL's own parser and derives what it can read.
///
/// Succeeds for exactly one `SELECT` (`VALUES`, `TABLE t` and set operations
/// included) that can be kept fresh from events. Refuses, with the way out
/// ("declare the tables it reads yourself"):
///
/// * anything else: writes, `SELECT … INTO`, data-modifying CTEs, utility
///   statements, several statements ([`QueryError::NotSelect`],
///   [`QueryError::StatementCount`]);
/// * `FOR UPDATE` / `FOR SHARE` ([`QueryError::Locking`]);
/// * functions and constructs whose result moves without any write: `now()`,
///   `CURRENT_TIMESTAMP`, `random()`, `nextval()`, `TABLESAMPLE`, `'now'::date`…
///   ([`QueryError::Volatile`]);
/// * the session: `current_user`, `session_user`, `current_setting()`,
///   privilege checks… ([`QueryError::SessionDependent`]);
/// * built-ins that read what sends no events: large objects, files, SQL passed
///   as text (`query_to_xml`) ([`QueryError::UnknownFunctionReads`]).
///
/// Other functions are checked on the server by [`resolve`](crate::resolve)
/// (`pg_proc.provolatile`, and whether they are built in).
///
/// ```
/// use pgcachewatch_query::{analyze, Shape};
/// let a = analyze("SELECT u.name, (SELECT count(*) FROM orders o WHERE o.user_id = u.id) FROM users u")?;
/// let names: Vec<String> = a.relations().iter().map(|r| r.to_string()).collect();
/// assert_eq!(names, ["orders", "users"]);
/// assert_eq!(a.shape(), &Shape::Table { reason: "subquery".into() });
///
/// // A CTE name never stands for a real table; inside its own body it does.
/// let a = analyze("WITH users AS (SELECT * FROM users WHERE active) SELECT * FROM users")?;
/// assert_eq!(a.relations()[0].name, "users");
/// assert_eq!(a.relations().len(), 1);
/// # Ok::<_, pgcachewatch_query::QueryError>(())
/// ```
pub fn analyze(sql: &str) -> Result<Analysis, QueryError> {
    analyze_with(sql, false)
}

/// [`analyze`], reading string literals as a server with
/// `standard_conforming_strings = off` does when `legacy_strings`.
pub(crate) fn analyze_with(sql: &str, legacy_strings: bool) -> Result<Analysis, QueryError> {
    let options = if legacy_strings {
        pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
    } else {
        pg_query::ParserOptions::DEFAULT
    };
    // pg_query's parse builds summaries with a few indexing operations of its
    // own; none can fail on a tree PostgreSQL produced, but no text may panic
    // this crate's caller.
    let parsed = std::panic::catch_unwind(|| pg_query::parse(sql, options)).map_err(|_| {
        QueryError::Parse {
            message: "the parser failed on this text".into(),
        }
    })?;
    let parsed = parsed.map_err(|e| QueryError::Parse {
        message: parse_message(e),
    })?;
    let stmts = &parsed.protobuf.stmts;
    if stmts.len() != 1 {
        return Err(QueryError::StatementCount { count: stmts.len() });
    }
    let node = stmts[0].stmt.as_ref().and_then(|n| n.node.as_ref());
    let select = match node {
        Some(NodeEnum::SelectStmt(select)) => select,
        Some(other) => {
            return Err(QueryError::NotSelect {
                statement: statement_kind(other),
            })
        }
        None => return Err(QueryError::StatementCount { count: 0 }),
    };
    let tree = serde_json::to_value(&parsed.protobuf).map_err(|e| QueryError::Parse {
        message: format!("could not read the parse tree: {e}"),
    })?;

    let mut walker = Walker::default();
    if let Some(stmt) = tree
        .get("stmts")
        .and_then(|s| s.get(0))
        .and_then(|s| s.get("stmt"))
    {
        walker.visit(stmt);
    }
    if let Some(err) = walker.refusal {
        return Err(err);
    }
    walker.relations.sort_by_key(|(at, _)| *at);
    let relations: Vec<RelationName> = walker.relations.iter().map(|(_, r)| r.clone()).collect();
    let shape = shape(select, &walker, &relations);
    Ok(Analysis {
        sql: sql.to_owned(),
        relations,
        functions: walker.functions.into_iter().collect(),
        operators: walker.operators.into_iter().collect(),
        params: walker.params,
        shape,
    })
}

fn parse_message(e: pg_query::Error) -> String {
    match e {
        pg_query::Error::Parse(m) => m
            .strip_prefix("Invalid statement: ")
            .map(str::to_owned)
            .unwrap_or(m),
        pg_query::Error::Conversion(_) => "the text contains a NUL character".into(),
        other => other.to_string(),
    }
}

fn statement_kind(node: &NodeEnum) -> String {
    match node {
        NodeEnum::InsertStmt(_) => "INSERT".into(),
        NodeEnum::UpdateStmt(_) => "UPDATE".into(),
        NodeEnum::DeleteStmt(_) => "DELETE".into(),
        NodeEnum::MergeStmt(_) => "MERGE".into(),
        NodeEnum::ExplainStmt(_) => "EXPLAIN".into(),
        NodeEnum::DeclareCursorStmt(_) => "DECLARE CURSOR".into(),
        NodeEnum::CallStmt(_) => "CALL".into(),
        NodeEnum::CopyStmt(_) => "COPY".into(),
        other => {
            let debug = format!("{other:?}");
            let name = debug.split('(').next().unwrap_or("this statement");
            format!("a {name}")
        }
    }
}

/// Quotes an identifier unless it is plain lower case (for display: a reserved
/// word is left as it is; [`RelationName::sql_name`] quotes everything).
pub(crate) fn quote_ident(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .enumerate()
            .all(|(i, c)| c == '_' || c.is_ascii_lowercase() || (i > 0 && c.is_ascii_digit()));
    if plain {
        name.to_owned()
    } else {
        always_quote(name)
    }
}

fn always_quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The structural facts the generic walk collects.
#[derive(Default)]
struct Walker {
    /// CTE names in scope, innermost last.
    scopes: Vec<Vec<String>>,
    /// With the text position of their first mention.
    relations: Vec<(i64, RelationName)>,
    functions: BTreeSet<RoutineName>,
    operators: BTreeSet<RoutineName>,
    params: usize,
    sublinks: usize,
    subselects: usize,
    joins: usize,
    range_functions: usize,
    ctes: usize,
    set_operations: usize,
    refusal: Option<QueryError>,
}

/// Functions whose result moves without any write.
const VOLATILE: &[&str] = &[
    "now",
    "transaction_timestamp",
    "statement_timestamp",
    "clock_timestamp",
    "timeofday",
    "random",
    "random_normal",
    "setseed",
    "gen_random_uuid",
    "uuidv4",
    "uuidv7",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "nextval",
    "currval",
    "lastval",
    "setval",
    "txid_current",
    "txid_current_if_assigned",
    "txid_current_snapshot",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "pg_current_snapshot",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "pg_notify",
    "set_config",
    "pg_cancel_backend",
    "pg_terminate_backend",
    "pg_postmaster_start_time",
    "pg_conf_load_time",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_last_committed_xact",
];

/// Prefixes of volatile function families.
const VOLATILE_PREFIXES: &[&str] = &["pg_advisory_", "pg_try_advisory_", "pg_stat_", "dblink"];

/// Functions whose result depends on the session (role, settings, connection).
const SESSION: &[&str] = &[
    "current_user",
    "session_user",
    "current_role",
    "user",
    "system_user",
    "current_setting",
    "current_schema",
    "current_schemas",
    "current_database",
    "current_catalog",
    "current_query",
    "pg_backend_pid",
    "inet_client_addr",
    "inet_client_port",
    "inet_server_addr",
    "inet_server_port",
    "pg_has_role",
    "row_security_active",
    "pg_my_temp_schema",
    "pg_is_other_temp_schema",
    "pg_trigger_depth",
    "pg_table_is_visible",
    "pg_function_is_visible",
    "pg_type_is_visible",
    "to_regclass",
    "to_regproc",
    "to_regprocedure",
    "to_regtype",
    "to_regnamespace",
    "to_regrole",
];

/// Built-ins that read what sends no events (large objects, files, SQL given as
/// text, the catalog).
const UNSEEN_READS: &[&str] = &[
    "query_to_xml",
    "query_to_xml_and_xmlschema",
    "query_to_xmlschema",
    "table_to_xml",
    "table_to_xml_and_xmlschema",
    "table_to_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "schema_to_xml",
    "schema_to_xml_and_xmlschema",
    "schema_to_xmlschema",
    "database_to_xml",
    "database_to_xml_and_xmlschema",
    "database_to_xmlschema",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "loread",
    "pg_get_viewdef",
    "pg_get_ruledef",
    "pg_get_indexdef",
    "pg_get_constraintdef",
    "pg_get_functiondef",
    "pg_get_triggerdef",
    "pg_relation_size",
    "pg_table_size",
    "pg_total_relation_size",
    "pg_indexes_size",
    "pg_database_size",
];

/// String constants PostgreSQL's date/time input reads as the current time.
const TIME_WORDS: &[&str] = &["now", "today", "tomorrow", "yesterday"];

pub(crate) fn routine_class(name: &str) -> Option<fn(String) -> QueryError> {
    if VOLATILE.contains(&name) || VOLATILE_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Some(|function| QueryError::Volatile { function });
    }
    if SESSION.contains(&name) || (name.starts_with("has_") && name.ends_with("_privilege")) {
        return Some(|what| QueryError::SessionDependent { what });
    }
    if UNSEEN_READS.contains(&name) || name.starts_with("lo_") {
        return Some(|function| QueryError::UnknownFunctionReads { function });
    }
    None
}

impl Walker {
    fn refuse(&mut self, err: QueryError) {
        if self.refusal.is_none() {
            self.refusal = Some(err);
        }
    }

    /// Visits any part of the tree: a `{"node": {Kind: fields}}` wrapper, an array,
    /// or a plain object (a typed field), whose values are visited in turn.
    fn visit(&mut self, value: &Value) {
        match value {
            Value::Array(items) => items.iter().for_each(|v| self.visit(v)),
            Value::Object(map) => {
                if let (1, Some(Value::Object(inner))) = (map.len(), map.get("node")) {
                    if let Some((kind, fields)) = inner.iter().next() {
                        self.node(kind, fields);
                        return;
                    }
                }
                map.values().for_each(|v| self.visit(v));
            }
            _ => {}
        }
    }

    fn node(&mut self, kind: &str, fields: &Value) {
        match kind {
            "SelectStmt" => self.select(fields),
            "RangeVar" => self.range_var(fields),
            "FuncCall" => {
                if let Some(name) = routine_name(fields.get("funcname")) {
                    if name.schema.as_deref().is_none_or(|s| s == "pg_catalog") {
                        if let Some(err) = routine_class(&name.name) {
                            self.refuse(err(format!("{}()", name.name)));
                        }
                        let args = fields.get("args").and_then(Value::as_array);
                        if name.name == "age" && args.is_some_and(|a| a.len() == 1) {
                            self.refuse(QueryError::Volatile {
                                function: "age() of one argument (it reads the current date)"
                                    .into(),
                            });
                        }
                    }
                    self.functions.insert(name);
                }
                self.visit_fields(fields);
            }
            "AExpr" => {
                let kind = fields.get("kind").and_then(Value::as_i64).unwrap_or(0);
                let between = (AExprKind::AexprBetween as i64
                    ..=AExprKind::AexprNotBetweenSym as i64)
                    .contains(&kind);
                if !between {
                    if let Some(name) = routine_name(fields.get("name")) {
                        self.operators.insert(name);
                    }
                }
                self.visit_fields(fields);
            }
            "SubLink" => {
                self.sublinks += 1;
                self.visit_fields(fields);
            }
            "RangeSubselect" => {
                self.subselects += 1;
                self.visit_fields(fields);
            }
            "RangeFunction" | "RangeTableFunc" | "JsonTable" => {
                self.range_functions += 1;
                self.visit_fields(fields);
            }
            "JoinExpr" => {
                self.joins += 1;
                self.visit_fields(fields);
            }
            "SqlvalueFunction" => {
                let op = fields.get("op").and_then(Value::as_i64).unwrap_or(0);
                let (what, time) = match op {
                    1 => ("CURRENT_DATE", true),
                    2 | 3 => ("CURRENT_TIME", true),
                    4 | 5 => ("CURRENT_TIMESTAMP", true),
                    6 | 7 => ("LOCALTIME", true),
                    8 | 9 => ("LOCALTIMESTAMP", true),
                    10 => ("CURRENT_ROLE", false),
                    11 => ("CURRENT_USER", false),
                    12 => ("USER", false),
                    13 => ("SESSION_USER", false),
                    14 => ("CURRENT_CATALOG", false),
                    15 => ("CURRENT_SCHEMA", false),
                    _ => ("an SQL value function", false),
                };
                self.refuse(if time {
                    QueryError::Volatile {
                        function: what.into(),
                    }
                } else {
                    QueryError::SessionDependent { what: what.into() }
                });
            }
            "RangeTableSample" => {
                self.refuse(QueryError::Volatile {
                    function: "TABLESAMPLE".into(),
                });
                self.visit_fields(fields);
            }
            "LockingClause" => {
                let strength = fields.get("strength").and_then(Value::as_i64).unwrap_or(0);
                let clause = match strength {
                    2 => "FOR KEY SHARE",
                    3 => "FOR SHARE",
                    4 => "FOR NO KEY UPDATE",
                    _ => "FOR UPDATE",
                };
                self.refuse(QueryError::Locking {
                    clause: clause.into(),
                });
            }
            "ParamRef" => {
                let n = fields.get("number").and_then(Value::as_u64).unwrap_or(0);
                self.params = self.params.max(usize::try_from(n).unwrap_or(usize::MAX));
            }
            "AConst" => {
                if let Some(s) = fields
                    .get("val")
                    .and_then(|v| v.get("Sval"))
                    .and_then(|v| v.get("sval"))
                    .and_then(Value::as_str)
                {
                    let word = s.trim().to_ascii_lowercase();
                    if TIME_WORDS.contains(&word.as_str()) {
                        self.refuse(QueryError::Volatile {
                            function: format!(
                                "'{s}' (read as a date or time, it is the current one)"
                            ),
                        });
                    }
                }
            }
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                self.refuse(QueryError::NotSelect {
                    statement: format!(
                        "a data-modifying CTE ({})",
                        kind.trim_end_matches("Stmt").to_ascii_uppercase()
                    ),
                });
                self.visit_fields(fields);
            }
            _ => self.visit_fields(fields),
        }
    }

    fn visit_fields(&mut self, fields: &Value) {
        if let Value::Object(map) = fields {
            map.values().for_each(|v| self.visit(v));
        }
    }

    /// A `SELECT`: its `WITH` scopes CTE names over its bodies (all of them with
    /// `RECURSIVE`, the earlier ones otherwise) and over the rest of the statement,
    /// set operations included.
    fn select(&mut self, fields: &Value) {
        let Value::Object(map) = fields else {
            return;
        };
        if map.get("into_clause").is_some_and(|v| !v.is_null()) {
            self.refuse(QueryError::NotSelect {
                statement: "SELECT … INTO (it creates a table)".into(),
            });
        }
        let op = map.get("op").and_then(Value::as_i64).unwrap_or(0);
        if op > SetOperation::SetopNone as i64 {
            self.set_operations += 1;
        }
        let scoped = match map.get("with_clause") {
            Some(Value::Object(with)) => {
                self.with(with);
                true
            }
            _ => false,
        };
        for (key, value) in map {
            match key.as_str() {
                "with_clause" => {}
                "larg" | "rarg" => self.select(value),
                _ => self.visit(value),
            }
        }
        if scoped {
            self.scopes.pop();
        }
    }

    /// Pushes the scope of a `WITH` (popped by the caller) and visits its bodies.
    fn with(&mut self, with: &Map<String, Value>) {
        let recursive = with
            .get("recursive")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let ctes: Vec<&Value> = with
            .get("ctes")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let cte = |v: &Value| -> Option<(String, Value)> {
            let fields = v.get("node")?.get("CommonTableExpr")?;
            let name = fields.get("ctename")?.as_str()?.to_owned();
            Some((name, fields.clone()))
        };
        let ctes: Vec<(String, Value)> = ctes.into_iter().filter_map(cte).collect();
        self.ctes += ctes.len();
        self.scopes.push(Vec::new());
        if recursive {
            if let Some(scope) = self.scopes.last_mut() {
                scope.extend(ctes.iter().map(|(n, _)| n.clone()));
            }
        }
        for (name, fields) in &ctes {
            self.visit_fields(fields);
            if !recursive {
                if let Some(scope) = self.scopes.last_mut() {
                    scope.push(name.clone());
                }
            }
        }
    }

    fn range_var(&mut self, fields: &Value) {
        let text = |key: &str| {
            fields
                .get(key)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let Some(name) = text("relname") else {
            return;
        };
        let catalog = text("catalogname");
        let schema = text("schemaname");
        if catalog.is_none()
            && schema.is_none()
            && self.scopes.iter().any(|scope| scope.contains(&name))
        {
            return; // a CTE
        }
        let only = !fields.get("inh").and_then(Value::as_bool).unwrap_or(true);
        let location = fields.get("location").and_then(Value::as_i64).unwrap_or(0);
        let relation = RelationName {
            catalog,
            schema,
            name,
            only,
        };
        match self
            .relations
            .iter_mut()
            .find(|(_, r)| r.same_relation(&relation))
        {
            Some((at, seen)) => {
                seen.only &= only;
                *at = (*at).min(location);
            }
            None => self.relations.push((location, relation)),
        }
    }
}

fn routine_name(names: Option<&Value>) -> Option<RoutineName> {
    let parts: Vec<&str> = names?
        .as_array()?
        .iter()
        .filter_map(|n| n.get("node")?.get("String")?.get("sval")?.as_str())
        .collect();
    match parts.as_slice() {
        [name] => Some(RoutineName {
            schema: None,
            name: (*name).to_owned(),
        }),
        [.., schema, name] => Some(RoutineName {
            schema: Some((*schema).to_owned()),
            name: (*name).to_owned(),
        }),
        [] => None,
    }
}

/// Whether the statement may be row-level, and if not, why.
fn shape(select: &protobuf::SelectStmt, walk: &Walker, relations: &[RelationName]) -> Shape {
    let table = |reason: &str| Shape::Table {
        reason: reason.to_owned(),
    };
    if walk.relations.is_empty() {
        return table("reads no table");
    }
    if walk.set_operations > 0 {
        return table("set operation");
    }
    if walk.ctes > 0 {
        return table("CTE");
    }
    if walk.joins > 0 || select.from_clause.len() > 1 {
        return table("join");
    }
    if walk.subselects > 0 || walk.sublinks > 0 {
        return table("subquery");
    }
    if walk.relations.len() > 1 {
        return table("several tables");
    }
    if walk.range_functions > 0 {
        return table("function in FROM");
    }
    let Some(NodeEnum::RangeVar(range)) = select.from_clause.first().and_then(|n| n.node.as_ref())
    else {
        return table("no plain table in FROM");
    };
    let Some(relation) = relations.first() else {
        return table("reads no table");
    };
    let Some(filter) = select.where_clause.as_deref() else {
        return table("no WHERE: every row");
    };
    let alias = range.alias.as_ref().map(|a| a.aliasname.as_str());
    let pins: Vec<Pin> = conjuncts(filter)
        .into_iter()
        .filter_map(|c| pins::read(c, range, alias))
        .collect();
    if pins.is_empty() {
        return table("the WHERE pins no column with =, IN (…) or = ANY in a top-level AND");
    }
    Shape::Row(RowCandidate {
        relation: relation.clone(),
        pins,
    })
}

/// The top-level conjuncts of a `WHERE` (nested `AND`s flattened).
fn conjuncts(node: &protobuf::Node) -> Vec<&protobuf::Node> {
    match node.node.as_ref() {
        Some(NodeEnum::BoolExpr(b)) if b.boolop == BoolExprType::AndExpr as i32 => {
            b.args.iter().flat_map(conjuncts).collect()
        }
        _ => vec![node],
    }
}
