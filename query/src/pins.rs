//! Pins: conjuncts of a `WHERE` that restrict a column to listed values.

use std::fmt;

use pg_query::protobuf::{self, a_const::Val, AExprKind};
use pg_query::NodeEnum;

/// One conjunct of the `WHERE` that lets a row through only if `column` equals
/// one of `values`: `column = v`, `v = column`, `column IN (v, …)`,
/// `column = ANY($n)` or `column = ANY(ARRAY[v, …])`, each `v` a parameter or a
/// literal (optionally cast).
///
/// A `NULL` value lets no row through.
///
/// ```
/// use pgcachewatch_query::{analyze, Literal, PinValue, Shape};
/// let a = analyze("SELECT * FROM t WHERE id IN ($1, 7, NULL) AND name = 'x'::text")?;
/// let Shape::Row(row) = a.shape() else { panic!() };
/// assert_eq!(row.pins[0].to_string(), "id IN ($1, 7, NULL)");
/// assert_eq!(row.pins[1].values[0], PinValue::Literal {
///     value: Literal::String("x".into()),
///     cast: Some("text".parse().unwrap()),
/// });
/// # Ok::<_, pgcachewatch_query::QueryError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pin {
    /// The column (as PostgreSQL reads the name).
    pub column: String,
    /// The values the column must equal one of (never empty).
    pub values: Vec<PinValue>,
    /// Whether it was written `= ANY(…)` (for display).
    pub any: bool,
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.column, self.rhs())
    }
}

impl Pin {
    /// The part after the column: `= $1`, `IN ($1, $2)`, `= ANY($1)`.
    pub(crate) fn rhs(&self) -> String {
        let list = |values: &[PinValue]| {
            values
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (self.any, self.values.as_slice()) {
            (true, [v @ PinValue::ParamArray { .. }]) => format!("= ANY({v})"),
            (true, values) => format!("= ANY(ARRAY[{}])", list(values)),
            (false, [v]) => format!("= {v}"),
            (false, values) => format!("IN ({})", list(values)),
        }
    }
}

/// A value a [`Pin`] compares the column with.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PinValue {
    /// `$index` (1-based), a scalar.
    Param {
        /// The parameter's number.
        index: usize,
        /// `$n::type`, if cast.
        cast: Option<TypeName>,
    },
    /// `= ANY($index)`: every element of the array parameter.
    ParamArray {
        /// The parameter's number.
        index: usize,
        /// `$n::type[]`, if cast (the array type).
        cast: Option<TypeName>,
    },
    /// A constant.
    Literal {
        /// The constant as the parser read it.
        value: Literal,
        /// `'…'::type` or `type '…'`, if cast.
        cast: Option<TypeName>,
    },
    /// `NULL`: equal to nothing.
    Null,
}

impl PinValue {
    /// The cast written on the value, if any.
    pub fn cast(&self) -> Option<&TypeName> {
        match self {
            PinValue::Param { cast, .. }
            | PinValue::ParamArray { cast, .. }
            | PinValue::Literal { cast, .. } => cast.as_ref(),
            PinValue::Null => None,
        }
    }
}

impl fmt::Display for PinValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (text, cast) = match self {
            PinValue::Param { index, cast } | PinValue::ParamArray { index, cast } => {
                (format!("${index}"), cast)
            }
            PinValue::Literal { value, cast } => (value.to_string(), cast),
            PinValue::Null => return f.write_str("NULL"),
        };
        f.write_str(&text)?;
        match cast {
            Some(t) => write!(f, "::{t}"),
            None => Ok(()),
        }
    }
}

