//! Every shipped fixture parses and replays, into every built-in time strategy.

use std::path::PathBuf;
use std::time::Duration;

use pgcachewatch_core::{Decision, GapReason, InvalidationStrategy};
use pgcachewatch_strategies::{Greedy, Timed, Windowed};
use pgcachewatch_testkit::eventlog::{EventLog, RecordKind};
use pgcachewatch_testkit::replay::{Cause, Replayer};

fn fixtures() -> Vec<(PathBuf, EventLog)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut logs: Vec<(PathBuf, EventLog)> = std::fs::read_dir(&dir)
        .expect("testkit/fixtures exists")
        .map(|entry| entry.expect("readable directory").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable fixture");
            let log = EventLog::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, log)
        })
        .collect();
    logs.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(logs.len() >= 3, "fixtures missing in {}", dir.display());
    logs
}

fn strategies() -> Vec<(&'static str, Box<dyn InvalidationStrategy<String>>)> {
    vec![
        ("greedy", Box::new(Greedy::new())),
        (
            "windowed",
            Box::new(Windowed::new(5, Duration::from_millis(100))),
        ),
        ("timed", Box::new(Timed::new(Duration::from_millis(100)))),
    ]
}

#[test]
fn every_fixture_parses_and_replays_into_every_strategy() {
    for (path, log) in fixtures() {
        assert!(!log.records.is_empty(), "{}: no records", path.display());
        let events = log
            .records
            .iter()
            .filter(|r| matches!(r.kind, RecordKind::Event(_)))
            .count();
        assert!(events > 0, "{}: no events", path.display());
        for (name, strategy) in strategies() {
            let report = Replayer::new(strategy).run(&log.records);
            let non_ticks = report
                .steps
                .iter()
                .filter(|s| !matches!(s.cause, Cause::Tick))
                .count();
            assert_eq!(non_ticks, log.records.len(), "{} / {name}", path.display());
            // Every strategy flushes on every gap, and none leaves an event uncovered:
            // the last event is followed by a flush (at it, or at a later tick).
            for (i, step) in report.steps.iter().enumerate() {
                if matches!(step.cause, Cause::Gap { .. }) {
                    assert_eq!(
                        step.decision,
                        Decision::All,
                        "{} / {name}: gap not flushed",
                        path.display()
                    );
                }
                if matches!(step.cause, Cause::Event { .. }) {
                    assert!(
                        report.steps[i..]
                            .iter()
                            .any(|s| s.decision == Decision::All),
                        "{} / {name}: event at step {i} never covered by a flush",
                        path.display()
                    );
                }
            }
            println!("{} / {name}:\n{report}\n", path.display());
        }
    }
}

#[test]
fn the_reconnect_fixture_holds_a_real_outage() {
    let (_, log) = fixtures()
        .into_iter()
        .find(|(p, _)| p.ends_with("reconnect.jsonl"))
        .expect("reconnect.jsonl");
    let kinds: Vec<String> = log
        .records
        .iter()
        .filter_map(|r| match &r.kind {
            RecordKind::Health(h) => Some(format!("{h:?}")),
            RecordKind::Gap(GapReason::ConnectionLost { .. }) => Some("lost".into()),
            RecordKind::Gap(GapReason::Reconnected) => Some("reconnected".into()),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        ["Healthy", "Unhealthy", "lost", "reconnected", "Healthy"]
    );
    let report = Replayer::<String, _>::new(Greedy::new()).run(&log.records);
    assert!(report.cache.unhealthy_for > Duration::ZERO);
    assert!(!report.cache.unhealthy);
}

#[test]
fn transactions_share_txids_in_the_mixed_fixture() {
    let (_, log) = fixtures()
        .into_iter()
        .find(|(p, _)| p.ends_with("mixed_writes.jsonl"))
        .expect("mixed_writes.jsonl");
    let txids: Vec<i64> = log
        .records
        .iter()
        .filter_map(|r| match &r.kind {
            RecordKind::Event(e) => e.txid,
            _ => None,
        })
        .collect();
    let shared = txids.windows(3).any(|w| w[0] == w[1] && w[1] == w[2]);
    assert!(
        shared,
        "expected three events of one transaction: {txids:?}"
    );
}
