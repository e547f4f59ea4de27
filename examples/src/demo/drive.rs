//! The demo driving itself: reads and writes over HTTP and through the cache,
//! printing hits, misses and the write → fresh-read latency.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::app::{user_by_id_cache, AppState, ReadYourWrites, User};
use super::setup::USERS;

/// One keep-alive HTTP/1.1 connection to the demo server (hyper's own client).
pub struct HttpClient {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

/// Status, `x-cache` header and body of a response.
pub struct Reply {
    pub status: StatusCode,
    pub cache: Option<String>,
    pub body: Bytes,
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr) -> Result<HttpClient> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the demo server at {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "demo HTTP client connection ended");
            }
        });
        Ok(HttpClient {
            sender,
            host: addr.to_string(),
        })
    }

    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Reply> {
        self.sender.ready().await?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.host)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let cache = response
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            cache,
            body,
        })
    }

    pub async fn get_user(&mut self, id: i32) -> Result<(User, String)> {
        let reply = self
            .send(Method::GET, &format!("/users/{id}"), None)
            .await?;
        if reply.status != StatusCode::OK {
            return Err(anyhow!("GET /users/{id}: {}", reply.status));
        }
        let user: User = serde_json::from_slice(&reply.body)?;
        Ok((user, reply.cache.unwrap_or_default()))
    }

    /// `GET /users/{id}/card`: the user and the `x-cache` tag.
    pub async fn get_card(&mut self, id: i32) -> Result<(User, String)> {
        let reply = self
            .send(Method::GET, &format!("/users/{id}/card"), None)
            .await?;
        if reply.status != StatusCode::OK {
            return Err(anyhow!("GET /users/{id}/card: {}", reply.status));
        }
        Ok((
            serde_json::from_slice(&reply.body)?,
            reply.cache.unwrap_or_default(),
        ))
    }

    /// `GET path` as text, failing unless it answers 200.
    pub async fn get_text(&mut self, path: &str) -> Result<String> {
        let reply = self.send(Method::GET, path, None).await?;
        if reply.status != StatusCode::OK {
            return Err(anyhow!("GET {path}: {}", reply.status));
        }
        Ok(String::from_utf8_lossy(&reply.body).into_owned())
    }

    pub async fn put_user(&mut self, id: i32, name: &str) -> Result<User> {
        let body = serde_json::json!({ "name": name }).to_string();
        let reply = self
            .send(Method::PUT, &format!("/users/{id}"), Some(body))
            .await?;
        if reply.status != StatusCode::OK {
            return Err(anyhow!("PUT /users/{id}: {}", reply.status));
        }
        Ok(serde_json::from_slice(&reply.body)?)
    }
}

/// Latencies of several rounds, summarized.
#[derive(Debug, Default)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn add(&mut self, d: Duration) {
        self.0.push(d);
    }

    pub fn summary(&self) -> String {
        if self.0.is_empty() {
            return "no samples".into();
        }
        let mut v = self.0.clone();
        v.sort();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        format!(
            "p50 {}  p99 {}  max {}  ({} rounds)",
            show(at(0.5)),
            show(at(0.99)),
            show(v[v.len() - 1]),
            v.len()
        )
    }
}

fn show(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }
}

