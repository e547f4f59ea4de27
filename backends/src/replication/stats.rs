//! Counters of a running [`PgReplicationSource`](super::PgReplicationSource).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use pgcachewatch_core::Lsn;

/// A snapshot of a replication source's counters, from
/// [`PgReplicationSource::stats`](super::PgReplicationSource::stats).
///
/// ```no_run
/// # async fn run(source: pgcachewatch_backends::replication::PgReplicationSource) {
/// let s = source.stats();
/// println!("{} events, confirmed {:?}, {:?} bytes behind", s.events, s.confirmed_lsn, s.lag_bytes);
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicationStats {
    /// Events published (one per table and operation of a transaction).
    pub events: u64,
    /// Transactions committed and published (including those with no event).
    pub transactions: u64,
    /// Transactions replayed after a reconnect and skipped: already published.
    pub skipped_transactions: u64,
    /// Tables degraded to a table-level event by the key cap.
    pub degraded_tables: u64,
    /// Successful reconnections.
    pub reconnects: u64,
    /// Gaps this source emitted (slot lost, unreadable data). Per-subscriber
    /// `Lagged` gaps are not counted here.
    pub gaps: u64,
    /// Everything committed before this position has been published.
    pub emitted_lsn: Option<Lsn>,
    /// The position confirmed to the server (the slot may free WAL before it).
    pub confirmed_lsn: Option<Lsn>,
    /// The newest server WAL position seen (IDENTIFY_SYSTEM, keepalives).
    pub server_lsn: Option<Lsn>,
    /// `server_lsn - confirmed_lsn`: WAL the slot still retains for this source,
    /// at least.
    pub lag_bytes: Option<u64>,
    /// The last connection or slot error, until the next successful connect.
    pub last_error: Option<String>,
    /// The walsender's `pg_backend_pid()`; `None` while disconnected.
    pub backend_pid: Option<u32>,
    /// When the last event was published.
    pub last_event_at: Option<DateTime<Utc>>,
    /// Snapshots taken on the side connection to see whether streamed commits
    /// are visible to other sessions yet (one per batch of commits).
    pub visibility_checks: u64,
    /// Times a streamed commit was not visible yet and was held back (the
    /// committing backend had not left the proc array, e.g. a synchronous
    /// standby had not answered). Nothing later is announced meanwhile.
    pub visibility_waits: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) events: AtomicU64,
    pub(crate) transactions: AtomicU64,
    pub(crate) skipped_transactions: AtomicU64,
    pub(crate) degraded_tables: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) gaps: AtomicU64,
    /// 0 = none, as for the positions below.
    pub(crate) emitted: AtomicU64,
    pub(crate) confirmed: AtomicU64,
    pub(crate) server: AtomicU64,
    pub(crate) visibility_checks: AtomicU64,
    pub(crate) visibility_waits: AtomicU64,
    backend_pid: AtomicU32,
    last_error: Mutex<Option<String>>,
    last_event_at: Mutex<Option<DateTime<Utc>>>,
    /// The source's series (feature `metrics`).
    #[cfg(feature = "metrics")]
    pub(crate) metrics: Option<crate::telemetry::SourceMetrics>,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn raise(position: &AtomicU64, lsn: Lsn) {
    position.fetch_max(lsn.0, Ordering::AcqRel);
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

    /// After the server or the confirmed position moved: sets the slot lag gauge
    /// (feature `metrics`; nothing otherwise).
    #[inline]
    pub(crate) fn positions_moved(&self) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metrics {
            let server = self.server.load(Ordering::Acquire);
            if server > 0 {
                let confirmed = self.confirmed.load(Ordering::Acquire);
                m.slot_lag.set(server.saturating_sub(confirmed) as f64);
            }
        }
    }

    pub(crate) fn set_last_error(&self, error: Option<String>) {
        *self.last_error.lock() = error;
    }

    pub(crate) fn event_published(&self, at: DateTime<Utc>) {
        bump(&self.events);
        *self.last_event_at.lock() = Some(at);
    }

    pub(crate) fn snapshot(&self) -> ReplicationStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let lsn = |c: &AtomicU64| Some(Lsn(c.load(Ordering::Acquire))).filter(|l| l.0 > 0);
        let pid = self.backend_pid.load(Ordering::Relaxed);
        let confirmed = lsn(&self.confirmed);
        let server = lsn(&self.server);
        ReplicationStats {
            events: get(&self.events),
            transactions: get(&self.transactions),
            skipped_transactions: get(&self.skipped_transactions),
            degraded_tables: get(&self.degraded_tables),
            reconnects: get(&self.reconnects),
            gaps: get(&self.gaps),
            emitted_lsn: lsn(&self.emitted),
            confirmed_lsn: confirmed,
            server_lsn: server,
            lag_bytes: server.map(|s| s.0.saturating_sub(confirmed.map_or(0, |c| c.0))),
            last_error: self.last_error.lock().clone(),
            backend_pid: (pid > 0).then_some(pid),
            last_event_at: *self.last_event_at.lock(),
            visibility_checks: get(&self.visibility_checks),
            visibility_waits: get(&self.visibility_waits),
        }
    }
}
