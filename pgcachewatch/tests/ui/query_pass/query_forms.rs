//! `#[cached(query = …)]`: every read form compiles, and the generated handle
//! is the `CachedQuery` the documentation promises.

use std::sync::Arc;

use pgcachewatch::cached;
use pgcachewatch::query::{CachedQuery, CachedQueryError};

#[derive(Clone, pgcachewatch::sqlx::FromRow)]
pub struct User {
    pub id: i64,
    pub name: String,
}

/// `fetch_optional`: a cached "not found" too.
#[cached(query = "SELECT id, name FROM users WHERE id = $1")]
pub async fn user_by_id(id: i64) -> Result<Option<User>, CachedQueryError>;

/// `fetch_one`, with options and an empty body.
#[cached(query = "SELECT id, name FROM users WHERE id = $1", name = "user", capacity = 500, strict = true)]
async fn user(id: i64) -> Result<User, CachedQueryError> {}

/// `fetch_all` as a `Vec`, two parameters.
#[cached(query = "SELECT id, name FROM users WHERE id IN ($1, $2) ORDER BY id")]
async fn pair(a: i64, b: i64) -> Result<Vec<User>, CachedQueryError>;

/// `fetch_all` shared, an array parameter, a tuple row, an error of one's own.
#[derive(Debug)]
struct AppError;
impl From<CachedQueryError> for AppError {
    fn from(_: CachedQueryError) -> Self {
        AppError
    }
}
#[cached(query = "SELECT id, name FROM users u JOIN orgs o ON o.id = u.org_id WHERE u.id = ANY($1)")]
async fn team(ids: Vec<i64>) -> Result<Arc<[(i64, String)]>, AppError>;

/// Compiled out with its handle.
#[cfg(any())]
#[cached(query = "SELECT id FROM users WHERE id = $1")]
async fn gone(id: i64) -> Result<(i64,), CachedQueryError>;

/// No parameter.
#[cached(query = "SELECT count(*) FROM users")]
async fn users() -> Result<(i64,), CachedQueryError>;

fn main() {
    let _: &'static CachedQuery<(i64,), User> = user_by_id_query();
    let _: &'static CachedQuery<(i64,), User> = user_query();
    let _: &'static CachedQuery<(i64, i64), User> = pair_query();
    let _: &'static CachedQuery<(Vec<i64>,), (i64, String)> = team_query();
    let _: &'static CachedQuery<(), (i64,)> = users_query();
    let _ = (user_by_id(1), user(1), pair(1, 2), team(vec![1]), users());
}
