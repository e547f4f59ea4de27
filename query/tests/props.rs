//! Property tests.
//!
//! * `row_level_is_sound_and_precise`: random single-table queries over random
//!   key predicates (pins of key columns in every form, other conjuncts, `OR`,
//!   `NOT`, ranges, `NULL` tests, subqueries). A model classifies each (row-level
//!   exactly when no subquery appears and the top-level `AND` pins every key
//!   column) and evaluates its `WHERE` on rows (three-valued, as SQL does).
//!   Whenever derivation says row-level, a write to a row the query can read is
//!   always seen and a write to a row whose key fails the pins never is; every
//!   other query is table-level. A failing case shrinks to its SQL text.
//! * `text_never_panics` / `sql_like_text_never_panics`: arbitrary text, and
//!   token soup and mutated queries, through `analyze`, `derive` and `affects`.

use std::fmt;

use pgcachewatch_core::{Event, Operation, RowKey};
use pgcachewatch_query::{analyze, derive, Catalog, KeyType, ResolveOptions};
use proptest::prelude::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------- the model

/// The two tables: `t (id int8 PRIMARY KEY, x int)` and
/// `m (a int8, b text, x int, PRIMARY KEY (a, b))`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Table {
    T,
    M,
}

/// A column: a key column (by position in the key) or the nullable `x`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Col {
    Key(usize),
    X,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::T => "t",
            Table::M => "m",
        }
    }

    fn keys(self) -> &'static [(&'static str, bool)] {
        // (name, is text)
        match self {
            Table::T => &[("id", false)],
            Table::M => &[("a", false), ("b", true)],
        }
    }
}

/// A scalar of the model: ints for `id`, `a`, `x`; strings for `b`.
#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Int(i64),
    Text(String),
}

impl Scalar {
    fn json(&self) -> Value {
        match self {
            Scalar::Int(i) => json!(i),
            Scalar::Text(s) => json!(s),
        }
    }

    fn sql(&self) -> String {
        match self {
            Scalar::Int(i) => i.to_string(),
            Scalar::Text(s) => format!("'{}'", s.replace('\'', "''")),
        }
    }
}

/// A value in the query: a literal, or a parameter (`$index`, with its value).
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Lit(Scalar),
    /// `$n`; `None` is a `NULL` parameter.
    Param(usize, Option<Scalar>),
}

/// How a pin is written.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Form {
    Eq,
    EqReversed,
    EqCast,
    In,
    AnyArray,
}

#[derive(Debug, Clone, PartialEq)]
enum Pred {
    /// A key column equal to one of the values, written as `form`.
    Pin(usize, Vec<Val>, Form),
    /// `col = ANY($n)`: a parameter array (elements `None` are `NULL`s; the
    /// array itself `None` is a `NULL`).
    AnyParam(usize, usize, Option<Vec<Option<Scalar>>>),
    /// `col op val` with op one of `<`, `<=`, `>`, `>=`, `<>`.
    Cmp(Col, &'static str, Val),
    /// `x = val` (a non-key "pin").
    XEq(Val),
    IsNull(Col, bool),
    Bool(bool),
    /// `EXISTS (SELECT 1 FROM other WHERE other.k = x)`: unknown to the model.
    Exists,
    And(Box<Pred>, Box<Pred>),
    Or(Box<Pred>, Box<Pred>),
    Not(Box<Pred>),
    Paren(Box<Pred>),
}

/// A row: its key values and `x`.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    key: Vec<Scalar>,
    x: Option<i64>,
}

impl Row {
    fn key_json(&self, table: Table) -> Value {
        let mut map = serde_json::Map::new();
        for ((name, _), v) in table.keys().iter().zip(&self.key) {
            map.insert((*name).to_owned(), v.json());
        }
        Value::Object(map)
    }

    fn col(&self, col: Col) -> Option<Scalar> {
        match col {
            Col::Key(i) => self.key.get(i).cloned(),
            Col::X => self.x.map(Scalar::Int),
        }
    }
}

