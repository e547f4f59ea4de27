//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`): the names of every series pgcachewatch emits, and the handles
//! caches and sources keep.
//!
//! The library only emits; the application picks the exporter (say,
//! `metrics-exporter-prometheus`) and installs it as the global recorder.
//! Handles are registered when a cache, a source or a dispatcher is built, so
//! **install the recorder before building them**: a cache built earlier reports
//! to the recorder that was current then (none: its series are lost).
//!
//! | series | type | labels | what |
//! |---|---|---|---|
//! | [`pgcachewatch_cache_hits_total`](CACHE_HITS) | counter | `cache` | reads answered from the cache (exported in batches, see below) |
//! | [`pgcachewatch_cache_misses_total`](CACHE_MISSES) | counter | `cache` | reads that found no fresh entry |
//! | [`pgcachewatch_cache_loads_total`](CACHE_LOADS) | counter | `cache` | loader runs (single-flight: one per key and miss burst) |
//! | [`pgcachewatch_cache_load_errors_total`](CACHE_LOAD_ERRORS) | counter | `cache` | loader runs that failed (nothing cached) |
//! | [`pgcachewatch_cache_load_duration_seconds`](CACHE_LOAD_DURATION) | histogram | `cache` | how long loader runs took, failed ones included |
//! | [`pgcachewatch_cache_discarded_loads_total`](CACHE_DISCARDED_LOADS) | counter | `cache` | loads not stored: an invalidation arrived while they ran |
//! | [`pgcachewatch_cache_invalidations_total`](CACHE_INVALIDATIONS) | counter | `cache`, `kind` | `key` (one key dropped), `table` (table invalidations), `all` (flushes: gaps, attach, `Decision::All`), `expired` (reads that found their entry past its time-to-live or -idle) |
//! | [`pgcachewatch_cache_bypasses_total`](CACHE_BYPASSES) | counter | `cache` | reads that went to the loader because the source was unhealthy |
//! | [`pgcachewatch_cache_entries`](CACHE_ENTRIES) | gauge | `cache` | entries held, set on every store, removal and `stats()` |
//! | [`pgcachewatch_cache_refreshes_total`](CACHE_REFRESHES) | counter | `cache`, `kind` | background reloads ([`Refresh`](crate::Refresh)): `started`, `served` (stored), `discarded` (an invalidation arrived while it ran), `failed` (refresher error or panic, dropped), `skipped` (at `max_concurrent`, or no runtime) |
//! | [`pgcachewatch_cache_warm_loads_total`](CACHE_WARM_LOADS) | counter | `cache` | refreshes started by warming after a flush |
//! | [`pgcachewatch_cache_stale_served_total`](CACHE_STALE_SERVED) | counter | `cache` | reads answered with a key's previous value while its refresh ran ([`serve_stale_within`](crate::CacheBuilder::serve_stale_within)) |
//! | [`pgcachewatch_source_events_total`](SOURCE_EVENTS) | counter | `source` | events the source emitted |
//! | [`pgcachewatch_source_gaps_total`](SOURCE_GAPS) | counter | `source`, `reason` | gaps the source emitted: `connection_lost`, `heartbeat_timeout`, `reconnected`, `malformed_payload`, `slot_lost`, `injected` (a subscriber's own `lagged` gaps are not counted) |
//! | [`pgcachewatch_source_healthy`](SOURCE_HEALTHY) | gauge | `source` | 1 while the source is healthy, else 0 |
//! | [`pgcachewatch_source_reconnects_total`](SOURCE_RECONNECTS) | counter | `source` | successful reconnections (LISTEN, replication, NATS) |
//! | [`pgcachewatch_source_event_latency_seconds`](SOURCE_EVENT_LATENCY) | histogram | `source` | event `sent_at` → applied by a dispatcher to its caches |
//! | [`pgcachewatch_source_heartbeat_rtt_seconds`](SOURCE_HEARTBEAT_RTT) | histogram | `source` | LISTEN heartbeat round trip (NOTIFY sent → received) |
//! | [`pgcachewatch_source_notify_queue_usage`](SOURCE_NOTIFY_QUEUE_USAGE) | gauge | `source` | `pg_notification_queue_usage()` (0–1), set each time `PgListenerSource::queue_usage` is asked |
//! | [`pgcachewatch_source_slot_lag_bytes`](SOURCE_SLOT_LAG) | gauge | `source` | replication: server WAL position − confirmed position |
//!
//! The `cache` label is the name given to
//! [`CacheBuilder::name`](crate::CacheBuilder::name), or `unnamed`. The `source`
//! label is [`EventSource::label`](crate::EventSource::label): `listen`,
//! `replication:<slot>`, `nats:<stream>`, `memory`, or `custom`.
//!
//! **The hit path.** A hit bumps the cache's own striped counter, as without the
//! feature; the hits are added to [`CACHE_HITS`] in batches: every
//! [`HIT_BATCH`] hits of one thread, on every miss, and on
//! [`Cache::stats`](crate::Cache::stats). So the counter trails the truth by
//! at most `HIT_BATCH` hits per thread, and a hit calls into the recorder once in
//! `HIT_BATCH` times.
//!
//! ```
//! use metrics_util::debugging::DebuggingRecorder;
//! use pgcachewatch::Cache;
//!
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! // Install it (globally, in an application; locally here): then build caches.
//! let users: Cache<u32, String> = metrics::with_local_recorder(&recorder, || {
//!     Cache::builder().name("users").build()
//! });
//! users.insert(1, "ann".into());
//! assert!(users.get(&1).is_some());
//! assert!(users.get(&2).is_none());
//! let misses = snapshotter
//!     .snapshot()
//!     .into_vec()
//!     .into_iter()
//!     .find(|(key, ..)| key.key().name() == pgcachewatch_core::telemetry::CACHE_MISSES)
//!     .map(|(.., value)| value);
//! assert_eq!(misses, Some(metrics_util::debugging::DebugValue::Counter(1)));
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::signal::{GapReason, Health, Signal};

