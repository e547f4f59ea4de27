//! [`resolve`]: an [`Analysis`] checked against a PostgreSQL server.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use pgcachewatch_core::TableRef;
use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection, Row};

use crate::analyze::{
    analyze, analyze_with, routine_class, Analysis, RelationName, RoutineName, Shape,
};
use crate::catalog::{Catalog, KeyColumn, KeyType, RelationKind, ResolvedRelation};
use crate::deps::{derive_checked, Dependencies, ResolveOptions};
use crate::error::QueryError;

/// Object ids below this are PostgreSQL's own (`FirstNormalObjectId`).
const FIRST_NORMAL_OID: i64 = 16_384;

/// At most this many views are expanded for one relation.
const MAX_VIEWS: usize = 1000;

/// Resolves `analysis` on the connection with the default [`ResolveOptions`].
/// See [`resolve_with`].
///
/// ```no_run
/// # async fn run(conn: &mut sqlx::PgConnection) -> Result<(), pgcachewatch_query::QueryError> {
/// use pgcachewatch_query::{analyze, resolve};
/// let deps = resolve(&analyze("SELECT * FROM users WHERE id = $1")?, conn).await?;
/// println!("{}", deps.explain()); // row-level on public.users(id) from $1
/// # Ok(()) }
/// ```
pub async fn resolve(
    analysis: &Analysis,
    conn: &mut PgConnection,
) -> Result<Dependencies, QueryError> {
    resolve_with(analysis, conn, &ResolveOptions::new()).await
}

/// Checks `analysis` against the server behind `conn` and derives the query's
/// [`Dependencies`]. Read-only; run once per statement (at attach), not per call.
///
/// 1. **Names**: every relation the query names is resolved as the server would
///    (`to_regclass`, through this connection's `search_path`); the result
///    records where each unqualified name led
///    ([`Dependencies::resolution_key`]).
/// 2. **Kinds**: tables; partitioned tables with all their partitions (a write
///    through a partition is named after the partition); inheritance children
///    unless read with `ONLY`; views expanded, recursively, to the relations,
///    functions and operators their rules depend on (`pg_depend`).
///    Refused ([`QueryError::NoEvents`]): materialized views, foreign tables (a
///    foreign partition too), sequences, system catalogs, temporary tables;
///    ([`QueryError::RowSecurity`]): tables with row-level security.
/// 3. **Functions and operators** named by the query or used by its views:
///    volatile ones are refused; so are those neither built in nor immutable
///    ([`QueryError::UnknownFunctionReads`]). Every overload the name can resolve
///    to is checked.
/// 4. **Keys**: the primary key from `pg_index`, with each column's type and
///    collation ([`KeyType`]); a key type with a user-defined `=` visible is not
///    compared exactly.
/// 5. **The generic plan** (unless [`ResolveOptions::plan_check`] is off): the
///    statement is prepared, planned generically (`plan_cache_mode =
///    force_generic_plan`, for this transaction only) and explained
///    (`EXPLAIN (VERBOSE, FORMAT JSON) EXECUTE` with `NULL`s), and the relations
///    the plan scans are compared with the ones found above. Where the plan reads
///    more, those are added and the query is table-level; where it reads less
///    (folded constants, pruned partitions), nothing is removed. Either way a
///    `tracing` warning says why, and so does [`Dependencies::warnings`].
///
/// With `standard_conforming_strings = off` on the server, the statement is read
/// again the way that server reads string literals.
///
/// The plan check prepares a statement (`pgcw_probe_…`, deallocated before this
/// returns) and plans it inside a transaction of its own, which it rolls back:
/// give it a connection that is not inside a transaction begun with a plain
/// `BEGIN` (one begun through sqlx becomes a savepoint), or turn the check off.
pub async fn resolve_with(
    analysis: &Analysis,
    conn: &mut PgConnection,
    options: &ResolveOptions,
) -> Result<Dependencies, QueryError> {
    let settings = sqlx::query(
        "SELECT pg_catalog.current_setting('standard_conforming_strings'), \
                pg_catalog.current_setting('search_path')",
    )
    .fetch_one(&mut *conn)
    .await?;
    let conforming: String = settings.try_get(0)?;
    let search_path: String = settings.try_get(1)?;
    let reread;
    let analysis = if conforming == "off" {
        reread = analyze_with(&analysis.sql, true)?;
        &reread
    } else {
        analysis
    };

    let mut catalog = Catalog::new().search_path(Vec::<String>::new());
    let mut probe = Probe {
        conn: &mut *conn,
        checked_routines: HashSet::new(),
        relations: BTreeSet::new(),
    };
    for written in &analysis.relations {
        let Some(rel) = probe.relation_by_name(written).await? else {
            return Err(QueryError::UnknownRelation {
                name: written.qualified(),
                search_path,
            });
        };
        let row_candidate = matches!(&analysis.shape, Shape::Row(c) if c.relation == *written);
        let resolved = probe.expand(&rel, written.only, row_candidate).await?;
        catalog = catalog.named(written.clone(), resolved);
    }
    for function in &analysis.functions {
        probe.function_by_name(function).await?;
    }
    for operator in &analysis.operators {
        probe.operator_by_name(operator).await?;
    }

    let mut warnings = Vec::new();
    let forced = if options.is_plan_checked() {
        let planned = plan_relations(probe.conn, analysis).await?;
        compare_with_plan(&catalog, &planned, &mut warnings)
    } else {
        None
    };
    let mut objects: Vec<(char, i64)> = probe.relations.iter().map(|oid| ('c', *oid)).collect();
    objects.extend(probe.checked_routines.iter().copied());
    objects.sort_unstable();
    objects.dedup();
    let derived = derive_checked(analysis, &catalog, options, forced, warnings).map(|mut deps| {
        deps.objects = objects;
        deps
    });
    match &derived {
        Ok(deps) => tracing::debug!(sql = %analysis.sql, "{}", deps.explain()),
        Err(e) => tracing::debug!(sql = %analysis.sql, "not derived: {e}"),
    }
    derived
}

