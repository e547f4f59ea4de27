//! The staleness model checker.
//!
//! A simulated versioned table, writers that commit writes, two sources (each a
//! real [`SignalHub`] feeding the cache through a real, inline [`Dispatcher`]) that
//! queue one notification per write (delivered late, twice, or lost-with-a-gap,
//! and disconnected at will), dispatchers that stop and attach again, strategies
//! that panic, and readers that read through the **real** [`Cache`]. Reads are futures driven by hand, one
//! [`Op`] at a time, so a load can read the table before a write and return after
//! that write's invalidation: the stale-set race, on demand.
//!
//! Every read is checked against the guarantee (ARCHITECTURE.md, "The guarantee"):
//!
//! 1. **Notified writes are never served stale.** Once the notification covering a
//!    write has been processed (its event, or a gap after it), no read that
//!    *starts* afterwards returns a value older than that write.
//! 2. **Unhealthy means bypass.** A read that starts while the cache should not
//!    trust its entries — a source it listens to told it `Unhealthy`, a dispatcher
//!    that fed it stopped and was not replaced, or a strategy panicked and has not
//!    handled a signal since — returns a value at least as new as every write committed
//!    before it started ([`WhileUnhealthy::Bypass`]), or one whose load started at
//!    most `max_staleness` before ([`WhileUnhealthy::ServeWithin`]).
//! 3. Reads end, return their own row, and do not fail.
//!
//! With feature `proptest`, `ModelChecker::explore` runs thousands of generated
//! [`Schedule`]s and shrinks a failure to a minimal one, printed as numbered steps
//! with the trace of what happened:
//!
//! ```text
//! minimal failing schedule:
//!   1: reader 0 starts reading row 0
//!   2: write row 0
//!   3: deliver next event twice
//!   4: reader 0's load returns
//!   5: reader 0 starts reading row 0
//!
//! trace:
//! step 5: reader 0 (from step 5) row 0 => v0 (load #0) STALE: v1 was notified at step 3 (load #0 read at step 1)
//!    1: reader 0 starts reading row 0
//!        reader 0's load reads row 0 = v0 (load #0)
//!    2: write row 0
//!        row 0 -> v1, event #1 queued
//!    3: deliver next event twice
//!        event #1 (row 0 v1) -> drop keys [0]
//!    4: reader 0's load returns
//!        reader 0 (from step 1) row 0 => v0 (load #0)
//!    5: reader 0 starts reading row 0
//!        reader 0 (from step 5) row 0 => v0 (load #0) STALE: v1 was notified at step 3 (load #0 read at step 1)
//! ```
//!
//! (That is the shrunk counterexample for a cache without generation stamps, from
//! `testkit/tests/model_checker.rs`; the real cache passes.)
//!
//! # Example
//!
//! ```
//! use pgcachewatch::testkit::checker::{ModelChecker, Op, Schedule};
//!
//! let race = Schedule::new(vec![
//!     Op::StartRead { slot: 0, row: 0 }, // the load reads v0 ...
//!     Op::Write { row: 0 },              // ... a write commits v1 ...
//!     Op::Deliver { source: 0 },         // ... its invalidation is processed ...
//!     Op::FinishLoad { slot: 0 },        // ... and only then the load returns v0.
//!     Op::StartRead { slot: 1, row: 0 }, // Must not see v0.
//!     Op::FinishLoad { slot: 1 },
//! ]);
//! let report = ModelChecker::new().run(&race).expect("the real cache closes the race");
//! assert_eq!(report.reads_checked, 2);
//! ```

mod cache;
mod schedule;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::LocalBoxFuture;
use pgcachewatch_core::{
    Cache, Decision, Dispatcher, DispatcherHandle, Event, GapReason, Health, InvalidationStrategy,
    Operation, RowKey, SignalHub, WhileUnhealthy,
};

pub use self::cache::{CheckedCache, Loader, Value};
pub use self::schedule::{Op, Row, Schedule, Source, ROWS, SLOTS, SOURCES};
use crate::clock::VirtualClock;