/// A constant as PostgreSQL's parser reads it (before the server gives it a type).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Literal {
    /// An integer that fits 32 bits.
    Integer(i64),
    /// Any other number, as written (`7.0`, `1e3`, `9223372036854775808`).
    Numeric(String),
    /// A string constant, escapes processed.
    String(String),
    /// `TRUE` / `FALSE`.
    Bool(bool),
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Integer(i) => write!(f, "{i}"),
            Literal::Numeric(n) => f.write_str(n),
            Literal::String(s) => write!(f, "'{}'", s.replace('\'', "''")),
            Literal::Bool(b) => f.write_str(if *b { "TRUE" } else { "FALSE" }),
        }
    }
}

/// A type name in a cast: `int8`, `pg_catalog.int4`, `uuid[]`. Casts with a
/// type modifier (`varchar(3)`) change the value and never make a pin.
///
/// ```
/// use pgcachewatch_query::TypeName;
/// let t: TypeName = "pg_catalog.int8[]".parse().unwrap();
/// assert_eq!((t.schema.as_deref(), t.name.as_str(), t.array), (Some("pg_catalog"), "int8", true));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct TypeName {
    /// The schema, if written (the parser writes `pg_catalog` for SQL's own
    /// spellings: `bigint` is `pg_catalog.int8`).
    pub schema: Option<String>,
    /// The type's name.
    pub name: String,
    /// Whether it is an array of that type.
    pub array: bool,
}

impl fmt::Display for TypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = &self.schema {
            write!(f, "{s}.")?;
        }
        f.write_str(&self.name)?;
        if self.array {
            f.write_str("[]")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for TypeName {
    type Err = String;

    /// `[schema.]name[[]]`, as the parser spells it (lower case, no quotes).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (base, array) = match s.strip_suffix("[]") {
            Some(base) => (base, true),
            None => (s, false),
        };
        let mut parts = base.split('.');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, None) if !name.is_empty() => Ok(TypeName {
                schema: None,
                name: name.to_owned(),
                array,
            }),
            (Some(schema), Some(name), None) if !schema.is_empty() && !name.is_empty() => {
                Ok(TypeName {
                    schema: Some(schema.to_owned()),
                    name: name.to_owned(),
                    array,
                })
            }
            _ => Err(format!("not a type name: {s:?}")),
        }
    }
}

/// The pin a conjunct makes on a column of `range`, if it makes one.
pub(crate) fn read(
    conjunct: &protobuf::Node,
    range: &protobuf::RangeVar,
    alias: Option<&str>,
) -> Option<Pin> {
    let Some(NodeEnum::AExpr(expr)) = conjunct.node.as_ref() else {
        return None;
    };
    if !is_equals(&expr.name) {
        return None;
    }
    let lexpr = expr.lexpr.as_deref()?;
    let rexpr = expr.rexpr.as_deref()?;
    let kind = expr.kind;
    if kind == AExprKind::AexprOp as i32 {
        let (column, value) = match column(lexpr, range, alias) {
            Some(c) => (c, rexpr),
            None => (column(rexpr, range, alias)?, lexpr),
        };
        return Some(Pin {
            column,
            values: vec![value_of(value)?],
            any: false,
        });
    }
    let column = column(lexpr, range, alias)?;
    if kind == AExprKind::AexprIn as i32 {
        let Some(NodeEnum::List(list)) = rexpr.node.as_ref() else {
            return None;
        };
        let values = list
            .items
            .iter()
            .map(value_of)
            .collect::<Option<Vec<_>>>()?;
        return (!values.is_empty()).then_some(Pin {
            column,
            values,
            any: false,
        });
    }
    if kind == AExprKind::AexprOpAny as i32 {
        let values = match rexpr.node.as_ref()? {
            NodeEnum::ParamRef(p) => vec![PinValue::ParamArray {
                index: param_index(p)?,
                cast: None,
            }],
            NodeEnum::TypeCast(c) => {
                let Some(NodeEnum::ParamRef(p)) = c.arg.as_deref().and_then(|a| a.node.as_ref())
                else {
                    return None;
                };
                let cast = type_name(c.type_name.as_ref()?)?;
                if !cast.array {
                    return None;
                }
                vec![PinValue::ParamArray {
                    index: param_index(p)?,
                    cast: Some(cast),
                }]
            }
            NodeEnum::AArrayExpr(array) => array
                .elements
                .iter()
                .map(value_of)
                .collect::<Option<Vec<_>>>()?,
            _ => return None,
        };
        return (!values.is_empty()).then_some(Pin {
            column,
            values,
            any: true,
        });
    }
    None
}