/// Counter: reads answered from the cache. Labels: `cache`.
pub const CACHE_HITS: &str = "pgcachewatch_cache_hits_total";
/// Counter: reads that found no fresh entry. Labels: `cache`.
pub const CACHE_MISSES: &str = "pgcachewatch_cache_misses_total";
/// Counter: loader runs. Labels: `cache`.
pub const CACHE_LOADS: &str = "pgcachewatch_cache_loads_total";
/// Counter: loader runs that failed. Labels: `cache`.
pub const CACHE_LOAD_ERRORS: &str = "pgcachewatch_cache_load_errors_total";
/// Histogram (seconds): loader run time. Labels: `cache`.
pub const CACHE_LOAD_DURATION: &str = "pgcachewatch_cache_load_duration_seconds";
/// Counter: loads not stored because an invalidation arrived while they ran.
/// Labels: `cache`.
pub const CACHE_DISCARDED_LOADS: &str = "pgcachewatch_cache_discarded_loads_total";
/// Counter: invalidations. Labels: `cache`, `kind` (`key`, `table`, `all`, `expired`).
pub const CACHE_INVALIDATIONS: &str = "pgcachewatch_cache_invalidations_total";
/// Counter: reads that bypassed the cache while unhealthy. Labels: `cache`.
pub const CACHE_BYPASSES: &str = "pgcachewatch_cache_bypasses_total";
/// Gauge: entries held. Labels: `cache`.
pub const CACHE_ENTRIES: &str = "pgcachewatch_cache_entries";
/// Counter: background reloads by what became of them. Labels: `cache`,
/// `kind` (`started`, `served`, `discarded`, `failed`, `skipped`).
pub const CACHE_REFRESHES: &str = "pgcachewatch_cache_refreshes_total";
/// Counter: refreshes started by warming after a flush. Labels: `cache`.
pub const CACHE_WARM_LOADS: &str = "pgcachewatch_cache_warm_loads_total";
/// Counter: reads answered with a key's previous value within the stale bound.
/// Labels: `cache`.
pub const CACHE_STALE_SERVED: &str = "pgcachewatch_cache_stale_served_total";