/// Builds the cache under test for one schedule.
pub type CacheFactory = Arc<dyn Fn(WhileUnhealthy) -> Box<dyn CheckedCache> + Send + Sync>;
/// Builds the strategy for one schedule.
pub type StrategyFactory = Arc<dyn Fn() -> Box<dyn InvalidationStrategy<Row>> + Send + Sync>;

/// Runs schedules against a cache and checks every read. See the [module docs](self).
#[derive(Clone)]
pub struct ModelChecker {
    while_unhealthy: WhileUnhealthy,
    cache: CacheFactory,
    strategy: StrategyFactory,
}

impl fmt::Debug for ModelChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelChecker")
            .field("while_unhealthy", &self.while_unhealthy)
            .finish_non_exhaustive()
    }
}

impl Default for ModelChecker {
    fn default() -> Self {
        Self::new()
    }
}

/// The default strategy: drop the keys (rows) an event names; a gap drops everything.
#[derive(Debug)]
struct RowKeyed;

impl InvalidationStrategy<Row> for RowKeyed {
    fn on_event(&mut self, event: &Event, _now: Instant) -> Decision<Row> {
        let Some(keys) = &event.keys else {
            return Decision::All;
        };
        let rows: Option<Vec<Row>> = keys
            .iter()
            .map(|k| {
                k.get("row")
                    .and_then(|v| v.as_u64())
                    .and_then(|v| Row::try_from(v).ok())
            })
            .collect();
        rows.map_or(Decision::All, Decision::keys)
    }
}

impl ModelChecker {
    /// The real [`Cache`] with [`WhileUnhealthy::Bypass`], and a strategy that drops
    /// the rows each event names (everything on a gap).
    pub fn new() -> Self {
        ModelChecker {
            while_unhealthy: WhileUnhealthy::Bypass,
            cache: Arc::new(|policy| {
                let cache: Cache<Row, Value> = Cache::builder()
                    .capacity(64)
                    .while_unhealthy(policy)
                    .build();
                Box::new(cache)
            }),
            strategy: Arc::new(|| Box::new(RowKeyed)),
        }
    }

    /// What the cache does while unhealthy, and what rule 2 checks (builder style).
    pub fn while_unhealthy(mut self, policy: WhileUnhealthy) -> Self {
        self.while_unhealthy = policy;
        self
    }

    /// Checks another cache (builder style): for a cache of your own, or a planted bug.
    pub fn cache<F>(mut self, factory: F) -> Self
    where
        F: Fn(WhileUnhealthy) -> Box<dyn CheckedCache> + Send + Sync + 'static,
    {
        self.cache = Arc::new(factory);
        self
    }

    /// Uses another strategy (builder style). It must act on every event at once
    /// (no deferral): the guarantee is about processed notifications.
    pub fn strategy<F>(mut self, factory: F) -> Self
    where
        F: Fn() -> Box<dyn InvalidationStrategy<Row>> + Send + Sync + 'static,
    {
        self.strategy = Arc::new(factory);
        self
    }

    /// Removes steps one at a time while the schedule still fails, until no single
    /// step can go (a 1-minimal schedule). Proptest's shrinking removes steps only
    /// before it simplifies them, so it can stop at a longer schedule than needed.
    /// A passing schedule comes back unchanged.
    ///
    /// ```
    /// use pgcachewatch::testkit::checker::{ModelChecker, Op, Schedule};
    /// let s = Schedule::new(vec![Op::Write { row: 0 }, Op::Deliver { source: 0 }]);
    /// assert_eq!(ModelChecker::new().minimize(s.clone()), s);
    /// ```
    pub fn minimize(&self, mut schedule: Schedule) -> Schedule {
        if self.run(&schedule).is_ok() {
            return schedule;
        }
        loop {
            let mut changed = false;
            let mut i = schedule.ops.len();
            while i > 0 {
                i -= 1;
                let mut shorter = schedule.clone();
                shorter.ops.remove(i);
                if self.run(&shorter).is_err() {
                    schedule = shorter;
                    changed = true;
                }
            }
            if !changed {
                return schedule;
            }
        }
    }

