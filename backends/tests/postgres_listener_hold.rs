//! The LISTEN source while a commit is held between its commit record and its
//! visibility, against a PostgreSQL cluster of each test's own
//! ([`OwnPostgres`]; the shared server at `DATABASE_URL` is not reconfigured).
//!
//! The hold: the cluster names a synchronous standby that never connects
//! (`synchronous_standby_names = 'nobody'`). Every session commits with
//! `synchronous_commit = local` (set for the database), except the writer,
//! which sets it `on`: its commit record is written and flushed, then its
//! backend waits for the standby before it leaves the proc array, so its write
//! is not visible to anyone else, and it keeps holding the NOTIFY commit lock.
//! `pg_cancel_backend` ends the wait: the transaction stays committed (the
//! writer gets a warning) and becomes visible.
//!
//! A PostgreSQL server never lets a committed heartbeat wait behind a held
//! commit (the NOTIFY commit lock orders them), so the source's other sign of a
//! stall, a heartbeat that does not come back on a connection that answers
//! `SELECT 1`, is produced at the wire: a proxy to the shared server withholds
//! its notifications ([`NotificationHold`]).
//!
//! Conditions are awaited with bounded polling; the sleeps below are how long a
//! commit (or a notification) is held, not assertions on how long anything took.
#![cfg(feature = "postgres")]

use std::str::FromStr;
use std::time::Duration;

use pgcachewatch_backends::postgres::install::{Installer, TableName};
use pgcachewatch_backends::postgres::listener::PgListenerSource;
use pgcachewatch_core::{Cache, Dispatcher, EventSource, Health, Signal, Subscription};
use pgcachewatch_strategies::Greedy;
use pgcachewatch_testkit::cluster::OwnPostgres;
use pgcachewatch_testkit::env::{eventually_within, unique_name as unique};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PATIENCE: Duration = Duration::from_secs(20);

/// A cluster of the test's own with a synchronous standby that never connects,
/// and a table `(id 1, v 0)` with pgcachewatch's triggers on `channel`.
struct Held {
    admin: PgPool,
    table: String,
    channel: String,
    /// Dropped last (fields drop in order): stops the server.
    pg: OwnPostgres,
}

impl Held {
    async fn start(prefix: &str) -> Held {
        let pg = tokio::task::spawn_blocking(|| {
            OwnPostgres::start(&["synchronous_standby_names = 'nobody'"])
        })
        .await
        .unwrap()
        .expect("a throw-away PostgreSQL cluster (initdb, pg_ctl) must start");
        let url = pg.url("postgres");
        // Local commits for every session of this pool from its first statement
        // on (ALTER DATABASE itself would otherwise wait for the standby), and
        // for every later session of the database.
        let options = PgConnectOptions::from_str(&url)
            .unwrap()
            .options([("synchronous_commit", "local")]);
        let admin = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .unwrap();
        admin
            .execute("ALTER DATABASE postgres SET synchronous_commit = local")
            .await
            .unwrap();
        let table = unique(prefix);
        let channel = unique(prefix);
        sqlx::raw_sql(&format!(
            "CREATE TABLE public.{table} (id int PRIMARY KEY, v bigint NOT NULL); \
             INSERT INTO public.{table} VALUES (1, 0);"
        ))
        .execute(&admin)
        .await
        .unwrap();
        Installer::new()
            .channel(&channel)
            .install(&admin, &[TableName::new("public", &table).unwrap()])
            .await
            .unwrap();
        Held {
            admin,
            table,
            channel,
            pg,
        }
    }

    fn url(&self) -> String {
        self.pg.url("postgres")
    }

    /// `v` of row 1, as a new snapshot sees it.
    async fn read(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(&format!("SELECT v FROM public.{} WHERE id = 1", self.table))
            .fetch_one(&self.admin)
            .await
    }

    /// Commits `v` (locally: not held); returns the txid.
    async fn write(&self, v: i64) -> i64 {
        let mut tx = self.admin.begin().await.unwrap();
        sqlx::query(&format!(
            "UPDATE public.{} SET v = $1 WHERE id = 1",
            self.table
        ))
        .bind(v)
        .execute(&mut *tx)
        .await
        .unwrap();
        let txid: i64 = sqlx::query_scalar("SELECT txid_current()")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        txid
    }

