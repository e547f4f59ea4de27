//! The server's own copy of its source's signals: a queue the source fills as
//! it emits and the pump empties a batch at a time.
//!
//! A subscription would make the server one more subscriber of the source's
//! hub, with the hub's buffer (4,096 signals by default): a burst larger than
//! that, emitted faster than the pump serializes it, is a `Lagged` gap — and
//! since PGCacheWatch's protocol cannot say "events were lost", a gap closes
//! every client. So the server attaches *inline* instead: the source's own task
//! appends each signal (one more reference to its event) to this queue as it
//! emits it, and the pump takes everything queued at once. The feed can only
//! fall behind if the pump does not run while [`feed_buffer`] events pile up;
//! then it drops events (never health changes or gaps), counts them, and the
//! pump closes every client: events were really lost, by the server itself.
//!
//! A source that offers no inline attachment is read through a subscription
//! by a small task that fills the same queue; its gaps (`Lagged` included)
//! come through as gaps.
//!
//! [`feed_buffer`]: super::WsServerBuilder::feed_buffer

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use pgcachewatch_core::{EventSource, InlineAttachment, Signal, Subscription};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The queue between the source and the pump.
#[derive(Debug)]
pub(super) struct Feed {
    queue: Mutex<Queue>,
    ready: Notify,
    /// Events queued at most; health changes and gaps are always queued.
    capacity: usize,
}

#[derive(Debug, Default)]
struct Queue {
    signals: VecDeque<Signal>,
    /// Events dropped because `capacity` were queued, since the pump last took.
    lost: u64,
    /// The source ended (the handler was dropped, or the subscription ended).
    ended: bool,
}

/// What the pump took from the feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Taken {
    /// Events dropped before the pump could take them.
    pub(super) lost: u64,
    /// The source ended after the signals taken.
    pub(super) ended: bool,
}

impl Feed {
    fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Feed {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            capacity,
        })
    }

    /// Appends `signal`; called by the source's task as it emits, so it only
    /// takes a lock, never waits.
    fn push(&self, signal: &Signal) {
        let was_empty = {
            let mut q = self.queue.lock();
            if matches!(signal, Signal::Event(_)) && q.signals.len() >= self.capacity {
                q.lost += 1;
                return;
            }
            let was_empty = q.signals.is_empty();
            q.signals.push_back(signal.clone());
            was_empty
        };
        // The pump empties the queue whenever it takes: a non-empty queue
        // already has a wake-up on its way.
        if was_empty {
            self.ready.notify_one();
        }
    }

    fn end(&self) {
        self.queue.lock().ended = true;
        self.ready.notify_one();
    }

    /// Waits until something is queued (or the source ended).
    pub(super) async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Moves everything queued into `into` (which must be empty; its buffer
    /// becomes the queue's).
    pub(super) fn take(&self, into: &mut VecDeque<Signal>) -> Taken {
        debug_assert!(into.is_empty());
        let mut q = self.queue.lock();
        std::mem::swap(&mut q.signals, into);
        Taken {
            lost: std::mem::take(&mut q.lost),
            ended: q.ended,
        }
    }
}

/// Fills a [`Feed`]; when it is dropped (the source dropped its inline
/// handler: the source ended) the feed says so.
struct Writer(Arc<Feed>);

impl Drop for Writer {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Keeps the feed filled: the inline attachment, or the task reading a
/// subscription (aborted when this is dropped).
#[derive(Debug)]
pub(super) enum Input {
    Inline { _attachment: InlineAttachment },
    Subscribed(JoinHandle<()>),
}

impl Drop for Input {
    fn drop(&mut self) {
        if let Input::Subscribed(task) = self {
            task.abort();
        }
    }
}

/// Connects a feed of `capacity` events to `source`: inline when the source
/// offers it, else through a subscription read by a task of its own.
pub(super) fn attach<S: EventSource + ?Sized>(source: &S, capacity: usize) -> (Arc<Feed>, Input) {
    let feed = Feed::new(capacity);
    let writer = Writer(feed.clone());
    if let Some(attachment) = source.attach_inline(Box::new(move |signal: &Signal| {
        writer.0.push(signal);
    })) {
        tracing::debug!("the WebSocket server reads its source inline");
        return (
            feed,
            Input::Inline {
                _attachment: attachment,
            },
        );
    }
    // Refused: the handler (and its writer, which marked that feed ended) was
    // dropped. A new feed, filled from a subscription.
    tracing::debug!(
        "the source offers no inline attachment: the WebSocket server subscribes (a burst \
         larger than the source's buffer is then a gap)"
    );
    let feed = Feed::new(capacity);
    let task = tokio::spawn(forward(source.subscribe(), Writer(feed.clone())));
    (feed, Input::Subscribed(task))
}

async fn forward(mut sub: Subscription, writer: Writer) {
    while let Some(signal) = sub.recv().await {
        writer.0.push(&signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgcachewatch_core::{Event, GapReason, Health, Operation, SignalHub};

    fn event(i: i64) -> Signal {
        Signal::Event(Arc::new(
            Event::new("ch", Operation::Insert, "public", "t").with_txid(i),
        ))
    }

    #[tokio::test]
    async fn inline_feed_takes_a_burst_larger_than_the_hub_and_drops_only_events_beyond_its_capacity(
    ) {
        let hub = SignalHub::new(4);
        let (feed, input) = attach(&hub, 100);
        assert!(matches!(input, Input::Inline { .. }));
        let burst: Vec<Signal> = (0..100).map(event).collect();
        hub.send_batch(&burst);
        hub.send_batch(&[event(100), Signal::Gap(GapReason::Reconnected), event(101)]);
        hub.set_health(Health::Unhealthy);
        feed.ready().await;
        let mut taken = VecDeque::new();
        let t = feed.take(&mut taken);
        // The health it started with and 99 events fill the 100 places; the
        // gap and the health change are queued all the same; three events are
        // dropped (the burst's last, and the two around the gap).
        assert_eq!(
            t,
            Taken {
                lost: 3,
                ended: false
            }
        );
        assert_eq!(taken.len(), 102);
        assert!(matches!(taken[0], Signal::Health(Health::Healthy)));
        assert!(taken[100].is_gap());
        assert!(matches!(taken[101], Signal::Health(Health::Unhealthy)));

        // The source ending is told, too.
        taken.clear();
        drop(hub);
        feed.ready().await;
        assert_eq!(
            feed.take(&mut taken),
            Taken {
                lost: 0,
                ended: true
            }
        );
        drop(input);
    }
}
