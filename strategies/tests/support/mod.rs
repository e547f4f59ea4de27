//! Generated event logs and a virtual-time driver for the property tests.
//!
//! A log is a list of [`Step`]s, each `delta_ms` after the previous one. The
//! driver turns it into a timeline on a virtual clock (`base + offset`), feeds it
//! to a strategy, and calls `on_tick` at every deadline that falls due before the
//! next step, at the deadline itself — so the recorded decisions show exactly
//! when a strategy fires. After the last step it keeps ticking until no deadline
//! is left, so deferred work is visible too.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use pgcachewatch_core::{Decision, Event, GapReason, InvalidationStrategy, Operation, RowKey};
use proptest::prelude::*;

/// The tables the generated events are about. `Users` has no schema, like
/// PGCacheWatch's payload.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    PublicUsers,
    PublicOrders,
    AuditUsers,
    Users,
}

impl Table {
    pub const ALL: [Table; 4] = [
        Table::PublicUsers,
        Table::PublicOrders,
        Table::AuditUsers,
        Table::Users,
    ];

    pub fn schema(self) -> Option<&'static str> {
        match self {
            Table::PublicUsers | Table::PublicOrders => Some("public"),
            Table::AuditUsers => Some("audit"),
            Table::Users => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Table::PublicOrders => "orders",
            _ => "users",
        }
    }
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.schema() {
            Some(schema) => write!(f, "{schema}.{}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// One input of a generated log.
#[derive(Clone, PartialEq)]
pub enum Step {
    Event {
        delta_ms: u64,
        op: Operation,
        table: Table,
        keys: Option<Vec<i64>>,
    },
    Gap {
        delta_ms: u64,
    },
}

impl Step {
    pub fn delta(&self) -> Duration {
        match self {
            Step::Event { delta_ms, .. } | Step::Gap { delta_ms } => {
                Duration::from_millis(*delta_ms)
            }
        }
    }

    pub fn event(&self) -> Option<Event> {
        match self {
            Step::Gap { .. } => None,
            Step::Event {
                op, table, keys, ..
            } => {
                let mut e = Event::new("pgcachewatch", *op, "", table.name());
                e.schema = table.schema().map(Into::into);
                e.keys = keys
                    .as_ref()
                    .map(|ks| ks.iter().map(|&k| RowKey::single("id", k)).collect());
                Some(e)
            }
        }
    }

    pub fn is_gap(&self) -> bool {
        matches!(self, Step::Gap { .. })
    }
}

/// Compact, so that a shrunk failure reads as an event log:
/// `+120ms update public.users keys=[1, 2]`, `+5ms GAP`.
impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Gap { delta_ms } => write!(f, "+{delta_ms}ms GAP"),
            Step::Event {
                delta_ms,
                op,
                table,
                keys,
            } => {
                write!(f, "+{delta_ms}ms {op} {table:?}")?;
                if let Some(keys) = keys {
                    write!(f, " keys={keys:?}")?;
                }
                Ok(())
            }
        }
    }
}

pub fn operation() -> impl Strategy<Value = Operation> {
    prop::sample::select(Operation::ALL.to_vec())
}

fn delta_ms() -> impl Strategy<Value = u64> {
    // Mostly bursts, sometimes long pauses.
    prop_oneof![3 => 0u64..20, 2 => 0u64..400]
}

pub fn step() -> impl Strategy<Value = Step> {
    let event = (
        delta_ms(),
        operation(),
        prop::sample::select(Table::ALL.to_vec()),
        prop::option::of(prop::collection::vec(0i64..6, 0..4)),
    )
        .prop_map(|(delta_ms, op, table, keys)| Step::Event {
            delta_ms,
            op,
            table,
            keys,
        });
    let gap = delta_ms().prop_map(|delta_ms| Step::Gap { delta_ms });
    prop_oneof![12 => event, 1 => gap]
}

pub fn log() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(step(), 0..60)
}

/// A step placed on the virtual clock.
#[derive(Debug, Clone)]
pub struct At {
    /// Offset from the run's base instant.
    pub at: Duration,
    /// Index of the step in the generated log.
    pub index: usize,
    pub step: Step,
}

