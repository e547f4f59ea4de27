//! The WebSocket server over the in-memory source: PGCacheWatch's JSON, a slow
//! client disconnected while a fast one keeps up, unknown channels and missing
//! tokens refused, gaps and unhealthy sources closing every client; a burst far
//! larger than the source's buffer passing every client that reads; requests
//! that never finish closed after the handshake timeout, and connections above
//! the limit refused while connected clients keep receiving.
#![cfg(feature = "websocket")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use pgcachewatch_backends::memory::InMemorySource;
use pgcachewatch_backends::websocket::{
    WsError, WsServer, WsServerHandle, CLOSE_GAP, CLOSE_LAGGED, CLOSE_SHUTDOWN, CLOSE_UNHEALTHY,
};
use pgcachewatch_core::{
    Event, EventSource, GapReason, Health, Operation, Signal, SignalHub, Subscription,
    DEFAULT_HUB_CAPACITY,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsClientError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

const CH: &str = "ch_pgcachewatch_table_change";
const WAIT: Duration = Duration::from_secs(10);

async fn server(
    source: &InMemorySource,
    f: impl FnOnce(
        pgcachewatch_backends::websocket::WsServerBuilder,
    ) -> pgcachewatch_backends::websocket::WsServerBuilder,
) -> WsServerHandle {
    f(WsServer::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .channel(CH)
        .channel("other"))
    .start(source)
    .await
    .expect("server starts")
}

async fn connect(
    addr: SocketAddr,
    channel: &str,
    token: Option<&str>,
) -> Result<Client, WsClientError> {
    let mut req = format!("ws://{addr}/pgpubsub/{channel}")
        .into_client_request()
        .unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

fn http_status(e: &WsClientError) -> Option<u16> {
    match e {
        WsClientError::Http(r) => Some(r.status().as_u16()),
        _ => None,
    }
}

/// The next text message, skipping pings.
async fn next_text(ws: &mut Client) -> serde_json::Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
        {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("JSON"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Reads until the close frame; returns its code and reason, and how many text
/// messages came before it.
async fn until_close(ws: &mut Client) -> (u16, String, usize) {
    let mut texts = 0;
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Text(_))) => texts += 1,
            Some(Ok(Message::Close(Some(f)))) => {
                return (u16::from(f.code), f.reason.to_string(), texts)
            }
            Some(Ok(Message::Close(None))) => panic!("closed without a reason"),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// The response's status line and headers to a plain `GET`.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

fn event(channel: &str, table: &str, op: Operation) -> Event {
    let mut e = Event::new(channel, op, "public", table);
    e.sent_at = Some("2024-05-01T10:00:00.123456Z".parse().unwrap());
    e.txid = Some(7);
    e
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the server counts `n` connected clients (registered before the
/// handshake ends, so events published after this reach them).
async fn clients(h: &WsServerHandle, n: usize) {
    wait_for("clients", || h.stats().clients == n).await;
}

#[tokio::test]
async fn events_reach_clients_of_their_channel_in_pgcachewatch_json() {
    let (source, handle) = InMemorySource::pair();
    let srv = server(&source, |b| b).await;
    let mut a = connect(srv.local_addr(), CH, None).await.unwrap();
    let mut b = connect(srv.local_addr(), "other", None).await.unwrap();
    clients(&srv, 2).await;

    handle.publish(event("unserved", "ignored", Operation::Insert));
    handle.publish(event("other", "orders", Operation::Delete));
    handle.publish(event(CH, "users", Operation::Update));
    let mut no_sent_at = Event::new(CH, Operation::Truncate, "public", "users");
    no_sent_at.sent_at = None;
    handle.publish(no_sent_at.clone());

    let m = next_text(&mut a).await;
    assert_eq!(
        m,
        serde_json::json!({
            "channel": CH,
            "operation": "update",
            "sent_at": "2024-05-01T10:00:00.123456+00:00",
            "table": "users",
        })
    );
    let m = next_text(&mut a).await;
    assert_eq!(m["operation"], "truncate");
    // Without a trigger timestamp, the time the source received it.
    let sent_at: chrono::DateTime<chrono::Utc> = m["sent_at"].as_str().unwrap().parse().unwrap();
    assert!((sent_at - no_sent_at.received_at).num_milliseconds().abs() < 1);

    let m = next_text(&mut b).await;
    assert_eq!(
        (m["channel"].as_str(), m["table"].as_str()),
        (Some("other"), Some("orders"))
    );
    assert_eq!(m.as_object().unwrap().len(), 4);

    // Pings are answered.
    a.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, a.next()).await.unwrap() {
            Some(Ok(Message::Pong(p))) => break assert_eq!(&p[..], b"hi"),
            Some(Ok(Message::Ping(_))) => {}
            other => panic!("expected a pong, got {other:?}"),
        }
    }

    // A client that leaves is forgotten.
    b.close(None).await.unwrap();
    clients(&srv, 1).await;
    srv.shutdown().await;
    let (code, _, _) = until_close(&mut a).await;
    assert_eq!(code, CLOSE_SHUTDOWN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_disconnected_with_a_reason_while_a_fast_one_keeps_receiving() {
    let (source, handle) = InMemorySource::with_capacity(1 << 16);
    let srv = server(&source, |b| {
        b.client_buffer(64).close_timeout(Duration::from_secs(30))
    })
    .await;
    let mut slow = connect(srv.local_addr(), CH, None).await.unwrap();
    let fast = connect(srv.local_addr(), CH, None).await.unwrap();
    clients(&srv, 2).await;

    let received = Arc::new(AtomicUsize::new(0));
    let reader = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut fast = fast;
            while let Some(Ok(m)) = fast.next().await {
                if m.is_text() {
                    received.fetch_add(1, Ordering::Release);
                }
            }
        })
    };
    // 16 KiB messages: the socket buffers fill after a few MiB, then the slow
    // client's 64-message buffer. The fast client is waited for after each batch.
    let table = "t".repeat(16 << 10);
    let mut published = 0;
    while srv.stats().lagged == 0 {
        for _ in 0..32 {
            handle.publish(event(CH, &table, Operation::Update));
            published += 1;
        }
        let want = published;
        wait_for("the fast client", || {
            received.load(Ordering::Acquire) == want
        })
        .await;
        assert!(
            published < 100_000,
            "the slow client was never disconnected"
        );
    }
    assert_eq!(srv.stats().lagged, 1);
    assert_eq!(srv.stats().clients, 1);

    // The fast client keeps receiving.
    for _ in 0..10 {
        handle.publish(event(CH, "after", Operation::Insert));
    }
    let want = published + 10;
    wait_for("the fast client after the disconnect", || {
        received.load(Ordering::Acquire) == want
    })
    .await;

    // The slow client reads what it was sent, then the close frame and its reason.
    let (code, reason, texts) = until_close(&mut slow).await;
    assert_eq!(code, CLOSE_LAGGED);
    assert!(reason.contains("fell behind"), "{reason}");
    assert!(
        texts < published,
        "the slow client got everything ({texts})"
    );
    srv.shutdown().await;
    reader.await.unwrap();
}

#[tokio::test]
async fn an_unknown_channel_or_a_plain_http_request_is_refused() {
    let (source, _handle) = InMemorySource::pair();
    let srv = server(&source, |b| b).await;
    let e = connect(srv.local_addr(), "nope", None).await.unwrap_err();
    assert_eq!(http_status(&e), Some(404));
    // A channel name that is only a prefix of a served one.
    let e = connect(srv.local_addr(), "ch_pgcachewatch", None)
        .await
        .unwrap_err();
    assert_eq!(http_status(&e), Some(404));
    // Not a WebSocket handshake at all.
    assert!(http_get(srv.local_addr(), &format!("/pgpubsub/{CH}"))
        .await
        .starts_with("HTTP/1.1 4"));
    assert_eq!(srv.stats().refused, 3);
    assert_eq!(srv.stats().clients, 0);
    assert!(http_get(srv.local_addr(), "/up")
        .await
        .starts_with("HTTP/1.1 200"));
    srv.shutdown().await;
}

#[tokio::test]
async fn a_non_loopback_address_needs_a_token_and_the_token_is_checked() {
    let (source, handle) = InMemorySource::pair();
    let err = WsServer::builder()
        .listen("0.0.0.0:0".parse().unwrap())
        .channel(CH)
        .start(&source)
        .await
        .unwrap_err();
    assert!(matches!(err, WsError::TokenRequired { .. }), "{err}");
    let err = WsServer::builder()
        .listen("0.0.0.0:0".parse().unwrap())
        .channel(CH)
        .token("  ")
        .start(&source)
        .await
        .unwrap_err();
    assert!(matches!(err, WsError::Config(_)), "{err}");
    let err = WsServer::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .start(&source)
        .await
        .unwrap_err();
    assert!(matches!(err, WsError::Config(_)), "no channel: {err}");

    let srv = WsServer::builder()
        .listen("0.0.0.0:0".parse().unwrap())
        .channel(CH)
        .token("s3cret-token")
        .start(&source)
        .await
        .expect("starts with a token");
    let addr: SocketAddr = ([127, 0, 0, 1], srv.local_addr().port()).into();
    for token in [
        None,
        Some("wrong"),
        Some("s3cret-toke"),
        Some("s3cret-token2"),
    ] {
        let e = connect(addr, CH, token).await.unwrap_err();
        assert_eq!(http_status(&e), Some(401), "{token:?}");
    }
    // Without the token, a client cannot even learn which channels exist.
    let e = connect(addr, "nope", None).await.unwrap_err();
    assert_eq!(http_status(&e), Some(401));
    let mut ok = connect(addr, CH, Some("s3cret-token"))
        .await
        .expect("the right token");
    clients(&srv, 1).await;
    handle.publish(event(CH, "users", Operation::Insert));
    assert_eq!(next_text(&mut ok).await["table"], "users");
    srv.shutdown().await;
}

#[tokio::test]
async fn a_gap_or_an_unhealthy_source_closes_every_client() {
    let (source, handle) = InMemorySource::pair();
    let srv = server(&source, |b| b).await;
    let mut a = connect(srv.local_addr(), CH, None).await.unwrap();
    let mut b = connect(srv.local_addr(), "other", None).await.unwrap();
    clients(&srv, 2).await;

    handle.gap(GapReason::Injected {
        detail: "test".into(),
    });
    for ws in [&mut a, &mut b] {
        let (code, reason, _) = until_close(ws).await;
        assert_eq!(code, CLOSE_GAP);
        assert!(reason.contains("events may have been lost"), "{reason}");
    }
    assert_eq!(srv.stats().closed_by_source, 2);

    // Still healthy after a gap: a new client is served.
    let mut c = connect(srv.local_addr(), CH, None).await.unwrap();
    clients(&srv, 1).await;

    handle.disconnect("test outage");
    let (code, reason, _) = until_close(&mut c).await;
    assert_eq!(code, CLOSE_UNHEALTHY);
    assert!(reason.contains("unhealthy"), "{reason}");
    // While unhealthy: refused with 503, and `/up` says so.
    let e = connect(srv.local_addr(), CH, None).await.unwrap_err();
    assert_eq!(http_status(&e), Some(503));
    assert!(!srv.stats().healthy);
    assert!(http_get(srv.local_addr(), "/up")
        .await
        .starts_with("HTTP/1.1 503"));

    handle.reconnect();
    wait_for("healthy again", || srv.stats().healthy).await;
    let mut d = connect(srv.local_addr(), CH, None).await.unwrap();
    clients(&srv, 1).await;
    handle.publish(event(CH, "users", Operation::Insert));
    assert_eq!(next_text(&mut d).await["table"], "users");

    // The source ending closes the rest, and the server says it is finished.
    handle.close();
    let (code, _, _) = until_close(&mut d).await;
    assert_eq!(code, CLOSE_SHUTDOWN);
    wait_for("finished", || srv.is_finished()).await;
    srv.shutdown().await;
}

/// A client read by a task of its own: counts the text messages it receives
/// and records how its connection ended.
struct Reader {
    texts: Arc<AtomicUsize>,
    ended: Arc<std::sync::Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl Reader {
    fn spawn(ws: Client) -> Reader {
        let texts = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(std::sync::Mutex::new(None));
        let task = {
            let (texts, ended) = (texts.clone(), ended.clone());
            tokio::spawn(async move {
                let mut ws = ws;
                let how = loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(_))) => {
                            texts.fetch_add(1, Ordering::Release);
                        }
                        Some(Ok(Message::Close(f))) => break format!("closed with {f:?}"),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break format!("failed: {e}"),
                        None => break "ended".to_owned(),
                    }
                };
                *ended.lock().unwrap() = Some(how);
            })
        };
        Reader { texts, ended, task }
    }

    fn ended(&self) -> Option<String> {
        self.ended.lock().unwrap().clone()
    }

    /// Waits (a bounded time) until it has received `n` messages; fails at
    /// once if its connection ended.
    async fn received(&self, who: &str, n: usize) {
        let deadline = tokio::time::Instant::now() + BURST_WAIT;
        loop {
            if let Some(how) = self.ended() {
                panic!(
                    "{who} was disconnected after {} of {n} messages: {how}",
                    self.texts.load(Ordering::Acquire)
                );
            }
            if self.texts.load(Ordering::Acquire) >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{who} received {} of {n} messages in time",
                self.texts.load(Ordering::Acquire)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// How long a reader may take to receive a burst (a debug build, on a loaded
/// machine).
const BURST_WAIT: Duration = Duration::from_secs(120);

/// `n` events on `channel` emitted into `hub` in one batch, as the `LISTEN`
/// source emits what it read of a large transaction.
fn burst(hub: &SignalHub, channel: &str, table: &str, n: usize) {
    let signals: Vec<Signal> = (0..n)
        .map(|i| {
            Signal::Event(Arc::new(
                event(channel, table, Operation::Insert).with_txid(i as i64),
            ))
        })
        .collect();
    hub.send_batch(&signals);
}

/// Issue 18, item 6: a burst eleven times the source's own buffer (its default,
/// 4,096 signals a subscriber) closes nobody who reads; a client that reads
/// nothing is the only one disconnected, and only once it is really behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_45000_event_burst_passes_every_reading_client_and_only_a_stalled_one_is_closed() {
    const BURST: usize = 45_000;
    const MORE: usize = 10_000;
    let source = SignalHub::new(DEFAULT_HUB_CAPACITY);
    // The defaults, but for the time the stalled client gets to read up to its
    // close frame at the end (this test reads it only once the others are done).
    let srv = WsServer::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .channel(CH)
        .close_timeout(Duration::from_secs(60))
        .start(&source)
        .await
        .expect("server starts");
    let a = Reader::spawn(connect(srv.local_addr(), CH, None).await.unwrap());
    let b = Reader::spawn(connect(srv.local_addr(), CH, None).await.unwrap());
    // Connected, and never read until the end.
    let mut stalled = connect(srv.local_addr(), CH, None).await.unwrap();
    clients(&srv, 3).await;

    burst(&source, CH, "burst", BURST);
    let mut sent = BURST;
    a.received("reader a", sent).await;
    b.received("reader b", sent).await;
    let s = srv.stats();
    assert_eq!((s.closed_by_source, s.clients), (0, 3), "{s:?}");

    // More transactions until the stalled client is found out (its socket
    // buffers take a few MiB first); the readers keep up with every one.
    let mut rounds = 0;
    while srv.stats().lagged == 0 {
        rounds += 1;
        assert!(rounds <= 100, "the stalled client was never disconnected");
        burst(&source, CH, "more", MORE);
        sent += MORE;
        a.received("reader a", sent).await;
        b.received("reader b", sent).await;
    }
    let s = srv.stats();
    assert_eq!(
        (s.lagged, s.clients, s.closed_by_source),
        (1, 2, 0),
        "{s:?}"
    );

    // Both readers still receive what comes after.
    burst(&source, CH, "after", 10);
    sent += 10;
    a.received("reader a", sent).await;
    b.received("reader b", sent).await;

    let (code, reason, texts) = until_close(&mut stalled).await;
    assert_eq!(code, CLOSE_LAGGED, "{reason}");
    assert!(reason.contains("fell behind"), "{reason}");
    assert!(texts < sent, "the stalled client got everything ({texts})");

    srv.shutdown().await;
    for r in [a, b] {
        r.task.await.unwrap();
        let how = r.ended.lock().unwrap().clone().unwrap();
        assert!(how.contains("Away"), "{how}");
    }
}

/// Opens a connection and sends an HTTP request line and one header, never the
/// blank line that ends the request; with `drip`, then a byte of another header
/// every 100 ms (a deadline, not an idle timeout, must close it). Returns how
/// long until the server closed it, or `Err` if it was still open after `WAIT`.
async fn unfinished_request(addr: SocketAddr, drip: bool) -> Result<Duration, String> {
    let started = tokio::time::Instant::now();
    let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.write_all(format!("GET /pgpubsub/{CH} HTTP/1.1\r\nHost: x\r\nX-Slow: ").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let deadline = started + WAIT;
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            read = tcp.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Ok(started.elapsed()),
                Ok(_) => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(100)), if drip => {
                if tcp.write_all(b"x").await.is_err() {
                    return Ok(started.elapsed());
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(format!("still open after {WAIT:?}"));
            }
        }
    }
}

