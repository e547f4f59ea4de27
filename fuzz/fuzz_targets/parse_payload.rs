//! `parse_payload` on arbitrary bytes: never panics; agrees with serde_json
//! alone (its fast path reads nothing differently) and with a `PayloadParser`
//! reading the input as a stream (what it remembers between payloads changes
//! nothing); whatever it accepts has a table name and survives an event-log
//! round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgcachewatch_core::{parse_payload, PayloadParser, Signal};
use pgcachewatch_testkit::eventlog::{EventLog, EventLogWriter, LogHeader, RecordKind};

fuzz_target!(|data: &[u8]| {
    let Ok(payload) = std::str::from_utf8(data) else {
        return;
    };
    let received_at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
    let parsed = parse_payload("fuzz", payload, received_at);
    let by_serde = pgcachewatch_core::fuzzing::parse_payload_with_serde("fuzz", payload, received_at);
    assert_eq!(parsed, by_serde, "the fast path read {payload:?} differently");
    // The whole input, then each of its lines, then the whole input again,
    // through one parser (as a source reads a stream of payloads).
    let mut parser = PayloadParser::new();
    for part in std::iter::once(payload)
        .chain(payload.split('\n'))
        .chain(std::iter::once(payload))
    {
        assert_eq!(
            parser.parse("fuzz", part, received_at),
            parse_payload("fuzz", part, received_at),
            "a parser that read the payloads before read {part:?} differently"
        );
    }
    let Ok(event) = parsed else {
        return;
    };
    assert!(!event.table.is_empty());
    assert_eq!(event.received_at, received_at);

    // What the listener accepted, `record` writes and the testkit reads back.
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    let mut writer = EventLogWriter::with_header(&mut out, LogHeader::new().recorded_at(None))
        .expect("writing to memory")
        .starting_at(start);
    let signal = Signal::Event(std::sync::Arc::new(event.clone()));
    writer
        .write_signal(&signal, start)
        .expect("writing to memory");
    let text = String::from_utf8(out).expect("the log is UTF-8");
    let log = EventLog::parse(&text).expect("a written log reads back");
    assert_eq!(log.records.len(), 1);
    match &log.records[0].kind {
        RecordKind::Event(back) => assert_eq!(*back, event),
        other => panic!("an event came back as {other:?}"),
    }
});
