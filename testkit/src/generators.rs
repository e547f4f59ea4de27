//! Proptest generators: events, gap reasons, event logs and checker schedules
//! (feature `proptest`).
//!
//! Logs look like real traffic: single writes, bursts (several events at the same
//! instant), multi-statement transactions (several events sharing a `txid`,
//! possibly reordered within the transaction), injected gaps, and outages
//! (`Unhealthy`, gap, silence, gap, `Healthy`). Offsets never decrease.
//!
//! Checker [`schedules`] mix writes visible at once ([`Op::Write`]) with writes
//! whose visibility lags their commit record by a few steps ([`Op::Commit`], later
//! [`Op::BecomeVisible`]), so deliveries and loads fall inside the visibility
//! window (see [`SourceDelivery`]).
//!
//! ```
//! use proptest::prelude::*;
//! use pgcachewatch::testkit::eventlog::{EventLog, RecordKind};
//! use pgcachewatch::testkit::generators::event_logs;
//!
//! proptest! {
//!     #![proptest_config(ProptestConfig::with_cases(16))]
//!     fn logs_round_trip(log in event_logs(30)) {
//!         prop_assert_eq!(EventLog::parse(&log.to_string()).unwrap(), log);
//!     }
//! }
//! # logs_round_trip();
//! ```

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use pgcachewatch_core::{Event, GapReason, Health, Operation, RowKey};
use proptest::prelude::*;

pub use crate::checker::schedules;
#[cfg(doc)]
use crate::checker::{Op, SourceDelivery};
use crate::eventlog::{EventLog, LogHeader, LogRecord, RecordKind};

/// The tables generated events are about.
pub const TABLES: [&str; 4] = ["users", "orders", "items", "audit"];

/// Any operation.
pub fn operations() -> impl Strategy<Value = Operation> {
    prop::sample::select(Operation::ALL.to_vec())
}

/// Row keys: one to three `{"id": n}` keys.
pub fn row_keys() -> impl Strategy<Value = Vec<RowKey>> {
    prop::collection::vec((0i64..100).prop_map(|id| RowKey::single("id", id)), 1..=3)
}

/// Events on [`TABLES`], with or without schema, keys, txid and `sent_at`, all
/// stamped at a fixed base time (logs set `received_at` from their offsets).
pub fn events() -> impl Strategy<Value = Event> {
    (
        operations(),
        prop::sample::select(TABLES.to_vec()),
        any::<bool>(),
        prop::option::of(row_keys()),
        prop::option::of(1i64..1_000_000),
        any::<bool>(),
    )
        .prop_map(|(op, table, schema, keys, txid, sent)| {
            let mut e = Event::new("pgcachewatch", op, "public", table);
            if !schema {
                e.schema = None;
            }
            // Truncate carries no row keys.
            if op != Operation::Truncate {
                e.keys = keys;
            }
            e.txid = txid;
            e.received_at = base_time();
            if sent {
                e.sent_at = Some(base_time());
            }
            e
        })
}

/// Every gap reason.
pub fn gap_reasons() -> impl Strategy<Value = GapReason> {
    prop_oneof![
        (1u64..10_000).prop_map(|missed| GapReason::Lagged { missed }),
        "[a-z ]{0,20}".prop_map(|d| GapReason::ConnectionLost { detail: d.into() }),
        Just(GapReason::HeartbeatTimeout),
        Just(GapReason::Reconnected),
        Just(GapReason::MalformedPayload),
        "[a-z ]{0,20}".prop_map(|d| GapReason::Injected { detail: d.into() }),
    ]
}

/// A piece of traffic; a log is a sequence of them.
#[derive(Debug, Clone)]
enum Segment {
    /// One event, `delay` after the previous record.
    Single(Duration, Event),
    /// Several events at the same instant.
    Burst(Duration, Vec<Event>),
    /// Several events of one transaction (same txid), in a possibly shuffled order,
    /// a few microseconds apart.
    Transaction(Duration, i64, Vec<Event>),
    /// A gap.
    Gap(Duration, GapReason),
    /// Unhealthy, connection-lost gap, `down` of silence, reconnected gap, Healthy.
    Outage(Duration, Duration),
}

fn delays() -> impl Strategy<Value = Duration> {
    prop_oneof![
        3 => (0u64..2_000).prop_map(Duration::from_micros),
        2 => (0u64..500).prop_map(Duration::from_millis),
        1 => (0u64..30).prop_map(Duration::from_secs),
    ]
}

fn segments() -> impl Strategy<Value = Segment> {
    prop_oneof![
        6 => (delays(), events()).prop_map(|(d, e)| Segment::Single(d, e)),
        2 => (delays(), prop::collection::vec(events(), 2..12)).prop_map(|(d, es)| Segment::Burst(d, es)),
        2 => (delays(), 1i64..1_000_000, prop::collection::vec(events(), 2..6))
            .prop_flat_map(|(d, txid, es)| (Just(d), Just(txid), Just(es).prop_shuffle()))
            .prop_map(|(d, txid, es)| Segment::Transaction(d, txid, es)),
        1 => (delays(), gap_reasons()).prop_map(|(d, r)| Segment::Gap(d, r)),
        1 => (delays(), (1u64..5_000).prop_map(Duration::from_millis)).prop_map(|(d, down)| Segment::Outage(d, down)),
    ]
}

fn base_time() -> DateTime<Utc> {
    Utc.timestamp_opt(1_735_732_800, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// Event logs of up to `max_segments` pieces of traffic (each one to a dozen
/// records), starting with `Healthy`. `received_at` follows the offsets.
pub fn event_logs(max_segments: usize) -> impl Strategy<Value = EventLog> {
    prop::collection::vec(segments(), 0..=max_segments).prop_map(build_log)
}

fn build_log(segments: Vec<Segment>) -> EventLog {
    let mut log = EventLog::new(
        LogHeader::new()
            .recorded_at(Some(base_time()))
            .source("generated"),
    );
    let mut at = Duration::ZERO;
    let mut push = |at: Duration, kind: RecordKind| {
        let kind = match kind {
            RecordKind::Event(mut e) => {
                let received = base_time() + chrono::Duration::from_std(at).unwrap_or_default();
                e.received_at = received;
                if e.sent_at.is_some() {
                    e.sent_at = Some(received - chrono::Duration::microseconds(300));
                }
                RecordKind::Event(e)
            }
            other => other,
        };
        log.records.push(LogRecord::new(at, kind));
    };
    push(at, RecordKind::Health(Health::Healthy));
    for segment in segments {
        match segment {
            Segment::Single(d, e) => {
                at += d;
                push(at, RecordKind::Event(e));
            }
            Segment::Burst(d, es) => {
                at += d;
                for e in es {
                    push(at, RecordKind::Event(e));
                }
            }
            Segment::Transaction(d, txid, es) => {
                at += d;
                for e in es {
                    at += Duration::from_micros(5);
                    push(at, RecordKind::Event(e.with_txid(txid)));
                }
            }
            Segment::Gap(d, reason) => {
                at += d;
                push(at, RecordKind::Gap(reason));
            }
            Segment::Outage(d, down) => {
                at += d;
                push(at, RecordKind::Health(Health::Unhealthy));
                push(
                    at,
                    RecordKind::Gap(GapReason::ConnectionLost {
                        detail: "generated outage".into(),
                    }),
                );
                at += down;
                push(at, RecordKind::Gap(GapReason::Reconnected));
                push(at, RecordKind::Health(Health::Healthy));
            }
        }
    }
    log
}
