//! The NATS relay's figures (issue 8), each next to a baseline measured in the
//! same run:
//!
//! 1. **write → fresh read** through the cache, p50 / p99: a single-row `UPDATE`
//!    issued → the event → the dispatcher invalidates → `get_or_load` reads the
//!    new row. At one of 64 subscribing caches (64 [`NatsSource`]s in this
//!    process, each with its own `Cache` and `Dispatcher`, fed by one [`Relay`]
//!    over a replication slot; the measured subscriber rotates), next to a
//!    direct [`PgReplicationSource`] + cache and the floor of
//!    `bench/src/bin/replication.rs` (a raw sqlx `PgListener` `recv` plus one
//!    `SELECT`, fed by a plain `pg_notify` trigger). Rounds alternate between
//!    the three, as in that program. The relay side also records the time
//!    until **all 64** caches had the event (invalidated).
//! 2. **PostgreSQL connections** used for watching, counted in
//!    `pg_stat_activity` / `pg_stat_replication` by `application_name`: the
//!    relay (one walsender for 64 caches) vs direct replication sources (one
//!    slot and walsender each: as many as the server's free
//!    `max_replication_slots` / `max_wal_senders` allow, the rest extrapolated
//!    and said so) vs 64 LISTEN sources (measured).
//! 3. **relay throughput**, N committed single-row transactions (one event
//!    each), timed until the relay's status shows N more events acknowledged by
//!    JetStream: *live* (from the first write, the relay running) and *backlog*
//!    (written while the relay was stopped, timed from its restart: its own
//!    rate). Against raw async-nats JetStream publishes of N messages of the
//!    relay's payload size, each with a `Nats-Msg-Id`, awaiting acks in order
//!    with the same in-flight window as the relay's `max_in_flight`, into a
//!    stream with the same settings (median of 3); and, for the upstream's
//!    share, a `PgReplicationSource` alone draining the same backlog from a
//!    second slot.
//!
//! `cargo run --release -p pgcachewatch-bench --bin relay [-- --quick]`
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`, needs
//! `wal_level = logical`; `NATS_URL`, default `nats://127.0.0.1:4222`, JetStream on).
//! Everything it creates (schema, publication, slots, streams) has a name unique
//! to the run and is removed at the end, also after an error or Ctrl-C.

use std::collections::VecDeque;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use pgcachewatch::nats::{NatsConnect, NatsSource, Relay, RelayHandle, StreamSettings};
use pgcachewatch::postgres::PgListenerSource;
use pgcachewatch::replication::PgReplicationSource;
use pgcachewatch::strategies::Keyed;
use pgcachewatch::{
    Cache, Dispatcher, DispatcherHandle, Event, EventSource, Health, Lsn, RowKey, Signal,
    Subscription,
};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Connection, PgPool};

#[derive(Parser, Debug)]
#[command(
    about = "NATS relay: write → fresh read at 64 subscribers vs a direct replication source; PostgreSQL connections; relay events/s vs raw async-nats publish"
)]
struct Args {
    /// A run of under a minute: fewer rounds, a smaller burst.
    #[arg(long)]
    quick: bool,
    /// Measured latency rounds per side (default 300, 60 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Subscribing caches (NatsSources) behind the one relay.
    #[arg(long, default_value_t = 64)]
    subscribers: usize,
    /// Direct replication sources to compare connections with (capped by the
    /// server's free slots and walsenders, leaving --reserve-slots for others).
    #[arg(long, default_value_t = 64)]
    direct_sources: usize,
    /// Slots and walsenders left free for other clients of the server.
    #[arg(long, default_value_t = 2)]
    reserve_slots: usize,
    /// LISTEN sources to compare connections with (capped by free connections).
    #[arg(long, default_value_t = 64)]
    listen_sources: usize,
    /// Committed transactions in the throughput burst (default 20000, 5000 with --quick).
    #[arg(long)]
    writes: Option<usize>,
    /// Concurrent writer connections for the burst (`synchronous_commit = off`).
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// The relay's max_in_flight, and the raw publisher's window.
    #[arg(long, default_value_t = pgcachewatch::nats::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: usize,
    /// Keep the JetStream streams in memory (default: file storage, the relay's default).
    #[arg(long)]
    memory: bool,
    /// PostgreSQL to use.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    /// NATS (JetStream on) to use.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
}

const ROWS: i64 = 1000;

