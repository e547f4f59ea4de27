//! Replay an [`EventLog`] into any [`InvalidationStrategy`] under a [`VirtualClock`].
//!
//! Each record is fed to the strategy at its recorded offset; between records the
//! strategy's [`next_deadline`](InvalidationStrategy::next_deadline)s fire
//! [`on_tick`](InvalidationStrategy::on_tick) at exactly that virtual instant. Every
//! decision is applied to a [`SimulatedCache`] (and to any extra
//! [`InvalidationTarget`], a real [`Cache`](pgcachewatch_core::Cache) for instance)
//! and reported as a [`ReplayStep`] naming its cause. The result prints as a table.
//!
//! ```
//! use pgcachewatch::{Decision, Event, Health, Operation};
//! use pgcachewatch::testkit::eventlog::{EventLog, LogHeader, LogRecord, RecordKind};
//! use pgcachewatch::testkit::replay::{replay, Cause};
//! # use std::time::{Duration, Instant};
//! # use pgcachewatch::InvalidationStrategy;
//! # #[derive(Debug)] struct DropAll;
//! # impl<K> InvalidationStrategy<K> for DropAll {
//! #     fn on_event(&mut self, _: &Event, _: Instant) -> Decision<K> { Decision::All }
//! # }
//!
//! let mut log = EventLog::new(LogHeader::new());
//! log.records.push(LogRecord::new(Duration::ZERO, RecordKind::Health(Health::Healthy)));
//! let e = Event::new("ch", Operation::Update, "public", "users");
//! log.records.push(LogRecord::new(Duration::from_millis(3), RecordKind::Event(e)));
//!
//! let report = replay::<u32, _>(&log, DropAll);
//! assert_eq!(report.steps.len(), 2);
//! assert!(matches!(report.steps[1].cause, Cause::Event { .. }));
//! assert_eq!(report.steps[1].decision, Decision::All);
//! assert_eq!(report.cache.flushes, 1);
//! println!("{report}");
//! ```

use std::fmt;
use std::time::{Duration, Instant};

use pgcachewatch_core::{
    Decision, Event, GapReason, Health, HealthVote, InvalidationStrategy, InvalidationTarget,
};

use crate::clock::VirtualClock;
use crate::eventlog::{EventLog, EventLogReader, LogError, LogRecord, RecordKind};

/// How fast a replay runs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum Speed {
    /// No waiting: the virtual clock jumps from record to record (the default).
    #[default]
    AsFastAsPossible,
    /// Real time scaled by `factor` (2.0: twice as fast as recorded). The replay
    /// blocks the calling thread while it waits; run it off async executors.
    Scaled {
        /// Recorded time divided by real time; values ≤ 0 mean as fast as possible.
        factor: f64,
    },
}

/// Why a [`ReplayStep`] happened.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Cause {
    /// A recorded event (`record` is its index among the log's records).
    Event {
        /// Index of the record.
        record: usize,
        /// The event.
        event: Event,
    },
    /// A recorded gap.
    Gap {
        /// Index of the record.
        record: usize,
        /// Why events may have been lost.
        reason: GapReason,
    },
    /// A recorded health change (applied to the cache; strategies see none).
    Health {
        /// Index of the record.
        record: usize,
        /// The new health.
        health: Health,
    },
    /// The strategy's deadline came.
    Tick,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Event { record, event } => {
                write!(f, "[{record}] {} {}", event.operation, event.table_ref())?;
                if let Some(txid) = event.txid {
                    write!(f, " txid {txid}")?;
                }
                if let Some(keys) = &event.keys {
                    let keys: Vec<String> = keys
                        .iter()
                        .map(|k| serde_json::Value::Object(k.0.clone()).to_string())
                        .collect();
                    write!(f, " keys {}", keys.join(","))?;
                }
                Ok(())
            }
            Cause::Gap { record, reason } => write!(f, "[{record}] gap: {reason}"),
            Cause::Health { record, health } => write!(
                f,
                "[{record}] {}",
                if health.is_healthy() {
                    "healthy"
                } else {
                    "unhealthy"
                }
            ),
            Cause::Tick => f.write_str("tick (deadline)"),
        }
    }
}

/// One thing the replay did: when, why, and what the strategy decided.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayStep<K> {
    /// Virtual time since the start of the log.
    pub at: Duration,
    /// What caused it.
    pub cause: Cause,
    /// The strategy's decision ([`Decision::Nothing`] for health changes).
    pub decision: Decision<K>,
}

/// A stand-in for a cache that counts what the decisions would have done to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SimulatedCache {
    /// `false` while the source is unhealthy (a real cache bypasses then).
    pub unhealthy: bool,
    /// [`Decision::All`]s applied.
    pub flushes: u64,
    /// Keys invalidated, counted one by one.
    pub keys_invalidated: u64,
    /// Table invalidations, counted one per table.
    pub tables_invalidated: u64,
    /// Virtual time spent unhealthy.
    pub unhealthy_for: Duration,
    unhealthy_since: Option<Duration>,
}