/// Runs the scenario and prints what it saw.
pub async fn drive(state: &AppState, addr: SocketAddr, rounds: usize) -> Result<()> {
    let mut http = HttpClient::connect(addr).await?;

    // 1. Cold, then warm reads over HTTP.
    let ids = 1..=20;
    let tally = |tags: Vec<String>| {
        let hits = tags.iter().filter(|t| *t == "hit").count();
        (tags.len() - hits, hits)
    };
    let mut first = Vec::new();
    for id in ids.clone() {
        first.push(http.get_user(id).await?.1);
    }
    let mut second = Vec::new();
    for id in ids.clone() {
        second.push(http.get_user(id).await?.1);
    }
    let (cold_misses, cold_hits) = tally(first);
    let (warm_misses, warm_hits) = tally(second);
    println!("1. GET /users/1..20 over HTTP");
    println!(
        "     first pass:  {cold_misses:>3} misses (loaded from PostgreSQL), {cold_hits:>3} hits"
    );
    println!(
        "     second pass: {warm_misses:>3} misses, {warm_hits:>3} hits (answered from the cache)"
    );

    // 2. A read-heavy load: the cache answers, PostgreSQL is left alone.
    let before = user_by_id_cache().stats();
    let reads = 100_000;
    let started = Instant::now();
    for i in 0..reads {
        state.read_user((i % USERS) + 1).await?;
    }
    let elapsed = started.elapsed();
    let after = user_by_id_cache().stats();
    println!("2. {reads} reads of the {USERS} rows through the cache (no HTTP)");
    println!(
        "     {} hits, {} misses (loads from PostgreSQL); {:.2} M reads/s on one task",
        after.hits - before.hits,
        after.misses - before.misses,
        reads as f64 / elapsed.as_secs_f64() / 1e6
    );

    // 3. Write → fresh read, through the cache the handler uses. `rename_user`
    //    returns once this process's dispatcher applied the write's own event
    //    (read-your-writes by transaction id): the very next read must be fresh.
    let mut latencies = Latencies::default();
    let (mut stale_after_write, mut by_hand) = (0u64, 0u64);
    for round in 0..rounds {
        let id = (round as i32 % USERS) + 1;
        state.read_user(id).await?; // warm: the old row is cached
        let written = Instant::now();
        let (user, applied) = state
            .rename_user(id, &format!("user-{id}-r{round}"))
            .await?
            .ok_or_else(|| anyhow!("user {id} vanished"))?;
        by_hand += u64::from(applied == ReadYourWrites::InvalidatedByHand);
        let (seen, _) = state.read_user(id).await?;
        if seen.as_ref().is_none_or(|u| u.version < user.version) {
            stale_after_write += 1;
        }
        latencies.add(written.elapsed());
    }
    println!("3. UPDATE issued → its event applied → the row read through the cache");
    println!("     {}", latencies.summary());
    println!(
        "     reads right after the write that were stale: {stale_after_write} (must be 0); \
         events later than 2 s (entry dropped by hand): {by_hand}"
    );

    // 4. The same over HTTP: PUT (which answers once the cache reflects it), then GET.
    let mut latencies = Latencies::default();
    let mut stale_over_http = 0u64;
    let http_rounds = (rounds / 4).max(1);
    for round in 0..http_rounds {
        let id = (round as i32 % 20) + 1;
        http.get_user(id).await?;
        let written = Instant::now();
        let user = http.put_user(id, &format!("user-{id}-h{round}")).await?;
        if http.get_user(id).await?.0.version < user.version {
            stale_over_http += 1;
        }
        latencies.add(written.elapsed());
    }
    println!("4. PUT /users/{{id}} → GET /users/{{id}} returns the new row (HTTP both ways)");
    println!("     {}", latencies.summary());
    println!("     GETs right after a PUT that were stale: {stale_over_http} (must be 0)");
    if stale_after_write + stale_over_http > 0 {
        return Err(anyhow!("a read after its own write was stale"));
    }

    // 5. The cached query (GET /users/{id}/card): row-level, so a write drops
    //    only the row it wrote; the next read of that row is fresh.
    for id in 1..=2 {
        http.get_card(id).await?;
    }
    let (_, one) = http.get_card(1).await?;
    let (_, two) = http.get_card(2).await?;
    let written = http.put_user(1, "card-reader").await?;
    let (after, tag_one) = http.get_card(1).await?;
    let (_, tag_two) = http.get_card(2).await?;
    println!(
        "5. GET /users/{{id}}/card: {}",
        state.cards.explain().unwrap_or_default()
    );
    println!(
        "     warm: user 1 {one}, user 2 {two}; after PUT /users/1: user 1 {tag_one} \
         (version {}), user 2 {tag_two}",
        after.version
    );
    if after.version < written.version || after.name != "card-reader" {
        return Err(anyhow!("GET /users/1/card after its PUT was stale"));
    }
    if tag_two != "hit" {
        return Err(anyhow!(
            "a write to user 1 dropped user 2's card (not row-level)"
        ));
    }

    let c = user_by_id_cache().stats();
    let l = state.source.stats();
    println!(
        "cache:    {} hits, {} misses, {} loads, {} flushes, {} loads discarded (stale-set race closed)",
        c.hits, c.misses, c.loads, c.flushes, c.discarded_loads
    );
    println!(
        "listener: {} events, {} reconnects, {} gaps",
        l.events, l.reconnects, l.gaps
    );

    // 6. The Prometheus endpoint answers with the cache's and the source's series.
    let text = http.get_text("/metrics").await?;
    let expected = [
        r#"pgcachewatch_cache_hits_total{cache="users"}"#,
        r#"pgcachewatch_cache_misses_total{cache="users"}"#,
        r#"pgcachewatch_cache_loads_total{cache="users"}"#,
        r#"pgcachewatch_source_events_total{source="listen"}"#,
        r#"pgcachewatch_source_healthy{source="listen"} 1"#,
        r#"pgcachewatch_source_event_latency_seconds"#,
    ];
    let missing: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|series| !text.contains(series))
        .collect();
    if !missing.is_empty() {
        return Err(anyhow!("GET /metrics lacks {missing:?}:\n{text}"));
    }
    let series = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("?")
            .to_owned()
    };
    println!(
        "6. GET /metrics: {} series lines; hits {}, events {}",
        text.lines().filter(|l| !l.starts_with('#')).count(),
        series(r#"pgcachewatch_cache_hits_total{cache="users"}"#),
        series(r#"pgcachewatch_source_events_total{source="listen"}"#),
    );
    Ok(())
}
