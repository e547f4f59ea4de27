//! The staleness model checker.
//!
//! A simulated versioned table, writers that commit writes, two sources (each a
//! real [`SignalHub`] feeding the cache through a real, inline [`Dispatcher`]) that
//! queue one notification per write (delivered late, twice, or lost-with-a-gap,
//! and disconnected at will), dispatchers that stop and attach again, strategies
//! that panic, and readers that read through the **real** [`Cache`]. Reads are
//! futures driven by hand, one [`Op`] at a time, so a load can read the table
//! before a write and return after that write's invalidation: the stale-set race,
//! on demand.
//!
//! # The visibility window
//!
//! A committed write has two moments, as in PostgreSQL: its **commit record** is
//! written, and later it becomes **visible** to a new snapshot (the committing
//! backend leaves the proc array). [`Op::Write`] has both in one step;
//! [`Op::Commit`] writes the commit record only and [`Op::BecomeVisible`] makes it
//! visible, with any steps in between. A load reads the table as a new snapshot
//! would: the newest *visible* version of its row.
//!
//! When a source announces (queues the event of) a write is the checker's
//! [`SourceDelivery`] ([`ModelChecker::delivery`]):
//! [`AnnounceOnReceipt`](SourceDelivery::AnnounceOnReceipt) at the commit record
//! (a replication source that invalidates on receipt: the event can be applied
//! while the write is invisible, and a load that starts after it reads the old
//! row, passes the generation check and stays cached; the checker finds this), or
//! [`AnnounceWhenVisible`](SourceDelivery::AnnounceWhenVisible), the default, once
//! visible (LISTEN; the fixed replication source).
//!
//! # The rules
//!
//! Every read is checked against the guarantee (ARCHITECTURE.md, "The guarantee"):
//!
//! 1. **Notified writes are never served stale.** Once the notification covering a
//!    committed write has been processed (its event, or a gap after it), no read
//!    that *starts* afterwards returns a value loaded before that write became
//!    visible. Precisely: a read is **stale** if it returns a version older than
//!    the newest write to its row whose notification was processed before the read
//!    started, *whether or not that write is visible yet* (a load reads the
//!    version visible when it runs, so "older than the write" is "loaded before
//!    it became visible"). A gap (or a flush: attaching, a strategy panic) of a
//!    source covers every write that source announced, its events delivered or
//!    lost, and, for the other rows, only what was visible when the gap was
//!    queued: a flush does not help a write still invisible.
//! 2. **Unhealthy means bypass.** A read that starts while the cache should not
//!    trust its entries — a source it listens to told it `Unhealthy`, a dispatcher
//!    that fed it stopped and was not replaced, or a strategy panicked and has not
//!    handled a signal since — returns a value at least as new as every write
//!    visible before it started ([`WhileUnhealthy::Bypass`]), or one whose load
//!    started at most `max_staleness` before ([`WhileUnhealthy::ServeWithin`]).
//! 3. Reads end, return their own row, and do not fail.
//!
//! A read older than what was visible when it started, but not notified, is
//! allowed ([`Report::stale_but_allowed`]): staleness before the notification is
//! bounded by notification latency. [`Report::window_reads`] counts reads whose
//! load ran inside a visibility window, to tell whether a run reached it.
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
//! `testkit/tests/model_checker.rs`; the real cache passes.) With
//! [`SourceDelivery::AnnounceOnReceipt`], the real cache is caught through the
//! window; the violation says why, and a probe read shows the old row outliving
//! the write's visibility:
//!
//! ```text
//! minimal failing schedule:
//!   1: commit a write to row 2 (not yet visible)
//!   2: deliver every queued signal
//!   3: reader 0 starts reading row 2
//!
//! trace:
//! step 4: reader 0 (from step 3) row 2 => v0 (load #0) STALE: v1 was notified at step 2 (load #0 read at step 3): the event was applied before v1 was visible (still invisible at step 4); the load started after the invalidation, so the generation check could not reject v0. Probe: with v1 visible, a new read still gets v0 (load #0) from the cache, and v1's event is spent: stale until something else invalidates row 2
//!        dispatcher attached to source 0 (cache flushed; source healthy)
//!        dispatcher attached to source 1 (cache flushed; source healthy)
//!    1: commit a write to row 2 (not yet visible)
//!        row 2 -> v1 committed, not yet visible (loads read v0), event #1 queued on source 0
//!    2: deliver every queued signal
//!        event #1 (row 2 v1) delivered by source 0
//!          strategy: drop keys [2]
//!    3: reader 0 starts reading row 2
//!        reader 0's load reads row 2 = v0 (load #0); v1 is committed but not yet visible
//!    4: (end: every pending load returns)
//!        reader 0 (from step 3) row 2 => v0 (load #0) STALE: v1 was notified at step 2 (load #0 read at step 3): the event was applied before v1 was visible (still invisible at step 4); the load started after the invalidation, so the generation check could not reject v0. Probe: with v1 visible, a new read still gets v0 (load #0) from the cache, and v1's event is spent: stale until something else invalidates row 2
//! ```
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
//!
//! The window: a load that starts after the event, before the write is visible.
//!
//! ```
//! use pgcachewatch::testkit::checker::{ModelChecker, Op, Schedule, SourceDelivery};
//!
//! let window = Schedule::new(vec![
//!     Op::Commit { row: 0 },             // v1's commit record is written ...
//!     Op::Deliver { source: 0 },         // ... announced on receipt, its event is applied ...
//!     Op::StartRead { slot: 0, row: 0 }, // ... and a new snapshot still reads v0.
//!     Op::FinishLoad { slot: 0 },
//!     Op::BecomeVisible { row: 0 },      // Announced when visible: the event comes now.
//!     Op::Deliver { source: 0 },
//!     Op::StartRead { slot: 1, row: 0 },
//!     Op::FinishLoad { slot: 1 },
//! ]);
//! let stale = ModelChecker::new()
//!     .delivery(SourceDelivery::AnnounceOnReceipt)
//!     .run(&window)
//!     .expect_err("v0 is loaded after v1's event, and cached");
//! assert_eq!(stale.step, 4);
//! let report = ModelChecker::new() // SourceDelivery::AnnounceWhenVisible
//!     .run(&window)
//!     .expect("announced once visible: the event drops v0");
//! assert_eq!((report.reads_checked, report.window_reads), (2, 1));
//! ```