pub fn timeline(steps: &[Step]) -> Vec<At> {
    let mut at = Duration::ZERO;
    steps
        .iter()
        .enumerate()
        .map(|(index, step)| {
            at += step.delta();
            At {
                at,
                index,
                step: step.clone(),
            }
        })
        .collect()
}

/// What a decision answered. Ticks sort before the step at the same instant,
/// as the driver delivers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Input {
    Tick,
    Step(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub at: Duration,
    pub input: Input,
    pub decision: Decision<u32>,
}

/// More ticks than this after the last step means a deadline that never settles.
const MAX_DRAIN_TICKS: usize = 10_000;

fn tick_due(
    s: &mut dyn InvalidationStrategy<u32>,
    base: Instant,
    until: Option<Instant>,
    out: &mut Vec<Record>,
) {
    let mut ticks = 0;
    while let Some(deadline) = s.next_deadline() {
        if until.is_some_and(|u| deadline > u) {
            break;
        }
        ticks += 1;
        assert!(ticks <= MAX_DRAIN_TICKS, "deadlines never settle");
        assert!(deadline >= base, "deadline before the first input");
        let decision = s.on_tick(deadline);
        assert!(
            s.next_deadline().is_none_or(|d| d > deadline),
            "a tick at the deadline must move the deadline (strategy {s:?})"
        );
        out.push(Record {
            at: deadline - base,
            input: Input::Tick,
            decision,
        });
    }
}

/// Feeds `timeline` to `s` on a virtual clock starting at `base`.
pub fn drive(s: &mut dyn InvalidationStrategy<u32>, timeline: &[At], base: Instant) -> Vec<Record> {
    let mut out = Vec::new();
    for item in timeline {
        let now = base + item.at;
        tick_due(s, base, Some(now), &mut out);
        let decision = match item.step.event() {
            Some(event) => s.on_event(&event, now),
            None => s.on_gap(
                &GapReason::Injected {
                    detail: "generated".into(),
                },
                now,
            ),
        };
        out.push(Record {
            at: item.at,
            input: Input::Step(item.index),
            decision,
        });
    }
    tick_due(s, base, None, &mut out);
    out
}

/// The records that drop something, by (instant, input).
pub fn firing(records: &[Record]) -> BTreeMap<(Duration, Input), Decision<u32>> {
    records
        .iter()
        .filter(|r| !r.decision.is_nothing())
        .map(|r| ((r.at, r.input), r.decision.clone()))
        .collect()
}

/// Checks that every matching event is covered by a flush (`All`) at most
/// `max_delay` after it and at most `max_events` matching events after it
/// (counting itself), and that no flush other than a gap's comes without an
/// uncovered matching event. Returns a description of the first violation.
pub fn check_coverage(
    records: &[Record],
    timeline: &[At],
    matching: impl Fn(&Step) -> bool,
    max_delay: Duration,
    max_events: Option<usize>,
) -> Result<(), String> {
    // (time, index) of the matching events not covered yet.
    let mut uncovered: Vec<(Duration, usize)> = Vec::new();
    for r in records {
        let step = match r.input {
            Input::Step(i) => timeline.iter().find(|a| a.index == i).map(|a| &a.step),
            Input::Tick => None,
        };
        let is_match = step.is_some_and(&matching);
        if is_match {
            uncovered.push((r.at, r.input_index()));
        }
        if let Some(&(first_at, first_index)) = uncovered.first() {
            if r.at > first_at + max_delay {
                return Err(format!(
                    "step {first_index} at {first_at:?} still not flushed at {:?} (window {max_delay:?})",
                    r.at
                ));
            }
        }
        if let Some(n) = max_events {
            if uncovered.len() > n {
                return Err(format!(
                    "step {} still not flushed after {} matching events",
                    uncovered[0].1,
                    uncovered.len()
                ));
            }
        }
        if r.decision == Decision::All {
            let gap = step.is_some_and(Step::is_gap);
            if uncovered.is_empty() && !gap {
                return Err(format!("spurious flush at {:?} by {:?}", r.at, r.input));
            }
            uncovered.clear();
        }
    }
    match uncovered.first() {
        None => Ok(()),
        Some((at, i)) => Err(format!("step {i} at {at:?} never flushed")),
    }
}

impl Record {
    fn input_index(&self) -> usize {
        match self.input {
            Input::Step(i) => i,
            Input::Tick => usize::MAX,
        }
    }
}