/// The names this run creates, unique to it.
struct Names {
    tag: String,
    schema: String,
    publication: String,
    relay_slot: String,
    direct_slot_prefix: String,
    channel: String,
    stream: StreamSettings,
    raw_stream: StreamSettings,
    app_relay: String,
    app_direct: String,
    app_listen: String,
}

impl Names {
    fn new(memory: bool) -> Names {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tag = format!("{}_{nanos:08x}", std::process::id());
        let stream = |kind: &str| {
            StreamSettings::new()
                .stream(format!("PGCWBENCH{kind}_{tag}").to_uppercase())
                .subject_prefix(format!("pgcwbench{kind}_{tag}"))
                .max_age(Duration::from_secs(3600))
                .memory(memory)
        };
        Names {
            schema: format!("pgcw_bench_relay_{tag}"),
            publication: format!("pgcw_bench_relay_{tag}"),
            relay_slot: format!("pgcw_bench_relay_{tag}"),
            direct_slot_prefix: format!("pgcw_bench_direct_{tag}"),
            channel: format!("pgcw_bench_relay_{tag}"),
            stream: stream(""),
            raw_stream: stream("raw"),
            app_relay: format!("pgcw-bench-relay-{tag}"),
            app_direct: format!("pgcw-bench-direct-{tag}"),
            app_listen: format!("pgcw-bench-listen-{tag}"),
            tag,
        }
    }

    fn items(&self) -> String {
        format!("\"{}\".items", self.schema)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The library's logs, where RUST_LOG asks for them (off by default).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let args = Args::parse();
    let names = Names::new(args.memory);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL (DATABASE_URL)")?;
    let result = tokio::select! {
        r = async {
            setup(&pool, &names).await?;
            run(&args, &pool, &names).await
        } => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Err(e) = teardown(&pool, &args.nats_url, &names).await {
        eprintln!("cleaning up: {e:#}");
    }
    result
}

async fn exec(pool: &PgPool, sql: &str) -> anyhow::Result<()> {
    sqlx::query(sql)
        .execute(pool)
        .await
        .with_context(|| sql.to_owned())?;
    Ok(())
}

async fn setup(pool: &PgPool, n: &Names) -> anyhow::Result<()> {
    let items = n.items();
    exec(pool, &format!("CREATE SCHEMA \"{}\"", n.schema)).await?;
    exec(
        pool,
        &format!("CREATE TABLE {items} (id bigint PRIMARY KEY, v bigint NOT NULL)"),
    )
    .await?;
    exec(
        pool,
        &format!("INSERT INTO {items} SELECT g, 0 FROM generate_series(1, {ROWS}) g"),
    )
    .await?;
    // The floor's trigger: a bare pg_notify of the id, nothing of pgcachewatch.
    exec(
        pool,
        &format!(
            "CREATE FUNCTION \"{s}\".notify_items() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_notify('{c}', NEW.id::text); RETURN NULL; END $$",
            s = n.schema,
            c = n.channel
        ),
    )
    .await?;
    exec(
        pool,
        &format!(
            "CREATE TRIGGER notify_items AFTER UPDATE ON {items} \
             FOR EACH ROW EXECUTE FUNCTION \"{}\".notify_items()",
            n.schema
        ),
    )
    .await?;
    // Not published: a write to it moves the slot's position without an event.
    exec(
        pool,
        &format!(
            "CREATE TABLE \"{}\".nudge (id bigserial PRIMARY KEY)",
            n.schema
        ),
    )
    .await?;
    exec(
        pool,
        &format!("CREATE PUBLICATION \"{}\" FOR TABLE {items}", n.publication),
    )
    .await?;
    Ok(())
}

/// Drops this run's slots (ending their walsenders), publication, schema and
/// streams; keeps going past failures and reports the first.
async fn teardown(pool: &PgPool, nats_url: &str, n: &Names) -> anyhow::Result<()> {
    let mut first_error: Option<anyhow::Error> = None;
    let pattern = format!("pgcw\\_bench\\_%{}", n.tag);
    for _ in 0..50 {
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name LIKE $1 || '%' AND active_pid IS NOT NULL",
        )
        .bind(&pattern)
        .execute(pool)
        .await;
        let _ = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name LIKE $1 || '%' AND NOT active",
        )
        .bind(&pattern)
        .execute(pool)
        .await;
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE $1 || '%'",
        )
        .bind(&pattern)
        .fetch_one(pool)
        .await
        .unwrap_or(1);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for sql in [
        format!("DROP PUBLICATION IF EXISTS \"{}\"", n.publication),
        format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", n.schema),
    ] {
        if let Err(e) = exec(pool, &sql).await {
            first_error.get_or_insert(e);
        }
    }
    match NatsConnect::new(nats_url).connect().await {
        Ok(client) => {
            let js = async_nats::jetstream::new(client);
            for s in [&n.stream, &n.raw_stream] {
                // A stream that was never created is not an error here.
                let _ = js.delete_stream(s.name()).await;
            }
        }
        Err(e) => {
            first_error.get_or_insert(anyhow::anyhow!("connecting to NATS to delete streams: {e}"));
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The row key the replication source sends: `{"id": n}`.
fn row_id(_: &Event, key: &RowKey) -> Option<i64> {
    key.get("id").and_then(|v| v.as_i64())
}

async fn read(cache: &Cache<i64, i64>, pool: &PgPool, items: &str, id: i64) -> anyhow::Result<i64> {
    let sql = format!("SELECT v FROM {items} WHERE id = $1");
    Ok(cache
        .get_or_load(id, || async {
            sqlx::query_scalar::<_, i64>(&sql)
                .bind(id)
                .fetch_one(pool)
                .await
        })
        .await?)
}

/// Updates one row; returns the WAL position before its commit (every event
/// of this write has a commit position above it, every earlier one below).
async fn write(pool: &PgPool, items: &str, id: i64, v: i64) -> anyhow::Result<Lsn> {
    let before: String = sqlx::query_scalar(&format!(
        "UPDATE {items} SET v = $2 WHERE id = $1 RETURNING pg_current_wal_lsn()::text"
    ))
    .bind(id)
    .bind(v)
    .fetch_one(pool)
    .await?;
    Lsn::from_str(&before).map_err(|e| anyhow::anyhow!("pg_current_wal_lsn {before:?}: {e}"))
}

/// Drops whatever the subscription has buffered.
fn drain(sub: &mut Subscription) {
    while sub.try_recv().is_ok() {}
}

/// Waits for an event committed after `after` on `sub`.
async fn event_after(sub: &mut Subscription, after: Lsn) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, sub.recv()).await {
            // A NatsSource passes events on without their position (one may
            // come late); it passes positions on as progress.
            Ok(Some(Signal::Event(e))) if e.lsn.is_none_or(|l| l > after) => return Ok(()),
            Ok(Some(Signal::Progress(l))) if l > after => return Ok(()),
            Ok(Some(Signal::Gap(g))) => anyhow::bail!("a gap: {g}"),
            Ok(Some(_)) => continue,
            Ok(None) => anyhow::bail!("the source ended"),
            Err(_) => anyhow::bail!("no event after {after} within 10 s"),
        }
    }
}

