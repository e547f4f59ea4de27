//! The replayer fed whatever the event-log reader accepts from arbitrary bytes,
//! into every built-in strategy that keeps time: never panics, never hangs.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use pgcachewatch_core::InvalidationStrategy;
use pgcachewatch_strategies::{Greedy, Timed, Windowed};
use pgcachewatch_testkit::eventlog::{EventLogReader, RecordKind};
use pgcachewatch_testkit::replay::Replayer;

fn strategies() -> Vec<Box<dyn InvalidationStrategy<u32>>> {
    vec![
        Box::new(Greedy::new()),
        Box::new(Windowed::new(3, Duration::from_millis(10))),
        Box::new(Timed::new(Duration::from_millis(10))),
    ]
}

fuzz_target!(|data: &[u8]| {
    let Ok(reader) = EventLogReader::new(data) else {
        return;
    };
    let records: Vec<_> = reader.filter_map(Result::ok).collect();
    // Every record but a position mark is a step; deadlines add more.
    let moving = records
        .iter()
        .filter(|r| !matches!(r.kind, RecordKind::Progress(_)))
        .count();
    for strategy in strategies() {
        let report = Replayer::new(strategy).run(&records);
        assert!(report.steps.len() >= moving);
    }
    // The streaming path stops at the first bad line, and must not panic either.
    if let Ok(reader) = EventLogReader::new(data) {
        let _ = Replayer::<u32, _>::new(Greedy::new()).run_reader(reader);
    }
});
