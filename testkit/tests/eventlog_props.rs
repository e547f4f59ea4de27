//! Properties of the event log and replay over generated logs.

use pgcachewatch_core::Decision;
use pgcachewatch_strategies::Greedy;
use pgcachewatch_testkit::eventlog::{EventLog, EventLogReader, RecordKind};
use pgcachewatch_testkit::generators::event_logs;
use pgcachewatch_testkit::replay::{replay, Cause};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_logs_round_trip(log in event_logs(20)) {
        let text = log.to_string();
        prop_assert_eq!(EventLog::parse(&text).unwrap(), log);
    }

    #[test]
    fn generated_logs_have_non_decreasing_offsets(log in event_logs(20)) {
        for pair in log.records.windows(2) {
            prop_assert!(pair[0].offset <= pair[1].offset);
        }
    }

    #[test]
    fn greedy_replay_flushes_on_every_event_and_gap(log in event_logs(20)) {
        let report = replay::<u32, _>(&log, Greedy::new());
        prop_assert_eq!(report.steps.len(), log.records.len());
        for step in &report.steps {
            let expected = match step.cause {
                Cause::Health { .. } => Decision::Nothing,
                _ => Decision::All,
            };
            prop_assert_eq!(&step.decision, &expected, "at {}", step.cause);
        }
        let flushes = log.records.iter().filter(|r| !matches!(r.kind, RecordKind::Health(_))).count();
        prop_assert_eq!(report.cache.flushes, flushes as u64);
    }

    /// Whatever the bytes, the reader reports errors and never panics.
    #[test]
    fn reader_never_panics_on_arbitrary_input(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(reader) = EventLogReader::new(bytes.as_slice()) {
            for _ in reader {}
        }
    }

    /// Corrupting one byte of a valid log yields errors with line numbers, no panic.
    #[test]
    fn reader_survives_corrupted_logs(log in event_logs(8), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = log.to_string().into_bytes();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        if let Ok(reader) = EventLogReader::new(bytes.as_slice()) {
            for record in reader {
                if let Err(e) = record {
                    prop_assert!(e.to_string().contains("line"), "{}", e);
                }
            }
        }
    }
}