/// Issue 18, item 9: sockets that never finish their request are closed after
/// the handshake timeout (counted), while a connected client stays fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_never_finish_are_closed_after_the_handshake_timeout() {
    const SLOW: usize = 40;
    let (source, handle) = InMemorySource::pair();
    let srv = server(&source, |b| b.handshake_timeout(Duration::from_secs(1))).await;
    let mut fresh = connect(srv.local_addr(), CH, None).await.unwrap();
    clients(&srv, 1).await;

    let addr = srv.local_addr();
    let slow: Vec<_> = (0..SLOW)
        .map(|i| tokio::spawn(unfinished_request(addr, i % 2 == 1)))
        .collect();
    // While they hang, the connected client is served.
    handle.publish(event(CH, "during", Operation::Insert));
    assert_eq!(next_text(&mut fresh).await["table"], "during");

    for (i, s) in slow.into_iter().enumerate() {
        let closed = s.await.unwrap();
        assert!(closed.is_ok(), "unfinished request {i}: {closed:?}");
    }
    wait_for("the timeouts counted", || {
        srv.stats().handshake_timeouts == SLOW as u64
    })
    .await;
    wait_for("their connections released", || {
        srv.stats().connections == 1
    })
    .await;
    handle.publish(event(CH, "after", Operation::Insert));
    assert_eq!(next_text(&mut fresh).await["table"], "after");
    assert_eq!(srv.stats().clients, 1);
    srv.shutdown().await;
}

