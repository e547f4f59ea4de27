//! Turning received notifications into signals, in order: inline in the
//! listener's task while it keeps up, on a second task during a burst.
//!
//! The listener's task reads the connection. Parsing a payload and running the
//! hub's inline handlers (the dispatcher, its strategies, the caches) costs about
//! as much again as reading it, so during a burst a task that did both would take
//! twice as long as the connection needs. [`Processor::deliver`] hands such
//! batches to a second task, which runs [`Publisher`] beside the reader on another core, while a
//! notification that arrives alone is still published right where it was read —
//! no hop, nothing added to the write → fresh-read latency.
//!
//! Order is kept: the reader publishes a batch itself only while the processor
//! has nothing queued or running, and before the reader reports anything else (a
//! gap, a health change) it [`finish`](Processor::finish)es the processor, which
//! publishes everything queued first.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgcachewatch_core::{GapReason, PayloadError, PayloadParser, SignalHub};
use sqlx::postgres::PgNotification;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::{MalformedPolicy, Settings};
use super::stats::{bump, Counters};

/// A batch this large goes to the processor even when it is idle (smaller ones
/// are published in place: a hop would cost them more than it saves).
const HAND_OFF_AT: usize = 16;
/// Batches queued for the processor before the reader waits for it (so memory
/// stays bounded and the connection is read no faster than events are applied).
const QUEUED_BATCHES: usize = 4;

/// Notifications read together, and when.
pub(crate) struct Batch {
    pub(crate) received_at: DateTime<Utc>,
    pub(crate) items: Vec<PgNotification>,
}

impl Batch {
    pub(crate) fn new() -> Batch {
        Batch {
            received_at: Utc::now(),
            items: Vec::new(),
        }
    }
}

/// Parses notifications and publishes their events into the hub.
pub(crate) struct Publisher {
    settings: Arc<Settings>,
    hub: SignalHub,
    counters: Arc<Counters>,
    /// Shares the channel and table names among the events it makes.
    parser: Mutex<PayloadParser>,
    log: Mutex<MalformedLog>,
}

impl Publisher {
    pub(crate) fn new(settings: Arc<Settings>, hub: SignalHub, counters: Arc<Counters>) -> Self {
        Publisher {
            settings,
            hub,
            counters,
            parser: Mutex::new(PayloadParser::new()),
            log: Mutex::new(MalformedLog::default()),
        }
    }

    /// Publishes one batch's events, in order.
    fn publish(&self, batch: &Batch) {
        let policy = self.settings.builder.on_malformed;
        let mut parser = self.parser.lock().unwrap_or_else(PoisonError::into_inner);
        for n in &batch.items {
            match parser.parse(n.channel(), n.payload(), batch.received_at) {
                Ok(event) => {
                    self.counters.event_received(batch.received_at);
                    self.hub.publish(event);
                }
                Err(error) => {
                    bump(&self.counters.malformed);
                    self.log
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .record(n.channel(), &error, policy);
                    if policy == MalformedPolicy::Gap {
                        self.gap(GapReason::MalformedPayload);
                    }
                }
            }
        }
    }

    /// Reports a gap (and counts it).
    pub(crate) fn gap(&self, reason: GapReason) {
        bump(&self.counters.gaps);
        self.hub.gap(reason);
    }

    /// When the source stops: logs the count of malformed payloads not yet logged.
    pub(crate) fn finish(&self) {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .finish();
    }
}

/// The second task of one session, started at its first burst.
pub(crate) struct Processor {
    publisher: Arc<Publisher>,
    running: Option<Running>,
}

struct Running {
    batches: mpsc::Sender<Batch>,
    /// Batches sent and not yet fully published.
    in_flight: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// The processor task is gone mid-session (it panicked): what it had not
/// published is lost.
#[derive(Debug)]
pub(crate) struct ProcessorLost;

impl Processor {
    pub(crate) fn new(publisher: Arc<Publisher>) -> Self {
        Processor {
            publisher,
            running: None,
        }
    }

    /// Publishes `batch`: in place if it is small and nothing is queued ahead
    /// of it, else through the processor task.
    pub(crate) async fn deliver(&mut self, batch: Batch) -> Result<(), ProcessorLost> {
        if batch.items.is_empty() {
            return Ok(());
        }
        let idle = self
            .running
            .as_ref()
            .is_none_or(|r| r.in_flight.load(Ordering::Acquire) == 0);
        if idle && batch.items.len() < HAND_OFF_AT {
            self.publisher.publish(&batch);
            return Ok(());
        }
        let publisher = &self.publisher;
        let running = self.running.get_or_insert_with(|| start(publisher.clone()));
        running.in_flight.fetch_add(1, Ordering::AcqRel);
        running.batches.send(batch).await.map_err(|_| ProcessorLost)
    }

    /// Waits until everything handed over is published and stops the task, so
    /// that what the reader reports next comes after it.
    pub(crate) async fn finish(&mut self) -> Result<(), ProcessorLost> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        drop(running.batches);
        running.task.await.map_err(|e| {
            tracing::error!(error = %e, "the listener's event processing task failed");
            ProcessorLost
        })
    }
}

fn start(publisher: Arc<Publisher>) -> Running {
    let (tx, mut rx) = mpsc::channel::<Batch>(QUEUED_BATCHES);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let counted = in_flight.clone();
    let task = tokio::spawn(async move {
        while let Some(batch) = rx.recv().await {
            publisher.publish(&batch);
            counted.fetch_sub(1, Ordering::AcqRel);
        }
    });
    Running {
        batches: tx,
        in_flight,
        task,
    }
}

/// Logs malformed payloads at most once a second, with how many were not logged.
#[derive(Default)]
struct MalformedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl MalformedLog {
    fn record(&mut self, channel: &str, error: &PayloadError, policy: MalformedPolicy) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            channel,
            %error,
            ?policy,
            suppressed_since_last_warning = self.suppressed,
            "payload on a watched channel is not an event"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }

    /// When the source stops: the count of those never logged, if any.
    fn finish(&mut self) {
        if self.suppressed > 0 {
            tracing::warn!(
                suppressed_since_last_warning = self.suppressed,
                "more payloads on watched channels were not events (not logged one by one)"
            );
            self.suppressed = 0;
        }
    }
}
