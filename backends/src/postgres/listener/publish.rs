//! Turning received notifications into signals, in order, in the listener's
//! own task.
//!
//! The listener's task reads what the connection has ready (a single
//! notification, or up to a batch of a burst) and [`Publisher::publish`]es it
//! right there: each payload parsed (with one [`PayloadParser`] per source, so a
//! burst's events share their names), then the batch emitted into the hub under
//! one lock, running the inline handlers (the dispatcher, its strategies, the
//! caches). The hub lends the batch's events to its handlers and subscribers
//! ([`SignalHub::send_batch`]), and those nobody kept are given back to the
//! parser, which writes the next events into them: a burst allocates no events.
//! No queue and no second task: measured on two cores, handing bursts
//! to a second task cost more processor time than it saved (the notifications
//! cross cores) and finished a 200,000-notification burst later.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgcachewatch_core::{GapReason, PayloadError, PayloadParser, Signal, SignalHub};
use sqlx::postgres::PgNotification;
use tokio::time::Instant;

use super::config::{MalformedPolicy, Settings};
use super::stats::{bump, Counters};

/// Notifications read together, and when. One per session, refilled for each
/// read (its buffer kept, so a burst's batches allocate nothing).
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

    /// Empties it for a read that starts now.
    pub(crate) fn restart(&mut self) {
        self.received_at = Utc::now();
        self.items.clear();
    }
}

/// Parses notifications and publishes their events into the hub.
pub(crate) struct Publisher {
    settings: Arc<Settings>,
    hub: SignalHub,
    counters: Arc<Counters>,
    /// Shares the channel and table names among the events it makes.
    parser: PayloadParser,
    log: MalformedLog,
    /// A batch's signals, emitted together (the buffer is kept between batches).
    signals: Vec<Signal>,
}

impl Publisher {
    pub(crate) fn new(settings: Arc<Settings>, hub: SignalHub, counters: Arc<Counters>) -> Self {
        Publisher {
            settings,
            hub,
            counters,
            parser: PayloadParser::new(),
            log: MalformedLog::default(),
            signals: Vec::new(),
        }
    }

    /// Publishes one batch's events, in order: parsed first, counted, then
    /// emitted into the hub together (one emission lock for the batch).
    pub(crate) fn publish(&mut self, batch: &Batch) {
        if batch.items.is_empty() {
            return;
        }
        let policy = self.settings.builder.on_malformed;
        let signals = &mut self.signals;
        let mut events = 0;
        for n in &batch.items {
            match self
                .parser
                .parse_shared(n.channel(), n.payload(), batch.received_at)
            {
                Ok(event) => {
                    events += 1;
                    signals.push(Signal::Event(event));
                }
                Err(error) => {
                    bump(&self.counters.malformed);
                    self.log.record(n.channel(), &error, policy);
                    if policy == MalformedPolicy::Gap {
                        bump(&self.counters.gaps);
                        signals.push(Signal::Gap(GapReason::MalformedPayload));
                    }
                }
            }
        }
        self.counters.events_received(events, batch.received_at);
        self.hub.send_batch(signals);
        // The events nobody kept (no subscriber, no handler held on) are
        // written over by the next batch instead of freed and allocated again.
        for signal in signals.drain(..) {
            if let Signal::Event(event) = signal {
                self.parser.recycle(event);
            }
        }
    }

    /// Reports a gap (and counts it).
    pub(crate) fn gap(&self, reason: GapReason) {
        bump(&self.counters.gaps);
        self.hub.gap(reason);
    }

    /// When the source stops: logs the count of malformed payloads not yet logged.
    pub(crate) fn finish(&mut self) {
        self.log.finish();
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
