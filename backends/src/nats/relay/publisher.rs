//! Publishing with acknowledgements awaited in order, and publishing again, in
//! order, after a failure.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
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
    /// Once acknowledged (after everything before it), every event up to
    /// this position is stored: a commit is complete when a later position
    /// or the source's progress followed it.
    pub(super) stores: Option<Lsn>,
    /// A progress record: once acknowledged, the stream says that every event
    /// up to this position is stored, and it may be confirmed upstream.
    pub(super) records: Option<Lsn>,
    /// For events: when the source received it (lag).
    pub(super) received_at: Option<DateTime<Utc>>,
    /// A heartbeat or a progress record: once it is stored, the one before
    /// of its kind is deleted (the stream keeps the latest).
    pub(super) supersedes: Option<Control>,
}

/// The relay's messages of which the stream keeps only the latest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Control {
    Heartbeat = 0,
    Progress = 1,
}

/// Messages published and awaiting their acknowledgement, oldest first.
pub(super) struct InFlight {
    js: Context,
    /// Each message with its acknowledgement to come (`None`: not sent, or
    /// its acknowledgement failed; sent again by [`InFlight::resend_all`]).
    queue: VecDeque<(Outgoing, Option<AckFuture>)>,
}

/// What became of the oldest message.
pub(super) enum Acked {
    /// JetStream stored it (or already had it: `duplicate`); it left the queue.
    Ok(Outgoing, PublishAck),
    /// It was not acknowledged. It stays first in the queue, and the messages
    /// after it may or may not have been stored.
    Failed(Failure),
}

/// Why the oldest message was not acknowledged.
#[derive(Debug)]
pub(super) struct Failure {
    /// Its subject.
    pub(super) subject: String,
    /// What the client said.
    pub(super) error: String,
    /// Nobody answered the publish ("no responders"): either no stream
    /// captures the subject (it is gone), or the stream's leader is being
    /// elected (a cluster node died). Not a verdict: the relay asks.
    pub(super) no_responders: bool,
    /// No acknowledgement came in time: JetStream is slow, or the connection
    /// is silently cut.
    pub(super) timed_out: bool,
}

impl InFlight {
    pub(super) fn new(js: Context) -> Self {
        InFlight {
            js,
            queue: VecDeque::new(),
        }
    }

    pub(super) fn js(&self) -> &Context {
        &self.js
    }

    /// Publishes through `js` from now on (a new connection); what is queued
    /// is published again by [`resend_all`](Self::resend_all).
    pub(super) fn set_js(&mut self, js: Context) {
        self.js = js;
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    async fn send(js: &Context, out: &Outgoing) -> Option<AckFuture> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, out.msg_id.as_str());
        if out.supersedes == Some(Control::Heartbeat) {
            // When it was sent: a heartbeat stored late (a partition held it,
            // TCP delivered it after healing) is judged by this, not by when
            // JetStream stored it, so an old "healthy" is not taken for news.
            let now_ms = chrono::Utc::now().timestamp_millis().to_string();
            headers.insert(crate::nats::wire::SENT_AT_HEADER, now_ms.as_str());
        }
        match js
            .publish_with_headers(out.subject.clone(), headers, out.payload.clone())
            .await
        {
            Ok(ack) => Some(Box::pin(std::future::IntoFuture::into_future(ack))),
            Err(e) => {
                tracing::debug!(error = %e, subject = %out.subject, "publish failed; will publish again");
                None
            }
        }
    }

    /// Publishes `out` after everything queued; its acknowledgement is awaited
    /// by [`poll_front`](Self::poll_front).
    pub(super) async fn push(&mut self, out: Outgoing) {
        let ack = Self::send(&self.js, &out).await;
        self.queue.push_back((out, ack));
    }

    /// The oldest message's fate; pending while the queue is empty. A failed
    /// message stays first: [`resend_all`](Self::resend_all) publishes it again.
    pub(super) fn poll_front(&mut self, cx: &mut TaskContext<'_>) -> Poll<Acked> {
        let Some((out, ack)) = self.queue.front_mut() else {
            return Poll::Pending;
        };
        let result = match ack {
            None => Err(Failure {
                subject: out.subject.clone(),
                error: "not sent".to_owned(),
                no_responders: false,
                timed_out: false,
            }),
            Some(fut) => match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(ack)) => Ok(ack),
                Poll::Ready(Err(e)) => Err(Failure {
                    subject: out.subject.clone(),
                    no_responders: e.kind() == PublishErrorKind::StreamNotFound,
                    timed_out: e.kind() == PublishErrorKind::TimedOut,
                    error: e.to_string(),
                }),
            },
        };
        match result {
            Ok(ack) => match self.queue.pop_front() {
                Some((out, _)) => Poll::Ready(Acked::Ok(out, ack)),
                None => Poll::Pending,
            },
            Err(failure) => {
                *ack = None;
                Poll::Ready(Acked::Failed(failure))
            }
        }
    }

    /// Publishes every queued message again, oldest first, with the same
    /// message ids, forgetting the acknowledgements still awaited. After a
    /// failed acknowledgement each later message may have been stored or not:
    /// JetStream drops the copies of those it has (same id, within its
    /// duplicate window) and stores the rest in the relay's order, after what
    /// it already holds. Nothing after a failure is left out; a message can
    /// land after later ones (late), never go missing.
    pub(super) async fn resend_all(&mut self) {
        for (out, ack) in self.queue.iter_mut() {
            *ack = Self::send(&self.js, out).await;
        }
    }

    /// Replaces the payload of every queued message of `kind`.
    pub(super) fn restamp(&mut self, kind: Control, payload: &Bytes) {
        for (out, _) in self.queue.iter_mut() {
            if out.supersedes == Some(kind) {
                out.payload = payload.clone();
            }
        }
    }

    /// Makes the last queued message's acknowledgement store `lsn` too;
    /// false if nothing is queued.
    pub(super) fn stores_after_last(&mut self, lsn: Lsn) -> bool {
        match self.queue.back_mut() {
            Some((out, _)) => {
                out.stores = out.stores.max(Some(lsn));
                true
            }
            None => false,
        }
    }

    /// Takes every queued message out (their stream is gone).
    pub(super) fn clear(&mut self) -> usize {
        let n = self.queue.len();
        self.queue.clear();
        n
    }
}
