//! The SQL text the installer runs: the notify function, the triggers, and what
//! removes them. Pure string building, no database access.

use pgcachewatch_core::Operation;

use super::ident::{quote_ident, quote_literal};
use super::table_name::TableName;

/// Every object pgcachewatch installs carries a comment starting with this; it is
/// how `uninstall` and `status` tell its objects from anybody else's.
pub(crate) const MARKER: &str = "pgcachewatch:";

/// The comment on the notify function.
pub(crate) const FUNCTION_COMMENT: &str = "pgcachewatch:function v1 \
    (sends one NOTIFY per statement on the channel named by its first trigger argument; \
    installed and removed by the pgcachewatch installer)";

/// The comment on each trigger.
pub(crate) const TRIGGER_COMMENT: &str = "pgcachewatch:trigger v1";

/// Transition table names the row-mode triggers declare and the function reads.
const NEW_ROWS: &str = "pgcachewatch_new";
const OLD_ROWS: &str = "pgcachewatch_old";

/// Key of the transaction-scoped advisory lock that serializes installs and
/// uninstalls (concurrent `CREATE OR REPLACE FUNCTION` of one function fails with
/// "tuple concurrently updated"). ASCII "pgcw" followed by "inst".
const INSTALL_LOCK_KEY: i64 = 0x7067_6377_696e_7374;

/// The second trigger argument: what the function sends.
pub(crate) const MODE_TABLE: &str = "table";
pub(crate) const MODE_ROWS: &str = "rows";

/// The trigger pgcachewatch puts on a table for `op`: `pgcachewatch_insert`, ….
pub(crate) fn trigger_name(op: Operation) -> String {
    format!("pgcachewatch_{}", op.as_str())
}

/// A list of SQL statements meant to run in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    statements: Vec<String>,
    warnings: Vec<super::InstallWarning>,
}

impl Plan {
    pub(crate) fn push(&mut self, statement: impl Into<String>) {
        self.statements.push(statement.into());
    }

    pub(crate) fn set_warnings(&mut self, warnings: Vec<super::InstallWarning>) {
        self.warnings = warnings;
    }

    /// What the install that applied this plan warned about (a table without a
    /// primary key in row mode); empty for a plan that was not applied
    /// ([`Installer::plan_install`](super::Installer::plan_install): see
    /// [`Installer::check`](super::Installer::check) for a dry run's warnings).
    pub fn warnings(&self) -> &[super::InstallWarning] {
        &self.warnings
    }

    /// The statements, without `BEGIN`/`COMMIT`, each ending in `;`.
    pub fn statements(&self) -> &[String] {
        &self.statements
    }

    /// Whether the plan changes nothing (it holds no statement but the lock it takes).
    pub fn is_empty(&self) -> bool {
        let lock = lock_statement();
        self.statements.iter().all(|s| *s == lock)
    }

    /// The statements as one script, without `BEGIN`/`COMMIT`, for running inside
    /// a transaction the caller already opened.
    pub(crate) fn body(&self) -> String {
        self.statements.join("\n")
    }
}

/// The whole plan as a script to pipe into `psql`: wrapped in `BEGIN`/`COMMIT` so
/// it applies entirely or not at all.
impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "BEGIN;")?;
        for statement in &self.statements {
            writeln!(f, "{statement}")?;
        }
        writeln!(f, "COMMIT;")
    }
}

pub(crate) fn lock_statement() -> String {
    format!("SELECT pg_catalog.pg_advisory_xact_lock({INSTALL_LOCK_KEY});")
}