fn val_scalar(v: &Val) -> Option<Scalar> {
    match v {
        Val::Lit(s) => Some(s.clone()),
        Val::Param(_, s) => s.clone(),
    }
}

/// SQL's `v IN (set)` in three values.
fn in_set(v: &Scalar, set: &[Option<Scalar>]) -> Option<bool> {
    if set.iter().any(|s| s.as_ref() == Some(v)) {
        Some(true)
    } else if set.iter().any(Option::is_none) {
        None
    } else {
        Some(false)
    }
}

fn compare(a: &Scalar, op: &str, b: &Scalar) -> Option<bool> {
    let ord = match (a, b) {
        (Scalar::Int(a), Scalar::Int(b)) => a.cmp(b),
        (Scalar::Text(a), Scalar::Text(b)) => a.cmp(b),
        _ => return None,
    };
    Some(match op {
        "<" => ord.is_lt(),
        "<=" => ord.is_le(),
        ">" => ord.is_gt(),
        ">=" => ord.is_ge(),
        _ => ord.is_ne(),
    })
}

/// The `WHERE` on a row, in SQL's three values (`None` is `NULL`).
fn eval(p: &Pred, row: &Row) -> Option<bool> {
    match p {
        Pred::Pin(col, vals, _) => {
            let set: Vec<Option<Scalar>> = vals.iter().map(val_scalar).collect();
            in_set(&row.key[*col], &set)
        }
        Pred::AnyParam(col, _, array) => match array {
            None => None,
            Some(items) => in_set(&row.key[*col], items),
        },
        Pred::Cmp(col, op, v) => compare(&row.col(*col)?, op, &val_scalar(v)?),
        Pred::XEq(v) => compare(&Scalar::Int(row.x?), "=", &val_scalar(v)?).map(|ne| !ne),
        Pred::IsNull(col, negated) => Some(row.col(*col).is_none() != *negated),
        Pred::Bool(b) => Some(*b),
        Pred::Exists => None,
        Pred::And(a, b) => match (eval(a, row), eval(b, row)) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        Pred::Or(a, b) => match (eval(a, row), eval(b, row)) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        Pred::Not(a) => eval(a, row).map(|b| !b),
        Pred::Paren(a) => eval(a, row),
    }
}

fn has_subquery(p: &Pred) -> bool {
    match p {
        Pred::Exists => true,
        Pred::And(a, b) | Pred::Or(a, b) => has_subquery(a) || has_subquery(b),
        Pred::Not(a) | Pred::Paren(a) => has_subquery(a),
        _ => false,
    }
}

/// The top-level conjuncts (through `AND` and parentheses).
fn conjuncts(p: &Pred) -> Vec<&Pred> {
    match p {
        Pred::And(a, b) => {
            let mut out = conjuncts(a);
            out.extend(conjuncts(b));
            out
        }
        Pred::Paren(a) => conjuncts(a),
        other => vec![other],
    }
}

/// The key column a top-level conjunct pins, with the values it admits
/// (`None` elements: `NULL`s, which admit nothing).
fn pin_of(p: &Pred) -> Option<(usize, Vec<Option<Scalar>>)> {
    match p {
        Pred::Pin(col, vals, _) => Some((*col, vals.iter().map(val_scalar).collect())),
        Pred::AnyParam(col, _, array) => Some((*col, array.clone().unwrap_or_default())),
        _ => None,
    }
}

// ---------------------------------------------------------------- the case

/// A generated query and the rows written.
#[derive(Clone)]
struct Case {
    table: Table,
    alias: bool,
    upper: bool,
    select_subquery: bool,
    aggregate: bool,
    order_limit: bool,
    filter: Pred,
    params: Vec<Value>,
    rows: Vec<Row>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} with {:?}, rows {:?}",
            self.sql(),
            self.params,
            self.rows
        )
    }
}

