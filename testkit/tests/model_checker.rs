//! The staleness model checker: the real cache passes 10 000 generated schedules
//! in each mode, and a planted bug (a cache without generation stamps) is caught
//! and shrunk to a readable counterexample.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::LocalBoxFuture;
use pgcachewatch_core::{
    Cache, Decision, Dispatcher, HealthBoard, HealthVote, InvalidationStrategy, InvalidationTarget,
    WhileUnhealthy,
};
use pgcachewatch_strategies::Greedy;
use pgcachewatch_testkit::checker::{CheckedCache, Loader, ModelChecker, Op, Row, Schedule, Value};
use proptest::test_runner::Config as ProptestConfig;

const MAX_LEN: usize = 40;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        // A failure is printed by the test itself; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases)
    }
}

fn explore(name: &str, checker: &ModelChecker) {
    match checker.explore(config(10_000), MAX_LEN) {
        Ok(done) => println!(
            "model checker [{name}]: {} cases passed in {:.2?}",
            done.cases, done.elapsed
        ),
        Err(counterexample) => {
            panic!("model checker [{name}] found a violation:\n{counterexample}")
        }
    }
}

#[test]
fn real_cache_is_never_stale_with_keyed_invalidation_and_bypass() {
    explore("keyed, bypass", &ModelChecker::new());
}

#[test]
fn real_cache_is_never_stale_when_serving_within_a_bound() {
    let checker =
        ModelChecker::new().while_unhealthy(WhileUnhealthy::ServeWithin(Duration::from_secs(60)));
    explore("keyed, serve within 60 s", &checker);
}

/// With a zero bound, nothing loaded before the outage may be served, not even by
/// sharing a load that started earlier (a bug the checker found in an early core).
#[test]
fn real_cache_is_never_stale_when_serving_within_a_zero_bound() {
    let checker = ModelChecker::new().while_unhealthy(WhileUnhealthy::ServeWithin(Duration::ZERO));
    explore("keyed, serve within 0 s", &checker);
}

#[test]
fn real_cache_is_never_stale_with_greedy_flushes() {
    let checker = ModelChecker::new().strategy(|| Box::new(Greedy::new()));
    explore("greedy, bypass", &checker);
}

/// The stale-set race, step by step, against the real cache.
#[test]
fn hand_written_race_passes_on_the_real_cache() {
    let report = ModelChecker::new()
        .run(&race())
        .unwrap_or_else(|v| panic!("{v}"));
    assert_eq!(report.reads_checked, 2);
}

fn race() -> Schedule {
    Schedule::new(vec![
        Op::StartRead { slot: 0, row: 0 },
        Op::Write { row: 0 },
        Op::Deliver { source: 0 },
        Op::FinishLoad { slot: 0 },
        Op::StartRead { slot: 1, row: 0 },
        Op::FinishLoad { slot: 1 },
    ])
}

// ---- the planted bug ----------------------------------------------------------

/// A HashMap cache without generation stamps: it stores a load's result even
/// when an invalidation arrived while the load ran (what `moka::get_with` and
/// most hand-rolled caches do).
#[derive(Clone, Default)]
struct NoGenerationsCache {
    map: Arc<Mutex<HashMap<Row, Value>>>,
    board: Arc<HealthBoard>,
}

impl NoGenerationsCache {
    fn new() -> Self {
        Self::default()
    }
}

impl CheckedCache for NoGenerationsCache {
    fn read(&self, row: Row, loader: Loader) -> LocalBoxFuture<'static, Result<Value, String>> {
        let this = self.clone();
        Box::pin(async move {
            if !this.board.is_healthy() {
                return Ok(loader().await);
            }
            if let Some(v) = this.map.lock().unwrap().get(&row) {
                return Ok(*v);
            }
            let v = loader().await;
            this.map.lock().unwrap().insert(row, v); // the bug: no check that it is still valid
            Ok(v)
        })
    }

    fn attach(
        &self,
        dispatcher: Dispatcher,
        strategy: Box<dyn InvalidationStrategy<Row>>,
    ) -> Dispatcher {
        dispatcher.attach(strategy, self.clone())
    }
}

impl InvalidationTarget<Row> for NoGenerationsCache {
    fn apply(&self, decision: &Decision<Row>) {
        let mut map = self.map.lock().unwrap();
        match decision {
            Decision::Nothing => {}
            Decision::All => map.clear(),
            Decision::Invalidate(t) if !t.tables.is_empty() => map.clear(),
            Decision::Invalidate(t) => {
                for k in &t.keys {
                    map.remove(k);
                }
            }
        }
    }

    fn health_vote(&self) -> HealthVote {
        HealthVote::new(self.board.clone())
    }
}

fn planted() -> ModelChecker {
    ModelChecker::new().cache(|_| Box::new(NoGenerationsCache::new()))
}

#[test]
fn hand_written_race_fails_on_the_planted_bug() {
    let violation = planted()
        .run(&race())
        .expect_err("the naive cache stores v0 after the invalidation");
    assert!(violation.message.contains("STALE"), "{violation}");
    assert_eq!(violation.step, 5);
}

#[test]
fn checker_finds_and_shrinks_the_planted_bug() {
    let counterexample = planted()
        .explore(config(10_000), MAX_LEN)
        .expect_err("the checker must find the stale-set race in a cache without generations");
    println!("planted bug caught; shrunk counterexample:\n{counterexample}");
    let violation = counterexample
        .violation
        .as_ref()
        .expect("the shrunk schedule reproduces a violation");
    assert!(violation.message.contains("STALE"), "{counterexample}");
    // Shrinking leaves the essence: a load, a write, its delivery, the stale store,
    // and a later read. Nothing much else.
    assert!(
        counterexample.schedule.ops.len() <= 8,
        "not minimal:\n{counterexample}"
    );
}

/// The real cache, deaf to health changes: it keeps serving while unhealthy.
#[derive(Clone)]
struct IgnoresHealth(Cache<Row, Value>, Arc<HealthBoard>);

impl CheckedCache for IgnoresHealth {
    fn read(&self, row: Row, loader: Loader) -> LocalBoxFuture<'static, Result<Value, String>> {
        self.0.read(row, loader)
    }
    fn attach(
        &self,
        dispatcher: Dispatcher,
        strategy: Box<dyn InvalidationStrategy<Row>>,
    ) -> Dispatcher {
        dispatcher.attach(strategy, self.clone())
    }
}

impl InvalidationTarget<Row> for IgnoresHealth {
    fn apply(&self, decision: &Decision<Row>) {
        InvalidationTarget::apply(&self.0, decision);
    }
    /// Votes on a board nobody reads.
    fn health_vote(&self) -> HealthVote {
        HealthVote::new(self.1.clone())
    }
}

#[test]
fn checker_catches_a_cache_that_serves_while_unhealthy() {
    let checker =
        ModelChecker::new().cache(|_| Box::new(IgnoresHealth(Cache::new(64), Arc::default())));
    let counterexample = checker
        .explore(config(10_000), MAX_LEN)
        .expect_err("the checker must notice reads served from cache while unhealthy");
    println!("health-deaf cache caught; shrunk counterexample:\n{counterexample}");
    let violation = counterexample.violation.as_ref().expect("reproducible");
    assert!(
        violation.message.contains("while unhealthy"),
        "{counterexample}"
    );
}