/// A relation as `pg_class` describes it.
#[derive(Debug, Clone)]
struct Rel {
    oid: i64,
    table: TableRef,
    kind: String,
    persistence: String,
    row_security: bool,
    has_children: bool,
}

const REL_COLUMNS: &str = "c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text, \
     c.relpersistence::text, c.relrowsecurity, c.relhassubclass \
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace";

fn rel_from_row(row: &sqlx::postgres::PgRow) -> Result<Rel, sqlx::Error> {
    Ok(Rel {
        oid: row.try_get(0)?,
        table: TableRef::new(row.try_get::<String, _>(1)?, row.try_get::<String, _>(2)?),
        kind: row.try_get(3)?,
        persistence: row.try_get(4)?,
        row_security: row.try_get(5)?,
        has_children: row.try_get(6)?,
    })
}

struct Probe<'c> {
    conn: &'c mut PgConnection,
    /// Functions and operators already judged (by oid, per catalog).
    checked_routines: HashSet<(char, i64)>,
    /// Every relation looked at (by oid), for [`catalog_fingerprint`].
    relations: BTreeSet<i64>,
}

impl Probe<'_> {
    async fn relation_by_name(
        &mut self,
        written: &RelationName,
    ) -> Result<Option<Rel>, QueryError> {
        let sql = format!("SELECT {REL_COLUMNS} WHERE c.oid = pg_catalog.to_regclass($1)");
        let row = sqlx::query(&sql)
            .bind(written.sql_name())
            .fetch_optional(&mut *self.conn)
            .await?;
        let rel = row.as_ref().map(rel_from_row).transpose()?;
        self.relations.extend(rel.as_ref().map(|r| r.oid));
        Ok(rel)
    }

    async fn relation_by_oid(&mut self, oid: i64) -> Result<Option<Rel>, QueryError> {
        let sql = format!("SELECT {REL_COLUMNS} WHERE c.oid = ($1::int8)::pg_catalog.oid");
        let row = sqlx::query(&sql)
            .bind(oid)
            .fetch_optional(&mut *self.conn)
            .await?;
        let rel = row.as_ref().map(rel_from_row).transpose()?;
        self.relations.extend(rel.as_ref().map(|r| r.oid));
        Ok(rel)
    }

    /// Refuses a relation that produces no events or whose rows depend on the reader.
    fn admit(rel: &Rel) -> Result<(), QueryError> {
        let no_events = |kind: &str| QueryError::NoEvents {
            relation: rel.table.to_string(),
            kind: kind.to_owned(),
        };
        let schema = rel.table.schema.as_deref().unwrap_or("");
        if matches!(schema, "pg_catalog" | "information_schema" | "pg_toast") {
            return Err(no_events("system catalog"));
        }
        if rel.persistence == "t" {
            return Err(no_events("temporary table (of one connection only)"));
        }
        match rel.kind.as_str() {
            "r" | "p" | "v" => {}
            "m" => return Err(no_events("materialized view")),
            "f" => return Err(no_events("foreign table")),
            "S" => return Err(no_events("sequence")),
            other => return Err(no_events(&format!("relation of kind '{other}'"))),
        }
        if rel.row_security {
            return Err(QueryError::RowSecurity {
                relation: rel.table.to_string(),
            });
        }
        Ok(())
    }

    /// What reading `rel` depends on.
    async fn expand(
        &mut self,
        rel: &Rel,
        only: bool,
        want_key: bool,
    ) -> Result<ResolvedRelation, QueryError> {
        Self::admit(rel)?;
        if rel.kind == "v" {
            let tables = self.view_tables(rel).await?;
            return Ok(ResolvedRelation::view(rel.table.clone(), tables));
        }
        self.expand_table(rel, only, want_key).await
    }

    /// What reading a table (plain or partitioned, admitted) depends on.
    async fn expand_table(
        &mut self,
        rel: &Rel,
        only: bool,
        want_key: bool,
    ) -> Result<ResolvedRelation, QueryError> {
        let key = if want_key {
            self.primary_key(rel.oid).await?
        } else {
            Vec::new()
        };
        if rel.kind == "p" {
            let partitions = self.descendants(rel, true).await?;
            return Ok(ResolvedRelation::partitioned(
                rel.table.clone(),
                partitions,
                key,
            ));
        }
        let mut resolved = ResolvedRelation::table(rel.table.clone(), key);
        if rel.has_children && !only {
            resolved.tables.extend(self.descendants(rel, false).await?);
            resolved.inheritance_children = true;
        }
        Ok(resolved)
    }

    /// Partitions (at any depth) or inheritance children, each admitted.
    async fn descendants(
        &mut self,
        rel: &Rel,
        partitions: bool,
    ) -> Result<Vec<TableRef>, QueryError> {
        let tree = if partitions {
            "SELECT relid AS oid FROM pg_catalog.pg_partition_tree(($1::int8)::pg_catalog.oid::pg_catalog.regclass)"
        } else {
            "WITH RECURSIVE tree(oid) AS ( \
               SELECT inhrelid FROM pg_catalog.pg_inherits WHERE inhparent = ($1::int8)::pg_catalog.oid \
               UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.oid) \
             SELECT oid FROM tree"
        };
        let sql = format!(
            "WITH t AS ({tree}) SELECT {REL_COLUMNS} JOIN t ON t.oid = c.oid \
             WHERE c.oid <> ($1::int8)::pg_catalog.oid ORDER BY n.nspname, c.relname"
        );
        let rows = sqlx::query(&sql)
            .bind(rel.oid)
            .fetch_all(&mut *self.conn)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let child = rel_from_row(row)?;
            self.relations.insert(child.oid);
            match child.kind.as_str() {
                "f" => {
                    return Err(QueryError::NoEvents {
                        relation: child.table.to_string(),
                        kind: format!("foreign table (a partition or child of {})", rel.table),
                    })
                }
                _ if child.persistence == "t" => {
                    return Err(QueryError::NoEvents {
                        relation: child.table.to_string(),
                        kind: format!("temporary table (a child of {})", rel.table),
                    })
                }
                _ => out.push(child.table),
            }
        }
        Ok(out)
    }

    /// The base tables of a view, through the dependencies of its rewrite rule
    /// (views under it too, breadth first); the functions and operators it uses
    /// are judged on the way.
    async fn view_tables(&mut self, view: &Rel) -> Result<Vec<TableRef>, QueryError> {
        let mut tables = Vec::new();
        let mut seen = HashSet::from([view.oid]);
        let mut queue = std::collections::VecDeque::from([view.clone()]);
        while let Some(view) = queue.pop_front() {
            if seen.len() > MAX_VIEWS {
                return Err(QueryError::NoEvents {
                    relation: view.table.to_string(),
                    kind: format!("view over more than {MAX_VIEWS} views"),
                });
            }
            // Constructs that are no catalog object (CURRENT_USER, CURRENT_DATE)
            // are found in the view's text; its relations come from its
            // dependencies.
            let text: Option<String> =
                sqlx::query_scalar("SELECT pg_catalog.pg_get_viewdef(($1::int8)::pg_catalog.oid)")
                    .bind(view.oid)
                    .fetch_one(&mut *self.conn)
                    .await?;
            if let Some(Err(refusal)) = text.as_deref().map(analyze) {
                if refusal.is_refusal() {
                    return Err(refusal);
                }
            }
            let deps = sqlx::query(
                "SELECT DISTINCT d.refclassid::pg_catalog.regclass::text, d.refobjid::int8 \
                 FROM pg_catalog.pg_rewrite r \
                 JOIN pg_catalog.pg_depend d \
                   ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid \
                 WHERE r.ev_class = ($1::int8)::pg_catalog.oid AND d.deptype = 'n' \
                 ORDER BY 1, 2",
            )
            .bind(view.oid)
            .fetch_all(&mut *self.conn)
            .await?;
            for row in &deps {
                let class: String = row.try_get(0)?;
                let oid: i64 = row.try_get(1)?;
                match class.trim_start_matches("pg_catalog.") {
                    "pg_class" if oid != view.oid => {
                        let Some(rel) = self.relation_by_oid(oid).await? else {
                            continue;
                        };
                        Self::admit(&rel)?;
                        if rel.kind == "v" {
                            if seen.insert(rel.oid) {
                                queue.push_back(rel);
                            }
                            continue;
                        }
                        // A view's rule does not say whether it reads with ONLY:
                        // children count.
                        let resolved = self.expand_table(&rel, false, false).await?;
                        for t in resolved.tables {
                            if !tables.contains(&t) {
                                tables.push(t);
                            }
                        }
                    }
                    "pg_proc" => self.function_by_oid(oid).await?,
                    "pg_operator" => self.operator_by_oid(oid).await?,
                    _ => {}
                }
            }
        }
        tables.sort();
        Ok(tables)
    }

    /// The primary key, in key order.
    async fn primary_key(&mut self, oid: i64) -> Result<Vec<KeyColumn>, QueryError> {
        let rows = sqlx::query(
            "SELECT a.attname::text, a.atttypid::int8, t.typname::text, \
                    COALESCE(co.collisdeterministic, true), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_operator o \
                            WHERE o.oprname = '=' AND o.oprleft = a.atttypid \
                              AND o.oid >= 16384 AND pg_catalog.pg_operator_is_visible(o.oid)) \
             FROM pg_catalog.pg_index i \
             CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation \
             WHERE i.indrelid = ($1::int8)::pg_catalog.oid AND i.indisprimary \
             ORDER BY k.ord",
        )
        .bind(oid)
        .fetch_all(&mut *self.conn)
        .await?;
        let mut key = Vec::with_capacity(rows.len());
        for row in &rows {
            let name: String = row.try_get(0)?;
            let type_oid: i64 = row.try_get(1)?;
            let type_name: String = row.try_get(2)?;
            let deterministic: bool = row.try_get(3)?;
            let own_equals: bool = row.try_get(4)?;
            let key_type = u32::try_from(type_oid)
                .ok()
                .and_then(|oid| KeyType::of_type_oid(oid, deterministic));
            key.push(match key_type {
                Some(ty) if !own_equals => KeyColumn {
                    type_name,
                    ..KeyColumn::new(name, ty)
                },
                _ if own_equals => KeyColumn::unsupported(
                    name,
                    format!("{type_name} (with a user-defined = operator visible)"),
                ),
                _ if !deterministic => KeyColumn::unsupported(
                    name,
                    format!("{type_name} under a nondeterministic collation"),
                ),
                _ => KeyColumn::unsupported(name, type_name),
            });
        }
        Ok(key)
    }

    async fn function_by_name(&mut self, name: &RoutineName) -> Result<(), QueryError> {
        let rows = sqlx::query(
            "SELECT p.oid::int8, n.nspname::text, p.proname::text, p.provolatile::text \
             FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
             WHERE p.proname = $2 AND CASE WHEN $1::text IS NULL \
               THEN pg_catalog.pg_function_is_visible(p.oid) ELSE n.nspname = $1 END",
        )
        .bind(name.schema.as_deref())
        .bind(&name.name)
        .fetch_all(&mut *self.conn)
        .await?;
        for row in &rows {
            self.judge_function(row)?;
        }
        Ok(())
    }

    async fn function_by_oid(&mut self, oid: i64) -> Result<(), QueryError> {
        if !self.checked_routines.insert(('f', oid)) {
            return Ok(());
        }
        let rows = sqlx::query(
            "SELECT p.oid::int8, n.nspname::text, p.proname::text, p.provolatile::text \
             FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
             WHERE p.oid = ($1::int8)::pg_catalog.oid",
        )
        .bind(oid)
        .fetch_all(&mut *self.conn)
        .await?;
        for row in &rows {
            self.judge_function(row)?;
        }
        Ok(())
    }

    fn judge_function(&mut self, row: &sqlx::postgres::PgRow) -> Result<(), QueryError> {
        let oid: i64 = row.try_get(0)?;
        let schema: String = row.try_get(1)?;
        let name: String = row.try_get(2)?;
        let volatility: String = row.try_get(3)?;
        self.checked_routines.insert(('f', oid));
        if schema == "pg_catalog" {
            if let Some(refusal) = routine_class(&name) {
                return Err(refusal(format!("{name}()")));
            }
        }
        judge(&format!("{schema}.{name}()"), oid, oid, &volatility)
    }

    async fn operator_by_name(&mut self, name: &RoutineName) -> Result<(), QueryError> {
        let rows = sqlx::query(&format!(
            "{OPERATOR_QUERY} WHERE o.oprname = $2 AND CASE WHEN $1::text IS NULL \
               THEN pg_catalog.pg_operator_is_visible(o.oid) ELSE n.nspname = $1 END"
        ))
        .bind(name.schema.as_deref())
        .bind(&name.name)
        .fetch_all(&mut *self.conn)
        .await?;
        for row in &rows {
            self.judge_operator(row)?;
        }
        Ok(())
    }

    async fn operator_by_oid(&mut self, oid: i64) -> Result<(), QueryError> {
        if !self.checked_routines.insert(('o', oid)) {
            return Ok(());
        }
        let rows = sqlx::query(&format!(
            "{OPERATOR_QUERY} WHERE o.oid = ($1::int8)::pg_catalog.oid"
        ))
        .bind(oid)
        .fetch_all(&mut *self.conn)
        .await?;
        for row in &rows {
            self.judge_operator(row)?;
        }
        Ok(())
    }

    fn judge_operator(&mut self, row: &sqlx::postgres::PgRow) -> Result<(), QueryError> {
        let oid: i64 = row.try_get(0)?;
        let schema: String = row.try_get(1)?;
        let name: String = row.try_get(2)?;
        let function_oid: i64 = row.try_get(3)?;
        let function: String = row.try_get(4)?;
        let volatility: String = row.try_get(5)?;
        self.checked_routines.insert(('o', oid));
        self.checked_routines.insert(('f', function_oid));
        judge(
            &format!("operator {schema}.{name} (function {function})"),
            oid,
            function_oid,
            &volatility,
        )
    }
}