    /// Sets `v` in a transaction whose commit waits for the standby; returns
    /// once it waits, its commit record written.
    async fn hold(&self, v: i64) -> Writer {
        let mut conn = PgConnection::connect(&self.url()).await.unwrap();
        conn.execute("SET synchronous_commit = on").await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        let update = format!("UPDATE public.{} SET v = $1 WHERE id = 1", self.table);
        let (txid_tx, txid_rx) = oneshot::channel();
        let commit = tokio::spawn(async move {
            conn.execute("BEGIN").await?;
            sqlx::query(&update).bind(v).execute(&mut conn).await?;
            let txid: i64 = sqlx::query_scalar("SELECT txid_current()")
                .fetch_one(&mut conn)
                .await?;
            let _ = txid_tx.send(txid);
            // Waits for the standby until pg_cancel_backend.
            conn.execute("COMMIT").await?;
            conn.close().await
        });
        let txid = txid_rx.await.expect("the writer failed before its commit");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let waits: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT FROM pg_stat_activity \
                  WHERE pid = $1 AND wait_event = 'SyncRep')",
            )
            .bind(pid)
            .fetch_one(&self.admin)
            .await
            .unwrap();
            if waits {
                break;
            }
            assert!(
                !commit.is_finished(),
                "the writer's commit was not held: {:?}",
                commit.await
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until the writer's commit waits for the standby"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Writer { pid, txid, commit }
    }

    /// Ends the writer's wait for the standby: its commit becomes visible.
    async fn release(&self, writer: Writer) {
        let cancelled: bool = sqlx::query_scalar("SELECT pg_cancel_backend($1)")
            .bind(writer.pid)
            .fetch_one(&self.admin)
            .await
            .unwrap();
        assert!(cancelled, "the writer's backend is gone");
        writer
            .commit
            .await
            .unwrap()
            .expect("the held commit completes (with a warning) once released");
    }
}

/// A writer whose commit is held.
struct Writer {
    pid: i32,
    txid: i64,
    commit: JoinHandle<Result<(), sqlx::Error>>,
}

/// The next signal, failing the test if none comes within [`PATIENCE`].
async fn next(sub: &mut Subscription) -> Signal {
    tokio::time::timeout(PATIENCE, sub.recv())
        .await
        .expect("no signal in time")
        .expect("the subscription ended")
}

/// Receives until the event of `txid`; fails on any gap or health change on the way.
async fn until_event(sub: &mut Subscription, txid: i64) {
    loop {
        match next(sub).await {
            Signal::Event(e) if e.txid == Some(txid) => return,
            Signal::Event(_) => {}
            other => panic!("expected the event of txid {txid}, got {other:?} first"),
        }
    }
}