/// Counter: events emitted by a source. Labels: `source`.
pub const SOURCE_EVENTS: &str = "pgcachewatch_source_events_total";
/// Counter: gaps emitted by a source. Labels: `source`, `reason`.
pub const SOURCE_GAPS: &str = "pgcachewatch_source_gaps_total";
/// Gauge: 1 while the source is healthy, 0 otherwise. Labels: `source`.
pub const SOURCE_HEALTHY: &str = "pgcachewatch_source_healthy";
/// Counter: successful reconnections. Labels: `source`.
pub const SOURCE_RECONNECTS: &str = "pgcachewatch_source_reconnects_total";
/// Histogram (seconds): an event's `sent_at` to its application by a
/// dispatcher. Labels: `source`.
pub const SOURCE_EVENT_LATENCY: &str = "pgcachewatch_source_event_latency_seconds";
/// Histogram (seconds): LISTEN heartbeat round trip. Labels: `source`.
pub const SOURCE_HEARTBEAT_RTT: &str = "pgcachewatch_source_heartbeat_rtt_seconds";
/// Gauge (0–1): `pg_notification_queue_usage()`. Labels: `source`.
pub const SOURCE_NOTIFY_QUEUE_USAGE: &str = "pgcachewatch_source_notify_queue_usage";
/// Gauge (bytes): a replication slot's lag (server WAL position − confirmed).
/// Labels: `source`.
pub const SOURCE_SLOT_LAG: &str = "pgcachewatch_source_slot_lag_bytes";

/// Hits of one thread between two exports of the hit counter (a power of two).
pub const HIT_BATCH: u64 = 1024;

/// The `cache` label of an unnamed cache.
pub const UNNAMED: &str = "unnamed";

/// The `reason` label of a gap.
pub fn gap_reason(reason: &GapReason) -> &'static str {
    match reason {
        GapReason::Lagged { .. } => "lagged",
        GapReason::ConnectionLost { .. } => "connection_lost",
        GapReason::HeartbeatTimeout => "heartbeat_timeout",
        GapReason::Reconnected => "reconnected",
        GapReason::MalformedPayload => "malformed_payload",
        GapReason::SlotLost { .. } => "slot_lost",
        GapReason::Injected { .. } => "injected",
    }
}

const GAP_REASONS: [&str; 7] = [
    "lagged",
    "connection_lost",
    "heartbeat_timeout",
    "reconnected",
    "malformed_payload",
    "slot_lost",
    "injected",
];

/// A cache's handles, registered once when it is built.
#[derive(Debug)]
pub(crate) struct CacheMetrics {
    hits: Counter,
    /// Hits already added to `hits`.
    exported_hits: AtomicU64,
    pub(crate) misses: Counter,
    pub(crate) loads: Counter,
    pub(crate) load_errors: Counter,
    pub(crate) load_duration: Histogram,
    pub(crate) discarded_loads: Counter,
    pub(crate) bypasses: Counter,
    pub(crate) by_key: Counter,
    pub(crate) by_table: Counter,
    pub(crate) flushes: Counter,
    pub(crate) expired: Counter,
    pub(crate) entries: Gauge,
    pub(crate) refreshes_started: Counter,
    pub(crate) refreshes_served: Counter,
    pub(crate) refreshes_discarded: Counter,
    pub(crate) refreshes_failed: Counter,
    pub(crate) refreshes_skipped: Counter,
    pub(crate) warm_loads: Counter,
    pub(crate) stale_served: Counter,
}

