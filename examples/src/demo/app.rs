//! The web app: one table, two caches, five routes.
//!
//! The Rust counterpart of PGCacheWatch's FastAPI example: a handler that returns a
//! query result through a cache which the database's NOTIFY events keep fresh.
//! `GET /users/{id}` reads through a `#[cached]` function with a hand-written
//! strategy (any change of the table drops everything); `GET /users/{id}/card`
//! reads through a cached query, whose dependencies come from its SQL
//! (row-level: a write drops only the rows it wrote).

use std::sync::{Arc, LazyLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use pgcachewatch::cached::AttachedCaches;
use pgcachewatch::postgres::PgListenerSource;
use pgcachewatch::query::{AttachedQuery, CachedQuery, CachedQueryError, QueryKey, Read};
use pgcachewatch::strategies::Greedy;
use pgcachewatch::{cached, Event};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// This run's suffix: the process id and clock bits, so that two runs on one
/// database (two people, or one person twice) never share a table or a channel.
pub fn run_suffix() -> &'static str {
    static SUFFIX: LazyLock<String> = LazyLock::new(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        format!("{}_{:06x}", std::process::id(), nanos & 0xff_ffff)
    });
    &SUFFIX
}

/// This run's demo table (in schema `public`): `pgcachewatch_demo_users_<pid>_<hex>`.
pub fn table() -> &'static str {
    static TABLE: LazyLock<String> =
        LazyLock::new(|| format!("pgcachewatch_demo_users_{}", run_suffix()));
    &TABLE
}

/// This run's NOTIFY channel unless `--channel` names one: `pgcachewatch_demo_<pid>_<hex>`.
pub fn default_channel() -> String {
    format!("pgcachewatch_demo_{}", run_suffix())
}

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

/// The user `id`, through a cache that PostgreSQL keeps fresh: any change of the
/// table drops it (`Greedy`, for events of this table), as soon as its NOTIFY
/// arrives. A hit costs a hash lookup; a miss runs one SELECT (once, however many
/// requests wait for it). `None` (no such user) is cached too, until the table
/// changes; errors are not cached. The cache is `user_by_id_cache()`.
#[cached(
    name = "users",
    capacity = 10_000,
    key = id,
    strategy = Greedy::with_predicate(|e: &Event| e.table == table()),
)]
pub async fn user_by_id(db: &PgPool, id: i32) -> Result<Option<Arc<User>>, Arc<sqlx::Error>> {
    let sql = format!("SELECT id, name, version FROM {} WHERE id = $1", table());
    let row: Option<User> = sqlx::query_as(&sql).bind(id).fetch_optional(db).await?;
    Ok(row.map(Arc::new))
}

/// The user `id` as `GET /users/{id}/card` serves it: a cached query. The SQL
/// is the whole declaration: the key is its parameter, the dependencies
/// (row-level on this run's table, by `id`) and the strategy come from the
/// statement, resolved on the server when it is attached. The table is named
/// for this run, so the SQL is built at run time (the runtime form; SQL written
/// in the source can be `#[cached(query = "…")]`).
pub fn user_card_query() -> CachedQuery<(i32,), User> {
    CachedQuery::builder(format!(
        "SELECT id, name, version FROM {} WHERE id = $1",
        table()
    ))
    .name("user_cards")
    .capacity(10_000)
    .build()
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub db: PgPool,
    pub source: Arc<PgListenerSource>,
    /// The dispatchers feeding the `#[cached]` functions' caches from `source`.
    pub caches: Arc<AttachedCaches>,
    /// The cached query behind `GET /users/{id}/card` ([`user_card_query`]).
    pub cards: CachedQuery<(i32,), User>,
    /// Its dispatcher on `source` (dropping it stops its invalidation).
    pub cards_attached: Arc<AttachedQuery>,
    /// Renders the `pgcachewatch_*` series (and any others) for `GET /metrics`.
    pub metrics: PrometheusHandle,
}