/// Everything the subscription has ready now.
fn ready(sub: &mut Subscription) -> Vec<Signal> {
    std::iter::from_fn(|| sub.try_recv().ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_commit_is_announced_only_once_visible_and_the_cache_is_fresh_after() {
    let db = Held::start("pgcw_hold_sound").await;
    let source = PgListenerSource::builder(db.url())
        .channel(&db.channel)
        .connect()
        .await
        .unwrap();
    let cache: Cache<i32, i64> = Cache::new(16);
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    let mut sub = source.subscribe();
    assert!(matches!(
        next(&mut sub).await,
        Signal::Health(Health::Healthy)
    ));
    let load = || cache.get_or_load(1, || db.read());
    assert_eq!(load().await.unwrap(), 0);
    let hits = cache.stats().hits;
    assert_eq!(load().await.unwrap(), 0);
    assert_eq!(cache.stats().hits, hits + 1, "warm");

    let writer = db.hold(1).await;
    // The commit record is written, but a new snapshot still sees the old row,
    // and nothing was announced: a load through the cache now reads the old row
    // and stores it. Had the event come before the commit was visible, that
    // stored value would outlive it.
    assert_eq!(db.read().await.unwrap(), 0, "the held write is not visible");
    cache.invalidate(&1);
    assert_eq!(
        load().await.unwrap(),
        0,
        "loaded during the hold: the old row"
    );
    let hits = cache.stats().hits;
    assert_eq!(load().await.unwrap(), 0);
    assert_eq!(cache.stats().hits, hits + 1, "stored during the hold");
    let during = ready(&mut sub);
    assert!(
        during.is_empty(),
        "nothing may be announced while the commit is held: {during:?}"
    );
    assert_eq!(source.stats().events, 0);

    let txid = writer.txid;
    db.release(writer).await;
    assert_eq!(db.read().await.unwrap(), 1, "visible once released");
    until_event(&mut sub, txid).await;
    dispatcher.sync().await;
    assert_eq!(load().await.unwrap(), 1, "fresh after the event");
    let stats = source.stats();
    assert_eq!(
        (stats.gaps, stats.reconnects),
        (0, 0),
        "the cache is fresh through the event, not through a flush: {stats:?}"
    );
    assert_eq!(source.health(), Health::Healthy);

    dispatcher.shutdown().await;
    source.shutdown().await;
}

/// How long the second test holds a commit: 15 heartbeat periods of its
/// source, and over the ~3 s that cost a false alarm with the defaults.
const HOLD: Duration = Duration::from_secs(3);
const BEAT: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_held_for_many_heartbeats_is_a_stall_not_a_lost_connection() {
    let db = Held::start("pgcw_hold_stall").await;
    let source = PgListenerSource::builder(db.url())
        .channel(&db.channel)
        .heartbeat_interval(BEAT)
        .heartbeat_timeout(BEAT)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let cache: Cache<i32, i64> = Cache::new(16);
    let dispatcher = Dispatcher::new()
        .attach(Greedy::new(), cache.clone())
        .spawn(&source);
    let mut sub = source.subscribe();
    assert!(matches!(
        next(&mut sub).await,
        Signal::Health(Health::Healthy)
    ));
    eventually_within(PATIENCE, "a heartbeat is answered", || {
        source.stats().heartbeats >= 1
    })
    .await;
    let load = || cache.get_or_load(1, || db.read());
    assert_eq!(load().await.unwrap(), 0);
    let pid = source.stats().backend_pid;
    dispatcher.sync().await;
    let flushes = cache.stats().flushes;

    let writer = db.hold(1).await;
    eventually_within(PATIENCE, "the source notices the stall", || {
        source.stats().queue_stalls >= 1
    })
    .await;
    // Many heartbeat periods, each of which used to end in a heartbeat timeout.
    tokio::time::sleep(HOLD).await;
    let during = ready(&mut sub);
    assert!(
        during.is_empty(),
        "no gap, no health change, no event while the commit is held: {during:?}"
    );
    let stats = source.stats();
    assert_eq!(source.health(), Health::Healthy);
    assert_eq!(
        (stats.gaps, stats.reconnects, stats.heartbeat_timeouts),
        (0, 0, 0),
        "a held commit is not a lost connection: {stats:?}"
    );
    assert_eq!(stats.backend_pid, pid, "the same connection");
    assert_eq!(stats.queue_stalls, 1, "one stall, counted once: {stats:?}");
    dispatcher.sync().await;
    assert_eq!(cache.stats().flushes, flushes, "no cache was flushed");
    let hits = cache.stats().hits;
    assert_eq!(load().await.unwrap(), 0);
    assert_eq!(
        cache.stats().hits,
        hits + 1,
        "still cached during the stall"
    );

    // Released: the held event comes, then a later one, on the same connection.
    let held = writer.txid;
    db.release(writer).await;
    until_event(&mut sub, held).await;
    let later = db.write(2).await;
    until_event(&mut sub, later).await;
    dispatcher.sync().await;
    assert_eq!(load().await.unwrap(), 2);
    let beats = source.stats().heartbeats;
    eventually_within(PATIENCE, "heartbeats come back", || {
        source.stats().heartbeats > beats
    })
    .await;
    let stats = source.stats();
    assert_eq!(
        (
            stats.gaps,
            stats.reconnects,
            stats.heartbeat_timeouts,
            stats.queue_stalls
        ),
        (0, 0, 0, 1),
        "{stats:?}"
    );
    assert_eq!(stats.backend_pid, pid);
    assert_eq!(source.health(), Health::Healthy);

    dispatcher.shutdown().await;
    source.shutdown().await;
}

/// A proxy to the shared server that withholds the server's notifications
/// (`NotificationResponse`, message type `A`) while told to, and passes
/// everything else: to the client, the notification queue stalls while the
/// connection answers every query. Released, the withheld notifications follow
/// in their order (asynchronous messages may come at any point of the protocol).
struct NotificationHold {
    addr: std::net::SocketAddr,
    hold: tokio::sync::watch::Sender<bool>,
}

impl NotificationHold {
    async fn start(upstream: std::net::SocketAddr) -> NotificationHold {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (hold, _) = tokio::sync::watch::channel(false);
        let holds = hold.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut client_rx, client_tx) = client.into_split();
                let (server_rx, mut server_tx) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                });
                tokio::spawn(withhold_notifications(
                    server_rx,
                    client_tx,
                    holds.subscribe(),
                ));
            }
        });
        NotificationHold { addr, hold }
    }

    fn hold(&self, on: bool) {
        self.hold.send_replace(on);
    }
}

