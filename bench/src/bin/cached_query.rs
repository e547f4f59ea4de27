//! The hit path of a [`CachedQuery`] next to the same hit through a plain
//! [`Cache::get_or_load`] and through a `#[cached]` function, in one run, with
//! the same key (`(i64,)`) and value types; and the one-time cost of deriving
//! the query's dependencies, timed apart from the reads.
//!
//! Needs PostgreSQL at `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`): it creates a schema of its own,
//! a table of 1000 users, and drops the schema at the end. Events come from an
//! in-memory source (nothing is written while measuring: every read is a hit).
//!
//! ```text
//! cargo run --release -p pgcachewatch-bench --bin cached_query [-- N]
//! ```
//!
//! The target: a `CachedQuery::fetch_one` hit within 1.1 x the time of a
//! `Cache::get_or_load` hit; derivation once per statement (the count of
//! server resolutions stays 1 whatever the number of reads).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context};
use pgcachewatch::memory::InMemorySource;
use pgcachewatch::strategies::Greedy;
use pgcachewatch::testkit::env::{database_url, unique_name};
use pgcachewatch::{cached, Cache};
use pgcachewatch_query::CachedQuery;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::Executor;

const KEYS: i64 = 1000;

#[derive(Debug, Clone, sqlx::FromRow)]
struct User {
    #[allow(dead_code)]
    id: i64,
    #[allow(dead_code)]
    name: String,
}

fn user(id: i64) -> User {
    User {
        id,
        name: format!("user {id}"),
    }
}

/// The same hit through `#[cached]`: its cache, keyed by the argument.
#[cached(capacity = 10_000, strategy = Greedy::new(), source = "cached-query-bench")]
async fn cached_user(id: i64) -> Result<User, Arc<std::io::Error>> {
    // Warmed before measuring: a load here would be a miss (asserted 0).
    Ok(user(id))
}

fn main() -> anyhow::Result<()> {
    let n: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse().context("N: reads per round")?,
        None => 2_000_000,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let schema = unique_name("pgcw_bench_cq");
    let outcome = rt.block_on(run(&schema, n));
    // Drop the schema whatever happened.
    rt.block_on(async {
        if let Ok(pool) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url())
            .await
        {
            let _ = pool
                .execute(format!("DROP SCHEMA IF EXISTS {schema} CASCADE").as_str())
                .await;
        }
    });
    outcome
}

async fn run(schema: &str, n: u64) -> anyhow::Result<()> {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&database_url())
        .await
        .with_context(|| format!("PostgreSQL at {}", database_url()))?;
    admin
        .execute(
            format!(
                "CREATE SCHEMA {schema};
                 CREATE TABLE {schema}.users (id int8 PRIMARY KEY, name text NOT NULL);
                 INSERT INTO {schema}.users SELECT i, 'user ' || i FROM generate_series(0, {}) i;",
                KEYS - 1
            )
            .as_str(),
        )
        .await?;
    // Every session of the pool reads the test's schema first (a startup option).
    let options = database_url()
        .parse::<PgConnectOptions>()?
        .options([("search_path", schema)]);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await?;
    let (source, _events) = InMemorySource::pair();

    println!("cached query: SELECT id, name FROM users WHERE id = $1 ({KEYS} warm keys, {n} reads a round, one thread)");

    // Derivation: once, at attach, timed apart from the reads.
    let query = CachedQuery::<(i64,), User>::new("SELECT id, name FROM users WHERE id = $1");
    let t = Instant::now();
    let attached = query.attach(&pool, &source).await?;
    let attach = t.elapsed();
    let t = Instant::now();
    let again = query.attach(&pool, &source).await?;
    let reattach = t.elapsed();
    println!(
        "   attach (analyze + resolve on the server + dispatcher): {:.2} ms; a second attach (derivation reused): {:.3} ms",
        attach.as_secs_f64() * 1e3,
        reattach.as_secs_f64() * 1e3
    );
    println!(
        "   derived: {}",
        query.explain().unwrap_or_else(|| "?".into())
    );

    // Warm: one load a key, through the database.
    let t = Instant::now();
    for id in 0..KEYS {
        query.fetch_one((id,)).await?;
    }
    let warm = t.elapsed();
    println!(
        "   {KEYS} misses (a query each): {:.1} µs a miss",
        warm.as_secs_f64() * 1e6 / KEYS as f64
    );

    // The baselines, same key and value types, warmed likewise.
    let plain: Cache<(i64,), User> = Cache::new(10_000);
    for id in 0..KEYS {
        plain
            .get_or_load((id,), || async { Ok::<_, std::io::Error>(user(id)) })
            .await?;
    }
    let (macro_source, _macro_events) = InMemorySource::pair();
    let _attached_macro = cached::attach_as("cached-query-bench", macro_source);
    for id in 0..KEYS {
        let _ = cached_user(id).await;
    }
    let loads = (query.stats().loads, cached_user_cache().stats().loads);

    // Rounds alternate the three sides (rotating which goes first), so all
    // see the same machine; the median of the rounds' ratios is the figure.
    let rounds = 15;
    let (mut q_ns, mut p_ns, mut m_ns) = (Vec::new(), Vec::new(), Vec::new());
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let mut times = [0f64; 3];
        for side in 0..3 {
            let which = (side + round) % 3;
            let t = Instant::now();
            match which {
                0 => {
                    for i in 0..n {
                        black_box(query.fetch_one((i as i64 % KEYS,)).await.ok());
                    }
                }
                1 => {
                    for i in 0..n {
                        let r = plain
                            .get_or_load((i as i64 % KEYS,), || async {
                                Err::<User, _>(std::io::Error::other("miss"))
                            })
                            .await;
                        black_box(r.ok());
                    }
                }
                _ => {
                    for i in 0..n {
                        black_box(cached_user(i as i64 % KEYS).await.ok());
                    }
                }
            }
            times[which] = t.elapsed().as_secs_f64() * 1e9 / n as f64;
        }
        q_ns.push(times[0]);
        p_ns.push(times[1]);
        m_ns.push(times[2]);
        ratios.push(times[0] / times[1]);
    }
    let after = (query.stats().loads, cached_user_cache().stats().loads);
    ensure!(
        after == loads && plain.stats().load_errors == 0 && query.stats().bypasses == 0,
        "the benchmark missed: it measured loads or bypasses, not hits ({:?}, {:?})",
        query.stats(),
        plain.stats()
    );
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (q, p, m) = (median(&mut q_ns), median(&mut p_ns), median(&mut m_ns));
    let ratio = median(&mut ratios);
    println!("   CachedQuery::fetch_one (hit)            {q:>7.1} ns");
    println!("   Cache::get_or_load (hit), same types    {p:>7.1} ns");
    println!("   #[cached] fn (hit), same types          {m:>7.1} ns");
    println!(
        "   CachedQuery::fetch_one / Cache::get_or_load: {ratio:.2} x, median of {rounds} rounds (target <= 1.10); / #[cached]: {:.2} x",
        q / m
    );
    println!(
        "   derivations (server resolutions) after {} reads and 2 attaches: {} (target: 1 per statement)",
        KEYS as u64 + n * rounds as u64,
        query.derivations()
    );
    ensure!(query.derivations() == 1, "derived more than once");
    attached.shutdown().await;
    again.shutdown().await;
    Ok(())
}