    /// Runs one schedule; `Err` with the trace up to the first violated rule.
    ///
    /// # Errors
    ///
    /// A [`Violation`] naming the step, what was expected and the whole trace.
    pub fn run(&self, schedule: &Schedule) -> Result<Report, Violation> {
        // Dispatchers spawn their (here never polled) deadline timers on a runtime.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| Violation {
                step: 0,
                message: format!("could not start a tokio runtime: {e}"),
                trace: String::new(),
            })?;
        let _entered = runtime.enter();
        let mut sim = Sim::new(self);
        for op in &schedule.ops {
            sim.step(*op)?;
        }
        sim.finish()
    }
}

/// What a passing run did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Report {
    /// Reads that completed and were checked.
    pub reads_checked: usize,
    /// Reads that returned an older value than the table held when they started
    /// (allowed: not yet notified, or within the unhealthy bound).
    pub stale_but_allowed: usize,
    /// The numbered trace.
    pub trace: String,
}

/// A broken rule: where, what, and the trace that led there.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Violation {
    /// The step (1-based; one past the last op for the final drain).
    pub step: usize,
    /// What went wrong.
    pub message: String,
    /// The numbered trace up to and including the violation.
    pub trace: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "step {}: {}", self.step, self.message)?;
        f.write_str(&self.trace)
    }
}

impl std::error::Error for Violation {}

// ---- proptest integration ---------------------------------------------------

/// Generated schedules of up to `max_len` steps (feature `proptest`).
///
/// ```
/// use proptest::strategy::{Strategy, ValueTree};
/// use proptest::test_runner::TestRunner;
/// let mut runner = TestRunner::deterministic();
/// let s = pgcachewatch::testkit::checker::schedules(20).new_tree(&mut runner).unwrap().current();
/// assert!((1..=20).contains(&s.ops.len()));
/// ```
#[cfg(feature = "proptest")]
#[cfg_attr(docsrs, doc(cfg(feature = "proptest")))]
pub fn schedules(max_len: usize) -> impl proptest::strategy::Strategy<Value = Schedule> {
    schedule::generate::schedules(max_len)
}

/// How an exploration went (feature `proptest`).
#[cfg(feature = "proptest")]
#[cfg_attr(docsrs, doc(cfg(feature = "proptest")))]
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Exploration {
    /// Schedules run and passed.
    pub cases: u32,
    /// Wall-clock time taken.
    pub elapsed: Duration,
}

/// A minimal failing schedule and its violation (feature `proptest`).
#[cfg(feature = "proptest")]
#[cfg_attr(docsrs, doc(cfg(feature = "proptest")))]
#[derive(Debug, Clone)]
pub struct Counterexample {
    /// The shrunk schedule.
    pub schedule: Schedule,
    /// The violation it produces, with its trace.
    pub violation: Option<Violation>,
    /// Proptest's own message (a panic, for instance), when there is no violation.
    pub message: String,
}

#[cfg(feature = "proptest")]
#[cfg_attr(docsrs, doc(cfg(feature = "proptest")))]
impl fmt::Display for Counterexample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "minimal failing schedule:{:?}", self.schedule)?;
        match &self.violation {
            Some(v) => write!(f, "trace:\n{v}"),
            None => f.write_str(&self.message),
        }
    }
}

#[cfg(feature = "proptest")]
#[cfg_attr(docsrs, doc(cfg(feature = "proptest")))]
impl ModelChecker {
    /// Runs `config.cases` generated schedules of up to `max_len` steps with
    /// proptest's runner; on failure, shrinks (proptest, then [`minimize`](Self::minimize))
    /// and returns the minimal schedule.
    ///
    /// ```
    /// use pgcachewatch::testkit::checker::ModelChecker;
    /// use proptest::test_runner::Config;
    /// let done = ModelChecker::new().explore(Config::with_cases(100), 30).unwrap();
    /// assert_eq!(done.cases, 100);
    /// ```
    ///
    /// # Errors
    ///
    /// The shrunk [`Counterexample`].
    pub fn explore(
        &self,
        config: proptest::test_runner::Config,
        max_len: usize,
    ) -> Result<Exploration, Box<Counterexample>> {
        use proptest::test_runner::{TestCaseError, TestError, TestRunner};

        let cases = config.cases;
        let mut runner = TestRunner::new(config);
        let started = Instant::now();
        let result = runner.run(&schedules(max_len), |schedule| {
            self.run(&schedule)
                .map(|_| ())
                .map_err(|v| TestCaseError::fail(v.to_string()))
        });
        match result {
            Ok(()) => Ok(Exploration {
                cases,
                elapsed: started.elapsed(),
            }),
            Err(TestError::Fail(reason, schedule)) => {
                let schedule = self.minimize(schedule);
                Err(Box::new(Counterexample {
                    violation: self.run(&schedule).err(),
                    schedule,
                    message: reason.to_string(),
                }))
            }
            Err(TestError::Abort(reason)) => Err(Box::new(Counterexample {
                schedule: Schedule::default(),
                violation: None,
                message: format!("proptest aborted: {reason}"),
            })),
        }
    }
}

