//! The series only the backends emit (feature `metrics`); their names are in
//! `pgcachewatch_core::telemetry`, with the core's.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use pgcachewatch_core::telemetry as names;

/// A source's own handles, registered when it starts.
#[derive(Debug, Clone)]
#[cfg_attr(not(any(feature = "postgres", feature = "nats")), allow(dead_code))]
pub(crate) struct SourceMetrics {
    pub(crate) reconnects: Counter,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) heartbeat_rtt: Histogram,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) queue_usage: Gauge,
    #[cfg_attr(not(feature = "replication"), allow(dead_code))]
    pub(crate) slot_lag: Gauge,
}

impl SourceMetrics {
    pub(crate) fn new(source: &str) -> Self {
        let source = source.to_owned();
        SourceMetrics {
            reconnects: counter!(names::SOURCE_RECONNECTS, "source" => source.clone()),
            heartbeat_rtt: histogram!(names::SOURCE_HEARTBEAT_RTT, "source" => source.clone()),
            queue_usage: gauge!(names::SOURCE_NOTIFY_QUEUE_USAGE, "source" => source.clone()),
            slot_lag: gauge!(names::SOURCE_SLOT_LAG, "source" => source),
        }
    }
}
