//! Shared by the NATS tests: a relay + source pair on a fresh stream, and a
//! private nats-server for tests that restart it or need authentication.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgcachewatch_backends::nats::{NatsConnect, NatsSource, StreamSettings};
use pgcachewatch_core::{Event, EventSource, Health, Lsn, Operation, Signal, Subscription};
use pgcachewatch_testkit::env::unique_name;

/// A stream of its own (in memory), so tests never see each other's messages.
pub fn fresh_stream() -> StreamSettings {
    let name = unique_name("pgcwt");
    StreamSettings::new()
        .stream(name.to_uppercase())
        .subject_prefix(name)
        .memory(true)
}

/// The shared server's address (`NATS_URL` without its scheme), for proxies.
pub fn nats_addr() -> std::net::SocketAddr {
    pgcachewatch_testkit::env::nats_url()
        .trim_start_matches("nats://")
        .parse()
        .expect("NATS_URL is nats://host:port")
}

/// An insert event on `table`, at commit position `lsn` if given.
pub fn event_at(table: &str, lsn: Option<u64>) -> Event {
    let mut e = Event::new("ch", Operation::Insert, "public", table);
    e.lsn = lsn.map(Lsn);
    e
}

/// A `NatsSource` on `stream` at `url` (unhealthy after `heartbeat_timeout`
/// without a relay heartbeat), and a subscription that has seen it healthy.
pub async fn healthy_source(
    url: &str,
    stream: &StreamSettings,
    heartbeat_timeout: Duration,
) -> (NatsSource, Subscription) {
    let source = NatsSource::builder(NatsConnect::new(url))
        .stream(stream.clone())
        .heartbeat_timeout(heartbeat_timeout)
        .buffer(1 << 16)
        .connect()
        .await
        .expect("source");
    let mut sub = source.subscribe();
    until(&mut sub, "healthy", |s| {
        matches!(s, Signal::Health(Health::Healthy))
    })
    .await;
    (source, sub)
}

/// Deletes a test's stream (best effort).
pub async fn delete_stream(url: &str, stream: &StreamSettings) {
    if let Ok(client) = NatsConnect::new(url).connect().await {
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(stream.name()).await;
    }
}

/// A nats-server of this test's own, on a free port, with a temporary store.
pub struct OwnNats {
    pub port: u16,
    args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    pgcachewatch_testkit::env::free_local_port().expect("a free port")
}

fn nats_server_binary() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| {
        for p in [
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
            "/usr/local/bin/nats-server",
        ] {
            if std::path::Path::new(p).exists() {
                return p.to_owned();
            }
        }
        "nats-server".to_owned()
    })
}