// ---- the simulation ---------------------------------------------------------

/// The newest version of a row covered by a processed notification, and when.
#[derive(Debug, Clone, Copy, Default)]
struct Notice {
    version: u64,
    step: usize,
}

#[derive(Debug)]
enum Queued {
    Event {
        n: u64,
        row: Row,
        version: u64,
        /// Every row's committed version when the write committed.
        snapshot: Vec<u64>,
    },
    Gap {
        reason: GapReason,
        /// Every row's committed version this gap covers.
        covers: Vec<u64>,
    },
    Health(Health),
}

#[derive(Debug)]
struct LoadRecord {
    row: Row,
    version: u64,
    read_step: usize,
    read_at: Instant,
}

struct Reading {
    row: Row,
    start_step: usize,
    started_at: Instant,
    future: LocalBoxFuture<'static, Result<Value, String>>,
    gate: Rc<Cell<bool>>,
    /// The load this reader's loader started, if it ran.
    own_load: Rc<Cell<Option<u64>>>,
    notified: Notice,
    committed: u64,
    unhealthy: bool,
}

/// A future that is ready once its flag is set.
struct Gate(Rc<Cell<bool>>);

impl Future for Gate {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if self.0.get() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// State shared with the loaders.
#[derive(Default)]
struct World {
    table: RefCell<Vec<u64>>,
    loads: RefCell<Vec<LoadRecord>>,
    step: Cell<usize>,
    trace: RefCell<String>,
}

impl World {
    fn note(&self, line: fmt::Arguments<'_>) {
        use fmt::Write;
        let mut t = self.trace.borrow_mut();
        let _ = writeln!(t, "       {line}");
    }
}

/// One simulated source: a real hub, its pending signals, and its dispatcher.
struct SimSource {
    /// A real hub, dispatching inline as the real sources do.
    hub: SignalHub,
    queue: VecDeque<Queued>,
    connected: bool,
    dispatcher: Option<DispatcherHandle>,
    panic_next: Arc<AtomicBool>,
    /// The model: the last health this source's dispatcher was told.
    told_healthy: bool,
    /// The model: its strategy panicked and has not handled a signal since.
    poisoned: bool,
}

/// Wraps the checked strategy: panics on demand, and notes each decision.
struct Noted {
    inner: Box<dyn InvalidationStrategy<Row>>,
    panic_next: Arc<AtomicBool>,
    notes: Arc<Mutex<Vec<String>>>,
}

impl fmt::Debug for Noted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Noted").field("inner", &self.inner).finish()
    }
}

impl Noted {
    fn note(&self, what: String) {
        if let Ok(mut notes) = self.notes.lock() {
            notes.push(what);
        }
    }
}

impl InvalidationStrategy<Row> for Noted {
    fn on_event(&mut self, event: &Event, now: Instant) -> Decision<Row> {
        if self.panic_next.swap(false, Ordering::SeqCst) {
            self.note("strategy panics (planted)".into());
            panic!("planted strategy panic");
        }
        let d = self.inner.on_event(event, now);
        self.note(format!("strategy: {}", describe(&d)));
        d
    }
    fn on_gap(&mut self, reason: &GapReason, now: Instant) -> Decision<Row> {
        let d = self.inner.on_gap(reason, now);
        self.note(format!("strategy on gap ({reason}): {}", describe(&d)));
        d
    }
    fn on_tick(&mut self, now: Instant) -> Decision<Row> {
        self.inner.on_tick(now)
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.inner.next_deadline()
    }
}

