//! The web app: one table, one cache, three routes.
//!
//! The Rust counterpart of PGCacheWatch's FastAPI example: a handler that returns a
//! query result through a cache which the database's NOTIFY events keep fresh.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use pgcachewatch::postgres::listener::PgListenerSource;
use pgcachewatch::{Cache, DispatcherHandle};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// The demo table (in schema `public`).
pub const TABLE: &str = "pgcachewatch_demo_users";

/// One row of the demo table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct User {
    pub id: i32,
    pub name: String,
    pub version: i64,
}

/// How a write became visible through the cache (the `x-read-your-writes` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadYourWrites {
    /// The dispatcher applied the write's event before the response.
    Applied,
    /// The event was late; the entry was dropped by hand.
    InvalidatedByHand,
}

/// Whether a read was answered from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub db: PgPool,
    /// `user id → row` (`None`: no such user; cached too, until the table changes).
    pub users: Cache<i32, Option<Arc<User>>>,
    pub source: Arc<PgListenerSource>,
    pub dispatcher: Arc<DispatcherHandle>,
}

impl AppState {
    /// The user, through the cache: a hit costs a hash lookup; a miss runs one SELECT
    /// (once, however many requests wait for it).
    pub async fn read_user(
        &self,
        id: i32,
    ) -> Result<(Option<Arc<User>>, Outcome), pgcachewatch::Error> {
        let loaded = AtomicBool::new(false);
        let user = self
            .users
            .get_or_load(id, || async {
                loaded.store(true, Ordering::Relaxed);
                let sql = format!("SELECT id, name, version FROM {TABLE} WHERE id = $1");
                let row: Option<User> = sqlx::query_as(&sql)
                    .bind(id)
                    .fetch_optional(&self.db)
                    .await?;
                Ok::<_, sqlx::Error>(row.map(Arc::new))
            })
            .await?;
        let outcome = if loaded.load(Ordering::Relaxed) {
            Outcome::Miss
        } else {
            Outcome::Hit
        };
        Ok((user, outcome))
    }

    /// Renames a user, and returns once the cache reflects it (read-your-writes).
    ///
    /// The cache is not touched here: the trigger's NOTIFY does it. The UPDATE
    /// also returns its transaction id, which the trigger puts in the event;
    /// waiting for the dispatcher to have applied that transaction means a read
    /// that follows this call (from this client or any other) sees the new name.
    /// If the event is late, the row's entry is dropped by hand instead.
    pub async fn rename_user(
        &self,
        id: i32,
        name: &str,
    ) -> Result<Option<(User, ReadYourWrites)>, sqlx::Error> {
        let sql = format!(
            "UPDATE {TABLE} SET name = $2, version = version + 1 WHERE id = $1 \
             RETURNING id, name, version, txid_current() AS txid"
        );
        let row: Option<(i32, String, i64, i64)> = sqlx::query_as(&sql)
            .bind(id)
            .bind(name)
            .fetch_optional(&self.db)
            .await?;
        let Some((id, name, version, txid)) = row else {
            return Ok(None);
        };
        let applied = match self
            .dispatcher
            .wait_for_txid(txid, std::time::Duration::from_secs(2))
            .await
        {
            Ok(()) => ReadYourWrites::Applied,
            Err(e) => {
                tracing::warn!(error = %e, id, "the write's event is late: dropping its entry by hand");
                self.users.invalidate(&id);
                ReadYourWrites::InvalidatedByHand
            }
        };
        Ok(Some((User { id, name, version }, applied)))
    }
}

/// `GET /users/{id}`, `PUT /users/{id}`, `GET /stats`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/users/{id}", get(get_user).put(put_user))
        .route("/stats", get(stats))
        .with_state(state)
}

/// The cached read. The `x-cache` header says `hit` or `miss`.
async fn get_user(State(state): State<AppState>, Path(id): Path<i32>) -> Response {
    match state.read_user(id).await {
        Ok((user, outcome)) => {
            let mut response = match user {
                Some(user) => Json(&*user).into_response(),
                None => (StatusCode::NOT_FOUND, format!("no user {id}\n")).into_response(),
            };
            let tag = match outcome {
                Outcome::Hit => "hit",
                Outcome::Miss => "miss",
            };
            response
                .headers_mut()
                .insert("x-cache", HeaderValue::from_static(tag));
            response
        }
        Err(e) => {
            tracing::error!(error = %e, id, "read failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

#[derive(Debug, Deserialize)]
struct Rename {
    name: String,
}

/// The write: an UPDATE; the trigger tells every cache, and the response waits
/// until this process's cache has applied it (`x-read-your-writes: applied`).
async fn put_user(
    State(state): State<AppState>,
    Path(id): Path<i32>,
    Json(body): Json<Rename>,
) -> Response {
    match state.rename_user(id, &body.name).await {
        Ok(Some((user, applied))) => {
            let mut response = Json(user).into_response();
            let tag = match applied {
                ReadYourWrites::Applied => "applied",
                ReadYourWrites::InvalidatedByHand => "invalidated-by-hand",
            };
            response
                .headers_mut()
                .insert("x-read-your-writes", HeaderValue::from_static(tag));
            response
        }
        Ok(None) => (StatusCode::NOT_FOUND, format!("no user {id}\n")).into_response(),
        Err(e) => {
            tracing::error!(error = %e, id, "write failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

/// Counters of the cache, the dispatcher and the listener.
async fn stats(State(state): State<AppState>) -> Response {
    let c = state.users.stats();
    let d = state.dispatcher.stats();
    let l = state.source.stats();
    Json(serde_json::json!({
        "cache": {
            "hits": c.hits, "misses": c.misses, "loads": c.loads, "flushes": c.flushes,
            "invalidations": c.invalidations, "discarded_loads": c.discarded_loads,
            "bypasses": c.bypasses, "entries": c.entries,
        },
        "dispatcher": { "events": d.events, "gaps": d.gaps, "health_changes": d.health_changes },
        "listener": {
            "healthy": state.users.is_healthy(), "events": l.events, "malformed": l.malformed,
            "reconnects": l.reconnects, "gaps": l.gaps, "heartbeats": l.heartbeats,
            "last_heartbeat_rtt_us": l.last_heartbeat_rtt.map(|d| d.as_micros() as u64),
        },
    }))
    .into_response()
}