/// `=` or `OPERATOR(pg_catalog.=)`.
fn is_equals(name: &[protobuf::Node]) -> bool {
    let parts: Vec<&str> = name
        .iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect();
    parts.len() == name.len() && matches!(parts.as_slice(), ["="] | ["pg_catalog", "="])
}

/// The column of `range` a bare column reference names (`id`, `t.id`,
/// `alias.id`, `schema.t.id`).
fn column(
    node: &protobuf::Node,
    range: &protobuf::RangeVar,
    alias: Option<&str>,
) -> Option<String> {
    let Some(NodeEnum::ColumnRef(c)) = node.node.as_ref() else {
        return None;
    };
    let parts: Vec<&str> = c
        .fields
        .iter()
        .map(|f| match f.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    let ours = |qualifier: &str| match alias {
        Some(a) => qualifier == a,
        None => qualifier == range.relname,
    };
    match parts.as_slice() {
        [col] => Some((*col).to_owned()),
        [q, col] if ours(q) => Some((*col).to_owned()),
        [s, t, col] if alias.is_none() && *t == range.relname && *s == range.schemaname => {
            Some((*col).to_owned())
        }
        _ => None,
    }
}

fn param_index(p: &protobuf::ParamRef) -> Option<usize> {
    usize::try_from(p.number).ok().filter(|n| *n > 0)
}

/// A parameter or constant, optionally cast once.
fn value_of(node: &protobuf::Node) -> Option<PinValue> {
    match node.node.as_ref()? {
        NodeEnum::ParamRef(p) => Some(PinValue::Param {
            index: param_index(p)?,
            cast: None,
        }),
        NodeEnum::AConst(c) => constant(c, None),
        NodeEnum::TypeCast(cast) => {
            let ty = type_name(cast.type_name.as_ref()?)?;
            if ty.array {
                return None;
            }
            match cast.arg.as_deref()?.node.as_ref()? {
                NodeEnum::ParamRef(p) => Some(PinValue::Param {
                    index: param_index(p)?,
                    cast: Some(ty),
                }),
                NodeEnum::AConst(c) => constant(c, Some(ty)),
                _ => None,
            }
        }
        _ => None,
    }
}

fn constant(c: &protobuf::AConst, cast: Option<TypeName>) -> Option<PinValue> {
    if c.isnull {
        return Some(PinValue::Null);
    }
    let value = match c.val.as_ref()? {
        Val::Ival(i) => Literal::Integer(i64::from(i.ival)),
        Val::Fval(f) => Literal::Numeric(f.fval.clone()),
        Val::Sval(s) => Literal::String(s.sval.clone()),
        Val::Boolval(b) => Literal::Bool(b.boolval),
        Val::Bsval(_) => return None,
    };
    Some(PinValue::Literal { value, cast })
}

/// A plain type name: no modifier, no `SETOF`, no `%TYPE`, at most one `[]`.
fn type_name(t: &protobuf::TypeName) -> Option<TypeName> {
    if !t.typmods.is_empty() || t.setof || t.pct_type || t.array_bounds.len() > 1 {
        return None;
    }
    let parts: Vec<&str> = t
        .names
        .iter()
        .map(|n| match n.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    let array = t.array_bounds.len() == 1;
    match parts.as_slice() {
        [name] => Some(TypeName {
            schema: None,
            name: (*name).to_owned(),
            array,
        }),
        [schema, name] => Some(TypeName {
            schema: Some((*schema).to_owned()),
            name: (*name).to_owned(),
            array,
        }),
        _ => None,
    }
}
