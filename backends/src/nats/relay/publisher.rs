//! Publishing with acknowledgements in order, and republishing on failure.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use pgcachewatch_core::Lsn;

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

/// One message to publish, and what its acknowledgement completes.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    pub(super) subject: String,
    pub(super) msg_id: String,
    pub(super) payload: Bytes,
    /// Confirm this position upstream once acknowledged.
    pub(super) confirm: Option<Lsn>,
    /// For events: when the source received it (lag).
    pub(super) received_at: Option<DateTime<Utc>>,
}

/// Messages published and awaiting their acknowledgement, oldest first.
pub(super) struct InFlight {
    js: Context,
    queue: VecDeque<(Outgoing, Option<AckFuture>)>,
}

/// What became of the oldest message.
pub(super) enum Acked {
    Ok(Outgoing, PublishAck),
    Failed(Outgoing, String),
}

impl InFlight {
    pub(super) fn new(js: Context) -> Self {
        InFlight {
            js,
            queue: VecDeque::new(),
        }
    }

    pub(super) fn js(&self) -> Context {
        self.js.clone()
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    async fn send(js: &Context, out: &Outgoing) -> Result<AckFuture, PublishError> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, out.msg_id.as_str());
        let ack = js
            .publish_with_headers(out.subject.clone(), headers, out.payload.clone())
            .await?;
        Ok(std::future::IntoFuture::into_future(ack))
    }

    /// Publishes `out`; its acknowledgement is awaited by [`poll_front`](Self::poll_front).
    pub(super) async fn push(&mut self, out: Outgoing) {
        let ack = match Self::send(&self.js, &out).await {
            Ok(ack) => Some(ack),
            Err(e) => {
                tracing::debug!(error = %e, "publish failed; will publish again");
                None
            }
        };
        self.queue.push_back((out, ack));
    }

    /// The oldest message's fate; pending while the queue is empty.
    pub(super) fn poll_front(&mut self, cx: &mut TaskContext<'_>) -> Poll<Acked> {
        let Some((_, ack)) = self.queue.front_mut() else {
            return Poll::Pending;
        };
        let result = match ack {
            None => Err("not sent".to_owned()),
            Some(fut) => match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => r.map_err(|e| e.to_string()),
            },
        };
        let Some((out, _)) = self.queue.pop_front() else {
            return Poll::Pending;
        };
        Poll::Ready(match result {
            Ok(ack) => Acked::Ok(out, ack),
            Err(e) => Acked::Failed(out, e),
        })
    }

    /// Publishes `out` again, with the same message id, until JetStream
    /// acknowledges it; `None` if `stop` says so first.
    pub(super) async fn republish(
        js: Context,
        out: &Outgoing,
        stop: &mut tokio::sync::watch::Receiver<bool>,
        mut on_retry: impl FnMut(),
    ) -> Option<PublishAck> {
        let mut backoff = Duration::from_millis(50);
        loop {
            on_retry();
            let attempt = async {
                let ack = Self::send(&js, out).await.map_err(|e| e.to_string())?;
                ack.await.map_err(|e| e.to_string())
            };
            tokio::select! {
                r = attempt => match r {
                    Ok(ack) => return Some(ack),
                    Err(e) => tracing::warn!(error = %e, subject = %out.subject, "JetStream did not acknowledge; publishing again"),
                },
                _ = stop.wait_for(|s| *s) => return None,
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return None,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
