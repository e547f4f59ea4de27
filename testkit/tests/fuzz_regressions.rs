//! Inputs found by fuzzing (`fuzz/`, `bash .ci/fuzz`) or written to the edges
//! the fuzz targets explore, kept here so that `cargo test` keeps them fixed
//! without a sanitizer build.

use std::time::Duration;

use pgcachewatch_core::{parse_payload, InvalidationStrategy};
use pgcachewatch_strategies::{Greedy, Timed, Windowed};
use pgcachewatch_testkit::eventlog::{EventLog, EventLogReader};
use pgcachewatch_testkit::replay::Replayer;

/// What the `replay` fuzz target does with one input.
fn replay_every_strategy(log: &str) {
    let reader = EventLogReader::new(log.as_bytes()).unwrap();
    let records: Vec<_> = reader.filter_map(Result::ok).collect();
    let strategies: Vec<Box<dyn InvalidationStrategy<u32>>> = vec![
        Box::new(Greedy::new()),
        Box::new(Windowed::new(3, Duration::from_millis(10))),
        Box::new(Timed::new(Duration::from_millis(10))),
    ];
    for strategy in strategies {
        let report = Replayer::new(strategy).run(&records);
        assert!(report.steps.len() >= records.len());
    }
}

#[test]
fn offsets_at_the_end_of_time_replay_without_overflow() {
    let max = u64::MAX;
    let log = format!(
        "{{\"pgcachewatch_log\":1}}\n\
         {{\"offset_us\":0,\"health\":\"healthy\"}}\n\
         {{\"offset_us\":1,\"event\":{{\"channel\":\"c\",\"operation\":\"insert\",\"table\":\"t\",\"received_at\":\"2024-01-01T00:00:00Z\"}}}}\n\
         {{\"offset_us\":{max},\"event\":{{\"channel\":\"c\",\"operation\":\"insert\",\"table\":\"t\",\"received_at\":\"2024-01-01T00:00:00Z\"}}}}\n\
         {{\"offset_us\":{max},\"gap\":{{\"reason\":\"reconnected\"}}}}\n"
    );
    replay_every_strategy(&log);
}

#[test]
fn event_log_round_trips_what_it_accepts_at_the_edges() {
    let max = u64::MAX;
    let text = format!(
        "{{\"pgcachewatch_log\":1,\"source\":\"\\u0000\"}}\n\
         {{\"offset_us\":{max},\"gap\":{{\"reason\":\"lagged\",\"missed\":{max}}}}}\n"
    );
    let log = EventLog::parse(&text).unwrap();
    assert_eq!(EventLog::parse(&log.to_string()).unwrap(), log);
}

#[test]
fn payload_edges_parse_or_fail_without_panicking() {
    let now = chrono::Utc::now();
    for payload in [
        r#"{"operation":"insert","table":"t","sent_at":"+262143-12-31T23:59:59Z"}"#,
        r#"{"operation":"insert","table":"t","sent_at":"9999-12-31 23:59:59.999999-15"}"#,
        r#"{"operation":"insert","table":"t","txid":"-9223372036854775808"}"#,
        r#"{"operation":"insert","table":"t","keys":[{"id":1e400}]}"#,
        r#"{"operation":"insert","table":"t","sent_at":"2024-05-01 10:00:00+"}"#,
    ] {
        let _ = parse_payload("c", payload, now);
    }
}

/// Found by the `parse_payload` target: a key too large for an integer is read
/// as a float, and without correctly rounded float parsing the value written to
/// the event log read back as a different float (a recorded log would then
/// replay another key than the one the listener saw).
#[test]
fn a_huge_numeric_key_survives_the_event_log_unchanged() {
    use pgcachewatch_core::Signal;
    use pgcachewatch_testkit::eventlog::{EventLogWriter, LogHeader, RecordKind};

    let payload = r#"{"operation":"update","schema":"s","table":"users","keys":[{"id":1},{"id":666666666666666666666666666666666666666666666}],"txid":13.581}"#;
    let received_at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let event = parse_payload("c", payload, received_at).unwrap();
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    let mut writer = EventLogWriter::with_header(&mut out, LogHeader::new().recorded_at(None))
        .unwrap()
        .starting_at(start);
    writer
        .write_signal(&Signal::Event(std::sync::Arc::new(event.clone())), start)
        .unwrap();
    let log = EventLog::parse(&String::from_utf8(out).unwrap()).unwrap();
    match &log.records[0].kind {
        RecordKind::Event(back) => assert_eq!(*back, event),
        other => panic!("an event came back as {other:?}"),
    }
}