struct Sim {
    world: Rc<World>,
    while_unhealthy: WhileUnhealthy,
    cache: Box<dyn CheckedCache>,
    strategy: StrategyFactory,
    notes: Arc<Mutex<Vec<String>>>,
    clock: VirtualClock,
    sources: Vec<SimSource>,
    /// The model: dispatchers that stopped and were not replaced.
    stopped: usize,
    writes: u64,
    notified: Vec<Notice>,
    slots: Vec<Option<Reading>>,
    reads_checked: usize,
    stale_but_allowed: usize,
}

impl Sim {
    fn new(checker: &ModelChecker) -> Self {
        let world = World {
            table: RefCell::new(vec![0; ROWS as usize]),
            ..World::default()
        };
        let mut sim = Sim {
            world: Rc::new(world),
            while_unhealthy: checker.while_unhealthy,
            cache: (checker.cache)(checker.while_unhealthy),
            strategy: checker.strategy.clone(),
            notes: Arc::default(),
            clock: VirtualClock::new(),
            sources: (0..SOURCES)
                .map(|_| SimSource {
                    hub: SignalHub::new(1024),
                    queue: VecDeque::new(),
                    connected: true,
                    dispatcher: None,
                    panic_next: Arc::default(),
                    told_healthy: false,
                    poisoned: false,
                })
                .collect(),
            stopped: 0,
            writes: 0,
            notified: vec![Notice::default(); ROWS as usize],
            slots: (0..SLOTS).map(|_| None).collect(),
            reads_checked: 0,
            stale_but_allowed: 0,
        };
        for source in 0..SOURCES {
            sim.attach(source);
        }
        sim
    }

    /// Whether, by the model, the cache must not trust its entries now.
    fn should_distrust(&self) -> bool {
        self.stopped > 0
            || self
                .sources
                .iter()
                .any(|s| s.dispatcher.is_some() && (!s.told_healthy || s.poisoned))
    }

    fn source_of(row: Row) -> Source {
        row as usize % SOURCES
    }

    /// Moves the strategy's notes into the trace.
    fn flush_notes(&self) {
        let notes = match self.notes.lock() {
            Ok(mut notes) => std::mem::take(&mut *notes),
            Err(_) => return,
        };
        for n in notes {
            self.note(format_args!("  {n}"));
        }
    }

    fn attach(&mut self, source: Source) {
        if self.sources[source].dispatcher.is_some() {
            self.note(format_args!("(source {source} has a dispatcher)"));
            return;
        }
        let strategy = Noted {
            inner: (self.strategy)(),
            panic_next: self.sources[source].panic_next.clone(),
            notes: self.notes.clone(),
        };
        let dispatcher = self.cache.attach(Dispatcher::new(), Box::new(strategy));
        let s = &mut self.sources[source];
        let handle = dispatcher.spawn(&s.hub);
        s.dispatcher = Some(handle);
        s.told_healthy = s.hub.health().is_healthy();
        s.poisoned = false;
        self.stopped = self.stopped.saturating_sub(1);
        // Attaching flushes: it covers every write committed so far.
        self.cover(&self.committed());
        self.note(format_args!(
            "dispatcher attached to source {source} (cache flushed; source {})",
            if self.sources[source].told_healthy {
                "healthy"
            } else {
                "unhealthy"
            }
        ));
    }

    /// Marks every row's committed version in `versions` as covered by a
    /// processed notification, now.
    fn cover(&mut self, versions: &[u64]) {
        let step = self.world.step.get();
        for (notice, &version) in self.notified.iter_mut().zip(versions) {
            if version > notice.version {
                *notice = Notice { version, step };
            }
        }
    }

    fn note(&self, line: fmt::Arguments<'_>) {
        self.world.note(line);
    }

    fn committed(&self) -> Vec<u64> {
        self.world.table.borrow().clone()
    }

    fn violation(&self, message: String) -> Violation {
        self.note(format_args!("{message}"));
        Violation {
            step: self.world.step.get(),
            message,
            trace: self.world.trace.borrow().clone(),
        }
    }

