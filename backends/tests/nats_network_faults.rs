//! The relay and `NatsSource` across a real network (issue 18, "Faults across
//! a real network"): PostgreSQL, NATS, the relay and a subscribing service on
//! separate hosts of one machine (network namespaces joined by a wire this test
//! controls: see `netns/mod.rs`), under writes, through partitions, delay,
//! loss and a NATS restart during a partition; and a three-node NATS cluster
//! (routes between three `nats-server`s, the stream replicated three times)
//! with its stream leader killed and restarted and the leader moved.
//!
//! ```text
//!   svc 10.213.77.1 (this process)         relay 10.213.77.20 (pgcw_relay)
//!   PostgreSQL, writers, the service:      `pgcachewatch relay` (the CLI binary)
//!   NatsSource + Cache + readers                    │
//!            │          ╲                           │
//!            └──────── the wire ────────────────────┘
//!                          │
//!   nats 10.213.77.10 (pgcw_nats)  or  n1/n2/n3 10.213.77.11-13 (pgcw_n1..3)
//! ```
//!
//! The promises are asserted: no stale read (a read that starts after the
//! event of version v was applied never returns an older version), no lost
//! event (every committed write reaches the service), and a `Gap` only where
//! the stream's limits really discarded something (one phase makes them: a
//! subscriber cut off while the stream keeps 100 messages must get one). The
//! figures — when the service noticed, when it was healthy and caching again
//! after healing, how long the backlog took, write → applied latency, events/s
//! — are printed, never asserted.
//!
//! Needs root (network namespaces, TUN devices), `nats-server`, PostgreSQL's
//! server binaries, and the CLI binary next to this test's (`cargo test
//! --workspace` builds it; `bash backends/tests/netns/run.sh` does everything,
//! `--long` for 30 s partitions). Without root or the binary it says why and
//! passes without running.
#![cfg(all(feature = "nats", feature = "replication"))]

mod netns;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netns::{ip, HostSpec, Lab, Link, Proc, WireStats};
use parking_lot::Mutex;
use pgcachewatch_backends::nats::{NatsConnect, NatsSource, StreamSettings};
use pgcachewatch_core::{
    Cache, Dispatcher, DispatcherHandle, Event, EventSource, Health, InlineAttachment, Lsn, RowKey,
    Signal,
};
use pgcachewatch_strategies::Keyed;
use pgcachewatch_testkit::cluster::OwnPostgres;
use sqlx::postgres::{PgPool, PgPoolOptions};

/// Rows the writers update.
const KEYS: i64 = 1_000;
/// A row nobody writes: the probe reads it to see whether the cache caches.
const PROBE: i64 = KEYS;
const PHASES: usize = 16;
const STREAM: &str = "PGCW_NETFAULTS";
const PREFIX: &str = "pgcwnet";
const SLOT: &str = "pgcw_netfaults";
const PUBLICATION: &str = "pgcw_netfaults";

/// How long faults last: short by default (CI), 30 s with `PGCW_NETFAULTS_LONG=1`.
#[derive(Debug, Clone, Copy)]
struct Options {
    partition: Duration,
    window: Duration,
    /// The longest the service may take to receive what was written before a
    /// fault healed (a bound for "lost", not a figure).
    settle: Duration,
    writes_per_second: u64,
}