impl Case {
    fn kw(&self, word: &str) -> String {
        if self.upper {
            word.to_uppercase()
        } else {
            word.to_lowercase()
        }
    }

    fn col(&self, col: Col) -> String {
        let name = match col {
            Col::Key(i) => self.table.keys()[i].0,
            Col::X => "x",
        };
        if self.alias {
            format!("r.{name}")
        } else {
            name.to_owned()
        }
    }

    fn val(&self, v: &Val) -> String {
        match v {
            Val::Lit(s) => s.sql(),
            Val::Param(n, _) => format!("${n}"),
        }
    }

    /// Renders with the fewest parentheses SQL's precedence allows (OR < AND <
    /// NOT < comparisons), plus the ones the case asks for.
    fn pred(&self, p: &Pred) -> (String, u8) {
        let wrap = |(text, prec): (String, u8), need: u8| {
            if prec < need {
                format!("({text})")
            } else {
                text
            }
        };
        match p {
            Pred::Pin(col, vals, form) => {
                let c = self.col(Col::Key(*col));
                let list: Vec<String> = vals.iter().map(|v| self.val(v)).collect();
                let text = match form {
                    Form::Eq => format!("{c} = {}", list[0]),
                    Form::EqReversed => format!("{} = {c}", list[0]),
                    Form::EqCast => {
                        let ty = if self.table.keys()[*col].1 {
                            "text"
                        } else {
                            "int8"
                        };
                        // `-3::int8` is `-(3::int8)`: an expression, not a cast constant.
                        if list[0].starts_with('-') {
                            format!("{c} = ({})::{ty}", list[0])
                        } else {
                            format!("{c} = {}::{ty}", list[0])
                        }
                    }
                    Form::In => format!("{c} {} ({})", self.kw("IN"), list.join(", ")),
                    Form::AnyArray => format!(
                        "{c} = {}({}[{}])",
                        self.kw("ANY"),
                        self.kw("ARRAY"),
                        list.join(", ")
                    ),
                };
                (text, 4)
            }
            Pred::AnyParam(col, n, _) => (
                format!("{} = {}(${n})", self.col(Col::Key(*col)), self.kw("ANY")),
                4,
            ),
            Pred::Cmp(col, op, v) => (format!("{} {op} {}", self.col(*col), self.val(v)), 4),
            Pred::XEq(v) => (format!("{} = {}", self.col(Col::X), self.val(v)), 4),
            Pred::IsNull(col, negated) => {
                let not = if *negated { " NOT" } else { "" };
                (
                    format!("{} {}", self.col(*col), self.kw(&format!("IS{not} NULL"))),
                    4,
                )
            }
            Pred::Bool(b) => (self.kw(if *b { "TRUE" } else { "FALSE" }), 5),
            Pred::Exists => (
                format!(
                    "{} (SELECT 1 FROM other o WHERE o.k = {})",
                    self.kw("EXISTS"),
                    self.col(Col::X)
                ),
                5,
            ),
            Pred::And(a, b) => (
                format!(
                    "{} {} {}",
                    wrap(self.pred(a), 2),
                    self.kw("AND"),
                    wrap(self.pred(b), 2)
                ),
                2,
            ),
            Pred::Or(a, b) => (
                format!(
                    "{} {} {}",
                    wrap(self.pred(a), 1),
                    self.kw("OR"),
                    wrap(self.pred(b), 1)
                ),
                1,
            ),
            Pred::Not(a) => (format!("{} {}", self.kw("NOT"), wrap(self.pred(a), 3)), 3),
            Pred::Paren(a) => (format!("({})", self.pred(a).0), 5),
        }
    }

