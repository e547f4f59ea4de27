//! `explain "SQL"`: what a cached query over SQL would depend on, resolved on
//! the server as `CachedQuery::attach` resolves it (names through the
//! `search_path`, views, partitions, keys, the generic plan).

use anyhow::{anyhow, Context as _, Result};
use pgcachewatch::query::{analyze, resolve_with, Dependencies, Level, QueryError, ResolveOptions};
use serde_json::json;

use crate::connect::Database;

/// What `explain` was asked.
#[derive(Debug, Clone)]
pub(crate) struct Request<'a> {
    pub(crate) sql: &'a str,
    pub(crate) strict: bool,
    pub(crate) search_path: Option<&'a str>,
    pub(crate) plan_check: bool,
    pub(crate) json: bool,
}

pub(crate) async fn explain(db: Database<'_>, request: Request<'_>) -> Result<()> {
    // Refusals the text alone shows need no server.
    let analysis = analyze(request.sql).map_err(|e| refusal(&e))?;
    let target = db.target()?;
    let mut conn = target.connect().await?;
    if let Some(path) = request.search_path {
        sqlx::query("SELECT pg_catalog.set_config('search_path', $1, false)")
            .bind(path)
            .execute(&mut conn)
            .await
            .with_context(|| format!("setting search_path to {path:?}"))?;
    }
    let options = ResolveOptions::new()
        .strict(request.strict)
        .plan_check(request.plan_check);
    let resolved = resolve_with(&analysis, &mut conn, &options).await;
    sqlx::Connection::close(conn).await.ok();
    let deps = match resolved {
        Ok(deps) => deps,
        Err(QueryError::Database(e)) => {
            return Err(anyhow!(e)).with_context(|| {
                format!(
                    "resolving the statement on {} (it must prepare there)",
                    target.describe()
                )
            })
        }
        Err(e) => return Err(refusal(&e)),
    };
    for warning in deps.warnings() {
        eprintln!("warning: {warning}");
    }
    if request.json {
        crate::output::print(&format!("{:#}\n", to_json(&deps)))
    } else {
        crate::output::print(&format!("{}\n", deps.explain()))
    }
}

/// A refusal (or a strict fall-back) in the command line's words.
fn refusal(e: &QueryError) -> anyhow::Error {
    match e {
        QueryError::NotRowLevel { explanation } => anyhow!(
            "not row-level (--strict): {explanation}\nhint: a query is row-level when it reads \
             one table and its WHERE pins every primary-key column with =, IN (…) or = ANY to \
             parameters; drop --strict to accept table-level"
        ),
        e => anyhow!("{e}"),
    }
}

fn to_json(deps: &Dependencies) -> serde_json::Value {
    let tables: Vec<String> = deps.tables().iter().map(ToString::to_string).collect();
    let (level, reason) = match deps.level() {
        Level::Row(_) => ("row", None),
        Level::Table(t) => ("table", Some(t.reason.clone())),
        _ => ("table", None),
    };
    json!({
        "explain": deps.explain(),
        "level": level,
        "reason": reason,
        "tables": tables,
        "resolution_key": deps.resolution_key(),
        "warnings": deps.warnings(),
    })
}
