//! [`TableName`]: a schema-qualified table name, parsed with PostgreSQL's rules.

use std::fmt;
use std::str::FromStr;

use super::error::InstallError;
use super::ident::{check_ident, quote_ident};

/// The schema a table name without one is looked up in.
pub const DEFAULT_SCHEMA: &str = "public";

/// A table to watch: schema and name, both exactly as stored in the catalog.
///
/// Parse it from SQL-style text (`users`, `app.users`, `"My Schema"."Tab;le"`):
/// unquoted parts fold to lower case as PostgreSQL does, quoted parts keep their
/// case and may contain anything (`""` is a literal quote); the schema defaults to
/// `public`. Or build it from raw names with [`TableName::new`], which takes them
/// verbatim. Either way it is always quoted when turned into SQL.
///
/// ```
/// use pgcachewatch::postgres::TableName;
///
/// let t: TableName = "Users".parse()?;
/// assert_eq!((t.schema(), t.table()), ("public", "users"));
///
/// let t: TableName = r#""My Schema"."Tab;le ""x""""#.parse()?;
/// assert_eq!((t.schema(), t.table()), ("My Schema", r#"Tab;le "x""#));
/// assert_eq!(t.to_string(), r#""My Schema"."Tab;le ""x""""#);
///
/// assert_eq!(TableName::new("app", "Orders")?.to_string(), r#""app"."Orders""#);
/// assert!("a.b.c".parse::<TableName>().is_err());
/// # Ok::<_, pgcachewatch::postgres::InstallError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    schema: String,
    table: String,
}

impl TableName {
    /// A table from raw (unquoted, unfolded) names.
    pub fn new(schema: impl Into<String>, table: impl Into<String>) -> Result<Self, InstallError> {
        let (schema, table) = (schema.into(), table.into());
        check_ident("schema", &schema)?;
        check_ident("table", &table)?;
        Ok(TableName { schema, table })
    }

    /// Parses `table` or `schema.table` with PostgreSQL's quoting rules — the
    /// same parser as every other table name in pgcachewatch
    /// ([`TableRef::parse`](pgcachewatch_core::TableRef::parse)).
    pub fn parse(text: &str) -> Result<Self, InstallError> {
        let t = pgcachewatch_core::TableRef::parse(text).map_err(|e| bad(text, &e.reason))?;
        TableName::new(t.schema.as_deref().unwrap_or(DEFAULT_SCHEMA), t.table)
    }

    /// The schema, as stored in the catalog.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The table, as stored in the catalog.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// `"schema"."table"`, for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.quoted())
    }
}

impl FromStr for TableName {
    type Err = InstallError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TableName::parse(s)
    }
}

fn bad(text: &str, reason: &str) -> InstallError {
    InstallError::InvalidName {
        what: "table",
        name: text.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> (String, String) {
        let t = TableName::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        (t.schema, t.table)
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.to_owned(), b.to_owned())
    }

    #[test]
    fn parses_with_postgres_rules() {
        assert_eq!(parse("users"), pair("public", "users"));
        assert_eq!(parse(" App.Users "), pair("app", "users"));
        assert_eq!(parse(r#""App"."Users""#), pair("App", "Users"));
        assert_eq!(parse(r#"app."x.y""#), pair("app", "x.y"));
        assert_eq!(
            parse(r#""My Schema"."Tab;le""#),
            pair("My Schema", "Tab;le")
        );
        assert_eq!(parse(r#""a""b""#), pair("public", r#"a"b"#));
        assert_eq!(parse("t_1$"), pair("public", "t_1$"));
        assert_eq!(parse("Émile"), pair("public", "Émile"));
    }

    #[test]
    fn rejects_what_postgres_would_reject() {
        for s in [
            "",
            ".",
            "a.",
            ".a",
            "a.b.c",
            "1abc",
            "a b",
            "a;b",
            r#""unterminated"#,
            r#""""#,
            r#""a"b"#,
            "a-b",
        ] {
            assert!(TableName::parse(s).is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn display_round_trips() {
        for (schema, table) in [("public", "t"), ("My \"S\"", "Tab;le x"), ("é", "DROP")] {
            let t = TableName::new(schema, table).unwrap();
            assert_eq!(TableName::parse(&t.to_string()).unwrap(), t);
        }
    }
}
