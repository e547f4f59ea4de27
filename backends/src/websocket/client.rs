//! One connected client: forwards its buffer to the socket, answers pings,
//! and closes with a reason when the hub says so.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt};

use super::hub::{Hub, Registration};
use super::Close;

/// How the client's session ended.
enum End {
    /// The server closes it, with this code and reason.
    Server(Close),
    /// The client left (close frame, or the connection broke).
    ClientLeft,
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
        mut close,
    } = reg;
    tracing::debug!(client = id, %channel, "WebSocket client connected");
    let (mut sink, mut stream) = socket.split();
    let end = loop {
        tokio::select! {
            biased;
            c = &mut close => break End::Server(c.unwrap_or_else(|_| Close::shutdown("the server is shutting down"))),
            text = rx.recv() => {
                let Some(text) = text else {
                    // Dropped by the hub without a reason: it is stopping.
                    break End::Server(Close::shutdown("the server is shutting down"));
                };
                // A client that stops reading blocks this send; the hub then
                // fills its buffer and tells us to close.
                tokio::select! {
                    biased;
                    c = &mut close => break End::Server(c.unwrap_or_else(|_| Close::shutdown("the server is shutting down"))),
                    sent = sink.send(Message::Text(text)) => if sent.is_err() {
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
                        c = &mut close => break End::Server(c.unwrap_or_else(|_| Close::shutdown("the server is shutting down"))),
                        flushed = sink.flush() => if flushed.is_err() {
                            break End::ClientLeft;
                        },
                    }
                }
            },
        }
    };
    hub.unregister(&channel, id);
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