/// Issue 18, item 9: with `max_connections` open, more connections are refused
/// at once (counted) while the connected clients keep receiving; slots come
/// back as clients leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_above_the_limit_is_refused_while_connected_clients_keep_receiving() {
    const LIMIT: usize = 8;
    const FLOOD: usize = 200;
    let (source, handle) = InMemorySource::pair();
    // A long handshake timeout: what refuses the flood is the limit.
    let srv = server(&source, |b| {
        b.max_connections(LIMIT)
            .handshake_timeout(Duration::from_secs(600))
    })
    .await;
    let addr = srv.local_addr();
    let fresh = Reader::spawn(connect(addr, CH, None).await.unwrap());
    let mut held = Vec::new();
    for _ in 1..LIMIT {
        held.push(connect(addr, CH, None).await.unwrap());
    }
    clients(&srv, LIMIT).await;

    // Events keep coming while the flood lasts.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (handle, stop) = (handle.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Acquire) {
                handle.publish(event(CH, "during", Operation::Insert));
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };
    let flood = futures::future::join_all(
        (0..FLOOD).map(|_| tokio::time::timeout(WAIT, connect(addr, CH, None))),
    )
    .await;
    stop.store(true, Ordering::Release);
    let published = publisher.await.unwrap();

    let mut served = 0;
    let mut not_answered = 0;
    let mut with_503 = 0;
    for attempt in &flood {
        match attempt {
            Ok(Ok(_)) => served += 1,
            Ok(Err(e)) if http_status(e) == Some(503) => with_503 += 1,
            Ok(Err(_)) => {}
            Err(_) => not_answered += 1,
        }
    }
    assert_eq!(
        (served, not_answered),
        (0, 0),
        "of {FLOOD} connections above the limit, {served} were served and {not_answered} not answered in {WAIT:?}"
    );
    assert!(with_503 > 0, "none was told 503");
    drop(flood);
    wait_for("the refusals counted", || {
        srv.stats().over_limit == FLOOD as u64
    })
    .await;
    fresh.received("the connected client", published).await;
    let s = srv.stats();
    assert_eq!((s.clients, s.connections), (LIMIT, LIMIT), "{s:?}");

    // Clients that leave give their slots back.
    held.truncate(LIMIT - 3);
    wait_for("slots released", || srv.stats().connections == LIMIT - 2).await;
    let mut late = connect(addr, CH, None).await.expect("a slot is free again");
    clients(&srv, LIMIT - 1).await;
    handle.publish(event(CH, "late", Operation::Insert));
    assert_eq!(next_text(&mut late).await["table"], "late");
    fresh.received("the connected client", published + 1).await;
    srv.shutdown().await;
}

