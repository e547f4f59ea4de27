//! The LISTEN source's series (feature `metrics`) against the real local
//! PostgreSQL (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`):
//! events, a reconnect after `pg_terminate_backend`, its gaps, health, heartbeat
//! round trips and the NOTIFY queue usage gauge.
#![cfg(all(feature = "postgres", feature = "metrics"))]

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use pgcachewatch_backends::postgres::listener::PgListenerSource;
use pgcachewatch_core::telemetry as t;
use pgcachewatch_core::EventSource;
use pgcachewatch_testkit::env::{database_url, eventually_within, unique_name as unique};
use sqlx::postgres::PgPoolOptions;

const PATIENCE: Duration = Duration::from_secs(10);

/// A recorder (`metrics-util`'s atomic registry) whose reads reset nothing.
struct Recorded(Registry<Key, AtomicStorage>);

impl Recorder for Recorded {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

impl Recorded {
    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, *v))
            .collect();
        Key::from_parts(name, labels)
    }
    fn counter(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> u64 {
        let key = Self::key(name, labels);
        self.0
            .get_counter_handles()
            .get(&key)
            .map_or(0, |c| c.load(Relaxed))
    }
    fn gauge(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Option<f64> {
        let key = Self::key(name, labels);
        self.0
            .get_gauge_handles()
            .get(&key)
            .map(|g| f64::from_bits(g.load(Relaxed)))
    }
    fn samples(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> usize {
        let key = Self::key(name, labels);
        self.0
            .get_histogram_handles()
            .get(&key)
            .map_or(0, |h| h.data().len())
    }
}

// A current-thread runtime: the recorder set for this thread stays in force
// across the awaits that build the source.
#[tokio::test(flavor = "current_thread")]
async fn the_listen_source_reports_events_reconnects_gaps_health_and_heartbeats() {
    let rec = Arc::new(Recorded(Registry::atomic()));
    let guard = metrics::set_default_local_recorder(&*rec);
    let channel = unique("metrics");
    let source = PgListenerSource::builder(database_url())
        .channel(channel.clone())
        .heartbeat_interval(Duration::from_millis(100))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect()
        .await
        .expect("PostgreSQL must be running at DATABASE_URL");
    drop(guard);
    assert_eq!(source.label(), "listen");
    let listen = &[("source", "listen")];
    assert_eq!(rec.gauge(t::SOURCE_HEALTHY, listen), Some(1.0));

    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url())
        .await
        .unwrap();
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(&channel)
        .bind(r#"{"operation": "update", "schema": "public", "table": "metrics_t"}"#)
        .execute(&db)
        .await
        .unwrap();
    eventually_within(PATIENCE, "the event is counted", || {
        rec.counter(t::SOURCE_EVENTS, listen) == 1
    })
    .await;
    eventually_within(PATIENCE, "a heartbeat round trip is recorded", || {
        rec.samples(t::SOURCE_HEARTBEAT_RTT, listen) > 0
    })
    .await;

    // The queue usage gauge is set when asked.
    let usage = source.queue_usage().await.unwrap();
    assert_eq!(rec.gauge(t::SOURCE_NOTIFY_QUEUE_USAGE, listen), Some(usage));

    // Kill the listening backend: a lost connection, a reconnect, healthy again.
    let pid = source.stats().backend_pid.expect("connected");
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(i32::try_from(pid).unwrap())
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(killed, "backend {pid} not terminated");
    eventually_within(PATIENCE, "the reconnect is counted", || {
        rec.counter(t::SOURCE_RECONNECTS, listen) == 1
    })
    .await;
    eventually_within(PATIENCE, "healthy again", || {
        rec.gauge(t::SOURCE_HEALTHY, listen) == Some(1.0)
    })
    .await;
    let gaps = |reason| rec.counter(t::SOURCE_GAPS, &[("source", "listen"), ("reason", reason)]);
    assert_eq!(gaps("connection_lost") + gaps("heartbeat_timeout"), 1);
    assert_eq!(gaps("reconnected"), 1);
    assert_eq!(rec.counter(t::SOURCE_EVENTS, listen), 1);
    assert_eq!(source.stats().reconnects, 1);
    source.shutdown().await;
    assert_eq!(rec.gauge(t::SOURCE_HEALTHY, listen), Some(0.0));
}