mod cache;
mod delivery;
mod refresh;
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
    Cache, CacheBuilder, Decision, Dispatcher, DispatcherHandle, Event, GapReason, Health,
    InvalidationStrategy, Operation, RowKey, SignalHub, WhileUnhealthy,
};

pub use self::cache::{CheckedCache, Loader, Value};
pub use self::delivery::SourceDelivery;
pub use self::refresh::RefreshingCacheFn;
use self::refresh::{RefreshCheck, RefreshSim};
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
    delivery: SourceDelivery,
    cache: CacheFactory,
    strategy: StrategyFactory,
    refresh: Option<RefreshCheck>,
}

impl fmt::Debug for ModelChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelChecker")
            .field("while_unhealthy", &self.while_unhealthy)
            .field("delivery", &self.delivery)
            .field("refresh", &self.refresh)
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
    /// The real [`Cache`] with [`WhileUnhealthy::Bypass`], sources that announce a
    /// write once it is visible ([`SourceDelivery::AnnounceWhenVisible`]), and a
    /// strategy that drops the rows each event names (everything on a gap).
    pub fn new() -> Self {
        ModelChecker {
            while_unhealthy: WhileUnhealthy::Bypass,
            delivery: SourceDelivery::default(),
            cache: Arc::new(|policy| {
                let cache: Cache<Row, Value> = Cache::builder()
                    .capacity(64)
                    .while_unhealthy(policy)
                    .build();
                Box::new(cache)
            }),
            strategy: Arc::new(|| Box::new(RowKeyed)),
            refresh: None,
        }
    }

    /// Checks the real [`Cache`] with refresh on invalidation (builder style):
    /// a key invalidated after it was read is reloaded in the background, and
    /// every flush warms every row, both through a refresher that reads the
    /// simulated table like a load. Refreshes read only at [`Op::RunRefreshes`]
    /// and return only at [`Op::FinishRefresh`] (or at the end), so writes,
    /// deliveries and reads fall in between. At most two run at once.
    ///
    /// The rules are unchanged: a refresh must never make a read stale. Replaces
    /// a cache set with [`cache`](Self::cache).
    ///
    /// ```
    /// use pgcachewatch::testkit::checker::{ModelChecker, Op, Schedule};
    /// let racing = Schedule::new(vec![
    ///     Op::StartRead { slot: 0, row: 0 }, // a miss marks row 0 read
    ///     Op::FinishLoad { slot: 0 },
    ///     Op::Write { row: 0 },
    ///     Op::Deliver { source: 0 },         // invalidated: a refresh starts ...
    ///     Op::RunRefreshes,                  // ... and reads v1 ...
    ///     Op::Write { row: 0 },              // ... v2 is written and delivered ...
    ///     Op::Deliver { source: 0 },
    ///     Op::FinishRefresh,                 // ... then the refresh returns v1: discarded.
    ///     Op::StartRead { slot: 1, row: 0 },
    /// ]);
    /// let report = ModelChecker::new().refresh_on_invalidation().run(&racing).unwrap();
    /// assert_eq!(report.reads_checked, 2);
    /// ```
    pub fn refresh_on_invalidation(mut self) -> Self {
        self.refresh.get_or_insert(RefreshCheck {
            stale_within: None,
            configure: None,
        });
        self
    }

    /// Refreshes on invalidation (as [`refresh_on_invalidation`](Self::refresh_on_invalidation))
    /// with [`CacheBuilder::serve_stale_within`]`(bound)`, and checks its rule:
    /// a read returns a value that is fresh, or was made stale by a processed
    /// notification at most `bound` before the read returned. The cache's
    /// stale clock is the checker's: one millisecond a step.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgcachewatch::testkit::checker::{ModelChecker, Op, Schedule};
    /// let s = Schedule::new(vec![
    ///     Op::StartRead { slot: 0, row: 0 },
    ///     Op::FinishLoad { slot: 0 },
    ///     Op::Write { row: 0 },
    ///     Op::Deliver { source: 0 },         // refresh starts; v0 may be served 2 ms
    ///     Op::StartRead { slot: 1, row: 0 }, // 1 ms later: v0, allowed
    /// ]);
    /// let checker = ModelChecker::new().serve_stale_within(Duration::from_millis(2));
    /// assert_eq!(checker.run(&s).unwrap().stale_served, 1);
    /// ```
    pub fn serve_stale_within(mut self, bound: Duration) -> Self {
        self = self.refresh_on_invalidation();
        if let Some(r) = &mut self.refresh {
            r.stale_within = Some(bound);
        }
        self
    }

    /// Adjusts the refreshing cache's builder after the checker's settings
    /// (builder style; turns refreshing on): to check a cache configured
    /// differently from the rule, for instance one that serves stale values
    /// for longer than [`serve_stale_within`](Self::serve_stale_within) allows
    /// (the checker must catch it).
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgcachewatch::testkit::checker::{ModelChecker, Op, Schedule};
    /// let s = Schedule::new(vec![
    ///     Op::StartRead { slot: 0, row: 0 },
    ///     Op::FinishLoad { slot: 0 },
    ///     Op::Write { row: 0 },
    ///     Op::Deliver { source: 0 },
    ///     Op::StartRead { slot: 1, row: 0 }, // v0, served stale
    /// ]);
    /// let planted = ModelChecker::new() // the rule: never stale
    ///     .refreshing_cache(|b| b.serve_stale_within(Duration::from_secs(1)));
    /// assert!(planted.run(&s).unwrap_err().message.contains("STALE"));
    /// ```
    pub fn refreshing_cache<F>(mut self, configure: F) -> Self
    where
        F: Fn(CacheBuilder<Row, Value>) -> CacheBuilder<Row, Value> + Send + Sync + 'static,
    {
        self = self.refresh_on_invalidation();
        if let Some(r) = &mut self.refresh {
            r.configure = Some(Arc::new(configure));
        }
        self
    }

    /// What the cache does while unhealthy, and what rule 2 checks (builder style).
    pub fn while_unhealthy(mut self, policy: WhileUnhealthy) -> Self {
        self.while_unhealthy = policy;
        self
    }

    /// When the simulated sources announce a write (builder style): at its commit
    /// record, so its event can be applied before a new snapshot sees the write
    /// ([`SourceDelivery::AnnounceOnReceipt`], a replication source that
    /// invalidates on receipt: the checker finds stale reads), or once it is visible
    /// ([`SourceDelivery::AnnounceWhenVisible`], the default: LISTEN, and the
    /// fixed replication source). It matters only for schedules that separate a
    /// write's commit from its visibility ([`Op::Commit`], [`Op::BecomeVisible`]).
    ///
    /// ```
    /// use pgcachewatch::testkit::checker::{ModelChecker, Op, Schedule, SourceDelivery};
    /// let s = Schedule::new(vec![
    ///     Op::Commit { row: 0 },
    ///     Op::Deliver { source: 0 },
    ///     Op::StartRead { slot: 0, row: 0 },
    /// ]);
    /// let checker = ModelChecker::new().delivery(SourceDelivery::AnnounceOnReceipt);
    /// assert!(checker.run(&s).is_err());
    /// ```
    pub fn delivery(mut self, delivery: SourceDelivery) -> Self {
        self.delivery = delivery;
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
    /// Reads that returned an older value than was visible when they started
    /// (allowed: not yet notified, or within the unhealthy bound).
    pub stale_but_allowed: usize,
    /// Checked reads whose value came from a load that read its row inside a
    /// visibility window (a newer write committed, not yet visible): the reads a
    /// source announcing on receipt can make stale. Tells whether a run reached
    /// the window at all.
    pub window_reads: usize,
    /// Reads that returned a value made stale by a processed notification,
    /// allowed because the cache serves stale values within a bound
    /// ([`ModelChecker::serve_stale_within`]) and the read returned within it.
    pub stale_served: usize,
    /// Background loads (refreshes and warming) that read the table.
    pub refreshes: usize,
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

/// Generated schedules of up to `max_len` steps (feature `proptest`): every kind
/// of [`Op`], including writes whose visibility lags their commit record
/// ([`Op::Commit`] ... [`Op::BecomeVisible`]), so loads and deliveries fall inside
/// the visibility window.
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
    /// [`Report::window_reads`] summed over the schedules run: how often the
    /// exploration put a load inside a visibility window.
    pub window_reads: u64,
    /// [`Report::refreshes`] summed: background loads that read the table.
    pub refreshes: u64,
    /// [`Report::stale_served`] summed: reads allowed by the stale bound.
    pub stale_served: u64,
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
        let window_reads = Cell::new(0u64);
        let refreshes = Cell::new(0u64);
        let stale_served = Cell::new(0u64);
        let result = runner.run(&schedules(max_len), |schedule| {
            self.run(&schedule)
                .map(|report| {
                    window_reads.set(window_reads.get() + report.window_reads as u64);
                    refreshes.set(refreshes.get() + report.refreshes as u64);
                    stale_served.set(stale_served.get() + report.stale_served as u64);
                })
                .map_err(|v| TestCaseError::fail(v.to_string()))
        });
        match result {
            Ok(()) => Ok(Exploration {
                cases,
                window_reads: window_reads.get(),
                refreshes: refreshes.get(),
                stale_served: stale_served.get(),
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
        /// What a gap standing for this event covers (see `Sim::covers`), as of
        /// its announcement.
        snapshot: Vec<u64>,
    },
    Gap {
        reason: GapReason,
        /// Every row's version this gap covers (see `Sim::covers`).
        covers: Vec<u64>,
    },
    Health(Health),
}

#[derive(Debug)]
struct LoadRecord {
    row: Row,
    version: u64,
    /// A newer write to the row was committed but not yet visible when it read.
    window: bool,
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
    /// The row's visible version when the read started.
    visible: u64,
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
    /// Every row's newest version visible to a new snapshot: what loads read.
    visible: RefCell<Vec<u64>>,
    /// Every row's newest committed version (commit record written).
    committed: RefCell<Vec<u64>>,
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
    delivery: SourceDelivery,
    cache: Box<dyn CheckedCache>,
    strategy: StrategyFactory,
    notes: Arc<Mutex<Vec<String>>>,
    clock: VirtualClock,
    sources: Vec<SimSource>,
    /// The model: dispatchers that stopped and were not replaced.
    stopped: usize,
    writes: u64,
    /// Per row, the event number of the write committed but not yet visible.
    in_flight: Vec<Option<u64>>,
    /// Per row, the newest version its source announced (its notification was
    /// queued, or lost to a disconnection): what a gap of that source stands for.
    announced: Vec<u64>,
    /// Per row, the step at which each version became visible (index: version).
    visible_since: Vec<Vec<usize>>,
    notified: Vec<Notice>,
    /// Per row, every advance of `notified`, in order: when each version was
    /// first covered by a processed notification (for the stale bound).
    notice_history: Vec<Vec<Notice>>,
    slots: Vec<Option<Reading>>,
    reads_checked: usize,
    stale_but_allowed: usize,
    window_reads: usize,
    stale_served: usize,
    refreshes: usize,
    /// With refreshes: the background work and what it shares.
    refresh: Option<RefreshSim>,
}

impl Sim {
    fn new(checker: &ModelChecker) -> Self {
        let world = World {
            visible: RefCell::new(vec![0; ROWS as usize]),
            committed: RefCell::new(vec![0; ROWS as usize]),
            ..World::default()
        };
        let (refresh, cache) = match &checker.refresh {
            Some(check) => {
                let (sim, cache) = RefreshSim::build(check, checker.while_unhealthy);
                (Some(sim), Box::new(cache) as Box<dyn CheckedCache>)
            }
            None => (None, (checker.cache)(checker.while_unhealthy)),
        };
        let mut sim = Sim {
            world: Rc::new(world),
            while_unhealthy: checker.while_unhealthy,
            delivery: checker.delivery,
            cache,
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
            in_flight: vec![None; ROWS as usize],
            announced: vec![0; ROWS as usize],
            visible_since: vec![vec![0]; ROWS as usize],
            notified: vec![Notice::default(); ROWS as usize],
            notice_history: vec![Vec::new(); ROWS as usize],
            slots: (0..SLOTS).map(|_| None).collect(),
            reads_checked: 0,
            stale_but_allowed: 0,
            window_reads: 0,
            stale_served: 0,
            refreshes: 0,
            refresh,
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
        // Attaching flushes: a gap standing for everything the source said before.
        self.cover(&self.covers(source));
        self.note(format_args!(
            "dispatcher attached to source {source} (cache flushed; source {})",
            if self.sources[source].told_healthy {
                "healthy"
            } else {
                "unhealthy"
            }
        ));
    }

    /// Marks every row's version in `versions` as covered by a processed
    /// notification, now.
    fn cover(&mut self, versions: &[u64]) {
        for (row, &version) in versions.iter().enumerate() {
            self.notify(row, version);
        }
    }

    /// `row`'s `version` is covered by a processed notification, now.
    fn notify(&mut self, row: usize, version: u64) {
        let step = self.world.step.get();
        let notice = &mut self.notified[row];
        if version > notice.version {
            *notice = Notice { version, step };
            self.notice_history[row].push(*notice);
        }
    }

    /// When a processed notification first covered a version of `row` newer
    /// than `version`: the step that made `version` stale.
    fn outdated_at(&self, row: Row, version: u64) -> Option<usize> {
        self.notice_history[row as usize]
            .iter()
            .find(|n| n.version > version)
            .map(|n| n.step)
    }

    fn note(&self, line: fmt::Arguments<'_>) {
        self.world.note(line);
    }

    /// What a gap of `source` (or a flush its dispatcher makes) created now covers,
    /// per row: for the source's own rows, every write it announced (the gap
    /// stands for their events, delivered or lost); for the other rows, what is
    /// visible now, which every load started after the flush reads at least. A
    /// flush does not make a committed but invisible write of another source's
    /// row safe: a load after it still reads the old row.
    ///
    /// When every write is visible at once (only [`Op::Write`]), this is every
    /// row's committed version, as before the window was modelled.
    fn covers(&self, source: Source) -> Vec<u64> {
        let visible = self.world.visible.borrow();
        (0..ROWS)
            .map(|row| {
                if Self::source_of(row) == source {
                    self.announced[row as usize]
                } else {
                    visible[row as usize]
                }
            })
            .collect()
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
        if let Some(r) = &self.refresh {
            r.now_ms.store(step as u64, Ordering::SeqCst);
        }
        match op {
            Op::Write { row } => self.write(row % ROWS, true),
            Op::Commit { row } => self.write(row % ROWS, false),
            Op::BecomeVisible { row } => {
                let row = row % ROWS;
                if self.in_flight[row as usize].is_some() {
                    self.become_visible(row);
                } else {
                    self.note(format_args!("(no write to row {row} in flight)"));
                }
            }
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
                let covers = self.covers(source);
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
                let covers = self.covers(source);
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
            Op::RunRefreshes => self.run_refreshes(false),
            Op::FinishRefresh => self.run_refreshes(true),
        }
        self.poll_reads()
    }

    /// Runs the background work (after letting the oldest waiting refresh
    /// return, with `release`), and moves what it did into the records.
    fn run_refreshes(&mut self, release: bool) {
        let Some(r) = &self.refresh else {
            self.note(format_args!("(no refreshes: the cache does not refresh)"));
            return;
        };
        if release && !r.release_one() {
            self.note(format_args!("(no refresh waits to return)"));
        }
        self.background();
    }

    /// Polls the background tasks, then records their loads and notes. The
    /// table they read is updated before.
    fn background(&mut self) {
        let Some(r) = &self.refresh else {
            return;
        };
        if let Ok(mut io) = r.io.lock() {
            io.visible.clone_from(&self.world.visible.borrow());
            io.committed.clone_from(&self.world.committed.borrow());
            io.next_id = self.world.loads.borrow().len() as u64;
        }
        r.run();
        let (loads, notes) = match r.io.lock() {
            Ok(mut io) => (std::mem::take(&mut io.loads), std::mem::take(&mut io.notes)),
            Err(_) => return,
        };
        let step = self.world.step.get();
        self.refreshes += loads.len();
        self.world
            .loads
            .borrow_mut()
            .extend(loads.into_iter().map(|l| LoadRecord {
                row: l.row,
                version: l.version,
                window: l.window,
                read_step: step,
                read_at: l.read_at,
            }));
        for n in notes {
            self.note(format_args!("{n}"));
        }
    }

    /// A write to `row`: its commit record now, and its visibility now
    /// (`visible_now`, [`Op::Write`]) or at [`Op::BecomeVisible`] ([`Op::Commit`]).
    /// The source announces it at the moment its [`SourceDelivery`] says.
    fn write(&mut self, row: Row, visible_now: bool) {
        if self.in_flight[row as usize].is_some() {
            self.note(format_args!(
                "(the write to row {row} in flight becomes visible first: this writer \
                 waited on its row lock)"
            ));
            self.become_visible(row);
        }
        let version = {
            let mut committed = self.world.committed.borrow_mut();
            committed[row as usize] += 1;
            committed[row as usize]
        };
        self.writes += 1;
        let n = self.writes;
        if visible_now {
            self.reveal(row, version);
            let announced = self.announce(row, version, n);
            self.note(format_args!("row {row} -> v{version}, {announced}"));
        } else {
            self.in_flight[row as usize] = Some(n);
            let announced = if self.delivery.announces_on_commit() {
                self.announce(row, version, n)
            } else {
                format!("event #{n} waits until it is visible")
            };
            self.note(format_args!(
                "row {row} -> v{version} committed, not yet visible (loads read v{}), {announced}",
                version - 1
            ));
        }
    }

    /// The write to `row` in flight becomes visible; announced now if the source
    /// waits for visibility.
    fn become_visible(&mut self, row: Row) {
        let Some(n) = self.in_flight[row as usize].take() else {
            return;
        };
        let version = self.world.committed.borrow()[row as usize];
        self.reveal(row, version);
        if self.delivery.announces_on_commit() {
            self.note(format_args!(
                "row {row} v{version} visible to new snapshots"
            ));
        } else {
            let announced = self.announce(row, version, n);
            self.note(format_args!(
                "row {row} v{version} visible to new snapshots, {announced}"
            ));
        }
    }

    /// Loads read `version` of `row` from now on.
    fn reveal(&mut self, row: Row, version: u64) {
        self.world.visible.borrow_mut()[row as usize] = version;
        let since = &mut self.visible_since[row as usize];
        debug_assert_eq!(
            since.len() as u64,
            version,
            "versions become visible in order"
        );
        since.push(self.world.step.get());
    }

    /// `row`'s source announces event `n` (`row` at `version`): queued, or lost if
    /// the source is disconnected. Says which, for the trace.
    fn announce(&mut self, row: Row, version: u64, n: u64) -> String {
        self.announced[row as usize] = version;
        let source = Self::source_of(row);
        if self.sources[source].connected {
            let snapshot = self.covers(source);
            self.sources[source].queue.push_back(Queued::Event {
                n,
                row,
                version,
                snapshot,
            });
            format!("event #{n} queued on source {source}")
        } else {
            format!("notification lost (source {source} disconnected)")
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
                        // The dispatcher flushed the cache: a gap of this source.
                        self.sources[source].poisoned = true;
                        let all = self.covers(source);
                        self.cover(&all);
                    } else {
                        self.sources[source].poisoned = false;
                        self.notify(row as usize, version);
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
                    // A new snapshot: only visible writes.
                    let version = world.visible.borrow()[row as usize];
                    let committed = world.committed.borrow()[row as usize];
                    let window = committed > version;
                    let id = {
                        let mut loads = world.loads.borrow_mut();
                        loads.push(LoadRecord {
                            row,
                            version,
                            window,
                            read_step: world.step.get(),
                            read_at: Instant::now(),
                        });
                        loads.len() as u64 - 1
                    };
                    own_load.set(Some(id));
                    let unseen = if window {
                        format!("; v{committed} is committed but not yet visible")
                    } else {
                        String::new()
                    };
                    world.note(format_args!(
                        "reader {slot}'s load reads row {row} = v{version} (load #{id}){unseen}"
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
            visible: self.world.visible.borrow()[row as usize],
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
                .map(|l| (l.row, l.version, l.window, l.read_step, l.read_at))
        };
        let Some((load_row, load_version, load_window, load_step, load_read_at)) = load else {
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
        if load_window {
            self.window_reads += 1;
        }
        if value.version < r.notified.version {
            // Stale serving is for a healthy cache only (an unhealthy one
            // bypasses, rule 2).
            let stale_ok = (!r.unhealthy)
                .then(|| self.within_stale_bound(row, value.version))
                .flatten();
            if let Some(allowed) = stale_ok {
                self.stale_served += 1;
                self.note(format_args!(
                    "{shown} (stale, allowed: made stale {allowed:?} ago, within the bound)"
                ));
                return Ok(());
            }
            let notified = r.notified.version;
            let mut message = format!(
                "{shown} STALE: v{notified} was notified at step {} (load #{} read at step {load_step})",
                r.notified.step, value.load
            );
            if load_window && load_step >= r.notified.step {
                use fmt::Write;
                let visible = match self.visible_since[row as usize].get(notified as usize) {
                    Some(step) => format!("visible from step {step}"),
                    None => format!("still invisible at step {}", self.world.step.get()),
                };
                let _ = write!(
                    message,
                    ": the event was applied before v{notified} was visible ({visible}); \
                     the load started after the invalidation, so the generation check \
                     could not reject v{}",
                    value.version
                );
                message.push_str(&self.probe(row));
            }
            return Err(self.violation(message));
        }
        if value.version < r.visible {
            if r.unhealthy {
                match self.while_unhealthy {
                    WhileUnhealthy::ServeWithin(bound) => {
                        let age = r.started_at.saturating_duration_since(load_read_at);
                        if age > bound {
                            return Err(self.violation(format!(
                                "{shown} STALE while unhealthy: v{} visible before the read; \
                                 the value's load started at least {age:?} earlier, beyond \
                                 the bound of {bound:?}",
                                r.visible
                            )));
                        }
                    }
                    _ => {
                        return Err(self.violation(format!(
                            "{shown} STALE while unhealthy: v{} was visible before the read \
                             started, and an unhealthy cache must bypass",
                            r.visible
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
                r.visible
            ));
        } else {
            self.note(format_args!("{shown}"));
        }
        Ok(())
    }

    /// With a stale bound: how long ago (one millisecond a step) `version` of
    /// `row` was made stale by a processed notification, if that is within
    /// the bound now (the read returns now).
    fn within_stale_bound(&self, row: Row, version: u64) -> Option<Duration> {
        let bound = self.refresh.as_ref()?.stale_within?;
        let at = self.outdated_at(row, version)?;
        let age = Duration::from_millis((self.world.step.get() - at) as u64);
        (age <= bound).then_some(age)
    }

    /// After a read found stale through the visibility window: makes `row`'s write
    /// visible (if it is still in flight; no event, as none is left to come) and
    /// reads `row` once more, to show what the cache now serves. Says what that
    /// read returned, for the violation's message.
    fn probe(&mut self, row: Row) -> String {
        if self.in_flight[row as usize].take().is_some() {
            let version = self.world.committed.borrow()[row as usize];
            self.reveal(row, version);
        }
        let world = self.world.clone();
        let loader: Loader = Box::new(move || {
            Box::pin(async move {
                Value {
                    version: world.visible.borrow()[row as usize],
                    load: u64::MAX,
                }
            })
        });
        let visible = self.world.visible.borrow()[row as usize];
        let mut read = self.cache.read(row, loader);
        let waker = futures::task::noop_waker();
        match read.as_mut().poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(Ok(v)) if v.load != u64::MAX && v.version < visible => format!(
                ". Probe: with v{visible} visible, a new read still gets v{} (load #{}) from \
                 the cache, and v{visible}'s event is spent: stale until something else \
                 invalidates row {row}",
                v.version, v.load
            ),
            _ => String::new(),
        }
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
        if let Some(r) = &self.refresh {
            r.release_all();
        }
        self.background();
        self.poll_reads()?;
        // A load released late may let a waiter lead a new load: release again.
        for _ in 0..SLOTS + 2 {
            for r in self.slots.iter().flatten() {
                r.gate.set(true);
            }
            self.background();
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
            window_reads: self.window_reads,
            stale_served: self.stale_served,
            refreshes: self.refreshes,
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