/// If the server itself drops events (its pump did not run while
/// `feed_buffer` events piled up: here a single-threaded runtime busy with the
/// burst), every client is closed with 1011 and the loss is counted: the
/// clients really missed events. New clients are served afterwards.
#[tokio::test]
async fn events_the_server_itself_drops_close_every_client_and_are_counted() {
    let source = SignalHub::new(DEFAULT_HUB_CAPACITY);
    let srv = WsServer::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .channel(CH)
        .feed_buffer(1000)
        .start(&source)
        .await
        .expect("server starts");
    let mut ws = connect(srv.local_addr(), CH, None).await.unwrap();
    clients(&srv, 1).await;
    // The pump cannot run until this returns.
    burst(&source, CH, "burst", 5000);
    let (code, reason, texts) = until_close(&mut ws).await;
    assert_eq!(code, CLOSE_GAP, "{reason}");
    assert!(reason.contains("fell behind its source"), "{reason}");
    assert!(texts <= 1000, "{texts}");
    let s = srv.stats();
    assert_eq!(
        (s.feed_lost, s.closed_by_source, s.lagged),
        (4000, 1, 0),
        "{s:?}"
    );

    let mut again = connect(srv.local_addr(), CH, None).await.unwrap();
    clients(&srv, 1).await;
    burst(&source, CH, "after", 1);
    assert_eq!(next_text(&mut again).await["table"], "after");
    srv.shutdown().await;
}

