//! Audit of hand-written rules: where a cache declares the tables its entries
//! depend on (`#[cached(tables = [...])]`) and its SQL is known, the tables the
//! SQL reads that the declaration leaves out. Nothing invalidates an entry on a
//! write to such a table: it goes stale silently, with a healthy cache.
//!
//! * [`register`] (called by the code `#[cached]` writes, when the function's
//!   cache is made, or by hand) compares by name, with no I/O, logs a `tracing`
//!   warning per finding, and keeps the result for [`findings`].
//! * [`check_on`] (feature `postgres`) redoes every registered comparison on
//!   the server: names through the connection's `search_path`, views expanded
//!   to their base tables, partitioned tables with their partitions, exactly as
//!   a [`CachedQuery`](crate::CachedQuery) would depend on them. Run it at
//!   start-up, after the caches are attached; it replaces the by-name results.
//!
//! ```
//! use pgcachewatch_query::audit::{self, Rule};
//! let rule = Rule::new(
//!     "user_with_org",
//!     "SELECT u.name, o.name FROM users u JOIN orgs o ON o.id = u.org_id WHERE u.id = $1",
//!     &["users"],
//! );
//! let finding = audit::check(&rule).expect("orgs is read, not declared");
//! assert_eq!(finding.unwatched_names(), vec!["orgs"]);
//! assert!(audit::check(&Rule::new("ok", "SELECT name FROM public.users WHERE id = $1", &["users"])).is_none());
//! ```

use std::fmt;
use std::sync::{Mutex, OnceLock};

use pgcachewatch_core::TableRef;

use crate::analyze::analyze;

/// A hand-written rule: a cache's name, the SQL its loader runs, and the tables
/// its entries are declared to depend on (as written in `tables = [...]`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rule {
    /// The cache (or function) name.
    pub name: String,
    /// The statement the loader runs.
    pub sql: String,
    /// The declared tables, as written (`"users"`, `"public.orders"`).
    pub declared: Vec<String>,
}

impl Rule {
    /// A rule.
    pub fn new(name: impl Into<String>, sql: impl Into<String>, declared: &[&str]) -> Self {
        Rule {
            name: name.into(),
            sql: sql.into(),
            declared: declared.iter().map(|t| (*t).to_owned()).collect(),
        }
    }
}

/// What [`check`] or [`check_on`] found: tables the rule's SQL reads that its
/// declaration leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Finding {
    /// The rule.
    pub rule: Rule,
    /// The tables read and not declared (names as read, or resolved base
    /// tables after [`check_on`]).
    pub unwatched: Vec<TableRef>,
    /// Whether the server resolved them ([`check_on`]) or they were compared
    /// by name only ([`check`]: a view is reported as itself then, since a
    /// declaration must name its base tables).
    pub resolved: bool,
}

impl Finding {
    /// The unwatched tables as text (`"orgs"`, `"public.orgs"`).
    pub fn unwatched_names(&self) -> Vec<String> {
        self.unwatched.iter().map(ToString::to_string).collect()
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cache `{}` declares tables = [{}] but its SQL also reads {}: nothing invalidates \
             its entries when {} written{}; add {} to `tables`, or cache it with \
             `#[cached(query = …)]`, whose dependencies come from the statement",
            self.rule.name,
            self.rule
                .declared
                .iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.unwatched_names().join(", "),
            if self.unwatched.len() == 1 {
                "it is"
            } else {
                "they are"
            },
            if self.resolved {
                ""
            } else {
                " (compared by name: a view counts as itself)"
            },
            if self.unwatched.len() == 1 {
                "it"
            } else {
                "them"
            },
        )
    }
}

fn declared_refs(rule: &Rule) -> Vec<TableRef> {
    rule.declared
        .iter()
        .filter_map(|t| TableRef::parse(t).ok())
        .collect()
}

/// Compares by name, with no I/O: each relation the SQL names that no declared
/// table matches (an unqualified name on either side matches any schema).
/// `None` when every one is declared, or when the SQL cannot be read (a
/// refused statement: `now()`, `FOR UPDATE`, … is exactly what the way out of
/// declaring tables is for, so it is not audited).
pub fn check(rule: &Rule) -> Option<Finding> {
    let analysis = analyze(&rule.sql).ok()?;
    let declared = declared_refs(rule);
    let mut unwatched: Vec<TableRef> = Vec::new();
    for read in analysis.relations() {
        let read = match &read.schema {
            Some(schema) => TableRef::new(schema.clone(), read.name.clone()),
            None => TableRef::unqualified(read.name.clone()),
        };
        if !declared.iter().any(|d| d.matches(&read)) && !unwatched.contains(&read) {
            unwatched.push(read);
        }
    }
    (!unwatched.is_empty()).then(|| Finding {
        rule: rule.clone(),
        unwatched,
        resolved: false,
    })
}