    fn step(&mut self, op: Op) -> Result<(), Violation> {
        let step = self.world.step.get() + 1;
        self.world.step.set(step);
        {
            use fmt::Write;
            let _ = writeln!(self.world.trace.borrow_mut(), "  {step:>2}: {op}");
        }
        self.clock.advance(Duration::from_millis(1));
        match op {
            Op::Write { row } => self.write(row),
            Op::DeliverAll => {
                if self.sources.iter().all(|s| s.queue.is_empty()) {
                    self.note(format_args!("(nothing queued)"));
                }
                for source in 0..SOURCES {
                    while !self.sources[source].queue.is_empty() {
                        self.deliver(source, false);
                    }
                }
            }
            Op::Deliver { source } => self.deliver(source % SOURCES, false),
            Op::Duplicate { source } => self.deliver(source % SOURCES, true),
            Op::Lose { source } => self.lose(source % SOURCES),
            Op::Disconnect { source } => {
                let source = source % SOURCES;
                let covers = self.committed();
                let s = &mut self.sources[source];
                if s.connected {
                    s.connected = false;
                    s.queue.push_back(Queued::Health(Health::Unhealthy));
                    s.queue.push_back(Queued::Gap {
                        reason: GapReason::ConnectionLost {
                            detail: "simulated".into(),
                        },
                        covers,
                    });
                    self.note(format_args!(
                        "Unhealthy + gap queued; source {source}'s writes are lost until reconnect"
                    ));
                } else {
                    self.note(format_args!("(already disconnected)"));
                }
            }
            Op::Reconnect { source } => {
                let source = source % SOURCES;
                let covers = self.committed();
                let s = &mut self.sources[source];
                if s.connected {
                    self.note(format_args!("(already connected)"));
                } else {
                    s.connected = true;
                    s.queue.push_back(Queued::Gap {
                        reason: GapReason::Reconnected,
                        covers,
                    });
                    s.queue.push_back(Queued::Health(Health::Healthy));
                    self.note(format_args!("gap + Healthy queued"));
                }
            }
            Op::StopDispatcher { source } => {
                let source = source % SOURCES;
                match self.sources[source].dispatcher.take() {
                    Some(handle) => {
                        drop(handle);
                        self.sources[source].poisoned = false;
                        self.stopped += 1;
                        self.note(format_args!(
                            "source {source}'s dispatcher dropped; its writes reach nobody"
                        ));
                    }
                    None => self.note(format_args!("(source {source} has no dispatcher)")),
                }
            }
            Op::Attach { source } => self.attach(source % SOURCES),
            Op::PanicOnNext { source } => {
                self.sources[source % SOURCES]
                    .panic_next
                    .store(true, Ordering::SeqCst);
            }
            Op::StartRead { slot, row } => self.start_read(slot % SLOTS, row % ROWS),
            Op::FinishLoad { slot } => match &self.slots[slot % SLOTS] {
                Some(r) if r.own_load.get().is_some() => r.gate.set(true),
                Some(_) => self.note(format_args!("(reader {slot} runs no load of its own)")),
                None => self.note(format_args!("(reader {slot} is idle)")),
            },
            Op::CancelRead { slot } => {
                if self.slots[slot % SLOTS].take().is_none() {
                    self.note(format_args!("(reader {slot} is idle)"));
                }
            }
        }
        self.poll_reads()
    }

    fn write(&mut self, row: Row) {
        let version = {
            let mut table = self.world.table.borrow_mut();
            table[row as usize] += 1;
            table[row as usize]
        };
        self.writes += 1;
        let source = Self::source_of(row);
        let snapshot = self.committed();
        if self.sources[source].connected {
            self.sources[source].queue.push_back(Queued::Event {
                n: self.writes,
                row,
                version,
                snapshot,
            });
            self.note(format_args!(
                "row {row} -> v{version}, event #{} queued on source {source}",
                self.writes
            ));
        } else {
            self.note(format_args!(
                "row {row} -> v{version}, notification lost (disconnected)"
            ));
        }
    }