/// Waits until the subscription reports `Healthy`.
async fn healthy(sub: &mut Subscription, what: &str) -> anyhow::Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), sub.recv()).await {
            Ok(Some(Signal::Health(Health::Healthy))) => return Ok(()),
            Ok(Some(_)) => {}
            Ok(None) => anyhow::bail!("{what} ended before it was healthy"),
            Err(_) => anyhow::bail!("{what} not healthy within 30 s"),
        }
    }
}

fn options(url: &str, application_name: &str) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)
        .context("DATABASE_URL is not a PostgreSQL URL")?
        .application_name(application_name))
}

/// One subscribing service: a NatsSource, its cache, its dispatcher.
struct Subscriber {
    source: NatsSource,
    cache: Cache<i64, i64>,
    _dispatcher: DispatcherHandle,
    sub: Subscription,
}

async fn start_relay(args: &Args, n: &Names) -> anyhow::Result<(RelayHandle, PgReplicationSource)> {
    let start =
        PgReplicationSource::builder_with_options(options(&args.database_url, &n.app_relay)?)
            .slot(&n.relay_slot)
            .publication(&n.publication)
            .create_slot_if_missing(true)
            .connect_durable()
            .await
            .context("the relay's replication source")?;
    let (relay, source) = Relay::builder(NatsConnect::new(&args.nats_url).name("pgcw-bench-relay"))
        .stream(n.stream.clone())
        .max_in_flight(args.max_in_flight)
        .start_durable(start)
        .await
        .context("starting the relay (is NATS with JetStream on at NATS_URL?)")?;
    Ok((relay, source))
}