impl OwnNats {
    /// Starts one with JetStream and `extra` arguments (`--user`, `--auth`, …).
    pub async fn start(extra: &[&str]) -> OwnNats {
        let dir = std::env::temp_dir().join(unique_name("pgcw_nats"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut me = OwnNats {
            port: free_port(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            dir,
            child: None,
        };
        me.spawn().await;
        me
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server on its port. A fresh server whose port was taken
    /// meanwhile moves to another; a restarted one keeps its port (its clients
    /// reconnect to it). Waits up to 20 s: a node joining a cluster on a loaded
    /// machine can take seconds.
    async fn spawn(&mut self) {
        let fresh = self.child.is_none() && !self.dir.join("nats.log").exists();
        for attempt in 0.. {
            match self.spawn_once().await {
                Ok(()) => return,
                Err(why) if fresh && attempt < 3 => {
                    eprintln!(
                        "own nats-server on port {} did not start ({why}); another port",
                        self.port
                    );
                    self.port = free_port();
                }
                Err(why) => panic!(
                    "own nats-server did not start on port {} ({why}); its log:\n{}",
                    self.port,
                    std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
                ),
            }
        }
    }

    async fn spawn_once(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats.log"))
            .expect("the server's log file");
        let child = Command::new(nats_server_binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server must be installed (Debian: apt-get install nats-server)");
        self.child = Some(child);
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!("it exited: {status}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        Err("no answer within 20 s".into())
    }

    /// Kills the server (the store stays) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Publishes relay messages by hand into a stream, in whatever order a test
/// needs (as a relay's republishing or a restart could store them).
pub struct RawRelay {
    pub js: async_nats::jetstream::Context,
    pub prefix: String,
    pub epoch: String,
    pub n: u64,
}

impl RawRelay {
    /// Creates (or checks) `stream` on `url` and writes as epoch `epoch`.
    pub async fn new(url: &str, stream: &StreamSettings, epoch: &str) -> RawRelay {
        let client = NatsConnect::new(url).connect().await.expect("NATS");
        let js = async_nats::jetstream::new(client);
        stream.ensure(&js).await.expect("stream");
        RawRelay {
            js,
            prefix: stream.prefix().to_owned(),
            epoch: epoch.to_owned(),
            n: 0,
        }
    }

    /// Publishes `kind` as the epoch's next message and waits until it is stored.
    pub async fn send(&mut self, kind: pgcachewatch_backends::nats::wire::WireKind) {
        use pgcachewatch_backends::nats::subject;
        use pgcachewatch_backends::nats::wire::{WireKind, WireMessage};
        let subject = match &kind {
            WireKind::Event(e) => {
                subject::table_subject(&self.prefix, e.schema.as_deref(), &e.table)
            }
            WireKind::Gap(_) => subject::control_subject(&self.prefix, "gap"),
            WireKind::Progress(_) => subject::progress_subject(&self.prefix, &self.epoch),
            _ => subject::control_subject(&self.prefix, "heartbeat"),
        };
        let msg = WireMessage {
            epoch: self.epoch.as_str().into(),
            kind,
        };
        self.n += 1;
        self.js
            .publish(subject, msg.to_json().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    /// A heartbeat saying the relay's source is healthy.
    pub async fn beat(&mut self) {
        self.send(pgcachewatch_backends::nats::wire::WireKind::Health(
            pgcachewatch_core::Health::Healthy,
        ))
        .await;
    }

    /// A progress record: every event up to `lsn` is stored before it.
    pub async fn progress(&mut self, lsn: u64) {
        self.send(pgcachewatch_backends::nats::wire::WireKind::Progress(
            pgcachewatch_core::Lsn(lsn),
        ))
        .await;
    }

    /// An event on `table` at commit position `lsn`.
    pub async fn event(&mut self, table: &str, lsn: u64) {
        let mut e = pgcachewatch_core::Event::new(
            "ch",
            pgcachewatch_core::Operation::Update,
            "public",
            table,
        );
        e.lsn = Some(pgcachewatch_core::Lsn(lsn));
        self.send(pgcachewatch_backends::nats::wire::WireKind::Event(e))
            .await;
    }
}

/// Reads until `pred` holds for a signal (panics after 30 s).
pub async fn until(
    sub: &mut Subscription,
    what: &str,
    mut pred: impl FnMut(&Signal) -> bool,
) -> Vec<Signal> {
    let mut seen = Vec::new();
    let wait = async {
        while let Some(s) = sub.recv().await {
            let done = pred(&s);
            seen.push(s);
            if done {
                return;
            }
        }
        panic!("subscription ended while waiting for {what}");
    };
    if tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .is_err()
    {
        panic!("timed out waiting for {what}; saw {seen:?}");
    }
    seen
}

pub fn event_index(s: &Signal) -> Option<usize> {
    s.as_event()?.table.strip_prefix('e')?.parse().ok()
}

/// Every index in `0..total` is either received or covered by a gap that came
/// between its neighbours: never silent loss. Returns (received, gaps).
pub fn check_no_silent_loss(signals: &[Signal], total: usize) -> (usize, usize) {
    let mut received = vec![false; total];
    // For each received event, how many gaps came before it.
    let mut gaps_before: Vec<Option<usize>> = vec![None; total];
    let mut gaps = 0;
    for s in signals {
        if s.is_gap() {
            gaps += 1;
        } else if let Some(i) = event_index(s) {
            if i < total {
                received[i] = true;
                gaps_before[i] = Some(gaps);
            }
        }
    }
    for i in 0..total {
        if received[i] {
            continue;
        }
        let before = (0..i).rev().find_map(|j| gaps_before[j]).unwrap_or(0);
        let after = (i + 1..total).find_map(|j| gaps_before[j]).unwrap_or(gaps);
        assert!(
            after > before,
            "event e{i} was lost without a Gap (received {} of {total})",
            received.iter().filter(|r| **r).count()
        );
    }
    (received.iter().filter(|r| **r).count(), gaps)
}

/// A three-node NATS cluster of the test's own on 127.0.0.1 (routes between
/// three `nats-server`s with JetStream), for streams replicated three times.
pub struct OwnCluster {
    pub nodes: Vec<OwnNats>,
    pub names: Vec<String>,
}

impl OwnCluster {
    pub async fn start() -> OwnCluster {
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let tag = unique_name("c");
        let mut nodes = Vec::new();
        let mut names = Vec::new();
        for (i, port) in cluster_ports.iter().enumerate() {
            let name = format!("{tag}_n{i}");
            let cluster = format!("nats://127.0.0.1:{port}");
            let node = OwnNats::start(&[
                "--server_name",
                &name,
                "--cluster_name",
                &tag,
                "--cluster",
                &cluster,
                "--routes",
                &routes,
            ])
            .await;
            nodes.push(node);
            names.push(name);
        }
        OwnCluster { nodes, names }
    }

    /// Every node's URL, comma-separated.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(OwnNats::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node named `name`.
    pub fn index(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} is not a node of this cluster"))
    }

    /// The node leading `stream` (waits up to 60 s for one).
    pub async fn stream_leader(&self, stream: &str) -> usize {
        let started = std::time::Instant::now();
        loop {
            let ask = async {
                let client = NatsConnect::new(self.urls()).connect().await.ok()?;
                let js = async_nats::jetstream::new(client);
                let mut s = js.get_stream(stream).await.ok()?;
                s.info().await.ok()?.cluster.clone()?.leader
            };
            if let Ok(Some(leader)) = tokio::time::timeout(Duration::from_secs(5), ask).await {
                return self.index(&leader);
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "stream {stream} has no leader"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A TCP proxy whose [`silence`](Self::silence) turns every current
/// connection into a black hole (bytes are read and dropped in both
/// directions, nothing is closed: a silent partition, as a lost NAT entry or
/// a dead middlebox leaves it), while new connections forward as usual.
pub struct SilentProxy {
    addr: std::net::SocketAddr,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> SilentProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let gen = generation.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let born = gen.load(Ordering::Acquire);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut r, mut w) in [(cr, sw), (sr, cw)].map(|(r, w)| {
                    (
                        Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(w) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    )
                }) {
                    let gen = gen.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match r.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if gen.load(Ordering::Acquire) != born {
                                continue;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        // Held open while silenced: a silent partition never closes.
                        if gen.load(Ordering::Acquire) != born {
                            std::future::pending::<()>().await;
                        }
                    });
                }
            }
        });
        SilentProxy {
            addr,
            generation,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Every current connection goes silent for good; new ones forward.
    pub fn silence(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
