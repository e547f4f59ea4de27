//! The WebSocket server over the in-memory source: PGCacheWatch's JSON, a slow
//! client disconnected while a fast one keeps up, unknown channels and missing
//! tokens refused, gaps and unhealthy sources closing every client.
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
use pgcachewatch_core::{Event, GapReason, Operation};
use tokio::net::TcpStream;
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