/// Forwards the server's messages, keeping back `NotificationResponse`s while
/// `hold` is on. Every message is type (1 byte) + length (4, big-endian,
/// counting itself) + body; the connection must not use TLS.
async fn withhold_notifications(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut hold: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut held: Vec<Vec<u8>> = Vec::new();
    loop {
        tokio::select! {
            n = from.read(&mut chunk) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
                while buf.len() >= 5 {
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1;
                    if buf.len() < len {
                        break;
                    }
                    let message: Vec<u8> = buf.drain(..len).collect();
                    let holding = *hold.borrow();
                    if message[0] == b'A' && holding {
                        held.push(message);
                    } else {
                        to.write_all(&message).await?;
                    }
                }
            }
            changed = hold.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let holding = *hold.borrow_and_update();
                if !holding {
                    for message in held.drain(..) {
                        to.write_all(&message).await?;
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_withheld_on_a_connection_that_answers_is_a_stall_not_a_lost_connection() {
    let url = pgcachewatch_testkit::env::database_url();
    let direct = PgConnectOptions::from_str(&url).unwrap();
    let upstream = tokio::net::lookup_host((direct.get_host(), direct.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = NotificationHold::start(upstream).await;
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(direct.clone())
        .await
        .expect("PostgreSQL must be running at DATABASE_URL");
    let channel = unique("pgcw_hold_withheld");
    let source = PgListenerSource::builder_with_options(
        direct
            .clone()
            .host("127.0.0.1")
            .port(proxy.addr.port())
            .ssl_mode(sqlx::postgres::PgSslMode::Disable),
    )
    .channel(&channel)
    .heartbeat_interval(BEAT)
    .heartbeat_timeout(BEAT)
    .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
    .connect()
    .await
    .unwrap();
    let mut sub = source.subscribe();
    assert!(matches!(
        next(&mut sub).await,
        Signal::Health(Health::Healthy)
    ));
    eventually_within(PATIENCE, "a heartbeat is answered", || {
        source.stats().heartbeats >= 1
    })
    .await;
    let pid = source.stats().backend_pid;

    proxy.hold(true);
    let payload = r#"{"operation":"update","schema":"public","table":"t","txid":7}"#;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(&channel)
        .bind(payload)
        .execute(&admin)
        .await
        .unwrap();
    eventually_within(PATIENCE, "the source notices the stall", || {
        source.stats().queue_stalls >= 1
    })
    .await;
    // Many heartbeat periods, each of which used to end in a heartbeat timeout.
    tokio::time::sleep(HOLD).await;
    let during = ready(&mut sub);
    assert!(
        during.is_empty(),
        "no gap, no health change, no event while notifications are withheld: {during:?}"
    );
    let stats = source.stats();
    assert_eq!(source.health(), Health::Healthy);
    assert_eq!(
        (stats.gaps, stats.reconnects, stats.heartbeat_timeouts),
        (0, 0, 0),
        "a connection that answers is not lost: {stats:?}"
    );
    assert_eq!(stats.backend_pid, pid, "the same connection");
    assert_eq!(stats.queue_stalls, 1, "one stall, counted once: {stats:?}");

    // Released: the withheld event comes, and heartbeats come back.
    proxy.hold(false);
    until_event(&mut sub, 7).await;
    let beats = source.stats().heartbeats;
    eventually_within(PATIENCE, "heartbeats come back", || {
        source.stats().heartbeats > beats
    })
    .await;
    let stats = source.stats();
    assert_eq!(
        (
            stats.gaps,
            stats.reconnects,
            stats.heartbeat_timeouts,
            stats.queue_stalls
        ),
        (0, 0, 0, 1),
        "{stats:?}"
    );
    assert_eq!(source.health(), Health::Healthy);
    source.shutdown().await;
}