    fn lose(&mut self, source: Source) {
        let queue = &mut self.sources[source].queue;
        match queue.front() {
            Some(Queued::Event { n, snapshot, .. }) => {
                let n = *n;
                let covers = snapshot.clone();
                queue[0] = Queued::Gap {
                    reason: GapReason::Injected {
                        detail: format!("event #{n} lost").into(),
                    },
                    covers,
                };
                self.note(format_args!("event #{n} lost; a gap takes its place"));
            }
            _ => self.note(format_args!("(no event at the head of the queue)")),
        }
    }

    fn deliver(&mut self, source: Source, duplicate: bool) {
        let queue = &mut self.sources[source].queue;
        let queued = if duplicate {
            match queue.front() {
                Some(Queued::Event {
                    n,
                    row,
                    version,
                    snapshot,
                }) => Queued::Event {
                    n: *n,
                    row: *row,
                    version: *version,
                    snapshot: snapshot.clone(),
                },
                _ => {
                    self.note(format_args!("(no event at the head of the queue)"));
                    return;
                }
            }
        } else {
            match queue.pop_front() {
                Some(q) => q,
                None => {
                    self.note(format_args!("(nothing queued)"));
                    return;
                }
            }
        };
        let attached = self.sources[source].dispatcher.is_some();
        let hub = self.sources[source].hub.clone();
        match queued {
            Queued::Event {
                n, row, version, ..
            } => {
                let event = Event::new("checker", Operation::Update, "public", "t")
                    .with_keys(vec![RowKey::single("row", row)])
                    .with_txid(n as i64);
                let panics = attached && self.sources[source].panic_next.load(Ordering::SeqCst);
                hub.publish(event);
                self.note(format_args!(
                    "event #{n} (row {row} v{version}) delivered by source {source}{}",
                    if attached { "" } else { " to nobody" }
                ));
                self.flush_notes();
                if attached {
                    if panics {
                        // The dispatcher flushed the cache: that covers everything.
                        self.sources[source].poisoned = true;
                        let all = self.committed();
                        self.cover(&all);
                    } else {
                        self.sources[source].poisoned = false;
                        let step = self.world.step.get();
                        let notice = &mut self.notified[row as usize];
                        if version > notice.version {
                            *notice = Notice { version, step };
                        }
                    }
                }
            }
            Queued::Gap { reason, covers } => {
                self.note(format_args!(
                    "gap ({reason}) delivered by source {source}{}",
                    if attached { "" } else { " to nobody" }
                ));
                hub.gap(reason);
                self.flush_notes();
                if attached {
                    self.sources[source].poisoned = false;
                    self.cover(&covers);
                }
            }
            Queued::Health(h) => {
                hub.set_health(h);
                if attached {
                    self.sources[source].told_healthy = h.is_healthy();
                }
                self.note(format_args!(
                    "source {source} says {h:?}{}",
                    if attached { "" } else { " to nobody" }
                ));
            }
        }
    }

    fn start_read(&mut self, slot: usize, row: Row) {
        if self.slots[slot].is_some() {
            self.note(format_args!("(reader {slot} is busy)"));
            return;
        }
        let gate = Rc::new(Cell::new(false));
        let own_load = Rc::new(Cell::new(None));
        let loader: Loader = {
            let world = self.world.clone();
            let gate = gate.clone();
            let own_load = own_load.clone();
            Box::new(move || {
                Box::pin(async move {
                    let version = world.table.borrow()[row as usize];
                    let id = {
                        let mut loads = world.loads.borrow_mut();
                        loads.push(LoadRecord {
                            row,
                            version,
                            read_step: world.step.get(),
                            read_at: Instant::now(),
                        });
                        loads.len() as u64 - 1
                    };
                    own_load.set(Some(id));
                    world.note(format_args!(
                        "reader {slot}'s load reads row {row} = v{version} (load #{id})"
                    ));
                    Gate(gate).await;
                    Value { version, load: id }
                })
            })
        };
        let started_at = Instant::now();
        let future = self.cache.read(row, loader);
        self.slots[slot] = Some(Reading {
            row,
            start_step: self.world.step.get(),
            started_at,
            future,
            gate,
            own_load,
            notified: self.notified[row as usize],
            committed: self.world.table.borrow()[row as usize],
            unhealthy: self.should_distrust(),
        });
    }