    fn sql(&self) -> String {
        let mut list = if self.aggregate { "count(*)" } else { "*" }.to_owned();
        if self.select_subquery {
            list.push_str(&format!(", ({} 1)", self.kw("SELECT")));
        }
        let from = if self.alias {
            format!("{} r", self.table.name())
        } else {
            self.table.name().to_owned()
        };
        let tail = if self.order_limit {
            format!(" {} 1 {} 10", self.kw("ORDER BY"), self.kw("LIMIT"))
        } else {
            String::new()
        };
        format!(
            "{} {list} {} {from} {} {}{tail}",
            self.kw("SELECT"),
            self.kw("FROM"),
            self.kw("WHERE"),
            self.pred(&self.filter).0.trim_end()
        )
    }

    /// What the model says: row-level exactly when no subquery appears and the
    /// top-level `AND` pins every key column.
    fn expect_row_level(&self) -> bool {
        if self.select_subquery || has_subquery(&self.filter) {
            return false;
        }
        let pinned: Vec<usize> = conjuncts(&self.filter)
            .into_iter()
            .filter_map(|c| pin_of(c).map(|(col, _)| col))
            .collect();
        (0..self.table.keys().len()).all(|k| pinned.contains(&k))
    }

    /// Whether a key passes every top-level pin.
    fn key_pinned(&self, key: &[Scalar]) -> bool {
        conjuncts(&self.filter)
            .into_iter()
            .filter_map(pin_of)
            .all(|(col, set)| set.iter().any(|s| s.as_ref() == Some(&key[col])))
    }

    fn event(&self, op: Operation, rows: &[&Row]) -> Event {
        let keys = rows
            .iter()
            .map(|r| serde_json::from_value::<RowKey>(r.key_json(self.table)).expect("a key"))
            .collect();
        Event::new("ch", op, "public", self.table.name()).with_keys(keys)
    }
}

// ---------------------------------------------------------------- strategies

fn int() -> impl Strategy<Value = i64> {
    prop_oneof![6 => 0i64..4, 1 => -3i64..100]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just("c".to_owned()),
        Just("it's".to_owned())
    ]
}

fn scalar(is_text: bool) -> BoxedStrategy<Scalar> {
    if is_text {
        text().prop_map(Scalar::Text).boxed()
    } else {
        int().prop_map(Scalar::Int).boxed()
    }
}

/// A value; parameters get their number when the case is assembled.
fn val(is_text: bool) -> BoxedStrategy<Val> {
    prop_oneof![
        2 => scalar(is_text).prop_map(Val::Lit),
        3 => proptest::option::weighted(0.85, scalar(is_text)).prop_map(|s| Val::Param(0, s)),
    ]
    .boxed()
}

/// A pin on key column `col`, in any form.
fn pin(table: Table, col: usize) -> BoxedStrategy<Pred> {
    let is_text = table.keys()[col].1;
    prop_oneof![
        (
            val(is_text),
            prop_oneof![Just(Form::Eq), Just(Form::EqReversed), Just(Form::EqCast)]
        )
            .prop_map(move |(v, form)| Pred::Pin(col, vec![v], form)),
        (
            proptest::collection::vec(val(is_text), 1..4),
            prop_oneof![Just(Form::In), Just(Form::AnyArray)]
        )
            .prop_map(move |(vs, form)| Pred::Pin(col, vs, form)),
        proptest::option::weighted(
            0.9,
            proptest::collection::vec(proptest::option::weighted(0.85, scalar(is_text)), 0..4)
        )
        .prop_map(move |array| Pred::AnyParam(col, 0, array)),
    ]
    .boxed()
}