async fn direct_source(args: &Args, n: &Names, i: usize) -> anyhow::Result<PgReplicationSource> {
    PgReplicationSource::builder_with_options(options(&args.database_url, &n.app_direct)?)
        .slot(format!("{}_{i}", n.direct_slot_prefix))
        .publication(&n.publication)
        .temporary_slot(true)
        .create_slot_if_missing(true)
        .connect()
        .await
        .with_context(|| format!("direct replication source {i}"))
}

/// (p50, p99) in µs.
fn summary(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e6
    };
    (at(0.5), at(0.99))
}

/// Connections in `pg_stat_activity` with this application name: (all, walsenders),
/// and the walsenders `pg_stat_replication` lists for it.
async fn connections(pool: &PgPool, app: &str) -> anyhow::Result<(i64, i64, i64)> {
    let (all, walsenders): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE backend_type = 'walsender') \
         FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(app)
    .fetch_one(pool)
    .await?;
    let replication: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_replication WHERE application_name = $1")
            .bind(app)
            .fetch_one(pool)
            .await?;
    Ok((all, walsenders, replication))
}

async fn setting(pool: &PgPool, name: &str) -> anyhow::Result<i64> {
    let v: String = sqlx::query_scalar("SELECT current_setting($1)")
        .bind(name)
        .fetch_one(pool)
        .await?;
    v.parse().with_context(|| format!("{name} = {v:?}"))
}