impl SimulatedCache {
    fn apply<K>(&mut self, decision: &Decision<K>) {
        match decision {
            Decision::Nothing => {}
            Decision::All => self.flushes += 1,
            Decision::Invalidate(t) => {
                self.keys_invalidated += t.keys.len() as u64;
                self.tables_invalidated += t.tables.len() as u64;
            }
        }
    }

    fn set_health(&mut self, health: Health, at: Duration) {
        match (health.is_healthy(), self.unhealthy_since) {
            (false, None) => self.unhealthy_since = Some(at),
            (true, Some(since)) => {
                self.unhealthy_for += at.saturating_sub(since);
                self.unhealthy_since = None;
            }
            _ => {}
        }
        self.unhealthy = !health.is_healthy();
    }

    fn finish(&mut self, at: Duration) {
        if let Some(since) = self.unhealthy_since {
            self.unhealthy_for += at.saturating_sub(since);
            self.unhealthy_since = Some(at);
        }
    }
}

/// What a replay did, step by step. `Display` prints it as a table.
#[derive(Debug, Clone)]
pub struct ReplayReport<K> {
    /// Every step, in order.
    pub steps: Vec<ReplayStep<K>>,
    /// The simulated cache after the last step.
    pub cache: SimulatedCache,
    /// Virtual time covered (the last record's offset, or the last tick's).
    pub duration: Duration,
    /// Real time the replay took.
    pub wall_time: Duration,
}

impl<K> ReplayReport<K> {
    /// The steps whose decision drops something.
    pub fn invalidations(&self) -> impl Iterator<Item = &ReplayStep<K>> {
        self.steps.iter().filter(|s| !s.decision.is_nothing())
    }

    /// How many steps were deadline ticks.
    pub fn ticks(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s.cause, Cause::Tick))
            .count()
    }
}

fn describe_decision<K: fmt::Debug>(d: &Decision<K>) -> String {
    match d {
        Decision::Nothing => "-".into(),
        Decision::All => "DROP ALL".into(),
        Decision::Invalidate(t) => {
            let mut parts = Vec::new();
            if !t.tables.is_empty() {
                let tables: Vec<String> = t.tables.iter().map(ToString::to_string).collect();
                parts.push(format!("drop tables {}", tables.join(",")));
            }
            if !t.keys.is_empty() {
                parts.push(format!("drop keys {:?}", t.keys));
            }
            parts.join("; ")
        }
    }
}

impl<K: fmt::Debug> fmt::Display for ReplayReport<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:>4}  {:>12}  {:<66}  decision", "step", "at", "cause")?;
        for (i, step) in self.steps.iter().enumerate() {
            writeln!(
                f,
                "{:>4}  {:>12}  {:<66}  {}",
                i + 1,
                format!("{:.6}s", step.at.as_secs_f64()),
                step.cause.to_string(),
                describe_decision(&step.decision)
            )?;
        }
        let c = &self.cache;
        write!(
            f,
            "{} steps ({} ticks) over {:.3}s virtual in {:.3?}: {} flushes, {} keys and {} tables \
             invalidated, {:.3}s unhealthy",
            self.steps.len(),
            self.ticks(),
            self.duration.as_secs_f64(),
            self.wall_time,
            c.flushes,
            c.keys_invalidated,
            c.tables_invalidated,
            c.unhealthy_for.as_secs_f64()
        )
    }
}

/// The most ticks fired in a row without a record in between before the replay
/// decides the strategy's deadline is stuck (an `on_tick` that does not move it).
const MAX_TICKS_IN_A_ROW: usize = 100_000;

/// Replays logs into one strategy. Build with [`new`](Self::new), configure,
/// then [`run`](Self::run).
///
/// ```
/// use pgcachewatch::{Cache, Decision, Event, Operation, InvalidationStrategy};
/// use pgcachewatch::testkit::eventlog::{EventLog, LogHeader, LogRecord, RecordKind};
/// use pgcachewatch::testkit::replay::{Replayer, Speed};
/// # #[derive(Debug)] struct DropAll;
/// # impl<K> InvalidationStrategy<K> for DropAll {
/// #     fn on_event(&mut self, _: &Event, _: std::time::Instant) -> Decision<K> { Decision::All }
/// # }
/// let cache: Cache<u32, String> = Cache::new(100);
/// let mut log = EventLog::new(LogHeader::new());
/// let e = Event::new("ch", Operation::Delete, "public", "t");
/// log.records.push(LogRecord::new(Default::default(), RecordKind::Event(e)));
///
/// let report = Replayer::new(DropAll)
///     .speed(Speed::AsFastAsPossible)
///     .target(cache.clone())
///     .run(&log.records);
/// assert_eq!(report.cache.flushes, 1);
/// assert_eq!(cache.stats().flushes, 1);
/// ```
pub struct Replayer<K, S> {
    strategy: S,
    clock: VirtualClock,
    speed: Speed,
    /// Each target with the replayer's vote on its health.
    targets: Vec<(Box<dyn InvalidationTarget<K>>, HealthVote)>,
}

