//! Counters of a running [`PgListenerSource`](super::PgListenerSource).

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// A snapshot of a listener's counters, from
/// [`PgListenerSource::stats`](super::PgListenerSource::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerStats {
    /// Events parsed and published.
    pub events: u64,
    /// Payloads on a watched channel that were not events (foreign or malformed).
    pub malformed: u64,
    /// Successful reconnections after a lost connection or a heartbeat timeout.
    pub reconnects: u64,
    /// Gaps this source emitted (lost connection, heartbeat timeout, reconnected,
    /// malformed payload under [`MalformedPolicy::Gap`](super::MalformedPolicy::Gap)).
    /// Per-subscriber `Lagged` gaps are not counted here.
    pub gaps: u64,
    /// Heartbeats that went unanswered within the timeout.
    pub heartbeat_timeouts: u64,
    /// Heartbeats answered.
    pub heartbeats: u64,
    /// Times the notification path stalled while the connection stayed alive: a
    /// heartbeat could not commit (it waited for the NOTIFY commit lock) or did
    /// not come back in time, yet the listening connection answered a round
    /// trip. A transaction that sent notifications was committing and not yet
    /// visible (a commit waiting for a synchronous standby, for example); nothing
    /// is lost, and the source stays healthy. Counted once per stall, however long
    /// it lasts; the stall ends when a heartbeat comes back.
    pub queue_stalls: u64,
    /// When the last event was received.
    pub last_event_at: Option<DateTime<Utc>>,
    /// Round-trip time of the last answered heartbeat (NOTIFY sent → received).
    pub last_heartbeat_rtt: Option<Duration>,
    /// `pg_backend_pid()` of the current listening connection; `None` while disconnected.
    pub backend_pid: Option<u32>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) events: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) heartbeat_timeouts: AtomicU64,
    pub(crate) heartbeats: AtomicU64,
    pub(crate) queue_stalls: AtomicU64,
    /// 0 = none.
    backend_pid: AtomicU32,
    /// Nanoseconds + 1; 0 = none.
    last_heartbeat_rtt: AtomicU64,
    /// Nanoseconds since the Unix epoch; 0 = none. An atomic, not a
    /// lock: it is written once per event.
    last_event_at: AtomicI64,
    /// The source's series (feature `metrics`).
    #[cfg(feature = "metrics")]
    pub(crate) metrics: Option<crate::telemetry::SourceMetrics>,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// Counters of the source labelled `source` (its series, with `metrics`).
    #[cfg_attr(
        not(feature = "metrics"),
        allow(unused_variables, clippy::needless_update)
    )]
    pub(crate) fn for_source(source: &str) -> Self {
        Counters {
            #[cfg(feature = "metrics")]
            metrics: Some(crate::telemetry::SourceMetrics::new(source)),
            ..Counters::default()
        }
    }

    pub(crate) fn set_backend_pid(&self, pid: Option<u32>) {
        self.backend_pid.store(pid.unwrap_or(0), Ordering::Relaxed);
    }

    pub(crate) fn reconnected(&self) {
        bump(&self.reconnects);
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metrics {
            m.reconnects.increment(1);
        }
    }

    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn queue_usage(&self, usage: f64) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metrics {
            m.queue_usage.set(usage);
        }
    }

    pub(crate) fn set_heartbeat_rtt(&self, rtt: Duration) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metrics {
            m.heartbeat_rtt.record(rtt.as_secs_f64());
        }
        let nanos = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX - 1);
        self.last_heartbeat_rtt
            .store(nanos.saturating_add(1), Ordering::Relaxed);
    }

    /// Counts `n` events received at `at` (once per batch, not per event).
    pub(crate) fn events_received(&self, n: u64, at: DateTime<Utc>) {
        if n == 0 {
            return;
        }
        self.events.fetch_add(n, Ordering::Relaxed);
        let nanos = at.timestamp_nanos_opt().unwrap_or(i64::MAX);
        self.last_event_at.store(nanos, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ListenerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let pid = self.backend_pid.load(Ordering::Relaxed);
        let rtt = get(&self.last_heartbeat_rtt);
        ListenerStats {
            events: get(&self.events),
            malformed: get(&self.malformed),
            reconnects: get(&self.reconnects),
            gaps: get(&self.gaps),
            heartbeat_timeouts: get(&self.heartbeat_timeouts),
            heartbeats: get(&self.heartbeats),
            queue_stalls: get(&self.queue_stalls),
            last_event_at: match self.last_event_at.load(Ordering::Relaxed) {
                0 => None,
                nanos => Some(DateTime::from_timestamp_nanos(nanos)),
            },
            last_heartbeat_rtt: (rtt > 0).then(|| Duration::from_nanos(rtt - 1)),
            backend_pid: (pid > 0).then_some(pid),
        }
    }
}