fn leaf(table: Table) -> BoxedStrategy<Pred> {
    let keys = table.keys().len();
    let pin = (0..keys).prop_flat_map(move |col| pin(table, col));
    let int_cols = move || {
        let mut cols = vec![Just(Col::X)];
        cols.extend(
            (0..keys)
                .filter(|k| !table.keys()[*k].1)
                .map(|k| Just(Col::Key(k))),
        );
        proptest::strategy::Union::new(cols)
    };
    prop_oneof![
        6 => pin,
        2 => (int_cols(), prop_oneof![Just("<"), Just("<="), Just(">"), Just(">="), Just("<>")], val(false))
            .prop_map(|(c, op, v)| Pred::Cmp(c, op, v)),
        1 => val(false).prop_map(Pred::XEq),
        1 => (int_cols(), any::<bool>()).prop_map(|(c, n)| Pred::IsNull(c, n)),
        1 => any::<bool>().prop_map(Pred::Bool),
        1 => Just(Pred::Exists),
    ]
    .boxed()
}

fn pred(table: Table) -> impl Strategy<Value = Pred> {
    leaf(table).prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Pred::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Pred::Or(Box::new(a), Box::new(b))),
            inner.clone().prop_map(|a| Pred::Not(Box::new(a))),
            inner.prop_map(|a| Pred::Paren(Box::new(a))),
        ]
    })
}

/// A top-level conjunction of 1 to 4 predicates, half the time after a pin on
/// every key column (so that row-level cases are common).
fn filter(table: Table) -> impl Strategy<Value = Pred> {
    let pins: Vec<BoxedStrategy<Pred>> = (0..table.keys().len()).map(|c| pin(table, c)).collect();
    (
        proptest::option::of(pins),
        proptest::collection::vec(pred(table), 1..5),
    )
        .prop_map(|(pins, preds)| {
            let mut iter = pins.unwrap_or_default().into_iter().chain(preds);
            let first = iter.next().unwrap_or(Pred::Bool(true));
            iter.fold(first, |a, b| Pred::And(Box::new(a), Box::new(b)))
        })
}

/// Every value the filter compares each key column with (so that rows with
/// those keys, the interesting ones, are written too).
fn key_values(p: &Pred, out: &mut [Vec<Scalar>]) {
    let mut add = |col: usize, s: Option<Scalar>| {
        if let (Some(s), Some(values)) = (s, out.get_mut(col)) {
            if !values.contains(&s) {
                values.push(s);
            }
        }
    };
    match p {
        Pred::Pin(col, vals, _) => vals.iter().for_each(|v| add(*col, val_scalar(v))),
        Pred::AnyParam(col, _, array) => array.iter().flatten().for_each(|s| add(*col, s.clone())),
        Pred::Cmp(Col::Key(col), _, v) => add(*col, val_scalar(v)),
        Pred::And(a, b) | Pred::Or(a, b) => {
            key_values(a, out);
            key_values(b, out);
        }
        Pred::Not(a) | Pred::Paren(a) => key_values(a, out),
        _ => {}
    }
}

/// Rows whose keys combine the values the filter names, each with `x` unset,
/// small and large.
fn rows_the_filter_names(table: Table, filter: &Pred) -> Vec<Row> {
    let mut values = vec![Vec::new(); table.keys().len()];
    key_values(filter, &mut values);
    let mut keys: Vec<Vec<Scalar>> = vec![Vec::new()];
    for (col, vals) in values.iter().enumerate() {
        let fallback = [if table.keys()[col].1 {
            Scalar::Text("a".into())
        } else {
            Scalar::Int(0)
        }];
        let vals = if vals.is_empty() {
            &fallback[..]
        } else {
            &vals[..]
        };
        keys = keys
            .into_iter()
            .flat_map(|k| {
                vals.iter().map(move |v| {
                    let mut k = k.clone();
                    k.push(v.clone());
                    k
                })
            })
            .take(16)
            .collect();
    }
    keys.into_iter()
        .flat_map(|key| {
            [None, Some(0), Some(50)].map(|x| Row {
                key: key.clone(),
                x,
            })
        })
        .collect()
}

fn row(table: Table) -> impl Strategy<Value = Row> {
    let key: Vec<BoxedStrategy<Scalar>> = table.keys().iter().map(|(_, t)| scalar(*t)).collect();
    (key, proptest::option::weighted(0.8, int())).prop_map(|(key, x)| Row { key, x })
}