impl<K, S: fmt::Debug> fmt::Debug for Replayer<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replayer")
            .field("strategy", &self.strategy)
            .field("clock", &self.clock)
            .field("speed", &self.speed)
            .field("targets", &self.targets.len())
            .finish()
    }
}

impl<K: 'static, S: InvalidationStrategy<K>> Replayer<K, S> {
    /// A replayer for `strategy`, as fast as possible, with a fresh [`VirtualClock`].
    pub fn new(strategy: S) -> Self {
        Replayer {
            strategy,
            clock: VirtualClock::new(),
            speed: Speed::AsFastAsPossible,
            targets: Vec::new(),
        }
    }

    /// Sets the speed (builder style).
    pub fn speed(mut self, speed: Speed) -> Self {
        self.speed = speed;
        self
    }

    /// Uses this clock; record offsets count from its base (builder style).
    pub fn clock(mut self, clock: VirtualClock) -> Self {
        self.clock = clock;
        self
    }

    /// Also applies every decision and health change to `target` (builder style).
    /// The replayer feeds it like a dispatcher (one health vote, healthy until the
    /// log says otherwise), without the flush a dispatcher makes when it attaches:
    /// a replay starts where its log starts.
    pub fn target(mut self, target: impl InvalidationTarget<K>) -> Self {
        let vote = target.health_vote();
        vote.set(true);
        self.targets.push((Box::new(target), vote));
        self
    }

    /// The strategy, for inspection after a run.
    pub fn strategy(&self) -> &S {
        &self.strategy
    }

    /// Replays `records` in order, then fires the deadlines still pending.
    pub fn run<'a>(&mut self, records: impl IntoIterator<Item = &'a LogRecord>) -> ReplayReport<K> {
        let mut run = Run::new(self);
        for (index, record) in records.into_iter().enumerate() {
            run.record(index, record);
        }
        run.finish()
    }

    /// Replays a log as it is read, stopping at the first bad line.
    ///
    /// # Errors
    ///
    /// The first [`LogError`] from the reader.
    pub fn run_reader<R: std::io::BufRead>(
        &mut self,
        reader: EventLogReader<R>,
    ) -> Result<ReplayReport<K>, LogError> {
        let mut run = Run::new(self);
        for (index, record) in reader.enumerate() {
            run.record(index, &record?);
        }
        Ok(run.finish())
    }
}

/// Replays `log` into `strategy` as fast as possible.
pub fn replay<K: 'static, S: InvalidationStrategy<K>>(
    log: &EventLog,
    strategy: S,
) -> ReplayReport<K> {
    Replayer::new(strategy).run(&log.records)
}

/// One pass over a log.
struct Run<'r, K, S> {
    r: &'r mut Replayer<K, S>,
    steps: Vec<ReplayStep<K>>,
    cache: SimulatedCache,
    real_start: Instant,
}