struct Registry {
    rules: Vec<Rule>,
    findings: Vec<Finding>,
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        Mutex::new(Registry {
            rules: Vec::new(),
            findings: Vec::new(),
        })
    })
}

fn lock() -> std::sync::MutexGuard<'static, Registry> {
    registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records a rule (once per name and SQL), checks it by name ([`check`]), logs
/// a `tracing` warning for a finding and keeps it for [`findings`]. Returns
/// the finding.
pub fn register(rule: Rule) -> Option<Finding> {
    let finding = check(&rule);
    let mut registry = lock();
    if registry.rules.contains(&rule) {
        return finding;
    }
    registry.rules.push(rule);
    if let Some(f) = &finding {
        tracing::warn!(cache = %f.rule.name, "{f}");
        registry.findings.push(f.clone());
    }
    finding
}

/// Every rule [`register`]ed so far.
pub fn rules() -> Vec<Rule> {
    lock().rules.clone()
}

/// The findings so far: by name after [`register`], resolved on the server
/// after [`check_on`].
pub fn findings() -> Vec<Finding> {
    lock().findings.clone()
}

/// [`check`] on the server: the rule's SQL resolved as a
/// [`CachedQuery`](crate::CachedQuery) resolves it (names through the
/// connection's `search_path`, views expanded to their base tables, partitions),
/// the declared tables matched against those base tables. `Ok(None)` when every
/// base table is declared.
///
/// # Errors
///
/// The server could not be asked, or a name does not resolve there. A refused
/// statement is not audited (`Ok(None)`).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub async fn check_rule_on(
    rule: &Rule,
    conn: &mut sqlx::PgConnection,
) -> Result<Option<Finding>, crate::QueryError> {
    let Ok(analysis) = analyze(&rule.sql) else {
        return Ok(None);
    };
    let options = crate::ResolveOptions::new();
    let deps = match crate::resolve_with(&analysis, conn, &options).await {
        Ok(deps) => deps,
        Err(e) if e.is_refusal() => return Ok(None),
        Err(e) => return Err(e),
    };
    let declared = declared_refs(rule);
    let unwatched: Vec<TableRef> = deps
        .tables()
        .iter()
        .filter(|t| !declared.iter().any(|d| d.matches(t)))
        .cloned()
        .collect();
    Ok((!unwatched.is_empty()).then(|| Finding {
        rule: rule.clone(),
        unwatched,
        resolved: true,
    }))
}

/// Checks every [`register`]ed rule on the server ([`check_rule_on`], one
/// connection of `pool`), logs a `tracing` warning per finding, replaces the
/// by-name findings with these, and returns them. Run it at start-up, after the
/// caches are attached (a rule is registered when its cache is made).
///
/// # Errors
///
/// The first rule the server could not check (a name that does not resolve, a
/// connection failure); the findings are then left as they were.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub async fn check_on(pool: &sqlx::PgPool) -> Result<Vec<Finding>, crate::QueryError> {
    let rules = rules();
    let mut conn = pool.acquire().await?;
    let mut found = Vec::new();
    for rule in &rules {
        if let Some(f) = check_rule_on(rule, &mut conn).await? {
            tracing::warn!(cache = %f.rule.name, "{f}");
            found.push(f);
        }
    }
    lock().findings = found.clone();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_name() {
        let f = check(&Rule::new(
            "x",
            "SELECT * FROM users u WHERE u.org_id IN (SELECT id FROM app.orgs) \
             AND EXISTS (SELECT 1 FROM public.teams)",
            &["users", "public.teams"],
        ))
        .unwrap();
        assert_eq!(f.unwatched_names(), vec!["app.orgs"]);
        assert!(f.to_string().contains("add it to `tables`"), "{f}");
        // A CTE is no table.
        assert!(check(&Rule::new(
            "y",
            "WITH o AS (SELECT * FROM orgs) SELECT * FROM o",
            &["orgs"]
        ))
        .is_none());
        // Refused statements are the way out: not audited.
        assert!(check(&Rule::new("z", "SELECT now() FROM orgs", &["users"])).is_none());
    }

    #[test]
    fn register_keeps_findings_once() {
        let rule = Rule::new("audit-unit", "SELECT * FROM a JOIN b ON true", &["a"]);
        assert!(register(rule.clone()).is_some());
        assert!(register(rule).is_some());
        let mine: Vec<Finding> = findings()
            .into_iter()
            .filter(|f| f.rule.name == "audit-unit")
            .collect();
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].unwatched_names(), vec!["b"]);
    }
}