const OPERATOR_QUERY: &str = "SELECT o.oid::int8, n.nspname::text, o.oprname::text, p.oid::int8, \
       pn.nspname::text || '.' || p.proname::text, p.provolatile::text \
     FROM pg_catalog.pg_operator o \
     JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace \
     JOIN pg_catalog.pg_proc p ON p.oid = o.oprcode::pg_catalog.oid \
     JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace";

/// A volatile routine is refused; so is one that is not built in (by its oid or
/// its function's) unless it is immutable (which promises it reads no table).
fn judge(what: &str, oid: i64, function_oid: i64, volatility: &str) -> Result<(), QueryError> {
    if volatility == "v" {
        return Err(QueryError::Volatile {
            function: what.to_owned(),
        });
    }
    let builtin = oid < FIRST_NORMAL_OID && function_oid < FIRST_NORMAL_OID;
    if !builtin && volatility != "i" {
        return Err(QueryError::UnknownFunctionReads {
            function: format!(
                "{what}, {} and not built in",
                if volatility == "s" {
                    "stable"
                } else {
                    "not immutable"
                }
            ),
        });
    }
    Ok(())
}

/// A text that changes whenever the catalog rows behind `deps` change: the
/// `xmin` of every relation's `pg_class` row and of the views' rewrite rules
/// (`CREATE OR REPLACE VIEW` writes a new one), of every function's `pg_proc`
/// row and every operator's `pg_operator` row that [`resolve`] looked at; a
/// dropped object drops out. DDL (`ALTER TABLE`, `CREATE OR REPLACE
/// FUNCTION`, a view replaced) writes new rows; DML, `ANALYZE` and `VACUUM`
/// (which update `pg_class` in place) do not. Empty for dependencies made by
/// [`derive`](crate::derive()).
pub(crate) async fn catalog_fingerprint(
    conn: &mut PgConnection,
    deps: &Dependencies,
) -> Result<String, QueryError> {
    let pick = |kind: char| -> Vec<i64> {
        deps.objects
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, oid)| *oid)
            .collect()
    };
    if deps.objects.is_empty() {
        return Ok(String::new());
    }
    let fingerprint: String = sqlx::query_scalar(
        "SELECT coalesce(pg_catalog.string_agg(x, ',' ORDER BY x), '') FROM ( \
           SELECT 'c' || c.oid::text || ':' || c.xmin::text AS x FROM pg_catalog.pg_class c \
             WHERE c.oid = ANY(($1::int8[])::pg_catalog.oid[]) \
           UNION ALL SELECT 'r' || r.oid::text || ':' || r.xmin::text FROM pg_catalog.pg_rewrite r \
             WHERE r.ev_class = ANY(($1::int8[])::pg_catalog.oid[]) \
           UNION ALL SELECT 'f' || p.oid::text || ':' || p.xmin::text FROM pg_catalog.pg_proc p \
             WHERE p.oid = ANY(($2::int8[])::pg_catalog.oid[]) \
           UNION ALL SELECT 'o' || o.oid::text || ':' || o.xmin::text FROM pg_catalog.pg_operator o \
             WHERE o.oid = ANY(($3::int8[])::pg_catalog.oid[])) s",
    )
    .bind(pick('c'))
    .bind(pick('f'))
    .bind(pick('o'))
    .fetch_one(&mut *conn)
    .await?;
    Ok(fingerprint)
}