impl CacheMetrics {
    pub(crate) fn new(name: Option<&str>) -> Self {
        let cache = name.unwrap_or(UNNAMED).to_owned();
        let kind = |kind: &'static str| counter!(CACHE_INVALIDATIONS, "cache" => cache.clone(), "kind" => kind);
        let refreshes = |kind: &'static str| counter!(CACHE_REFRESHES, "cache" => cache.clone(), "kind" => kind);
        CacheMetrics {
            hits: counter!(CACHE_HITS, "cache" => cache.clone()),
            exported_hits: AtomicU64::new(0),
            misses: counter!(CACHE_MISSES, "cache" => cache.clone()),
            loads: counter!(CACHE_LOADS, "cache" => cache.clone()),
            load_errors: counter!(CACHE_LOAD_ERRORS, "cache" => cache.clone()),
            load_duration: histogram!(CACHE_LOAD_DURATION, "cache" => cache.clone()),
            discarded_loads: counter!(CACHE_DISCARDED_LOADS, "cache" => cache.clone()),
            bypasses: counter!(CACHE_BYPASSES, "cache" => cache.clone()),
            by_key: kind("key"),
            by_table: kind("table"),
            flushes: kind("all"),
            expired: kind("expired"),
            refreshes_started: refreshes("started"),
            refreshes_served: refreshes("served"),
            refreshes_discarded: refreshes("discarded"),
            refreshes_failed: refreshes("failed"),
            refreshes_skipped: refreshes("skipped"),
            warm_loads: counter!(CACHE_WARM_LOADS, "cache" => cache.clone()),
            stale_served: counter!(CACHE_STALE_SERVED, "cache" => cache.clone()),
            entries: gauge!(CACHE_ENTRIES, "cache" => cache),
        }
    }

    /// Adds the hits counted since the last export (`total`: every hit so far).
    /// Concurrent exports never add a hit twice: each adds only what it raised
    /// the exported mark by.
    pub(crate) fn export_hits(&self, total: u64) {
        let before = self.exported_hits.fetch_max(total, Ordering::Relaxed);
        if total > before {
            self.hits.increment(total - before);
        }
    }
}

/// A source's handles, registered once when its hub is labelled.
#[derive(Debug)]
pub(crate) struct SourceMetrics {
    events: Counter,
    gaps: [Counter; GAP_REASONS.len()],
    healthy: Gauge,
}

impl SourceMetrics {
    pub(crate) fn new(source: &str, health: Health) -> Self {
        let label = source.to_owned();
        let metrics = SourceMetrics {
            events: counter!(SOURCE_EVENTS, "source" => label.clone()),
            gaps: GAP_REASONS
                .map(|reason| counter!(SOURCE_GAPS, "source" => label.clone(), "reason" => reason)),
            healthy: gauge!(SOURCE_HEALTHY, "source" => label),
        };
        metrics.health(health);
        metrics
    }

    fn health(&self, health: Health) {
        self.healthy
            .set(if health.is_healthy() { 1.0 } else { 0.0 });
    }

    pub(crate) fn emitted(&self, signal: &Signal) {
        match signal {
            Signal::Event(_) => self.events.increment(1),
            Signal::Gap(reason) => {
                let name = gap_reason(reason);
                if let Some(i) = GAP_REASONS.iter().position(|r| *r == name) {
                    self.gaps[i].increment(1);
                }
            }
            Signal::Health(h) => self.health(*h),
            Signal::Progress(_) => {}
        }
    }
}

/// The latency histogram a dispatcher records into.
#[derive(Debug)]
pub(crate) struct DispatcherMetrics {
    latency: Histogram,
}

impl DispatcherMetrics {
    pub(crate) fn new(source: String) -> Self {
        DispatcherMetrics {
            latency: histogram!(SOURCE_EVENT_LATENCY, "source" => source),
        }
    }

    /// Records `sent_at` → now for an event just applied (nothing for an event
    /// without `sent_at` or one "sent in the future": clocks disagree).
    pub(crate) fn applied(&self, event: &crate::Event) {
        let Some(sent_at) = event.sent_at else {
            return;
        };
        if let Ok(latency) = (chrono::Utc::now() - sent_at).to_std() {
            self.latency.record(latency.as_secs_f64());
        }
    }
}