impl AppState {
    /// The user, and whether the cache answered (for the `x-cache` header).
    pub async fn read_user(
        &self,
        id: i32,
    ) -> Result<(Option<Arc<User>>, Outcome), Arc<sqlx::Error>> {
        let outcome = if user_by_id_cache().contains_key(&id) {
            Outcome::Hit
        } else {
            Outcome::Miss
        };
        Ok((user_by_id(&self.db, id).await?, outcome))
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
            "UPDATE {} SET name = $2, version = version + 1 WHERE id = $1 \
             RETURNING id, name, version, txid_current() AS txid",
            table()
        );
        let row: Option<(i32, String, i64, i64)> = sqlx::query_as(&sql)
            .bind(id)
            .bind(name)
            .fetch_optional(&self.db)
            .await?;
        let Some((id, name, version, txid)) = row else {
            return Ok(None);
        };
        let patience = std::time::Duration::from_secs(2);
        let applied = match self.caches.wait_for_txid(txid, patience).await.and(
            self.cards_attached
                .dispatcher()
                .wait_for_txid(txid, patience)
                .await,
        ) {
            Ok(()) => ReadYourWrites::Applied,
            Err(e) => {
                tracing::warn!(error = %e, id, "the write's event is late: dropping its entries by hand");
                user_by_id_cache().invalidate(&id);
                self.cards.cache().invalidate_all();
                ReadYourWrites::InvalidatedByHand
            }
        };
        Ok(Some((User { id, name, version }, applied)))
    }

    /// The user through the cached query, and whether its cache answered.
    pub async fn read_card(&self, id: i32) -> Result<(Option<User>, Outcome), CachedQueryError> {
        let key = QueryKey::new((id,), Read::First);
        let outcome = if self.cards.cache().contains_key(&key) {
            Outcome::Hit
        } else {
            Outcome::Miss
        };
        Ok((self.cards.fetch_optional((id,)).await?, outcome))
    }
}

/// `GET /users/{id}`, `PUT /users/{id}`, `GET /stats`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/users/{id}", get(get_user).put(put_user))
        .route("/users/{id}/card", get(get_card))
        .route("/stats", get(stats))
        .route("/metrics", get(prometheus))
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

/// The read through the cached query; `x-cache` as for `GET /users/{id}`,
/// `x-dependencies` says what was derived from the SQL.
async fn get_card(State(state): State<AppState>, Path(id): Path<i32>) -> Response {
    match state.read_card(id).await {
        Ok((user, outcome)) => {
            let mut response = match user {
                Some(user) => Json(user).into_response(),
                None => (StatusCode::NOT_FOUND, format!("no user {id}\n")).into_response(),
            };
            let tag = match outcome {
                Outcome::Hit => "hit",
                Outcome::Miss => "miss",
            };
            let headers = response.headers_mut();
            headers.insert("x-cache", HeaderValue::from_static(tag));
            if let Some(Ok(explained)) = state.cards.explain().map(HeaderValue::try_from) {
                headers.insert("x-dependencies", explained);
            }
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

/// Every series in Prometheus' text format (`metrics-exporter-prometheus`). The
/// NOTIFY queue usage is asked for on each scrape, which sets its gauge.
async fn prometheus(State(state): State<AppState>) -> Response {
    if let Err(e) = state.source.queue_usage().await {
        tracing::debug!(error = %e, "pg_notification_queue_usage() unavailable");
    }
    let _ = user_by_id_cache().stats(); // exports the hits counted since the last miss
    (
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Counters of the cache, the dispatcher and the listener.
async fn stats(State(state): State<AppState>) -> Response {
    let c = user_by_id_cache().stats();
    let (mut events, mut gaps, mut health_changes) = (0, 0, 0);
    for d in state.caches.handles() {
        let d = d.stats();
        (events, gaps, health_changes) = (
            events + d.events,
            gaps + d.gaps,
            health_changes + d.health_changes,
        );
    }
    let l = state.source.stats();
    Json(serde_json::json!({
        "cache": {
            "hits": c.hits, "misses": c.misses, "loads": c.loads, "flushes": c.flushes,
            "invalidations": c.invalidations, "discarded_loads": c.discarded_loads,
            "bypasses": c.bypasses, "entries": c.entries,
        },
        "dispatcher": { "events": events, "gaps": gaps, "health_changes": health_changes },
        "listener": {
            "healthy": user_by_id_cache().is_healthy(), "events": l.events, "malformed": l.malformed,
            "reconnects": l.reconnects, "gaps": l.gaps, "heartbeats": l.heartbeats,
            "last_heartbeat_rtt_us": l.last_heartbeat_rtt.map(|d| d.as_micros() as u64),
        },
    }))
    .into_response()
}