/// `"schema"."name"`, as `EXECUTE FUNCTION` wants it (arguments follow).
pub(crate) fn qualified_function(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// `"schema"."name"()`, as `COMMENT ON` / `DROP FUNCTION` want it.
pub(crate) fn function_signature(schema: &str, name: &str) -> String {
    format!("{}()", qualified_function(schema, name))
}

/// `CREATE OR REPLACE FUNCTION …` and its marker comment.
///
/// The body is static: the channel and the mode come from the trigger's
/// arguments, so one function serves every table and channel and nothing a user
/// supplies is ever spliced into PL/pgSQL.
pub(crate) fn create_function(schema: &str, name: &str) -> [String; 2] {
    let signature = function_signature(schema, name);
    let create = format!(
        r#"CREATE OR REPLACE FUNCTION {signature} RETURNS trigger
LANGUAGE plpgsql
-- Row keys are to_jsonb values: a timestamptz key is written in UTC whatever
-- the writer's time zone, as the replication source writes it.
SET "TimeZone" = 'UTC'
AS $pgcachewatch$
DECLARE
  channel text := TG_ARGV[0];
  key_expr text;
  rows_query text;
  keys jsonb;
  payload text;
BEGIN
  IF TG_NARGS > 1 AND TG_ARGV[1] = '{MODE_ROWS}' AND TG_OP <> 'TRUNCATE' THEN
    -- Primary-key columns, looked up per statement so a changed key is followed.
    SELECT pg_catalog.string_agg(pg_catalog.format('%L, t.%I', a.attname, a.attname), ', ' ORDER BY k.ord)
      INTO key_expr
      FROM pg_catalog.pg_index i
      CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = TG_RELID AND i.indisprimary;
    IF key_expr IS NOT NULL THEN
      key_expr := 'pg_catalog.jsonb_build_object(' || key_expr || ')';
      rows_query := CASE TG_OP
        WHEN 'INSERT' THEN pg_catalog.format('SELECT %s AS k FROM {NEW_ROWS} t', key_expr)
        WHEN 'DELETE' THEN pg_catalog.format('SELECT %s AS k FROM {OLD_ROWS} t', key_expr)
        ELSE pg_catalog.format('SELECT %s AS k FROM {NEW_ROWS} t UNION SELECT %s FROM {OLD_ROWS} t', key_expr, key_expr)
      END;
      -- 801 keys print as at least 8008 bytes: reading more cannot make them fit.
      EXECUTE 'SELECT pg_catalog.jsonb_agg(k) FROM (' || rows_query || ' LIMIT 801) s' INTO keys;
      payload := pg_catalog.jsonb_build_object(
        'operation', pg_catalog.lower(TG_OP), 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
        'sent_at', pg_catalog.clock_timestamp(), 'txid', pg_catalog.txid_current(),
        'keys', COALESCE(keys, '[]'::jsonb))::text;
      IF pg_catalog.octet_length(payload) < 8000 THEN
        PERFORM pg_catalog.pg_notify(channel, payload);
        RETURN NULL;
      END IF;
      -- Too many keys for one NOTIFY: fall back to a table-level event.
    END IF;
  END IF;
  PERFORM pg_catalog.pg_notify(channel, pg_catalog.json_build_object(
    'operation', pg_catalog.lower(TG_OP), 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
    'sent_at', pg_catalog.clock_timestamp(), 'txid', pg_catalog.txid_current())::text);
  RETURN NULL;
END
$pgcachewatch$;"#
    );
    let comment = format!(
        "COMMENT ON FUNCTION {signature} IS {};",
        quote_literal(FUNCTION_COMMENT)
    );
    [create, comment]
}

/// Drop-if-exists, create and mark the trigger for `op` on `table`.
pub(crate) fn create_trigger(
    table: &TableName,
    op: Operation,
    function: &str,
    channel: &str,
    row_keys: bool,
) -> [String; 3] {
    let name = quote_ident(&trigger_name(op));
    let on = table.quoted();
    let referencing = match (row_keys, op) {
        (false, _) | (true, Operation::Truncate) => String::new(),
        (true, Operation::Insert) => format!(" REFERENCING NEW TABLE AS {NEW_ROWS}"),
        (true, Operation::Delete) => format!(" REFERENCING OLD TABLE AS {OLD_ROWS}"),
        (true, Operation::Update) => {
            format!(" REFERENCING NEW TABLE AS {NEW_ROWS} OLD TABLE AS {OLD_ROWS}")
        }
    };
    let mode = if row_keys { MODE_ROWS } else { MODE_TABLE };
    [
        drop_trigger(table, &trigger_name(op)),
        format!(
            "CREATE TRIGGER {name} AFTER {op} ON {on}{referencing} FOR EACH STATEMENT \
             EXECUTE FUNCTION {function}({}, {});",
            quote_literal(channel),
            quote_literal(mode),
            op = op.as_str().to_uppercase(),
        ),
        format!(
            "COMMENT ON TRIGGER {name} ON {on} IS {};",
            quote_literal(TRIGGER_COMMENT)
        ),
    ]
}

pub(crate) fn drop_trigger(table: &TableName, trigger: &str) -> String {
    format!(
        "DROP TRIGGER IF EXISTS {} ON {};",
        quote_ident(trigger),
        table.quoted()
    )
}

pub(crate) fn drop_function(schema: &str, name: &str) -> String {
    format!(
        "DROP FUNCTION IF EXISTS {};",
        function_signature(schema, name)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_stay_inside_their_quotes() {
        let table = TableName::new(r#"s"; DROP TABLE x; --"#, "t'\\").unwrap();
        let function = qualified_function("f\"s", "f\"n");
        let [drop, create, comment] = create_trigger(
            &table,
            Operation::Update,
            &function,
            "ch'; NOTIFY x; --\\",
            true,
        );
        assert_eq!(
            drop,
            r#"DROP TRIGGER IF EXISTS "pgcachewatch_update" ON "s""; DROP TABLE x; --"."t'\";"#
        );
        assert!(
            create.ends_with(r#"EXECUTE FUNCTION "f""s"."f""n"(E'ch''; NOTIFY x; --\\', 'rows');"#),
            "{create}"
        );
        assert!(create
            .contains("REFERENCING NEW TABLE AS pgcachewatch_new OLD TABLE AS pgcachewatch_old"));
        assert!(comment.starts_with(r#"COMMENT ON TRIGGER "pgcachewatch_update" ON "s""; DROP"#));
    }

    #[test]
    fn truncate_never_references_transition_tables() {
        let table = TableName::new("public", "t").unwrap();
        let [_, create, _] = create_trigger(&table, Operation::Truncate, "f()", "c", true);
        assert!(!create.contains("REFERENCING"), "{create}");
    }

    #[test]
    fn the_function_body_contains_no_user_input() {
        let [create, _] = create_function("a$pgcachewatch$b", "n");
        // The name is quoted in the signature; the body's dollar quote is static.
        assert_eq!(create.matches("$pgcachewatch$").count(), 3);
        assert!(create.contains("clock_timestamp()"));
        assert!(!create.contains("now()"));
    }
}