/// Numbers the parameters in order of appearance and collects their values.
fn number_params(p: &mut Pred, params: &mut Vec<Value>) {
    let number = |v: &mut Val, params: &mut Vec<Value>| {
        if let Val::Param(n, s) = v {
            params.push(s.as_ref().map_or(Value::Null, Scalar::json));
            *n = params.len();
        }
    };
    match p {
        Pred::Pin(_, vals, _) => vals.iter_mut().for_each(|v| number(v, params)),
        Pred::AnyParam(_, n, array) => {
            params.push(match array {
                None => Value::Null,
                Some(items) => Value::Array(
                    items
                        .iter()
                        .map(|s| s.as_ref().map_or(Value::Null, Scalar::json))
                        .collect(),
                ),
            });
            *n = params.len();
        }
        Pred::Cmp(_, _, v) | Pred::XEq(v) => number(v, params),
        Pred::And(a, b) | Pred::Or(a, b) => {
            number_params(a, params);
            number_params(b, params);
        }
        Pred::Not(a) | Pred::Paren(a) => number_params(a, params),
        Pred::IsNull(..) | Pred::Bool(_) | Pred::Exists => {}
    }
}

fn case() -> impl Strategy<Value = Case> {
    prop_oneof![Just(Table::T), Just(Table::M)].prop_flat_map(|table| {
        (
            (any::<bool>(), any::<bool>()),
            proptest::bool::weighted(0.1),
            (any::<bool>(), any::<bool>()),
            filter(table),
            proptest::collection::vec(row(table), 1..6),
        )
            .prop_map(
                move |(
                    (alias, upper),
                    select_subquery,
                    (aggregate, order_limit),
                    mut filter,
                    rows,
                )| {
                    let mut params = Vec::new();
                    number_params(&mut filter, &mut params);
                    let mut rows = rows;
                    rows.extend(rows_the_filter_names(table, &filter));
                    Case {
                        table,
                        alias,
                        upper,
                        select_subquery,
                        aggregate,
                        order_limit,
                        filter,
                        params,
                        rows,
                    }
                },
            )
    })
}

fn catalog() -> Catalog {
    Catalog::new()
        .table("public.t", &[("id", KeyType::Int)])
        .table("public.m", &[("a", KeyType::Int), ("b", KeyType::Text)])
        .table("public.other", &[("k", KeyType::Int)])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn row_level_is_sound_and_precise(case in case()) {
        let sql = case.sql();
        let analysis = analyze(&sql).map_err(|e| TestCaseError::fail(format!("{sql}: {e}")))?;
        let deps = derive(&analysis, &catalog(), &ResolveOptions::new())
            .map_err(|e| TestCaseError::fail(format!("{sql}: {e}")))?;
        prop_assert_eq!(
            deps.is_row_level(),
            case.expect_row_level(),
            "derived {}",
            deps.explain()
        );
        let params = &case.params;
        if !deps.is_row_level() {
            // Table-level: every write to the table counts.
            for r in &case.rows {
                prop_assert!(deps.affects(params, &case.event(Operation::Update, &[r])));
            }
            return Ok(());
        }
        for (i, r) in case.rows.iter().enumerate() {
            let passes = eval(&case.filter, r) == Some(true);
            let pinned = case.key_pinned(&r.key);
            // The model agrees with itself: a row the WHERE lets through has a pinned key.
            prop_assert!(!passes || pinned, "row {:?} passes but is not pinned", r);
            for op in [Operation::Insert, Operation::Update, Operation::Delete] {
                let affects = deps.affects(params, &case.event(op, &[r]));
                // Sound: a write to a row the query reads is seen.
                prop_assert!(!passes || affects, "{} of {:?} missed", op, r);
                // Precise: a write to a row whose key fails the pins is not.
                prop_assert_eq!(affects, pinned, "{} of {:?} ({})", op, r, deps.explain());
            }
            // An UPDATE moving a key: old and new in one event.
            let next = &case.rows[(i + 1) % case.rows.len()];
            let moved = deps.affects(params, &case.event(Operation::Update, &[r, next]));
            prop_assert_eq!(moved, pinned || case.key_pinned(&next.key));
        }
        // Another table's writes never count; a keyless or TRUNCATE event always does.
        prop_assert!(!deps.affects(params, &Event::new("ch", Operation::Update, "public", "other")));
        prop_assert!(deps.affects(params, &Event::new("ch", Operation::Update, "public", case.table.name())));
        prop_assert!(deps.affects(params, &case.event(Operation::Truncate, &[])));
    }
}