/// `resolve`'s future can be spawned.
#[allow(dead_code)]
fn resolve_is_send<'a>(analysis: &'a Analysis, conn: &'a mut PgConnection) -> impl Send + 'a {
    resolve(analysis, conn)
}

static PROBES: AtomicU64 = AtomicU64::new(0);

/// The relations the statement's generic plan scans.
async fn plan_relations(
    conn: &mut PgConnection,
    analysis: &Analysis,
) -> Result<Vec<TableRef>, QueryError> {
    let name = format!(
        "pgcw_probe_{}_{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    );
    // A prepared statement outlives a rolled-back transaction: prepare outside
    // one, deallocate after it whatever happened.
    // Statements without arguments go through the simple query protocol, as
    // `PREPARE` must (its parameters are its own).
    let prepare = format!("PREPARE {name} AS\n{}\n", analysis.sql);
    conn.execute(prepare.as_str()).await?;
    let explained = explain_generic(conn, &name, analysis.params).await;
    let deallocate = format!("DEALLOCATE {name}");
    let deallocated = conn.execute(deallocate.as_str()).await;
    let plan = explained?;
    deallocated?;
    let mut out = Vec::new();
    collect_relations(&plan, &mut out);
    Ok(out)
}

async fn explain_generic(
    conn: &mut PgConnection,
    name: &str,
    params: usize,
) -> Result<Value, QueryError> {
    let mut tx = conn.begin().await?;
    tx.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        .await?;
    let args = if params == 0 {
        String::new()
    } else {
        format!("({})", vec!["NULL"; params].join(", "))
    };
    let plan: Value = sqlx::query_scalar(&format!(
        "EXPLAIN (VERBOSE, FORMAT JSON) EXECUTE {name}{args}"
    ))
    .persistent(false)
    .fetch_one(&mut *tx)
    .await?;
    tx.rollback().await?;
    Ok(plan)
}

/// Every `"Relation Name"` (with its `"Schema"`) in an `EXPLAIN (FORMAT JSON)` plan.
pub(crate) fn collect_relations(plan: &Value, out: &mut Vec<TableRef>) {
    match plan {
        Value::Array(items) => items.iter().for_each(|v| collect_relations(v, out)),
        Value::Object(map) => {
            if let Some(Value::String(name)) = map.get("Relation Name") {
                let table = match map.get("Schema") {
                    Some(Value::String(schema)) => TableRef::new(schema.clone(), name.clone()),
                    _ => TableRef::unqualified(name.clone()),
                };
                if !out.contains(&table) {
                    out.push(table);
                }
            }
            map.values().for_each(|v| collect_relations(v, out));
        }
        _ => {}
    }
}

/// Compares the plan's relations with the catalog's: more in the plan forces
/// table level with them added; fewer is only reported.
fn compare_with_plan(
    catalog: &Catalog,
    planned: &[TableRef],
    warnings: &mut Vec<String>,
) -> Option<(String, Vec<TableRef>)> {
    let found: Vec<&TableRef> = catalog
        .entries
        .iter()
        .flat_map(|(_, r)| r.tables.iter())
        .collect();
    let extra: Vec<TableRef> = planned
        .iter()
        .filter(|p| !found.iter().any(|f| f.matches(p)))
        .cloned()
        .collect();
    for (_, relation) in &catalog.entries {
        // Partitions may be pruned when the plan starts; views are scanned as
        // their base tables, which their own entries do not name.
        let direct = relation.kind == RelationKind::Table;
        let scanned = relation
            .tables
            .iter()
            .any(|t| planned.iter().any(|p| p.matches(t)));
        if direct && !scanned {
            let warning = format!(
                "the parser found {}, which the generic plan does not scan (folded away?); \
                 it stays a dependency",
                relation.relation
            );
            tracing::warn!("{warning}");
            warnings.push(warning);
        }
    }
    if extra.is_empty() {
        return None;
    }
    let names: Vec<String> = extra.iter().map(ToString::to_string).collect();
    let warning = format!(
        "the generic plan scans {}, which the parser did not find (a function inlined?); \
         added, and the query is table-level",
        names.join(", ")
    );
    tracing::warn!("{warning}");
    warnings.push(warning);
    Some((format!("the plan reads {} too", names.join(", ")), extra))
}