impl<'r, K: 'static, S: InvalidationStrategy<K>> Run<'r, K, S> {
    fn new(r: &'r mut Replayer<K, S>) -> Self {
        Run {
            r,
            steps: Vec::new(),
            cache: SimulatedCache::default(),
            real_start: Instant::now(),
        }
    }

    fn record(&mut self, index: usize, record: &LogRecord) {
        let target = self.r.clock.base() + record.offset;
        self.ticks_until(Some(target));
        self.r.clock.advance_to(target);
        self.pace();
        let now = self.r.clock.now();
        let (cause, decision) = match &record.kind {
            RecordKind::Event(event) => (
                Cause::Event {
                    record: index,
                    event: event.clone(),
                },
                self.r.strategy.on_event(event, now),
            ),
            RecordKind::Gap(reason) => (
                Cause::Gap {
                    record: index,
                    reason: reason.clone(),
                },
                self.r.strategy.on_gap(reason, now),
            ),
            RecordKind::Health(health) => {
                self.cache.set_health(*health, self.r.clock.elapsed());
                for (_, vote) in &self.r.targets {
                    vote.set(health.is_healthy());
                }
                (
                    Cause::Health {
                        record: index,
                        health: *health,
                    },
                    Decision::Nothing,
                )
            }
            // A position mark moves no strategy.
            RecordKind::Progress(_) => return,
        };
        self.apply(cause, decision);
    }

    /// Fires every deadline up to `until` (all of them for `None`).
    fn ticks_until(&mut self, until: Option<Instant>) {
        let mut fired = 0usize;
        while let Some(deadline) = self.r.strategy.next_deadline() {
            if until.is_some_and(|u| deadline > u) {
                return;
            }
            if fired == MAX_TICKS_IN_A_ROW {
                tracing::warn!(
                    ?deadline,
                    "strategy deadline did not move after {MAX_TICKS_IN_A_ROW} ticks; replay stops ticking"
                );
                return;
            }
            fired += 1;
            self.r.clock.advance_to(deadline);
            self.pace();
            let decision = self.r.strategy.on_tick(self.r.clock.now());
            self.apply(Cause::Tick, decision);
        }
    }

    fn apply(&mut self, cause: Cause, decision: Decision<K>) {
        self.cache.apply(&decision);
        if !decision.is_nothing() {
            for (t, _) in &self.r.targets {
                t.apply(&decision);
            }
        }
        self.steps.push(ReplayStep {
            at: self.r.clock.elapsed(),
            cause,
            decision,
        });
    }

    /// Sleeps until the real time that matches the virtual one, when scaled.
    fn pace(&self) {
        if let Speed::Scaled { factor } = self.r.speed {
            if factor > 0.0 && factor.is_finite() {
                let real = self.r.clock.elapsed().div_f64(factor);
                let due = self.real_start + real;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
        }
    }

    fn finish(mut self) -> ReplayReport<K> {
        self.ticks_until(None);
        let duration = self.r.clock.elapsed();
        self.cache.finish(duration);
        ReplayReport {
            steps: self.steps,
            cache: self.cache,
            duration,
            wall_time: self.real_start.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventlog::LogHeader;
    use pgcachewatch_core::Operation;

    /// Drops everything `delay` after the first event of a batch.
    #[derive(Debug)]
    struct Delayed {
        delay: Duration,
        due: Option<Instant>,
    }

    impl InvalidationStrategy<u32> for Delayed {
        fn on_event(&mut self, _: &Event, now: Instant) -> Decision<u32> {
            self.due.get_or_insert(now + self.delay);
            Decision::Nothing
        }
        fn on_tick(&mut self, now: Instant) -> Decision<u32> {
            match self.due {
                Some(d) if d <= now => {
                    self.due = None;
                    Decision::All
                }
                _ => Decision::Nothing,
            }
        }
        fn next_deadline(&self) -> Option<Instant> {
            self.due
        }
    }

    fn log_of(offsets_ms: &[u64]) -> EventLog {
        let mut log = EventLog::new(LogHeader::new());
        for &ms in offsets_ms {
            let e = Event::new("ch", Operation::Insert, "public", "t");
            log.records.push(LogRecord::new(
                Duration::from_millis(ms),
                RecordKind::Event(e),
            ));
        }
        log
    }

    #[test]
    fn ticks_fire_at_their_deadline_between_records() {
        let strategy = Delayed {
            delay: Duration::from_millis(10),
            due: None,
        };
        let report = replay(&log_of(&[0, 5, 30, 31]), strategy);
        let kinds: Vec<(u128, bool)> = report
            .steps
            .iter()
            .map(|s| (s.at.as_millis(), matches!(s.cause, Cause::Tick)))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0, false),
                (5, false),
                (10, true),
                (30, false),
                (31, false),
                (40, true)
            ]
        );
        assert_eq!(report.cache.flushes, 2);
        assert_eq!(report.duration, Duration::from_millis(40));
        let table = report.to_string();
        assert!(
            table.contains("tick (deadline)") && table.contains("DROP ALL"),
            "{table}"
        );
    }

    #[test]
    fn scaled_speed_does_not_change_decisions() {
        let strategy = || Delayed {
            delay: Duration::from_millis(1),
            due: None,
        };
        let records = log_of(&[0, 100]).records;
        let scaled = Replayer::new(strategy())
            .speed(Speed::Scaled { factor: 10.0 })
            .run(&records);
        let fast = Replayer::new(strategy()).run(&records);
        let show = |r: &ReplayReport<_>| format!("{:?}", r.steps);
        assert_eq!(show(&scaled), show(&fast));
        assert!(!scaled.steps.is_empty());
    }

    #[test]
    fn health_time_is_accounted() {
        let mut log = EventLog::new(LogHeader::new());
        for (ms, h) in [
            (0, Health::Healthy),
            (10, Health::Unhealthy),
            (35, Health::Healthy),
        ] {
            log.records.push(LogRecord::new(
                Duration::from_millis(ms),
                RecordKind::Health(h),
            ));
        }
        let report = replay::<u32, _>(
            &log,
            Delayed {
                delay: Duration::ZERO,
                due: None,
            },
        );
        assert_eq!(report.cache.unhealthy_for, Duration::from_millis(25));
        assert!(!report.cache.unhealthy);
    }
}