// ---------------------------------------------------------------- never panics

const TOKENS: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "AND",
    "OR",
    "NOT",
    "(",
    ")",
    ",",
    "=",
    "<>",
    "IN",
    "ANY",
    "ALL",
    "ARRAY[",
    "]",
    "$1",
    "$2",
    "$0",
    "$99999999999",
    "'x'",
    "''",
    "1",
    "-1",
    "1.5",
    "NULL",
    "TRUE",
    "t",
    "m",
    "t.id",
    "id",
    "a",
    "b",
    "x",
    "*",
    "JOIN",
    "ON",
    "USING",
    "LATERAL",
    "WITH",
    "AS",
    "RECURSIVE",
    "UNION",
    "EXCEPT",
    "INTERSECT",
    "ORDER BY",
    "LIMIT",
    "GROUP BY",
    "HAVING",
    "count(*)",
    "now()",
    "EXISTS",
    "::int8",
    "::text[]",
    "FOR UPDATE",
    "ONLY",
    "VALUES",
    ";",
    "\"Q\"",
    "s.t",
    "--",
    "/*",
    "*/",
    "$$",
    "E'\\'",
    "\u{0}",
    "é",
    "OPERATOR(pg_catalog.=)",
    "CASE",
    "WHEN",
    "THEN",
    "END",
    "IS",
    "DISTINCT",
    "TABLE",
    "INTO",
    "DELETE",
    "UPDATE",
    "SET",
];

fn soup() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(TOKENS), 0..40).prop_map(|t| t.join(" "))
}

/// A generated query with a few characters deleted, inserted or replaced.
fn mutated() -> impl Strategy<Value = String> {
    (
        case(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<char>(), 0u8..3), 1..6),
    )
        .prop_map(|(case, edits)| {
            let mut chars: Vec<char> = case.sql().chars().collect();
            for (at, c, kind) in edits {
                if chars.is_empty() {
                    break;
                }
                let i = at.index(chars.len());
                match kind {
                    0 => {
                        chars.remove(i);
                    }
                    1 => chars.insert(i, c),
                    _ => chars[i] = c,
                }
            }
            chars.into_iter().collect()
        })
}

fn exercise(sql: &str, params: &[Value]) {
    let Ok(analysis) = analyze(sql) else {
        return;
    };
    let Ok(deps) = derive(&analysis, &catalog(), &ResolveOptions::new()) else {
        return;
    };
    let _ = deps.explain();
    for table in ["t", "m", "other"] {
        let e = Event::new("ch", Operation::Update, "public", table)
            .with_keys(vec![RowKey::single("id", 1), RowKey::single("b", "x")]);
        let _ = deps.affects(params, &e);
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        proptest::collection::vec(inner, 0..4).prop_map(Value::Array)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

    #[test]
    fn text_never_panics(sql in any::<String>(), params in proptest::collection::vec(json_value(), 0..3)) {
        exercise(&sql, &params);
    }

    #[test]
    fn sql_like_text_never_panics(
        sql in prop_oneof![soup(), mutated()],
        params in proptest::collection::vec(json_value(), 0..3),
    ) {
        exercise(&sql, &params);
    }
}