async fn run(args: &Args, pool: &PgPool, n: &Names) -> anyhow::Result<()> {
    let rounds = args.rounds.unwrap_or(if args.quick { 60 } else { 300 });
    let warmup = if args.quick { 10 } else { 20 };
    let writes = args
        .writes
        .unwrap_or(if args.quick { 5_000 } else { 20_000 });
    anyhow::ensure!(args.subscribers > 0, "--subscribers must be at least 1");
    let items = n.items();
    let items_ref = format!("{}.items", n.schema);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "# pgcachewatch relay figures ({} cores; load average {}; streams: {} storage)\n",
        cores,
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into()),
        if args.memory { "memory" } else { "file" },
    );

    // The relay over its slot, and the subscribers behind it.
    let (relay, relay_source) = start_relay(args, n).await?;
    let mut subs = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let source = NatsSource::builder(
            NatsConnect::new(&args.nats_url).name(format!("pgcw-bench-sub-{i}")),
        )
        .stream(n.stream.clone())
        .table(items_ref.as_str())
        .context("the subscribers' table")?
        .buffer(1 << 16)
        .connect()
        .await
        .with_context(|| format!("NatsSource {i}"))?;
        let cache: Cache<i64, i64> = Cache::new(10_000);
        let dispatcher = Dispatcher::new()
            .attach(Keyed::new(row_id), cache.clone())
            .spawn(&source);
        let sub = source.subscribe();
        subs.push(Subscriber {
            source,
            cache,
            _dispatcher: dispatcher,
            sub,
        });
    }
    // All connected first: one relay heartbeat makes them all healthy.
    for (i, s) in subs.iter_mut().enumerate() {
        healthy(&mut s.sub, &format!("NatsSource {i}")).await?;
    }
    // The direct replication source (a temporary slot of its own).
    let direct = direct_source(args, n, 0).await?;
    let direct_cache: Cache<i64, i64> = Cache::new(10_000);
    let _d_direct = Dispatcher::new()
        .attach(Keyed::new(row_id), direct_cache.clone())
        .spawn(&direct);
    let mut sub_direct = direct.subscribe();
    healthy(&mut sub_direct, "the direct replication source").await?;
    // The floor.
    let mut raw = PgListener::connect_with(pool).await?;
    raw.listen(&n.channel).await?;
    let raw_sql = format!("SELECT v FROM {items} WHERE id = 1");

    // 1. Write → fresh read.
    let (mut t_one, mut t_all, mut t_direct, mut t_raw) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut v = 0i64;
    for round in 0..rounds + warmup {
        for side in 0..3 {
            v += 1;
            for s in subs.iter_mut() {
                drain(&mut s.sub);
            }
            drain(&mut sub_direct);
            while raw.next_buffered().is_some() {}
            let measured = round % subs.len();
            match side {
                0 => {
                    read(&subs[measured].cache, pool, &items, 1).await?;
                }
                1 => {
                    read(&direct_cache, pool, &items, 1).await?;
                }
                _ => {}
            }
            let t0 = Instant::now();
            let before = write(pool, &items, 1, v).await?;
            match side {
                0 => {
                    let s = &mut subs[measured];
                    loop {
                        event_after(&mut s.sub, before)
                            .await
                            .with_context(|| format!("subscriber {measured}"))?;
                        if read(&s.cache, pool, &items, 1).await? == v {
                            break;
                        }
                    }
                    let one = t0.elapsed();
                    for (i, s) in subs.iter_mut().enumerate() {
                        if i != measured {
                            event_after(&mut s.sub, before)
                                .await
                                .with_context(|| format!("subscriber {i}"))?;
                        }
                    }
                    let all = t0.elapsed();
                    if round >= warmup {
                        t_one.push(one);
                        t_all.push(all);
                    }
                }
                1 => {
                    loop {
                        event_after(&mut sub_direct, before)
                            .await
                            .context("direct replication source")?;
                        if read(&direct_cache, pool, &items, 1).await? == v {
                            break;
                        }
                    }
                    if round >= warmup {
                        t_direct.push(t0.elapsed());
                    }
                }
                _ => {
                    tokio::time::timeout(Duration::from_secs(10), raw.recv())
                        .await
                        .context("no notification within 10 s")??;
                    let seen: i64 = sqlx::query_scalar(&raw_sql).fetch_one(pool).await?;
                    anyhow::ensure!(seen == v, "the floor read an old value");
                    if round >= warmup {
                        t_raw.push(t0.elapsed());
                    }
                }
            }
        }
    }
    let floor = summary(&mut t_raw);
    let direct_s = summary(&mut t_direct);
    let one = summary(&mut t_one);
    let all = summary(&mut t_all);
    let nsubs = subs.len();
    println!(
        "## 1. Write → fresh read through the cache ({rounds} rounds per side after {warmup} warm-up, sides interleaved; µs)\n"
    );
    println!("| path | p50 µs | p99 µs | p50 / floor | p99 / floor |");
    println!("|---|---:|---:|---:|---:|");
    let row = |name: &str, s: (f64, f64)| {
        println!(
            "| {name} | {:.0} | {:.0} | {:.2} x | {:.2} x |",
            s.0,
            s.1,
            s.0 / floor.0,
            s.1 / floor.1
        );
    };
    row(
        &format!("relay → NatsSource, 1 of {nsubs} subscribing caches (fresh read)"),
        one,
    );
    row(
        &format!("relay → all {nsubs} caches invalidated (last one)"),
        all,
    );
    row("direct PgReplicationSource + cache (fresh read)", direct_s);
    row(
        "floor: raw sqlx LISTEN recv + SELECT (pg_notify trigger)",
        floor,
    );
    println!(
        "\nrelay vs direct replication source: p50 {:+.0} µs ({:.2} x), p99 {:+.0} µs ({:.2} x)\n",
        one.0 - direct_s.0,
        one.0 / direct_s.0,
        one.1 - direct_s.1,
        one.1 / direct_s.1
    );

    // 2. PostgreSQL connections.
    let max_slots = setting(pool, "max_replication_slots").await?;
    let max_senders = setting(pool, "max_wal_senders").await?;
    let max_conn = setting(pool, "max_connections").await?;
    let relay_conns = connections(pool, &n.app_relay).await?;
    let slots_used: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots")
        .fetch_one(pool)
        .await?;
    let senders_used: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_replication")
        .fetch_one(pool)
        .await?;
    let ours: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name IN ($1, $2)")
            .bind(&n.relay_slot)
            .bind(format!("{}_0", n.direct_slot_prefix))
            .fetch_one(pool)
            .await?;
    let free = (max_slots - slots_used).min(max_senders - senders_used);
    let reserve = i64::try_from(args.reserve_slots).unwrap_or(i64::MAX);
    // The direct source of part 1 already holds one.
    let extra_allowed = usize::try_from((free - reserve).max(0)).unwrap_or(0);
    let want_direct = args.direct_sources.max(1);
    let extra = (want_direct - 1).min(extra_allowed);
    let mut more = Vec::new();
    for i in 1..=extra {
        match direct_source(args, n, i).await {
            Ok(s) => more.push(s),
            Err(e) => {
                eprintln!("direct replication source {i} did not start: {e:#}");
                break;
            }
        }
    }
    for s in &more {
        let mut sub = s.subscribe();
        healthy(&mut sub, "a direct replication source").await?;
    }
    let direct_n = 1 + more.len();
    let direct_conns = connections(pool, &n.app_direct).await?;
    for s in &more {
        s.shutdown().await;
    }
    drop(more);

    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity")
        .fetch_one(pool)
        .await?;
    let listen_allowed = usize::try_from((max_conn - active - 20).max(0)).unwrap_or(0);
    let listen_n = args.listen_sources.min(listen_allowed);
    let mut listeners = Vec::new();
    for i in 0..listen_n {
        match PgListenerSource::builder_with_options(options(&args.database_url, &n.app_listen)?)
            .channel(&n.channel)
            .connect()
            .await
        {
            Ok(s) => listeners.push(s),
            Err(e) => {
                eprintln!("LISTEN source {i} did not start: {e}");
                break;
            }
        }
    }
    let listen_conns = connections(pool, &n.app_listen).await?;
    let listen_n = listeners.len();
    for s in &listeners {
        s.shutdown().await;
    }
    drop(listeners);

    println!("## 2. PostgreSQL connections used for watching (counted in pg_stat_activity / pg_stat_replication by application_name)\n");
    println!(
        "Server: max_replication_slots = {max_slots}, max_wal_senders = {max_senders}, max_connections = {max_conn}; \
         in use when counted: {slots_used} slots ({ours} of them this run's relay and direct source), {senders_used} walsenders.\n"
    );
    println!("| setup | caches served | connections | of them walsenders | pg_stat_replication | slots | measured? |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    println!(
        "| 1 relay (replication slot) + {nsubs} NatsSources | {nsubs} | {} | {} | {} | 1 | measured |",
        relay_conns.0, relay_conns.1, relay_conns.2
    );
    println!(
        "| direct PgReplicationSource each | {direct_n} | {} | {} | {} | {direct_n} | measured |",
        direct_conns.0, direct_conns.1, direct_conns.2
    );
    if direct_n < want_direct {
        let per = direct_conns.0 as f64 / direct_n as f64;
        let per_ws = direct_conns.1 as f64 / direct_n as f64;
        println!(
            "| direct PgReplicationSource each | {want_direct} | {:.0} | {:.0} | {:.0} | {want_direct} | **not measured**: {want_direct} × the per-source count above; needs {want_direct} slots and walsenders, the server allows {max_slots} / {max_senders} |",
            per * want_direct as f64,
            per_ws * want_direct as f64,
            per_ws * want_direct as f64,
        );
    }
    println!(
        "| PgListenerSource (LISTEN) each | {listen_n} | {} | {} | {} | 0 | measured |",
        listen_conns.0, listen_conns.1, listen_conns.2
    );
    if direct_n < want_direct {
        println!(
            "\nOnly {direct_n} direct replication sources were started: {free} slots/walsenders were free and {reserve} were left for other clients (--reserve-slots)."
        );
    }
    if listen_n < args.listen_sources {
        println!(
            "Only {listen_n} of {} LISTEN sources were started: max_connections = {max_conn}, {active} connections open, 20 left for other clients.",
            args.listen_sources
        );
    }
    println!(
        "The subscribers' cache loads go through the application's own pool (not counted: a service has it anyway); NatsSources hold no PostgreSQL connection.\n"
    );

    // 3. Relay throughput. Only the relay reads now: no subscribers, no direct
    // source, no trigger.
    for s in &subs {
        s.source.shutdown().await;
    }
    drop(subs);
    direct.shutdown().await;
    drop((sub_direct, raw));
    exec(pool, &format!("DROP TRIGGER notify_items ON {items}")).await?;

    let writers = args.writers.max(1);
    let window = args.max_in_flight.max(1);

    // a. Live: the relay runs while the writers commit.
    let base = relay.status().events;
    let t0 = Instant::now();
    let t_live_written = burst(&args.database_url, &items, writes, writers).await?;
    wait_events(&relay, base + writes as u64, t0).await?;
    let t_live = t0.elapsed();
    let live_status = relay.status();

    // b. Backlog: the relay is stopped while the writers commit, then started
    // again; it resumes its slot and drains the backlog into JetStream. First
    // let everything so far be confirmed to the slot, so that the restarted
    // relay republishes nothing.
    let wal_now: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await?;
    let wal_now = Lsn::from_str(&wal_now).map_err(|e| anyhow::anyhow!("{wal_now:?}: {e}"))?;
    // The last commit is confirmed once a later position reaches the relay (a
    // commit to an unpublished table makes the server send one), and the slot
    // records it at the source's next status update.
    let confirm_wait = Instant::now();
    let mut all_confirmed = false;
    while confirm_wait.elapsed() < Duration::from_secs(15) {
        let flushed: Option<String> = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&n.relay_slot)
        .fetch_optional(pool)
        .await?
        .flatten();
        if flushed
            .and_then(|f| Lsn::from_str(&f).ok())
            .is_some_and(|f| f >= wal_now)
        {
            all_confirmed = true;
            break;
        }
        exec(
            pool,
            &format!("INSERT INTO \"{}\".nudge DEFAULT VALUES", n.schema),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.shutdown().await;
    relay_source.shutdown().await;
    wait_slot_inactive(pool, &n.relay_slot).await?;
    // A second slot at the same place: the replication source alone drains the
    // same backlog afterwards (no NATS), the relay's upstream share.
    let solo_slot = format!("{}_solo", n.direct_slot_prefix);
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&solo_slot)
        .execute(pool)
        .await
        .context("creating the solo drain slot")?;
    let t_backlog_written = burst(&args.database_url, &items, writes, writers).await?;
    // The writers commit without waiting for the WAL flush, and a walsender
    // sends only flushed WAL: one synchronous commit flushes everything before
    // it, so that the backlog is there to drain (not still being flushed by
    // the WAL writer while the relay waits) for the relay and the solo source
    // alike.
    exec(
        pool,
        &format!("INSERT INTO \"{}\".nudge DEFAULT VALUES", n.schema),
    )
    .await?;
    let t0 = Instant::now();
    let (relay, relay_source) = start_relay(args, n).await?;
    let t_started = t0.elapsed();
    wait_events(&relay, writes as u64, t0).await?;
    let t_drain = t0.elapsed();
    let drain_status = relay.status();

    let t0 = Instant::now();
    let start =
        PgReplicationSource::builder_with_options(options(&args.database_url, &n.app_direct)?)
            .slot(&solo_slot)
            .publication(&n.publication)
            .connect_durable()
            .await
            .context("the solo replication source")?;
    let (solo, mut solo_sub, _gate) = start.into_parts();
    let mut seen = 0usize;
    while seen < writes {
        match tokio::time::timeout(Duration::from_secs(60), solo_sub.recv()).await {
            Ok(Some(Signal::Event(_))) => seen += 1,
            Ok(Some(Signal::Gap(g))) => anyhow::bail!("the solo replication source: a gap: {g}"),
            Ok(Some(_)) => {}
            Ok(None) => anyhow::bail!("the solo replication source ended"),
            Err(_) => {
                anyhow::bail!("the solo replication source: {seen} of {writes} events in 60 s")
            }
        }
    }
    let t_solo = t0.elapsed();
    drop(solo_sub);
    solo.shutdown().await;

    // c. Raw async-nats publishes of the relay's payload size (median of 3).
    let client = NatsConnect::new(&args.nats_url)
        .name("pgcw-bench-raw")
        .connect()
        .await
        .context("connecting to NATS")?;
    let js = async_nats::jetstream::new(client);
    let subject =
        pgcachewatch::nats::subject::table_subject(n.stream.prefix(), Some(&n.schema), "items");
    let stream = js
        .get_stream(n.stream.name())
        .await
        .context("the relay's stream")?;
    let last = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .context("the relay's last event message")?;
    let payload = bytes::Bytes::from(last.payload.to_vec());
    n.raw_stream
        .ensure(&js)
        .await
        .context("creating the raw publish stream")?;
    let raw_subject = format!("{}.raw", n.raw_stream.prefix());
    let mut raw_times = Vec::new();
    for rep in 0..3 {
        let t0 = Instant::now();
        let mut inflight: VecDeque<async_nats::jetstream::context::PublishAckFuture> =
            VecDeque::with_capacity(window);
        for i in 0..writes {
            if inflight.len() >= window {
                if let Some(ack) = inflight.pop_front() {
                    ack.await.context("raw publish not acknowledged")?;
                }
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                format!("raw:{rep}:{i}").as_str(),
            );
            let ack = js
                .publish_with_headers(raw_subject.clone(), headers, payload.clone())
                .await
                .context("raw publish")?;
            inflight.push_back(ack);
        }
        while let Some(ack) = inflight.pop_front() {
            ack.await.context("raw publish not acknowledged")?;
        }
        raw_times.push(t0.elapsed());
    }
    raw_times.sort();
    let t_raw_pub = raw_times[raw_times.len() / 2];

    let rate = |d: Duration| writes as f64 / d.as_secs_f64();
    let raw_rate = rate(t_raw_pub);
    println!(
        "## 3. Relay throughput: {writes} committed single-row transactions (one event each), {} B payload, in-flight window {window}\n",
        payload.len()
    );
    println!("| path | time s | events/s | vs raw publish |");
    println!("|---|---:|---:|---:|");
    println!(
        "| relay draining a backlog: {writes} commits made while it was stopped; restart (connect, resume slot: {:.3} s of it) → all acked by JetStream | {:.3} | {:.0} | {:.3} x |",
        t_started.as_secs_f64(),
        t_drain.as_secs_f64(),
        rate(t_drain),
        rate(t_drain) / raw_rate
    );
    println!(
        "| baseline upstream: PgReplicationSource alone (no NATS) draining the same backlog from a second slot: connect → {writes} events received | {:.3} | {:.0} | {:.3} x |",
        t_solo.as_secs_f64(),
        rate(t_solo),
        rate(t_solo) / raw_rate
    );
    println!(
        "| relay live: first of {writes} commits → all acked by JetStream (writers took {:.3} s = {:.0} tx/s) | {:.3} | {:.0} | {:.3} x |",
        t_live_written.as_secs_f64(),
        rate(t_live_written),
        t_live.as_secs_f64(),
        rate(t_live),
        rate(t_live) / raw_rate
    );
    println!(
        "| raw async-nats JetStream publish + ack: same size, a Nats-Msg-Id each, same in-flight window (median of 3: {}) | {:.3} | {:.0} | 1.000 x |",
        raw_times
            .iter()
            .map(|d| format!("{:.3} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        t_raw_pub.as_secs_f64(),
        raw_rate
    );
    println!(
        "\nWriters: {writers} connections, `synchronous_commit = off`, autocommit UPDATEs of distinct rows (backlog written in {:.3} s). \
         Subscribers, direct source and trigger were gone during this part; the solo source read its slot after the relay's drain.",
        t_backlog_written.as_secs_f64()
    );
    println!(
        "Relay status after the live burst: {} events acked in all, {} retries, last event lag {:?}; after the drain: {} events acked, {} retries, epochs {}{}.",
        live_status.events,
        live_status.retries,
        live_status.last_event_lag,
        drain_status.events,
        drain_status.retries,
        drain_status.epochs,
        if all_confirmed {
            " (everything before the stop was confirmed to the slot: no republished copies counted)"
        } else {
            " (NOT everything before the stop was confirmed within 15 s: the drain may count a few republished copies)"
        }
    );

    relay.shutdown().await;
    relay_source.shutdown().await;
    Ok(())
}

/// Commits `writes` single-row transactions from `writers` connections; how long it took.
async fn burst(url: &str, items: &str, writes: usize, writers: usize) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = url.to_owned();
        let sql = format!("UPDATE {items} SET v = v + 1 WHERE id = $1");
        let count = writes / writers + usize::from(w < writes % writers);
        tasks.push(tokio::spawn(async move {
            let mut conn = sqlx::PgConnection::connect(&url)
                .await
                .context("a writer's connection")?;
            sqlx::query("SET synchronous_commit = off")
                .execute(&mut conn)
                .await?;
            for k in 0..count {
                // Each writer its own rows: no lock waits.
                let id = 1 + ((k * writers + w) as i64 % ROWS);
                sqlx::query(&sql).bind(id).execute(&mut conn).await?;
            }
            conn.close().await?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("a writer panicked")??;
    }
    Ok(t0.elapsed())
}

/// Waits until the relay's status shows `target` events acknowledged.
async fn wait_events(relay: &RelayHandle, target: u64, t0: Instant) -> anyhow::Result<()> {
    loop {
        let s = relay.status();
        if s.events >= target {
            return Ok(());
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "the relay acknowledged {} of {target} events within 300 s: {s:?}",
            s.events
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until no walsender holds `slot` (a stopped relay's connection is gone).
async fn wait_slot_inactive(pool: &PgPool, slot: &str) -> anyhow::Result<()> {
    for _ in 0..300 {
        let active: Option<bool> =
            sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot)
                .fetch_optional(pool)
                .await?;
        if active != Some(true) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("slot {slot} still active 6 s after the relay stopped")
}