    /// Polls every read until none makes progress; checks those that complete.
    fn poll_reads(&mut self) -> Result<(), Violation> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        loop {
            let mut progressed = false;
            for slot in 0..SLOTS {
                let Some(reading) = &mut self.slots[slot] else {
                    continue;
                };
                if let Poll::Ready(result) = reading.future.as_mut().poll(&mut cx) {
                    progressed = true;
                    if let Some(reading) = self.slots[slot].take() {
                        self.check(slot, &reading, result)?;
                    }
                }
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    fn check(
        &mut self,
        slot: usize,
        r: &Reading,
        result: Result<Value, String>,
    ) -> Result<(), Violation> {
        let row = r.row;
        let head = format!("reader {slot} (from step {}) row {row}", r.start_step);
        let value = match result {
            Ok(v) => v,
            Err(e) => return Err(self.violation(format!("{head} FAILED: {e}"))),
        };
        self.reads_checked += 1;
        let load = {
            let loads = self.world.loads.borrow();
            loads
                .get(value.load as usize)
                .map(|l| (l.row, l.version, l.read_step, l.read_at))
        };
        let Some((load_row, load_version, load_step, load_read_at)) = load else {
            return Err(self.violation(format!(
                "{head} => a value from load #{} that never ran",
                value.load
            )));
        };
        let shown = format!("{head} => v{} (load #{})", value.version, value.load);
        if load_row != row || load_version != value.version {
            return Err(self.violation(format!(
                "{shown} WRONG: load #{} read row {load_row} = v{load_version}",
                value.load
            )));
        }
        if value.version < r.notified.version {
            return Err(self.violation(format!(
                "{shown} STALE: v{} was notified at step {} (load #{} read at step {load_step})",
                r.notified.version, r.notified.step, value.load
            )));
        }
        if value.version < r.committed {
            if r.unhealthy {
                match self.while_unhealthy {
                    WhileUnhealthy::ServeWithin(bound) => {
                        let age = r.started_at.saturating_duration_since(load_read_at);
                        if age > bound {
                            return Err(self.violation(format!(
                                "{shown} STALE while unhealthy: v{} committed before the read; \
                                 the value's load started at least {age:?} earlier, beyond \
                                 the bound of {bound:?}",
                                r.committed
                            )));
                        }
                    }
                    _ => {
                        return Err(self.violation(format!(
                            "{shown} STALE while unhealthy: v{} was committed before the read \
                             started, and an unhealthy cache must bypass",
                            r.committed
                        )));
                    }
                }
            }
            self.stale_but_allowed += 1;
            let why = if r.unhealthy {
                "unhealthy, within the bound"
            } else {
                "not yet notified"
            };
            self.note(format_args!(
                "{shown} (older than v{}, allowed: {why})",
                r.committed
            ));
        } else {
            self.note(format_args!("{shown}"));
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Report, Violation> {
        let step = self.world.step.get() + 1;
        self.world.step.set(step);
        {
            use fmt::Write;
            let _ = writeln!(
                self.world.trace.borrow_mut(),
                "  {step:>2}: (end: every pending load returns)"
            );
        }
        for r in self.slots.iter().flatten() {
            r.gate.set(true);
        }
        self.poll_reads()?;
        // A load released late may let a waiter lead a new load: release again.
        for _ in 0..SLOTS {
            for r in self.slots.iter().flatten() {
                r.gate.set(true);
            }
            self.poll_reads()?;
        }
        if let Some(slot) = self.slots.iter().position(Option::is_some) {
            return Err(self.violation(format!(
                "reader {slot} never completed although every load returned (hung)"
            )));
        }
        Ok(Report {
            reads_checked: self.reads_checked,
            stale_but_allowed: self.stale_but_allowed,
            trace: self.world.trace.borrow().clone(),
        })
    }
}

fn describe(d: &Decision<Row>) -> String {
    match d {
        Decision::Nothing => "nothing".into(),
        Decision::All => "drop all".into(),
        Decision::Invalidate(t) if t.tables.is_empty() => format!("drop keys {:?}", t.keys),
        Decision::Invalidate(t) => format!("drop tables {:?} keys {:?}", t.tables, t.keys),
    }
}