fn options() -> Options {
    let settle = std::env::var("PGCW_NETFAULTS_SETTLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs);
    let mut o = options_for_length();
    o.settle = settle.unwrap_or(o.settle);
    o
}

fn options_for_length() -> Options {
    if std::env::var("PGCW_NETFAULTS_LONG").is_ok_and(|v| v == "1") {
        Options {
            partition: Duration::from_secs(30),
            window: Duration::from_secs(30),
            settle: Duration::from_secs(180),
            writes_per_second: 200,
        }
    } else {
        Options {
            partition: Duration::from_secs(5),
            window: Duration::from_secs(8),
            settle: Duration::from_secs(90),
            writes_per_second: 200,
        }
    }
}

/// What is needed besides root: the CLI binary (the relay) and nats-server.
fn prerequisites() -> Option<(PathBuf, String)> {
    if let Some(why) = netns::unavailable() {
        eprintln!("SKIPPED: the network-fault suite needs root: {why}");
        return None;
    }
    let relay = std::env::var_os("PGCW_RELAY_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.join("pgcachewatch"))
        })
        .filter(|p| p.exists());
    let Some(relay) = relay else {
        eprintln!(
            "SKIPPED: the CLI binary (the relay) is not built next to this test: \
             `cargo build -p pgcachewatch-cli` (or run bash backends/tests/netns/run.sh)"
        );
        assert!(
            std::env::var("PGCW_NETFAULTS_REQUIRE").is_err(),
            "PGCW_NETFAULTS_REQUIRE is set and the relay binary is missing"
        );
        return None;
    };
    let nats = [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .iter()
    .find(|p| std::path::Path::new(p).exists())
    .map(|p| (*p).to_owned())
    .or_else(|| std::env::var("NATS_SERVER_BIN").ok())
    .expect("nats-server must be installed (apt-get install nats-server)");
    Some((relay, nats))
}

fn host(name: &'static str, netns: Option<&'static str>, last: u8) -> HostSpec {
    HostSpec {
        name,
        netns,
        ip: ip(last),
    }
}

// ---------------------------------------------------------------------------
// What happened, with times: writes, deliveries, reads, the service's signals.
// ---------------------------------------------------------------------------

struct Write {
    txid: i64,
    at: Instant,
}

/// A signal the service's subscription saw.
#[derive(Debug, Clone)]
enum Seen {
    Healthy,
    Unhealthy,
    Gap(String),
}

/// A committed version of a row: its value, its transaction id (low 32
/// bits), when its commit returned.
type Version = (i64, i64, Instant);

struct Record {
    phase: AtomicUsize,
    writes: Mutex<Vec<Write>>,
    /// Committed versions per key, with their transaction ids (low 32 bits)
    /// and when their commit returned.
    versions: Mutex<HashMap<i64, Vec<Version>>>,
    /// Transactions the service applied (after its dispatcher), first time.
    applied: Mutex<HashMap<i64, Instant>>,
    /// Writes before this index are all applied.
    applied_upto: AtomicUsize,
    reads: Vec<AtomicU64>,
    stale: Vec<AtomicU64>,
    stale_examples: Mutex<Vec<String>>,
    /// Per phase: the oldest a read's value was (how long before the read
    /// began a newer version had committed), in µs, and reads over a second.
    behind_max_us: Vec<AtomicU64>,
    behind_1s: Vec<AtomicU64>,
    seen: Mutex<Vec<(Instant, Seen)>>,
    /// The probe's reads: whether each was served from the cache.
    probes: Mutex<Vec<(Instant, bool)>>,
    read_errors: AtomicU64,
}

impl Record {
    fn new() -> Arc<Record> {
        Arc::new(Record {
            phase: AtomicUsize::new(0),
            writes: Mutex::default(),
            versions: Mutex::default(),
            applied: Mutex::default(),
            applied_upto: AtomicUsize::new(0),
            reads: (0..PHASES).map(|_| AtomicU64::new(0)).collect(),
            stale: (0..PHASES).map(|_| AtomicU64::new(0)).collect(),
            stale_examples: Mutex::default(),
            behind_max_us: (0..PHASES).map(|_| AtomicU64::new(0)).collect(),
            behind_1s: (0..PHASES).map(|_| AtomicU64::new(0)).collect(),
            seen: Mutex::default(),
            probes: Mutex::default(),
            read_errors: AtomicU64::new(0),
        })
    }

    /// The newest version of `key` whose event the service applied.
    fn floor(&self, key: i64) -> i64 {
        let applied = self.applied.lock();
        self.versions.lock().get(&key).map_or(0, |versions| {
            versions
                .iter()
                .filter(|(_, txid, _)| applied.contains_key(txid))
                .map(|(v, _, _)| *v)
                .max()
                .unwrap_or(0)
        })
    }

    /// How long before `began` a version newer than `v` of `key` committed
    /// (zero if none did: the value was the newest).
    fn behind(&self, key: i64, v: i64, began: Instant) -> Duration {
        self.versions
            .lock()
            .get(&key)
            .map_or(Duration::ZERO, |versions| {
                versions
                    .iter()
                    .filter(|(newer, _, at)| *newer > v && *at < began)
                    .map(|(_, _, at)| began - *at)
                    .max()
                    .unwrap_or_default()
            })
    }

    /// When the oldest write the service has not applied committed.
    fn first_undelivered(&self) -> Option<Instant> {
        self.undelivered(Instant::now());
        let writes = self.writes.lock();
        let applied = self.applied.lock();
        let from = self.applied_upto.load(Ordering::Relaxed);
        writes[from..]
            .iter()
            .find(|w| !applied.contains_key(&w.txid))
            .map(|w| w.at)
    }

    /// Writes committed before `before` that the service has not applied.
    fn undelivered(&self, before: Instant) -> usize {
        let writes = self.writes.lock();
        let applied = self.applied.lock();
        let mut from = self.applied_upto.load(Ordering::Relaxed);
        while from < writes.len() && applied.contains_key(&writes[from].txid) {
            from += 1;
        }
        self.applied_upto.store(from, Ordering::Relaxed);
        writes[from..]
            .iter()
            .filter(|w| w.at < before && !applied.contains_key(&w.txid))
            .count()
    }
}

fn low32(txid: i64) -> i64 {
    txid & 0xffff_ffff
}

// ---------------------------------------------------------------------------
// The service: a NatsSource, a cache kept by a dispatcher, readers, writers.
// ---------------------------------------------------------------------------

struct Service {
    /// Gaps before the service was healthy (the relay's start marker).
    gaps_at_start: u64,
    source: NatsSource,
    cache: Cache<i64, i64>,
    dispatcher: DispatcherHandle,
    _collector: InlineAttachment,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    writers: Vec<tokio::task::JoinHandle<()>>,
    stop_writers: Arc<AtomicBool>,
}

impl Service {
    /// Connects (once the relay made the stream), waits until healthy, and
    /// starts the writers, the readers and the probe.
    async fn start(urls: &str, rec: &Arc<Record>, db: &PgPool, opts: Options) -> Service {
        let stream = StreamSettings::new().stream(STREAM).subject_prefix(PREFIX);
        let started = Instant::now();
        let source = loop {
            match NatsSource::builder(NatsConnect::new(urls).name("pgcw netfaults service"))
                .stream(stream.clone())
                .table("public.items")
                .expect("table")
                .buffer(1 << 16)
                .connect()
                .await
            {
                Ok(s) => break s,
                Err(e) if started.elapsed() < Duration::from_secs(60) => {
                    tracing_free_log(&format!("service: waiting for the stream: {e}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("the service never found the relay's stream: {e}"),
            }
        };
        let cache: Cache<i64, i64> = Cache::new(4 * KEYS as usize);
        let dispatcher = Dispatcher::new()
            .attach(
                Keyed::per_table().table("public.items", |_: &Event, row: &RowKey| {
                    row.get("id").and_then(|v| v.as_i64())
                }),
                cache.clone(),
            )
            .spawn(&source);
        // After the dispatcher's: a transaction is recorded once applied.
        let applied = rec.clone();
        let collector = source
            .attach_inline(Box::new(move |signal: &Signal| {
                if let Signal::Event(e) = signal {
                    if let Some(t) = e.txid {
                        applied
                            .applied
                            .lock()
                            .entry(low32(t))
                            .or_insert_with(Instant::now);
                    }
                }
            }))
            .expect("inline");
        let mut sub = source.subscribe();
        let (healthy_tx, healthy_rx) = tokio::sync::oneshot::channel();
        let mut healthy_tx = Some(healthy_tx);
        let seen = rec.clone();
        let mut tasks = vec![tokio::spawn(async move {
            while let Some(signal) = sub.recv().await {
                // From the first Healthy on: before it, the relay's start
                // (a new epoch, its marker a gap) may be read.
                let s = match signal {
                    Signal::Health(Health::Healthy) => {
                        if let Some(tx) = healthy_tx.take() {
                            let _ = tx.send(());
                        }
                        Seen::Healthy
                    }
                    _ if healthy_tx.is_some() => continue,
                    Signal::Health(_) => Seen::Unhealthy,
                    Signal::Gap(g) => Seen::Gap(g.to_string()),
                    _ => continue,
                };
                seen.seen.lock().push((Instant::now(), s));
            }
        })];
        tokio::time::timeout(Duration::from_secs(60), healthy_rx)
            .await
            .expect("the service turns healthy")
            .expect("healthy");

        let stop = Arc::new(AtomicBool::new(false));
        let stop_writers = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        let every = Duration::from_micros(2_000_000 / opts.writes_per_second);
        for w in 0..2i64 {
            let (db, rec, stop) = (db.clone(), rec.clone(), stop_writers.clone());
            writers.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = w;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    n = (n * 7919 + 17) % KEYS;
                    let (v, txid): (i64, i64) = sqlx::query_as(
                        "UPDATE items SET v = v + 1 WHERE id = $1 RETURNING v, txid_current()",
                    )
                    .bind(n)
                    .fetch_one(&db)
                    .await
                    .expect("write");
                    let at = Instant::now();
                    let txid = low32(txid);
                    rec.versions
                        .lock()
                        .entry(n)
                        .or_default()
                        .push((v, txid, at));
                    rec.writes.lock().push(Write { txid, at });
                }
            }));
        }
        for r in 0..4i64 {
            let (db, rec, stop, cache) = (db.clone(), rec.clone(), stop.clone(), cache.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = r;
                while !stop.load(Ordering::Relaxed) {
                    n = (n * 31 + 7) % KEYS;
                    let phase = rec.phase.load(Ordering::Relaxed);
                    let floor = rec.floor(n);
                    let began = Instant::now();
                    let read = cache
                        .get_or_load(n, || async {
                            sqlx::query_scalar::<_, i64>("SELECT v FROM items WHERE id = $1")
                                .bind(n)
                                .fetch_one(&db)
                                .await
                        })
                        .await;
                    match read {
                        Ok(v) => {
                            rec.reads[phase].fetch_add(1, Ordering::Relaxed);
                            let behind = rec.behind(n, v, began);
                            let us = behind.as_micros() as u64;
                            rec.behind_max_us[phase].fetch_max(us, Ordering::Relaxed);
                            if behind > Duration::from_secs(1) {
                                rec.behind_1s[phase].fetch_add(1, Ordering::Relaxed);
                            }
                            if v < floor {
                                rec.stale[phase].fetch_add(1, Ordering::Relaxed);
                                let mut ex = rec.stale_examples.lock();
                                if ex.len() < 10 {
                                    ex.push(format!(
                                        "phase {phase}: key {n} read {v} after {floor} was applied"
                                    ));
                                }
                            }
                        }
                        Err(_) => {
                            rec.read_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        {
            let (db, rec, stop, cache) = (db.clone(), rec.clone(), stop.clone(), cache.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let hit = cache.get(&PROBE).is_some();
                    if !hit {
                        let _ = cache
                            .get_or_load(PROBE, || async {
                                sqlx::query_scalar::<_, i64>("SELECT v FROM items WHERE id = $1")
                                    .bind(PROBE)
                                    .fetch_one(&db)
                                    .await
                            })
                            .await;
                    }
                    rec.probes.lock().push((Instant::now(), hit));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        while rec.probes.lock().last().is_none_or(|(_, hit)| !hit) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let gaps_at_start = source.stats().gaps;
        Service {
            gaps_at_start,
            source,
            cache,
            dispatcher,
            _collector: collector,
            stop,
            tasks,
            writers,
            stop_writers,
        }
    }

    async fn stop_writers(&mut self) {
        self.stop_writers.store(true, Ordering::Relaxed);
        for w in self.writers.drain(..) {
            w.await.expect("writer");
        }
    }

    async fn shutdown(mut self) {
        self.stop_writers().await;
        self.stop.store(true, Ordering::Relaxed);
        self.dispatcher.shutdown().await;
        self.source.shutdown().await;
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

/// With `PGCW_NETFAULTS_VERBOSE` set, the service's own logs (this
/// process: its `NatsSource`) go to stderr, at `RUST_LOG` or info.
fn verbose_service_logs() {
    if std::env::var("PGCW_NETFAULTS_VERBOSE").is_ok() {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("warn,pgcachewatch_backends=info")
        });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
}

fn tracing_free_log(line: &str) {
    if std::env::var("PGCW_NETFAULTS_VERBOSE").is_ok() {
        eprintln!("{line}");
    }
}

// ---------------------------------------------------------------------------
// Phases and their figures.
// ---------------------------------------------------------------------------

struct Phase {
    name: String,
    index: usize,
    start: Instant,
    /// Writes before this had all been read when the phase began (the
    /// earliest not yet delivered then, or the last phase's heal, whichever
    /// is later).
    exposed_from: Instant,
    fault: Instant,
    heal: Instant,
    settled: Instant,
    wire: WireStats,
    /// Whether the stream's limits discarded messages during the phase (its
    /// first sequence moved): only then is a `Gap` justified.
    discarded: bool,
    /// The phase ended without the service being healthy, caching and up to
    /// date within the bound.
    ///
    /// (`Figures::lost`, taken when the phase ended, counts the writes
    /// committed before the heal that had not arrived then; the closing table
    /// counts, per phase, the writes committed during it that never arrived.)
    unsettled: bool,
    source_late: u64,
    source_consumers: u64,
    figures: Option<Figures>,
}

struct Run<'a> {
    title: &'static str,
    rec: Arc<Record>,
    lab: &'a Lab,
    db: PgPool,
    opts: Options,
    urls: String,
    phases: Vec<Phase>,
    wire_at: WireStats,
    /// The stream's first sequence when the last phase ended.
    first_seq: Option<u64>,
}

/// A phase under way: its fault and heal times are set by the scenario.
struct Open {
    name: String,
    index: usize,
    start: Instant,
    exposed_from: Instant,
    fault: Option<Instant>,
    heal: Option<Instant>,
}

impl Open {
    fn fault(&mut self) {
        self.fault = Some(Instant::now());
        tracing_free_log(&format!("{} fault", chrono::Utc::now()));
    }
    fn heal(&mut self) {
        self.heal = Some(Instant::now());
        tracing_free_log(&format!("{} healed", chrono::Utc::now()));
    }
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn after(t: Option<Instant>, since: Instant) -> String {
    match t {
        Some(t) if t >= since => ms(t - since),
        Some(t) => format!("-{}", ms(since - t)),
        None => "-".to_owned(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

impl<'a> Run<'a> {
    fn begin(&mut self, name: impl Into<String>) -> Open {
        let index = self.phases.len() + 1;
        assert!(index < PHASES);
        self.rec.phase.store(index, Ordering::Relaxed);
        self.wire_at = self.lab.wire_stats();
        let name = name.into();
        eprintln!("-- {}: {name}", self.title);
        let start = Instant::now();
        Open {
            name,
            index,
            start,
            // Everything committed before the last heal was read when that
            // phase settled; what came since may still be on its way.
            exposed_from: self
                .rec
                .first_undelivered()
                .unwrap_or(start)
                .max(self.phases.last().map_or(start, |p| p.heal))
                .min(start),
            fault: None,
            heal: None,
        }
    }

    /// Waits until the service has read everything committed before the heal
    /// (its dispatcher applied that position: every such event arrived, or the
    /// stream discarded it and a gap said so), is healthy and its cache serves
    /// hits again (bounded), then closes the phase.
    async fn settle(&mut self, open: Open, service: &Service) {
        let heal = open.heal.unwrap_or_else(Instant::now);
        let position: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&self.db)
            .await
            .expect("WAL position");
        let position: Lsn = position.parse().expect("an LSN");
        let deadline = heal + self.opts.settle;
        let mut settled_in_time = true;
        loop {
            let read_up_to = service
                .dispatcher
                .applied_lsn()
                .is_some_and(|l| l >= position);
            let healthy = service.source.health().is_healthy();
            let caching = self
                .rec
                .probes
                .lock()
                .last()
                .is_some_and(|(at, hit)| *at >= heal && *hit);
            if read_up_to && healthy && caching {
                break;
            }
            if Instant::now() > deadline {
                settled_in_time = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let settled = Instant::now();
        let first_seq = stream_first_seq(&self.urls).await;
        let stats = service.source.stats();
        let mut phase = Phase {
            name: open.name,
            index: open.index,
            start: open.start,
            exposed_from: open.exposed_from,
            fault: open.fault.unwrap_or(open.start),
            heal,
            settled,
            wire: self.lab.wire_stats() - self.wire_at,
            discarded: false,
            unsettled: !settled_in_time,
            source_late: stats.late,
            source_consumers: stats.consumers,
            figures: None,
        };
        if let (Some(before), Some(now)) = (self.first_seq, first_seq) {
            phase.discarded = now > before;
        }
        self.first_seq = first_seq.or(self.first_seq);
        phase.figures = Some(self.figures(&phase));
        self.report(&phase);
        self.phases.push(phase);
    }

    fn figures(&self, p: &Phase) -> Figures {
        let rec = &self.rec;
        let writes = rec.writes.lock();
        let applied = rec.applied.lock();
        let mut latencies = Vec::new();
        let (mut written, mut lost) = (0, 0);
        for w in writes.iter().filter(|w| w.at < p.settled) {
            let applied_at = applied.get(&w.txid);
            if w.at >= p.start {
                written += 1;
                if let Some(at) = applied_at {
                    latencies.push(at.saturating_duration_since(w.at));
                }
            }
            // Lost: committed before the heal, from when everything before had
            // arrived, and never applied.
            if applied_at.is_none() && w.at >= p.exposed_from && w.at < p.heal {
                lost += 1;
            }
        }
        latencies.sort();
        let backlog = writes
            .iter()
            .filter(|w| w.at >= p.start && w.at < p.heal)
            .filter_map(|w| applied.get(&w.txid))
            .max()
            .copied();
        let delivered = applied
            .values()
            .filter(|at| **at >= p.start && **at < p.settled)
            .count();
        drop((writes, applied));
        let seen: Vec<(Instant, Seen)> = rec
            .seen
            .lock()
            .iter()
            .filter(|(at, _)| *at >= p.start && *at < p.settled)
            .cloned()
            .collect();
        let gaps: Vec<String> = seen
            .iter()
            .filter_map(|(_, s)| match s {
                Seen::Gap(g) => Some(g.clone()),
                _ => None,
            })
            .collect();
        let unhealthy = seen
            .iter()
            .find(|(at, s)| *at >= p.fault && matches!(s, Seen::Unhealthy))
            .map(|(at, _)| *at);
        let healthy = seen
            .iter()
            .rev()
            .find(|(_, s)| matches!(s, Seen::Healthy))
            .map(|(at, _)| *at)
            .filter(|at| unhealthy.is_some_and(|u| *at > u));
        // Caching stopped at the first probe served without the cache after
        // the fault, and is back at the first hit after the last such probe.
        let probes: Vec<(Instant, bool)> = rec
            .probes
            .lock()
            .iter()
            .filter(|(at, _)| *at >= p.fault && *at < p.settled)
            .copied()
            .collect();
        let caching_stopped = probes.iter().find(|(_, hit)| !hit).map(|(at, _)| *at);
        let caching_back = match probes.iter().rposition(|(_, hit)| !hit) {
            Some(last_miss) => probes[last_miss..]
                .iter()
                .find(|(_, hit)| *hit)
                .map(|(at, _)| *at),
            None => None,
        };
        let secs = (p.settled - p.start).as_secs_f64().max(1e-3);
        Figures {
            written,
            delivered,
            lost,
            gaps,
            reads: rec.reads[p.index].load(Ordering::Relaxed),
            stale: rec.stale[p.index].load(Ordering::Relaxed),
            unhealthy,
            healthy,
            caching_stopped,
            caching_back,
            behind_max: Duration::from_micros(rec.behind_max_us[p.index].load(Ordering::Relaxed)),
            behind_1s: rec.behind_1s[p.index].load(Ordering::Relaxed),
            backlog,
            p50: percentile(&latencies, 0.5),
            p99: percentile(&latencies, 0.99),
            max: latencies.last().copied().unwrap_or_default(),
            events_per_s: delivered as f64 / secs,
        }
    }

    fn report(&self, p: &Phase) {
        let f = p.figures.as_ref().expect("figures");
        let discarded = p.discarded;
        if p.unsettled {
            eprintln!(
                "   NOT SETTLED within {:?} of healing (service unhealthy, not caching, or events missing)",
                self.opts.settle
            );
        }
        eprintln!(
            "   writes {}, delivered {} ({:.0} events/s), missing {}, late copies {}; gaps {} ({}); \
             reads {}, stale {}; reads of a value over 1 s old {} (oldest {})",
            f.written,
            f.delivered,
            f.events_per_s,
            f.lost,
            p.source_late,
            f.gaps.len(),
            if discarded {
                "the stream discarded messages"
            } else {
                "the stream discarded nothing"
            },
            f.reads,
            f.stale,
            f.behind_1s,
            ms(f.behind_max),
        );
        eprintln!(
            "   service unhealthy {} after the fault, healthy {} after healing; caching stopped {} \
             after the fault, back {} after healing; backlog delivered {} after healing; \
             write → applied p50 {}, p99 {}, max {}; consumers created so far {}; \
             wire: {} packets cut, {} lost, {} delayed",
            after(f.unhealthy, p.fault),
            after(f.healthy, p.heal),
            after(f.caching_stopped, p.fault),
            after(f.caching_back, p.heal),
            after(f.backlog, p.heal),
            ms(f.p50),
            ms(f.p99),
            ms(f.max),
            p.source_consumers,
            p.wire.cut,
            p.wire.lost,
            p.wire.delayed
        );
    }

    /// Stops the writers, waits for everything written to arrive (bounded),
    /// prints the table and asserts the promises.
    async fn finish(mut self, mut service: Service, relay: &Proc) {
        let open = self.begin("drain (writers stopped)");
        service.stop_writers().await;
        let mut open = open;
        open.heal();
        self.settle(open, &service).await;
        let stats = service.source.stats();
        let gaps_at_start = service.gaps_at_start;
        let cache = service.cache.stats();
        let lost = self.rec.undelivered(Instant::now());
        let written = self.rec.writes.lock().len();
        let reads: u64 = self
            .rec
            .reads
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum();
        let stale: u64 = self
            .rec
            .stale
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum();

        println!();
        println!(
            "== {} (partitions {:?}, windows {:?}, {} writes/s)",
            self.title, self.opts.partition, self.opts.window, self.opts.writes_per_second
        );
        println!(
            "{:<50} {:>6} {:>4} {:>4} {:>11} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>5}",
            "phase",
            "writes",
            "lost",
            "gaps",
            "stale/reads",
            ">1s old",
            "unhealthy",
            "healthy",
            "no cache",
            "caching",
            "backlog",
            "p99",
            "ev/s"
        );
        println!(
            "{:<50} {:>6} {:>4} {:>4} {:>11} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>5}",
            "",
            "",
            "",
            "",
            "",
            "reads",
            "+fault",
            "+heal",
            "+fault",
            "+heal",
            "+heal",
            "w→apply",
            ""
        );
        // Lost: committed while the phase ran and never delivered, by the end.
        let lost_in = |p: &Phase| {
            let writes = self.rec.writes.lock();
            let applied = self.rec.applied.lock();
            writes
                .iter()
                .filter(|w| w.at >= p.start && w.at < p.settled && !applied.contains_key(&w.txid))
                .count()
        };
        for p in &self.phases {
            let f = p.figures.as_ref().expect("figures");
            println!(
                "{:<50} {:>6} {:>4} {:>4} {:>11} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>5.0}",
                p.name,
                f.written,
                format!(
                    "{}{}",
                    lost_in(p),
                    if p.discarded && !f.gaps.is_empty() && lost_in(p) > 0 {
                        "*"
                    } else {
                        ""
                    }
                ),
                f.gaps.len(),
                format!("{}/{}", f.stale, f.reads),
                f.behind_1s,
                after(f.unhealthy, p.fault),
                after(f.healthy, p.heal),
                after(f.caching_stopped, p.fault),
                after(f.caching_back, p.heal),
                after(f.backlog, p.heal),
                ms(f.p99),
                f.events_per_s
            );
        }

        let examples = self.rec.stale_examples.lock().clone();
        let gap_list: Vec<String> = self
            .rec
            .seen
            .lock()
            .iter()
            .filter_map(|(_, s)| match s {
                Seen::Gap(g) => Some(g.clone()),
                _ => None,
            })
            .collect();
        // Writes that never arrived, unless a phase whose stream discarded
        // messages covers them with a gap.
        let excused = |at: Instant| {
            self.phases.iter().any(|p| {
                p.discarded
                    && at >= p.exposed_from
                    && at < p.settled
                    && p.figures.as_ref().is_some_and(|f| !f.gaps.is_empty())
            })
        };
        let unexcused: Vec<i64> = {
            let writes = self.rec.writes.lock();
            let applied = self.rec.applied.lock();
            writes
                .iter()
                .filter(|w| !applied.contains_key(&w.txid) && !excused(w.at))
                .map(|w| w.txid)
                .collect()
        };
        println!(
            "total: {written} writes, {lost} not delivered ({} of them without a justified gap), \
             {} gaps, {stale} stale of {reads} reads, {} late copies delivered, {} consumers \
             created; cache: {} hits, {} misses, {} bypasses, {} flushes",
            unexcused.len(),
            stats.gaps - gaps_at_start,
            stats.late,
            stats.consumers,
            cache.hits,
            cache.misses,
            cache.bypasses,
            cache.flushes
        );
        println!(
            "(* covered by the phase's gap: the stream's limits discarded them unread; \
             times are from the fault's start (+fault) or from healing (+heal))"
        );
        println!("relay's last report: {}", last_report(relay));
        let phase_gaps: usize = self
            .phases
            .iter()
            .map(|p| p.figures.as_ref().map_or(0, |f| f.gaps.len()))
            .sum();
        let unjustified: Vec<(String, Vec<String>)> = self
            .phases
            .iter()
            .filter(|p| !p.discarded)
            .filter_map(|p| {
                let f = p.figures.as_ref()?;
                (!f.gaps.is_empty()).then(|| (p.name.clone(), f.gaps.clone()))
            })
            .collect();
        let silent: Vec<String> = self
            .phases
            .iter()
            .filter(|p| p.discarded)
            .filter_map(|p| {
                let f = p.figures.as_ref()?;
                (f.lost > 0 && f.gaps.is_empty()).then(|| p.name.clone())
            })
            .collect();
        let unsettled = self.phases.last().is_some_and(|p| p.unsettled);
        if !unexcused.is_empty() {
            where_are(&self.urls, &unexcused).await;
        }
        service.shutdown().await;
        assert_eq!(stale, 0, "stale reads: {examples:?}");
        assert!(
            unexcused.is_empty(),
            "{} committed writes never delivered and no justified gap covers them (txids {:?})",
            unexcused.len(),
            &unexcused[..unexcused.len().min(20)]
        );
        assert!(
            unjustified.is_empty(),
            "gaps where the stream discarded nothing: {unjustified:?}"
        );
        assert!(
            silent.is_empty(),
            "the stream discarded events that never arrived, without a gap: {silent:?}"
        );
        assert_eq!(
            stats.gaps,
            gaps_at_start + phase_gaps as u64,
            "every gap the source emitted fell in a phase: {gap_list:?}"
        );
        assert!(written > 100 && reads > 1000, "the load ran");
        assert!(
            !unsettled && cache.hits > 0,
            "at the end the service was healthy, caching and up to date"
        );
    }
}

struct Figures {
    written: usize,
    delivered: usize,
    lost: usize,
    gaps: Vec<String>,
    reads: u64,
    stale: u64,
    unhealthy: Option<Instant>,
    healthy: Option<Instant>,
    caching_stopped: Option<Instant>,
    caching_back: Option<Instant>,
    behind_max: Duration,
    behind_1s: u64,
    backlog: Option<Instant>,
    p50: Duration,
    p99: Duration,
    max: Duration,
    events_per_s: f64,
}

fn last_report(relay: &Proc) -> String {
    relay
        .log_text()
        .lines()
        .rev()
        .find(|l| l.starts_with("-- "))
        .unwrap_or("-")
        .to_owned()
}

/// A client of the test's own (not through `NatsConnect`: it takes the
/// comma-separated list as a list of servers).
async fn admin(urls: &str) -> Option<async_nats::Client> {
    let servers: Vec<&str> = urls.split(',').collect();
    tokio::time::timeout(
        Duration::from_secs(5),
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(servers.as_slice()),
    )
    .await
    .ok()?
    .ok()
}

/// The stream's first sequence (None if NATS cannot be asked now).
async fn stream_first_seq(urls: &str) -> Option<u64> {
    let ask = async {
        let js = async_nats::jetstream::new(admin(urls).await?);
        let mut stream = js.get_stream(STREAM).await.ok()?;
        let info = stream.info().await.ok()?;
        Some(info.state.first_sequence)
    };
    tokio::time::timeout(Duration::from_secs(5), ask)
        .await
        .ok()
        .flatten()
}

/// What the relay and the service are given to reach the cluster: every
/// node's URL, comma-separated (as `--nats-url` documents it), if
/// `NatsConnect` takes that; else the first node's only, the others learnt
/// from the cluster (what the client is told about its peers).
async fn service_urls(urls: &str) -> String {
    match NatsConnect::new(urls).connect().await {
        Ok(_) => urls.to_owned(),
        Err(e) => {
            let first = urls.split(',').next().unwrap_or(urls).to_owned();
            println!(
                "NOTE: NatsConnect refuses several comma-separated URLs ({e}); \
                 the relay and the service are given {first} and learn the other nodes from it"
            );
            first
        }
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL, NATS and the relay on their hosts.
// ---------------------------------------------------------------------------

/// A PostgreSQL of the test's own, on 127.0.0.1 and the svc host's address
/// (trust from the lab's network only), with the table, publication and slot.
async fn postgres(lab: &Lab) -> (OwnPostgres, PgPool) {
    let hba = lab.dir().join("pg_hba.conf");
    std::fs::write(
        &hba,
        "local all all trust\n\
         host all all 127.0.0.1/32 trust\n\
         host all all 10.213.77.0/24 trust\n\
         local replication all trust\n\
         host replication all 127.0.0.1/32 trust\n\
         host replication all 10.213.77.0/24 trust\n",
    )
    .expect("pg_hba.conf");
    let listen = format!("listen_addresses = '127.0.0.1,{}'", ip(1));
    let hba_line = format!("hba_file = '{}'", hba.display());
    let pg = OwnPostgres::start(&[&listen, &hba_line]).expect("a PostgreSQL of the test's own");
    let db = PgPoolOptions::new()
        .max_connections(12)
        .connect(&pg.url("postgres"))
        .await
        .expect("PostgreSQL");
    for sql in [
        "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL)".to_owned(),
        format!("INSERT INTO items SELECT g, 0 FROM generate_series(0, {KEYS}) g"),
        format!("CREATE PUBLICATION {PUBLICATION} FOR TABLE items"),
        format!("SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')"),
    ] {
        sqlx::query(&sql)
            .execute(&db)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    (pg, db)
}

fn nats_args(
    host: &HostSpec,
    store: &std::path::Path,
    cluster: Option<(&str, &[HostSpec])>,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-a".into(),
        host.ip.to_string(),
        "-p".into(),
        "4222".into(),
        "-js".into(),
        "-sd".into(),
        store.display().to_string(),
    ];
    if let Some((name, peers)) = cluster {
        let routes: Vec<String> = peers
            .iter()
            .map(|p| format!("nats://{}:6222", p.ip))
            .collect();
        args.extend([
            "--server_name".into(),
            name.into(),
            "--cluster_name".into(),
            "pgcw".into(),
            "--cluster".into(),
            format!("nats://{}:6222", host.ip),
            "--routes".into(),
            routes.join(","),
        ]);
    }
    args
}

/// Waits until `proc`'s log says "Server is ready" `times` times.
async fn ready(proc: &mut Proc, times: usize) {
    let started = Instant::now();
    loop {
        if proc.log_text().matches("Server is ready").count() >= times {
            return;
        }
        assert!(
            proc.running(),
            "{} exited:\n{}",
            proc.name,
            proc.log_tail(30)
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} never got ready:\n{}",
            proc.name,
            proc.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn relay_proc(lab: &Lab, bin: &std::path::Path, pg_port: u16, urls: &str) -> Proc {
    let database = format!("postgres://postgres@{}:{pg_port}/postgres", ip(1));
    let args: Vec<String> = [
        "relay",
        "--slot",
        SLOT,
        "--publication",
        PUBLICATION,
        "--nats-url",
        urls,
        "--stream",
        STREAM,
        "--prefix",
        PREFIX,
        "--heartbeat",
        "1s",
        "--report-every",
        "1s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    lab.proc(
        "relay",
        "relay",
        bin,
        &args,
        &[
            ("DATABASE_URL", database.as_str()),
            (
                "RUST_LOG",
                "warn,pgcachewatch_backends=debug,async_nats=debug",
            ),
        ],
    )
}

fn cut_both(lab: &Lab, nats: &str) {
    lab.cut("relay", nats);
    lab.cut("svc", nats);
}

fn impair(lab: &Lab, nats: &str, link: Link) {
    lab.link("relay", nats, link);
    lab.link("svc", nats, link);
}

// ---------------------------------------------------------------------------
// The scenarios.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nats_partitions_delay_loss_and_a_restart_during_a_partition() {
    let Some((relay_bin, nats_bin)) = prerequisites() else {
        return;
    };
    let opts = options();
    verbose_service_logs();
    let lab = Lab::start(vec![
        host("svc", None, 1),
        host("nats", Some("pgcw_nats"), 10),
        host("relay", Some("pgcw_relay"), 20),
    ]);
    let (pg, db) = postgres(&lab).await;
    let store = lab.dir().join("nats-store");
    let mut nats = lab.proc(
        "nats",
        "nats",
        &nats_bin,
        &nats_args(lab.host("nats"), &store, None),
        &[],
    );
    lab.start_proc(&mut nats);
    ready(&mut nats, 1).await;
    let urls = format!("nats://{}:4222", ip(10));
    let mut relay = relay_proc(&lab, &relay_bin, pg.port(), &urls);
    lab.start_proc(&mut relay);
    let rec = Record::new();
    let service = Service::start(&urls, &rec, &db, opts).await;
    let mut run = Run {
        title: "one NATS server",
        rec: rec.clone(),
        lab: &lab,
        db: db.clone(),
        opts,
        urls: urls.clone(),
        phases: Vec::new(),
        wire_at: WireStats::default(),
        first_seq: None,
    };
    run.first_seq = stream_first_seq(&urls).await;
    let p = opts.partition;

    let mut ph = run.begin("no fault");
    ph.fault();
    tokio::time::sleep(Duration::from_secs(3)).await;
    ph.heal();
    run.settle(ph, &service).await;

    let mut ph = run.begin(format!("partition relay↔NATS {}s", p.as_secs()));
    ph.fault();
    lab.cut("relay", "nats");
    tokio::time::sleep(p).await;
    lab.heal_all();
    ph.heal();
    run.settle(ph, &service).await;

    let mut ph = run.begin(format!("partition subscriber↔NATS {}s", p.as_secs()));
    ph.fault();
    lab.cut("svc", "nats");
    tokio::time::sleep(p).await;
    lab.heal_all();
    ph.heal();
    run.settle(ph, &service).await;

    let mut ph = run.begin(format!(
        "delay 200 ms each way, relay+subscriber↔NATS {}s",
        opts.window.as_secs()
    ));
    ph.fault();
    impair(
        &lab,
        "nats",
        Link {
            delay: Duration::from_millis(200),
            ..Link::default()
        },
    );
    tokio::time::sleep(opts.window).await;
    lab.heal_all();
    ph.heal();
    run.settle(ph, &service).await;

    let mut ph = run.begin(format!(
        "loss 5 %, relay+subscriber↔NATS {}s",
        opts.window.as_secs()
    ));
    ph.fault();
    impair(
        &lab,
        "nats",
        Link {
            loss: 0.05,
            ..Link::default()
        },
    );
    tokio::time::sleep(opts.window).await;
    lab.heal_all();
    ph.heal();
    run.settle(ph, &service).await;

    let mut ph = run.begin(format!(
        "NATS killed+restarted in a {}s partition (both cut)",
        p.as_secs()
    ));
    ph.fault();
    cut_both(&lab, "nats");
    let started = Instant::now();
    tokio::time::sleep(p / 2).await;
    nats.restart();
    ready(&mut nats, 2).await;
    tokio::time::sleep(p.saturating_sub(started.elapsed())).await;
    lab.heal_all();
    ph.heal();
    run.settle(ph, &service).await;

    // The other side of "a gap only where the stream's limits discarded
    // something": while the subscriber is cut off, the stream keeps only its
    // last 100 messages; what it discarded unread must come as a gap. (First
    // the relay's backlog from the restart drains, so that what the limit
    // discards was written in this phase.)
    let drained = Instant::now();
    while rec.undelivered(Instant::now()) > 0 && drained.elapsed() < opts.settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ph = run.begin(format!(
        "subscriber cut {}s while the stream keeps 100 messages",
        p.as_secs()
    ));
    set_max_messages(&urls, 100).await;
    ph.fault();
    lab.cut("svc", "nats");
    tokio::time::sleep(p).await;
    lab.heal_all();
    ph.heal();
    set_max_messages(&urls, -1).await;
    run.settle(ph, &service).await;

    assert!(relay.running(), "the relay exited:\n{}", relay.log_tail(40));
    run.finish(service, &relay).await;
    relay.stop(Duration::from_secs(5));
    nats.kill();
    drop(db);
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_leader_killed_and_moved() {
    let Some((relay_bin, nats_bin)) = prerequisites() else {
        return;
    };
    let opts = options();
    verbose_service_logs();
    let lab = Lab::start(vec![
        host("svc", None, 1),
        host("n1", Some("pgcw_n1"), 11),
        host("n2", Some("pgcw_n2"), 12),
        host("n3", Some("pgcw_n3"), 13),
        host("relay", Some("pgcw_relay"), 20),
    ]);
    let (pg, db) = postgres(&lab).await;
    let names = ["n1", "n2", "n3"];
    let peers: Vec<HostSpec> = names.iter().map(|n| lab.host(n).clone()).collect();
    let mut nodes: Vec<Proc> = names
        .iter()
        .map(|n| {
            let store = lab.dir().join(format!("store-{n}"));
            lab.proc(
                n,
                n,
                &nats_bin,
                &nats_args(lab.host(n), &store, Some((n, &peers))),
                &[],
            )
        })
        .collect();
    for node in &mut nodes {
        lab.start_proc(node);
    }
    for node in &mut nodes {
        ready(node, 1).await;
    }
    let urls = peers
        .iter()
        .map(|p| format!("nats://{}:4222", p.ip))
        .collect::<Vec<_>>()
        .join(",");
    create_replicated_stream(&urls).await;
    let given = service_urls(&urls).await;
    let mut relay = relay_proc(&lab, &relay_bin, pg.port(), &given);
    lab.start_proc(&mut relay);
    let rec = Record::new();
    let service = Service::start(&given, &rec, &db, opts).await;
    let mut run = Run {
        title: "three-node NATS cluster, stream R3",
        rec: rec.clone(),
        lab: &lab,
        db: db.clone(),
        opts,
        urls: urls.clone(),
        phases: Vec::new(),
        wire_at: WireStats::default(),
        first_seq: None,
    };
    run.first_seq = stream_first_seq(&urls).await;
    let p = opts.partition;

    let mut ph = run.begin("no fault");
    ph.fault();
    tokio::time::sleep(Duration::from_secs(3)).await;
    ph.heal();
    run.settle(ph, &service).await;

    for _ in 0..2 {
        let leader = stream_leader(&urls).await;
        let i = names
            .iter()
            .position(|n| *n == leader)
            .unwrap_or_else(|| panic!("leader {leader:?} is not a node"));
        let mut ph = run.begin(format!(
            "stream leader {leader} killed, restarted after {}s",
            p.as_secs()
        ));
        ph.fault();
        let starts = nodes[i].log_text().matches("Server is ready").count();
        nodes[i].kill();
        tokio::time::sleep(p).await;
        nodes[i].restart();
        ready(&mut nodes[i], starts + 1).await;
        ph.heal();
        run.settle(ph, &service).await;
        eprintln!(
            "   the stream's leader is now {}",
            stream_leader(&urls).await
        );

        let before = stream_leader(&urls).await;
        let mut ph = run.begin(format!("stream leader {before} moved (step-down)"));
        ph.fault();
        step_down(&urls).await;
        ph.heal();
        tokio::time::sleep(Duration::from_secs(3)).await;
        run.settle(ph, &service).await;
        eprintln!(
            "   the stream's leader is now {}",
            stream_leader(&urls).await
        );
    }

    assert!(relay.running(), "the relay exited:\n{}", relay.log_tail(40));
    run.finish(service, &relay).await;
    relay.stop(Duration::from_secs(5));
    for node in &mut nodes {
        node.kill();
    }
    drop(db);
    drop(pg);
}

/// The relay's stream, created ahead of it with three replicas (the relay
/// keeps an existing stream's replicas; its own settings have none).
async fn create_replicated_stream(urls: &str) {
    use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
    let started = Instant::now();
    let client = loop {
        if let Some(c) = admin(urls).await {
            break c;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the cluster never answered"
        );
    };
    let js = async_nats::jetstream::new(client);
    let config = Config {
        name: STREAM.into(),
        subjects: vec![format!("{PREFIX}.>")],
        max_age: pgcachewatch_backends::nats::DEFAULT_MAX_AGE,
        max_bytes: pgcachewatch_backends::nats::DEFAULT_MAX_BYTES,
        max_messages: -1,
        duplicate_window: Duration::from_secs(120),
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        num_replicas: 3,
        ..Default::default()
    };
    let started = Instant::now();
    loop {
        match js.create_stream(config.clone()).await {
            Ok(_) => return,
            Err(e) if started.elapsed() < Duration::from_secs(60) => {
                tracing_free_log(&format!("creating the R3 stream: {e}"));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("the cluster never took an R3 stream: {e}"),
        }
    }
}

/// For a failure's message: which of the `missing` transactions the stream
/// holds (the relay published them: the service did not deliver them) and
/// which it does not (the relay never published them).
async fn where_are(urls: &str, missing: &[i64]) {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    use futures::StreamExt;
    let Some(client) = admin(urls).await else {
        println!("cannot reach NATS to look for the missing transactions");
        return;
    };
    let js = async_nats::jetstream::new(client);
    let Ok(mut stream) = js.get_stream(STREAM).await else {
        return;
    };
    let Ok(info) = stream.info().await.cloned() else {
        return;
    };
    let last = info.state.last_sequence;
    let Ok(consumer) = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
    else {
        return;
    };
    let Ok(mut messages) = consumer.messages().await else {
        return;
    };
    let mut found: HashMap<i64, Vec<(u64, String)>> = HashMap::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await
    {
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        let text = String::from_utf8_lossy(&m.payload).into_owned();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            let e = &v["event"];
            let txid = e["xid32"].as_i64().or(e["txid"].as_i64()).map(low32);
            if let Some(t) = txid.filter(|t| missing.contains(t)) {
                found.entry(t).or_default().push((seq, text.clone()));
            }
        }
        if seq >= last {
            break;
        }
    }
    println!(
        "of {} missing transactions, the stream (sequences {}..={}) holds {}:",
        missing.len(),
        info.state.first_sequence,
        last,
        found.len()
    );
    for t in missing.iter().take(10) {
        match found.get(t) {
            Some(copies) => println!("  txid {t}: in the stream at {copies:?}"),
            None => println!("  txid {t}: not in the stream"),
        }
    }
}

/// Sets the stream's message limit (as an operator would).
async fn set_max_messages(urls: &str, n: i64) {
    let js = async_nats::jetstream::new(admin(urls).await.expect("NATS"));
    let mut stream = js.get_stream(STREAM).await.expect("stream");
    let mut config = stream.info().await.expect("stream info").config.clone();
    config.max_messages = n;
    js.update_stream(config).await.expect("stream update");
}

async fn stream_leader(urls: &str) -> String {
    let started = Instant::now();
    loop {
        let ask = async {
            let js = async_nats::jetstream::new(admin(urls).await?);
            let mut stream = js.get_stream(STREAM).await.ok()?;
            stream.info().await.ok()?.cluster.clone()?.leader
        };
        if let Ok(Some(leader)) = tokio::time::timeout(Duration::from_secs(5), ask).await {
            return leader;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the stream has no leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn step_down(urls: &str) {
    let client = admin(urls).await.expect("cluster");
    let reply = client
        .request(
            format!("$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}"),
            bytes::Bytes::new(),
        )
        .await
        .expect("step-down");
    let text = String::from_utf8_lossy(&reply.payload).into_owned();
    assert!(text.contains("\"success\":true"), "step-down: {text}");
}
