//! Accepting connections, within bounds: at most
//! [`max_connections`](super::WsServerBuilder::max_connections) open at once,
//! and each given [`handshake_timeout`](super::WsServerBuilder::handshake_timeout)
//! to send its request and be upgraded.
//!
//! Every accepted connection holds a permit of the hub's semaphore for as long
//! as its socket is open: while its request is read and answered, and, once
//! upgraded, for the whole WebSocket session (the permit travels inside the
//! socket hyper hands to the upgrade). With no permit left, a connection is
//! refused at once: it gets `503 Service Unavailable` (its request is read for
//! up to a second first, so that closing does not reset the connection before
//! the client reads the answer; at most [`REFUSALS_AT_ONCE`] such refusals run
//! at a time, beyond that the socket is simply closed), and is counted.
//!
//! The request is served by hyper's HTTP/1 connection with upgrades, the whole
//! of it under the handshake timeout: a client that sends `GET … HTTP/1.1` and
//! one header and never the blank line, or one header byte a second, is closed
//! when the timeout ends, and counted. (hyper's own `header_read_timeout` needs
//! a timer and covers the headers only; this deadline covers the request, the
//! answer and the upgrade.) Plain HTTP answers carry `Connection: close`, so a
//! connection serves one request.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::hub::Hub;

/// Refusals (over the limit) answered with a 503 at the same time; beyond
/// that, sockets over the limit are closed without an answer.
pub(super) const REFUSALS_AT_ONCE: usize = 64;

/// How long a refused connection's request is read before the 503 is written.
const REFUSAL_WINDOW: Duration = Duration::from_secs(1);

/// How much of a refused connection's request is read at most.
const REFUSAL_READ: usize = 8 << 10;

/// The largest request head read (hyper's buffer; its minimum is 8 KiB).
const MAX_REQUEST_BUFFER: usize = 16 << 10;

/// How long to wait before accepting again after an error such as "too many
/// open files".
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const OVER_LIMIT_BODY: &str = "too many connections; retry later\n";

/// The answer to a connection over the limit.
fn over_limit_response() -> String {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{OVER_LIMIT_BODY}",
        OVER_LIMIT_BODY.len()
    )
}

/// At most one log line a second, with the count of lines left out.
#[derive(Debug, Default)]
struct LogLimit {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogLimit {
    /// `Some(lines left out since the last one)` if a line may be logged now.
    fn check(&self) -> Option<u64> {
        let mut last = self.last.lock();
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// What the accept loop and its connections share.
struct Ctx {
    hub: Arc<Hub>,
    router: Router,
    handshake_timeout: Duration,
    refusals: Arc<Semaphore>,
    over_limit_log: LogLimit,
    timeout_log: LogLimit,
    accept_log: LogLimit,
}

/// Accepts connections on `listener` until `stop` fires.
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    hub: Arc<Hub>,
    handshake_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let ctx = Arc::new(Ctx {
        hub,
        router,
        handshake_timeout,
        refusals: Arc::new(Semaphore::new(REFUSALS_AT_ONCE)),
        over_limit_log: LogLimit::default(),
        timeout_log: LogLimit::default(),
        accept_log: LogLimit::default(),
    });
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            // The peer gave up before it was accepted: nothing to do.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if let Some(suppressed) = ctx.accept_log.check() {
                    tracing::warn!(error = %e, suppressed, "accepting a WebSocket connection failed; retrying");
                }
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        match ctx.hub.connection_permits().clone().try_acquire_owned() {
            Ok(permit) => {
                // Events are small and latency matters: no Nagle delay.
                let _ = tcp.set_nodelay(true);
                tokio::spawn(connection(
                    ctx.clone(),
                    Counted {
                        tcp,
                        _permit: permit,
                    },
                    peer,
                    stop.clone(),
                ));
            }
            Err(_) => refuse(&ctx, tcp, peer),
        }
    }
    tracing::debug!("the WebSocket server stopped accepting connections");
}

/// Errors that concern one connection only.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection's request under the handshake timeout; an upgraded
/// connection lives on in its client task.
async fn connection(ctx: Arc<Ctx>, io: Counted, peer: SocketAddr, mut stop: watch::Receiver<bool>) {
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(MAX_REQUEST_BUFFER)
        .serve_connection(
            TokioIo::new(io),
            TowerToHyperService::new(ctx.router.clone()),
        )
        .with_upgrades();
    tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => {}
        served = tokio::time::timeout(ctx.handshake_timeout, conn) => match served {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "a WebSocket connection failed before it was upgraded"),
            Err(_) => {
                ctx.hub.handshake_timed_out();
                tracing::debug!(%peer, timeout = ?ctx.handshake_timeout, "closing a connection that did not finish its request in time");
                if let Some(suppressed) = ctx.timeout_log.check() {
                    tracing::warn!(
                        %peer,
                        timeout = ?ctx.handshake_timeout,
                        suppressed,
                        total = ctx.hub.stats().handshake_timeouts,
                        "closed a connection that did not finish its request in time"
                    );
                }
            }
        },
    }
}

/// Refuses a connection over the limit: a 503 if few refusals are under way,
/// else just closed. Counted and logged (at most once a second).
fn refuse(ctx: &Ctx, tcp: TcpStream, peer: SocketAddr) {
    ctx.hub.over_limit();
    if let Some(suppressed) = ctx.over_limit_log.check() {
        tracing::warn!(
            %peer,
            max_connections = ctx.hub.max_connections(),
            suppressed,
            total = ctx.hub.stats().over_limit,
            "refused a WebSocket connection: the connection limit is reached"
        );
    }
    let Ok(permit) = ctx.refusals.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let mut tcp = tcp;
        let _ = tokio::time::timeout(REFUSAL_WINDOW, read_request_head(&mut tcp)).await;
        let _ = tcp.write_all(over_limit_response().as_bytes()).await;
        let _ = tcp.shutdown().await;
    });
}

/// Reads until the end of a request head (a blank line), the end of the
/// stream, an error, or [`REFUSAL_READ`] bytes.
async fn read_request_head(tcp: &mut TcpStream) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while head.len() < REFUSAL_READ {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return;
        }
    }
}

/// An accepted socket holding its place under the connection limit until it
/// is dropped.
struct Counted {
    tcp: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_503_is_well_formed() {
        let r = over_limit_response();
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("connection: close"));
    }

    #[test]
    fn log_limit_lets_one_line_a_second_through() {
        let limit = LogLimit::default();
        assert_eq!(limit.check(), Some(0));
        assert_eq!(limit.check(), None);
        assert_eq!(limit.check(), None);
        *limit.last.lock() = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(limit.check(), Some(2));
    }
}
