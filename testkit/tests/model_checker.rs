//! The staleness model checker: the real cache passes 10 000 generated schedules
//! in each mode, and a planted bug (a cache without generation stamps) is caught
//! and shrunk to a readable counterexample. The visibility window: with sources
//! that announce a write on receipt of its commit record, before it is visible,
//! the checker finds (and shrinks) a stale read; with sources that announce it
//! once visible, it finds none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::LocalBoxFuture;
use pgcachewatch_core::{
    Cache, Decision, Dispatcher, HealthBoard, HealthVote, InvalidationStrategy, InvalidationTarget,
    WhileUnhealthy,
};
use pgcachewatch_strategies::Greedy;
use pgcachewatch_testkit::checker::{
    schedules, CheckedCache, Exploration, Loader, ModelChecker, Op, Row, Schedule, SourceDelivery,
    Value,
};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

const MAX_LEN: usize = 40;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        // A failure is printed by the test itself; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases)
    }
}

fn explore(name: &str, checker: &ModelChecker) -> Exploration {
    match checker.explore(config(10_000), MAX_LEN) {
        Ok(done) => {
            println!(
                "model checker [{name}]: {} cases passed in {:.2?} ({} reads of loads inside a \
                 visibility window)",
                done.cases, done.elapsed, done.window_reads
            );
            done
        }
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

// ---- the visibility window ------------------------------------------------------

/// A write whose commit record precedes its visibility, with a read in between.
fn window() -> Schedule {
    Schedule::new(vec![
        Op::Commit { row: 0 },     // v1's commit record is written, not yet visible
        Op::Deliver { source: 0 }, // on receipt: its event is applied now
        Op::StartRead { slot: 0, row: 0 }, // a new snapshot still reads v0 ...
        Op::FinishLoad { slot: 0 }, // ... and the cache stores it
        Op::BecomeVisible { row: 0 }, // when visible: its event is queued only now ...
        Op::Deliver { source: 0 }, // ... and applied
        Op::StartRead { slot: 1, row: 0 }, // must read v1
        Op::FinishLoad { slot: 1 },
    ])
}

fn on_receipt() -> ModelChecker {
    ModelChecker::new().delivery(SourceDelivery::AnnounceOnReceipt)
}

fn when_visible() -> ModelChecker {
    ModelChecker::new().delivery(SourceDelivery::AnnounceWhenVisible)
}

#[test]
fn hand_written_window_passes_when_sources_announce_when_visible() {
    let report = when_visible()
        .run(&window())
        .unwrap_or_else(|v| panic!("{v}"));
    assert_eq!(report.reads_checked, 2, "{}", report.trace);
    // The first read's load ran inside the window (and returned v0, allowed: no
    // event yet); the second read, after the event, got v1.
    assert_eq!(report.window_reads, 1, "{}", report.trace);
    assert!(
        report
            .trace
            .contains("row 0 v1 visible to new snapshots, event #1 queued on source 0"),
        "{}",
        report.trace
    );
    assert!(
        report
            .trace
            .contains("reader 1 (from step 7) row 0 => v1 (load #1)"),
        "{}",
        report.trace
    );
}

#[test]
fn hand_written_window_is_stale_when_sources_announce_on_receipt() {
    let violation = on_receipt()
        .run(&window())
        .expect_err("the event is applied before v1 is visible; the load after it reads v0");
    assert_eq!(violation.step, 4, "{violation}");
    assert!(
        violation.message.contains(
            "reader 0 (from step 3) row 0 => v0 (load #0) STALE: v1 was notified at step 2"
        ),
        "{violation}"
    );
    assert!(
        violation
            .message
            .contains("the event was applied before v1 was visible (still invisible at step 4)"),
        "{violation}"
    );
    // And it is no passing staleness: the cache kept v0 once v1 was visible.
    assert!(
        violation
            .message
            .contains("Probe: with v1 visible, a new read still gets v0 (load #0) from the cache"),
        "{violation}"
    );
}

/// Schedules whose writes are visible at once (no `Commit`/`BecomeVisible`, as
/// every schedule was before the window was modelled) run identically, trace for
/// trace, in both modes.
#[test]
fn schedules_without_a_window_mean_the_same_in_both_modes() {
    let mut runner = TestRunner::new(config(500));
    let mut failing = 0;
    for _ in 0..500 {
        let mut schedule = schedules(MAX_LEN)
            .new_tree(&mut runner)
            .expect("a schedule")
            .current();
        schedule
            .ops
            .retain(|op| !matches!(op, Op::Commit { .. } | Op::BecomeVisible { .. }));
        let outcome = |checker: ModelChecker| match checker.run(&schedule) {
            Ok(report) => Ok(report.trace),
            Err(violation) => Err(violation.to_string()),
        };
        let (receipt, visible) = (outcome(on_receipt()), outcome(when_visible()));
        assert_eq!(receipt, visible, "schedule:{schedule:?}");
        failing += usize::from(visible.is_err());
    }
    assert_eq!(failing, 0, "the real cache passes every such schedule");
}

/// Issue 17: a source that announces a write when its commit record arrives lets
/// a load that starts after the invalidation read the old row (the write is not
/// yet visible to a new snapshot) and store it. The checker must find that, and
/// shrink it to the window itself.
#[test]
fn checker_finds_stale_reads_when_sources_announce_on_receipt() {
    let counterexample = on_receipt()
        .explore(config(10_000), MAX_LEN)
        .expect_err("the checker must find a stale read through the visibility window");
    println!("announce on receipt caught; shrunk counterexample:\n{counterexample}");
    let violation = counterexample
        .violation
        .as_ref()
        .expect("the shrunk schedule reproduces a violation");
    assert!(violation.message.contains("STALE"), "{counterexample}");
    assert!(
        violation.message.contains("was applied before v"),
        "not the window:\n{counterexample}"
    );
    let ops = &counterexample.schedule.ops;
    assert!(
        ops.iter().any(|op| matches!(op, Op::Commit { .. })),
        "the window needs a write not yet visible:\n{counterexample}"
    );
    // A commit, the delivery of its event, and a read: little else.
    assert!(ops.len() <= 5, "not minimal:\n{counterexample}");
    // Only the moment of the announcement makes it fail.
    if let Err(v) = when_visible().run(&counterexample.schedule) {
        panic!("the counterexample fails even when announced once visible:\n{v}");
    }
}

/// The fix (and LISTEN): announced no earlier than visible, no stale read over many
/// schedules whose loads do fall inside visibility windows.
#[test]
fn real_cache_is_never_stale_when_sources_announce_when_visible() {
    let done = explore("keyed, bypass, announce when visible", &when_visible());
    assert!(
        done.window_reads >= 1_000,
        "the schedules rarely reach the window: {} reads of loads inside one",
        done.window_reads
    );
}

/// The same generated schedules, in both modes: none fails when announced once
/// visible, and a good share fails when announced on receipt, so the schedules
/// the exploration above passes do reach the window where it matters.
#[test]
fn generated_schedules_reach_the_window() {
    let mut runner = TestRunner::new(config(2_000));
    let (mut cases, mut stale_on_receipt) = (0, 0);
    for _ in 0..2_000 {
        let schedule = schedules(MAX_LEN)
            .new_tree(&mut runner)
            .expect("a schedule")
            .current();
        if let Err(v) = when_visible().run(&schedule) {
            panic!("announced when visible, yet:\n{v}");
        }
        cases += 1;
        if let Err(v) = on_receipt().run(&schedule) {
            assert!(v.message.contains("STALE"), "{v}");
            stale_on_receipt += 1;
        }
    }
    println!("{stale_on_receipt} of {cases} schedules are stale when announced on receipt");
    // The schedules are random (a new seed each run): about 1 in 18 of them is
    // stale on receipt (97 to 129 of 2,000 over 15 runs). The bar, 1 in 50, sits
    // far below that spread and far above a generator that misses the window.
    assert!(
        stale_on_receipt * 50 >= cases,
        "only {stale_on_receipt} of {cases} generated schedules catch a source announcing on receipt"
    );
}

// ---- refresh on invalidation, warming, bounded stale serving (issue 22) -------

/// Refreshes (on invalidation and warming after every flush) read the table
/// when the schedule says and return later, with writes, deliveries, outages
/// and reads in between: never a stale read, and the schedules do refresh.
#[test]
fn real_cache_is_never_stale_with_refresh_on_invalidation() {
    let done = explore(
        "keyed, bypass, refresh",
        &ModelChecker::new().refresh_on_invalidation(),
    );
    assert!(
        done.refreshes >= 1_000,
        "the schedules rarely refresh: {} background loads",
        done.refreshes
    );
}

#[test]
fn real_cache_is_never_stale_with_refresh_while_serving_within_a_bound() {
    let checker = ModelChecker::new()
        .while_unhealthy(WhileUnhealthy::ServeWithin(Duration::from_secs(60)))
        .refresh_on_invalidation();
    explore("keyed, serve within 60 s, refresh", &checker);
}

/// The rule with the option on: a value is fresh, or made stale by a processed
/// notification at most `d` before the read returned (8 steps of 1 ms here:
/// generated schedules of 40 steps both serve stale values and outlast it).
#[test]
fn stale_serving_never_passes_its_bound() {
    let checker = ModelChecker::new().serve_stale_within(Duration::from_millis(8));
    let done = explore("keyed, bypass, refresh, stale within 8 ms", &checker);
    println!(
        "{} reads served a stale value within the bound",
        done.stale_served
    );
}

/// Every step of a schedule on row 0 (and its source): one hot key.
fn on_one_hot_row(schedule: &Schedule) -> Schedule {
    let ops = schedule.ops.iter().map(|op| match *op {
        Op::Write { .. } => Op::Write { row: 0 },
        Op::Commit { .. } => Op::Commit { row: 0 },
        Op::BecomeVisible { .. } => Op::BecomeVisible { row: 0 },
        Op::StartRead { slot, .. } => Op::StartRead { slot, row: 0 },
        Op::Deliver { .. } => Op::Deliver { source: 0 },
        Op::Duplicate { .. } => Op::Duplicate { source: 0 },
        Op::Lose { .. } => Op::Lose { source: 0 },
        Op::Disconnect { .. } => Op::Disconnect { source: 0 },
        Op::Reconnect { .. } => Op::Reconnect { source: 0 },
        other => other,
    });
    Schedule::new(ops.collect())
}

/// The same rule where it is exercised most: generated schedules folded onto
/// one hot row, so reads, writes, refreshes and stale serving meet often.
#[test]
fn stale_serving_on_one_hot_key_never_passes_its_bound() {
    let mut served = 0;
    for (name, bound) in [("3 ms", 3), ("8 ms", 8)] {
        let checker = ModelChecker::new().serve_stale_within(Duration::from_millis(bound));
        let mut runner = TestRunner::new(config(10_000));
        let (mut stale, mut refreshes) = (0, 0);
        for _ in 0..10_000 {
            let schedule = schedules(MAX_LEN)
                .new_tree(&mut runner)
                .expect("a schedule")
                .current();
            let schedule = on_one_hot_row(&schedule);
            match checker.run(&schedule) {
                Ok(report) => {
                    stale += report.stale_served;
                    refreshes += report.refreshes;
                }
                Err(_) => {
                    let minimal = checker.minimize(schedule);
                    let v = checker.run(&minimal).expect_err("still fails");
                    panic!("stale within {name}, one hot row:\nminimal failing schedule:{minimal:?}\ntrace:\n{v}");
                }
            }
        }
        println!(
            "model checker [one hot row, refresh, stale within {name}]: 10000 cases passed \
             ({refreshes} background loads, {stale} reads served stale within the bound)"
        );
        served += stale;
    }
    // Serving stale needs a stored value, a write delivered, and a read while
    // its refresh runs: 290 to 350 reads over the 20,000 random schedules in
    // three runs. The bar sits far below that spread.
    assert!(served >= 100, "stale values rarely served: {served}");
}

/// A refresh that reads v1, then v2's invalidation, then the refresh returns:
/// discarded, and the next read loads v2.
#[test]
fn hand_written_refresh_race_passes() {
    let s = Schedule::new(vec![
        Op::StartRead { slot: 0, row: 0 },
        Op::FinishLoad { slot: 0 },
        Op::Write { row: 0 },
        Op::Deliver { source: 0 },
        Op::RunRefreshes,
        Op::Write { row: 0 },
        Op::Deliver { source: 0 },
        Op::FinishRefresh,
        Op::StartRead { slot: 1, row: 0 },
        Op::FinishLoad { slot: 1 },
    ]);
    let report = ModelChecker::new()
        .refresh_on_invalidation()
        .run(&s)
        .unwrap_or_else(|v| panic!("{v}"));
    assert_eq!(report.refreshes, 1, "{}", report.trace);
    assert!(
        report.trace.contains("reader 1 (from step 9) row 0 => v2"),
        "{}",
        report.trace
    );
}

/// A cache that serves stale values while the rule allows none is caught and
/// shrunk to: a read, a write, its delivery, a read.
#[test]
fn checker_catches_stale_serving_the_rule_does_not_allow() {
    let checker =
        ModelChecker::new().refreshing_cache(|b| b.serve_stale_within(Duration::from_secs(1)));
    let counterexample = checker
        .explore(config(10_000), MAX_LEN)
        .expect_err("stale values served without the option must be caught");
    println!("stale serving caught; shrunk counterexample:\n{counterexample}");
    let violation = counterexample.violation.as_ref().expect("a violation");
    assert!(violation.message.contains("STALE"), "{counterexample}");
    assert!(
        counterexample.schedule.ops.len() <= 6,
        "not minimal:\n{counterexample}"
    );
}

/// A cache whose bound is longer than the rule's is caught: the checker
/// measures the bound, it does not trust the cache's.
#[test]
fn checker_catches_stale_serving_past_the_bound() {
    let checker = ModelChecker::new()
        .serve_stale_within(Duration::from_millis(2))
        .refreshing_cache(|b| b.serve_stale_within(Duration::from_millis(6)));
    let counterexample = checker
        .explore(config(10_000), MAX_LEN)
        .expect_err("a value served past the checked bound must be caught");
    println!("stale serving past the bound caught:\n{counterexample}");
    let violation = counterexample.violation.as_ref().expect("a violation");
    assert!(violation.message.contains("STALE"), "{counterexample}");
}
