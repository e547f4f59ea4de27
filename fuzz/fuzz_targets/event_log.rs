//! The event-log reader on arbitrary bytes: never panics, and every record it
//! accepts writes and reads back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgcachewatch_testkit::eventlog::{EventLog, EventLogReader};

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = EventLogReader::new(data) else {
        return;
    };
    let mut log = EventLog::new(reader.header().clone());
    for record in reader.by_ref() {
        if let Ok(record) = record {
            log.records.push(record);
        }
    }
    let text = log.to_string();
    let back = EventLog::parse(&text).expect("a written log reads back");
    assert_eq!(back, log);
});