/// A source that offers no inline attachment.
#[derive(Debug)]
struct SubscribeOnly(SignalHub);

impl EventSource for SubscribeOnly {
    fn subscribe(&self) -> Subscription {
        self.0.subscribe()
    }
    fn health(&self) -> Health {
        self.0.health()
    }
}

/// A source read through a subscription serves the same events; a burst
/// larger than that subscription's buffer is the source's `Lagged` gap, and
/// closes every client with 1011: they really missed events.
#[tokio::test]
async fn a_source_without_inline_attachment_is_read_through_a_subscription() {
    let source = SubscribeOnly(SignalHub::new(16));
    let srv = WsServer::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .channel(CH)
        .start(&source)
        .await
        .expect("server starts");
    let mut ws = connect(srv.local_addr(), CH, None).await.unwrap();
    clients(&srv, 1).await;
    burst(&source.0, CH, "users", 1);
    assert_eq!(next_text(&mut ws).await["table"], "users");

    // The single-threaded runtime runs nothing else until this returns.
    burst(&source.0, CH, "burst", 100);
    let (code, reason, _) = until_close(&mut ws).await;
    assert_eq!(code, CLOSE_GAP, "{reason}");
    assert!(reason.contains("lagged"), "{reason}");
    assert_eq!(srv.stats().feed_lost, 0);

    source.0.set_health(Health::Unhealthy);
    wait_for("unhealthy", || !srv.stats().healthy).await;
    drop(source);
    wait_for("finished once the source ended", || srv.is_finished()).await;
    srv.shutdown().await;
}
