//! One connected client: forwards its channel's messages to the socket (what
//! is ready, a batch per flush), answers pings, and closes with a reason when
//! the hub says so or when it finds itself too far behind.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::hub::{Hub, Registration};
use super::Close;

/// Messages written to the socket before one flush (one system call for a
/// burst's worth instead of one per message).
const WRITE_BATCH: usize = 64;

/// How the client's session ended.
enum End {
    /// The server closes it, with this code and reason.
    Server(Close),
    /// The client left (close frame, or the connection broke).
    ClientLeft,
}

fn stopping() -> Close {
    Close::shutdown("the server is shutting down")
}

pub(super) async fn serve(
    socket: WebSocket,
    hub: Arc<Hub>,
    channel: String,
    reg: Registration,
    close_timeout: Duration,
) {
    let Registration {
        id,
        mut rx,
        taken,
        mut close,
        guard,
    } = reg;
    tracing::debug!(client = id, %channel, "WebSocket client connected");
    let (mut sink, mut stream) = socket.split();
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let end = loop {
        tokio::select! {
            biased;
            c = &mut close => break End::Server(c.unwrap_or_else(|_| stopping())),
            first = rx.recv() => {
                match first {
                    Ok(text) => batch.push(text),
                    Err(RecvError::Lagged(_)) => break End::Server(hub.fell_behind(&channel, id)),
                    // The hub dropped the channel: it is closing every client.
                    Err(RecvError::Closed) => break End::Server(stopping()),
                }
                let mut lagged = false;
                while batch.len() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(text) => batch.push(text),
                        Err(TryRecvError::Lagged(_)) => {
                            lagged = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                taken.fetch_add(batch.len() as u64, Ordering::Release);
                hub.sent(batch.len());
                if lagged {
                    break End::Server(hub.fell_behind(&channel, id));
                }
                // A client that stops reading blocks this write; the pump then
                // sees it fall behind and tells us to close.
                let write = async {
                    for text in batch.drain(..) {
                        sink.feed(Message::Text(text)).await?;
                    }
                    sink.flush().await
                };
                tokio::select! {
                    biased;
                    c = &mut close => break End::Server(c.unwrap_or_else(|_| stopping())),
                    written = write => if written.is_err() {
                        break End::ClientLeft;
                    },
                }
            }
            // Reading also answers pings (the pong goes out with the next write
            // or flush); anything the client sends is ignored, as PGCacheWatch's
            // distributor ignores it.
            incoming = stream.next() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break End::ClientLeft,
                Some(Ok(_)) => {
                    tokio::select! {
                        biased;
                        c = &mut close => break End::Server(c.unwrap_or_else(|_| stopping())),
                        flushed = sink.flush() => if flushed.is_err() {
                            break End::ClientLeft;
                        },
                    }
                }
            },
        }
    };
    // Unregistered now; the connection's slot is given back when the socket
    // is dropped, after the closing handshake.
    drop(guard);
    drop(rx);
    match end {
        End::ClientLeft => tracing::debug!(client = id, %channel, "WebSocket client left"),
        End::Server(c) => {
            tracing::info!(client = id, %channel, code = c.code, reason = %c.reason, "closing a WebSocket client");
            let frame = CloseFrame {
                code: c.code,
                reason: c.reason.as_str().into(),
            };
            // The close frame waits behind whatever the client has not read:
            // give it `close_timeout` to read up to it and answer, then drop.
            let handshake = async {
                sink.send(Message::Close(Some(frame))).await.ok()?;
                while let Some(Ok(m)) = stream.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
                Some(())
            };
            if tokio::time::timeout(close_timeout, handshake)
                .await
                .is_err()
            {
                tracing::debug!(
                    client = id,
                    "the client did not complete the closing handshake in time"
                );
            }
        }
    }
}
