//! The relay protocol as a model whose every reachable state is explored
//! (breadth first, no sampling): an upstream that commits positions, a relay
//! that publishes them through a window of acknowledgements that can fail,
//! republishes, crashes and restarts over its slot, a stream that can be lost
//! or created anew, a slot someone else can advance, and one consumer.
//!
//! The property, checked in every state where nothing can happen any more:
//! every committed position was delivered to the consumer, or the consumer
//! handled a gap after it was committed (a flush: nothing loaded before that
//! gap survives it). A position neither delivered nor covered is a cache that
//! stays stale. And in every state: the position the consumer reports as
//! applied (where a read-your-writes wait ends) has every position up to it
//! delivered or covered; else a reader that waited reads a stale value.
//!
//! [`Rules`] switches each rule between its old form and its current one, so
//! the tests show what each rule is for: on the old rules the explorer finds
//! every loss of issue 18 (items 1–3) and of a slot moved under a stopped relay;
//! on the current rules it finds none. Where the current code has a decision
//! function of its own (where a restarted relay begins: [`super::resume`]), the
//! model calls it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::rc::Rc;

use pgcachewatch_core::{Event, GapReason, Lsn, Operation};

use super::resume::{self, Begin};
use crate::nats::wire::{WireKind, WireMessage};

/// Explorations stop (failing) beyond this many states: a model that grew
/// must be bounded again, not eat the machine's memory.
const MAX_STATES: usize = 1_000_000;
/// Messages the relay may have in flight.
const WINDOW: usize = 2;
/// The relay's upstream, as it names its epochs.
const ORIGIN: &str = "o";

/// Which form of each rule the model follows.
#[derive(Debug, Clone, Copy)]
struct Rules {
    /// Consumer: an event below a position already delivered in its epoch is
    /// delivered (else dropped as a duplicate).
    deliver_late: bool,
    /// Consumer: a stream created anew is noticed (a gap, then read from its
    /// start); else reading goes on at the old sequence number.
    check_identity: bool,
    /// Relay: a lost stream is created again and a new epoch starts; else the
    /// relay publishes into nothing for ever.
    recreate_stream: bool,
    /// Relay: after a failed acknowledgement, everything in flight is
    /// published again (else only the failed message).
    resend_all: bool,
    /// Relay: how it confirms upstream, and where it begins after a restart.
    resume: ResumeRule,
    /// Consumer: its applied position moves with progress records only (else
    /// with events' positions too).
    applied_by_records: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResumeRule {
    /// Confirm at each acknowledged event; continue the stream's last epoch
    /// whenever it came from this upstream.
    AnyEpoch,
    /// Confirm at each acknowledged event; continue if the epoch's last event
    /// or progress position is at or beyond the slot.
    LastPosition,
    /// Confirm once a progress record is stored; continue if the epoch's last
    /// record is at or beyond the slot (the current code: [`resume::decide`]).
    LastRecord,
}

const OLD: Rules = Rules {
    deliver_late: false,
    check_identity: false,
    recreate_stream: false,
    resend_all: false,
    resume: ResumeRule::AnyEpoch,
    applied_by_records: false,
};

const CURRENT: Rules = Rules {
    deliver_late: true,
    check_identity: true,
    recreate_stream: true,
    resend_all: true,
    resume: ResumeRule::LastRecord,
    applied_by_records: true,
};

/// How far a run goes: positions the upstream commits (1..=positions), and
/// how many of each fault may happen.
#[derive(Debug, Clone, Copy)]
struct Limits {
    positions: u8,
    faults: Faults,
}

/// How many of each fault a run may have (or has had).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct Faults {
    /// A message is not stored and its acknowledgement fails.
    lost: u8,
    /// A message is stored but its acknowledgement fails.
    ack_lost: u8,
    /// The relay crashes (everything in flight is forgotten) and restarts.
    crashes: u8,
    /// The stream is lost (a memory-backed stream in a NATS restart).
    stream_lost: u8,
    /// The stream is deleted and created anew by someone else.
    recreated: u8,
    /// The slot is advanced to the last commit while no relay reads it.
    advanced: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Gap,
    Event(u8),
    Progress(u8),
    Beat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Msg {
    epoch: u8,
    n: u8,
    kind: Kind,
}

impl Msg {
    /// Its message id: an event's names its position (the same in every
    /// epoch of the upstream), anything else its epoch and number.
    fn id(&self) -> (u8, u8) {
        match self.kind {
            Kind::Event(p) => (0, p),
            _ => (self.epoch, self.n),
        }
    }

    fn wire(&self) -> WireMessage {
        let kind = match self.kind {
            Kind::Gap => WireKind::Gap(GapReason::Reconnected),
            Kind::Event(p) => {
                let mut e = Event::new("m", Operation::Update, "s", "t");
                e.lsn = Some(Lsn(u64::from(p)));
                WireKind::Event(e)
            }
            Kind::Progress(p) => WireKind::Progress(Lsn(u64::from(p))),
            Kind::Beat => WireKind::Health(pgcachewatch_core::Health::Healthy),
        };
        WireMessage {
            epoch: format!("{ORIGIN}/{}", self.epoch).into(),
            kind,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Fate {
    /// Sent, not yet stored or lost.
    Pending,
    /// Stored; its acknowledgement will come.
    Stored,
    /// Its acknowledgement will fail.
    Failed,
    /// No stream takes it: its acknowledgement will say so.
    NoStream,
}

/// What becomes of a message on its way.
#[derive(Debug, Clone, Copy)]
enum Meet {
    /// Stored, acknowledged.
    Stored,
    /// Not stored; the acknowledgement fails.
    Lost,
    /// Stored; the acknowledgement fails all the same.
    AckLost,
    /// No stream takes it.
    NoStream,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Relay {
    epoch: u8,
    n: u8,
    /// Positions up to this one were read from the upstream.
    read: u8,
    /// Each message with its fate and what its acknowledgement stores.
    queue: Vec<(Msg, Fate, u8)>,
    /// Every event up to this position is acknowledged.
    stored: u8,
    /// The last progress record published.
    recorded: u8,
}

impl Faults {
    fn plus(&self, o: &Faults) -> Faults {
        Faults {
            lost: self.lost + o.lost,
            ack_lost: self.ack_lost + o.ack_lost,
            crashes: self.crashes + o.crashes,
            stream_lost: self.stream_lost + o.stream_lost,
            recreated: self.recreated + o.recreated,
            advanced: self.advanced + o.advanced,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Stream {
    /// Which incarnation of the stream: bumped when it is lost or created anew.
    generation: u8,
    alive: bool,
    msgs: Vec<Msg>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Consumer {
    generation: u8,
    next: usize,
    epoch: Option<u8>,
    max: u8,
    /// Bit p: position p was delivered.
    delivered: u8,
    /// The position it reports as applied.
    applied: u8,
    /// Positions up to this one were committed before a gap it handled.
    covered: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    committed: u8,
    /// The slot's confirmed position.
    slot: u8,
    relay: Option<Relay>,
    /// Whether a relay ever started (the slot existed before).
    started: bool,
    stream: Stream,
    consumer: Consumer,
    epochs: u8,
    faults: Faults,
}

impl State {
    fn initial() -> Self {
        State {
            committed: 0,
            slot: 0,
            relay: None,
            started: false,
            stream: Stream {
                generation: 0,
                alive: true,
                msgs: Vec::new(),
            },
            consumer: Consumer {
                generation: 0,
                next: 0,
                epoch: None,
                max: 0,
                delivered: 0,
                applied: 0,
                covered: 0,
            },
            epochs: 0,
            faults: Faults::default(),
        }
    }

    /// A position committed and neither delivered nor covered by a gap.
    fn stale(&self) -> Option<u8> {
        (1..=self.committed)
            .find(|p| self.consumer.delivered & (1 << p) == 0 && *p > self.consumer.covered)
    }

    /// A position at or below the applied one, neither delivered nor covered:
    /// a read-your-writes wait for it has ended before its invalidation.
    fn early(&self) -> Option<u8> {
        (1..=self.consumer.applied)
            .find(|p| self.consumer.delivered & (1 << p) == 0 && *p > self.consumer.covered)
    }

    /// Stores `msg` unless the stream has a message with its id.
    fn store(&mut self, msg: Msg) {
        if !self.stream.msgs.iter().any(|m| m.id() == msg.id()) {
            self.stream.msgs.push(msg);
        }
    }
}

fn push(relay: &mut Relay, kind: Kind, stores: u8) {
    let msg = Msg {
        epoch: relay.epoch,
        n: relay.n,
        kind,
    };
    relay.queue.push((msg, Fate::Pending, stores));
    relay.n += 1;
}

/// A new epoch: its gap marker, whose acknowledgement stores what was stored
/// before and (over a known slot position) everything before the slot.
fn new_epoch(s: &mut State, relay: &mut Relay, covered: u8) {
    s.epochs += 1;
    relay.epoch = s.epochs;
    relay.n = 0;
    let stores = relay.stored.max(covered);
    relay.stored = 0;
    relay.recorded = 0;
    push(relay, Kind::Gap, stores);
}

/// Where a restarted relay begins, by `rule`: the epoch to continue and its
/// next number, or `None` for a new epoch.
fn begin(s: &State, rule: ResumeRule) -> Option<(u8, u8)> {
    if !s.started {
        return None;
    }
    let last = s.stream.msgs.last()?;
    let epoch_msgs = || s.stream.msgs.iter().filter(|m| m.epoch == last.epoch);
    match rule {
        ResumeRule::AnyEpoch => Some((last.epoch, last.n + 1)),
        ResumeRule::LastPosition => {
            let position = epoch_msgs()
                .filter_map(|m| match m.kind {
                    Kind::Event(p) | Kind::Progress(p) => Some(p),
                    Kind::Gap | Kind::Beat => None,
                })
                .max();
            (position >= Some(s.slot)).then_some((last.epoch, last.n + 1))
        }
        // The latest record is the one the stream keeps (each replaces the
        // one before on its subject): what the relay reads back.
        ResumeRule::LastRecord => {
            let found = s
                .stream
                .msgs
                .iter()
                .rev()
                .find(|m| matches!(m.kind, Kind::Progress(_)))
                .and_then(|m| resume::found_in(&m.wire(), ORIGIN));
            match resume::decide(ORIGIN, true, Lsn(u64::from(s.slot)), found) {
                Begin::Continue(r) => {
                    let epoch: u8 = r.epoch.strip_prefix("o/")?.parse().ok()?;
                    // A number no stored message of the epoch has (the relay
                    // names its messages by a random run instead).
                    let n = epoch_msgs_n(s, epoch);
                    Some((epoch, n))
                }
                Begin::New { .. } => None,
            }
        }
    }
}

/// The number after every stored message's of `epoch`.
fn epoch_msgs_n(s: &State, epoch: u8) -> u8 {
    s.stream
        .msgs
        .iter()
        .filter(|m| m.epoch == epoch)
        .map(|m| m.n + 1)
        .max()
        .unwrap_or(0)
}

/// Every state one step from `s`, each with what happened.
fn successors(s: &State, rules: Rules, limits: Limits) -> Vec<(State, String)> {
    let budget = limits.faults;
    let mut out = Vec::new();
    let mut next = |f: &dyn Fn(&mut State) -> Option<String>| {
        let mut t = s.clone();
        if let Some(what) = f(&mut t) {
            out.push((t, what));
        }
    };
    // The upstream commits.
    next(&|t| {
        (t.committed < limits.positions).then(|| {
            t.committed += 1;
            format!("commit {}", t.committed)
        })
    });
    // The relay reads a commit and publishes it.
    next(&|t| {
        let r = t.relay.as_mut()?;
        if r.read >= t.committed || r.queue.len() >= WINDOW {
            return None;
        }
        r.read += 1;
        let p = r.read;
        push(r, Kind::Event(p), p);
        Some(format!("relay publishes event {p}"))
    });
    // The relay publishes a progress record of what is stored.
    next(&|t| {
        if rules.resume != ResumeRule::LastRecord {
            return None;
        }
        let r = t.relay.as_mut()?;
        if r.stored <= r.recorded {
            return None;
        }
        r.recorded = r.stored;
        let p = r.stored;
        push(r, Kind::Progress(p), 0);
        Some(format!("relay records {p}"))
    });
    // A heartbeat: the relay publishes even with nothing to say, so it finds
    // out that its stream is gone (beats into a live stream change nothing
    // the property reads, so the model leaves them out).
    next(&|t| {
        let alive = t.stream.alive;
        let r = t.relay.as_mut()?;
        if alive || r.queue.iter().any(|(m, _, _)| m.kind == Kind::Beat) {
            return None;
        }
        push(r, Kind::Beat, 0);
        Some("relay beats".to_owned())
    });
    // The oldest message on its way meets the stream.
    for meet in [Meet::Stored, Meet::Lost, Meet::AckLost, Meet::NoStream] {
        next(&|t| {
            let alive = t.stream.alive;
            let faults = &mut t.faults;
            let r = t.relay.as_mut()?;
            let i = r.queue.iter().position(|(_, f, _)| *f == Fate::Pending)?;
            let msg = r.queue[i].0;
            r.queue[i].1 = match meet {
                Meet::NoStream if !alive => Fate::NoStream,
                Meet::Stored if alive => Fate::Stored,
                Meet::Lost if alive && faults.lost < budget.lost => {
                    faults.lost += 1;
                    Fate::Failed
                }
                Meet::AckLost if alive && faults.ack_lost < budget.ack_lost => {
                    faults.ack_lost += 1;
                    Fate::Failed
                }
                _ => return None,
            };
            if matches!(meet, Meet::Stored | Meet::AckLost) {
                t.store(msg);
            }
            Some(format!("{msg:?}: {meet:?}"))
        });
    }
    // The oldest message's acknowledgement.
    next(&|t| {
        let mut r = t.relay.take()?;
        let (msg, fate, stores) = *r.queue.first()?;
        let what = match fate {
            Fate::Pending => return None,
            Fate::Stored => {
                r.queue.remove(0);
                match (msg.kind, rules.resume) {
                    (Kind::Event(p), ResumeRule::AnyEpoch | ResumeRule::LastPosition) => {
                        t.slot = t.slot.max(p);
                    }
                    (Kind::Progress(p), ResumeRule::LastRecord) => t.slot = t.slot.max(p),
                    _ => {}
                }
                r.stored = r.stored.max(stores);
                format!("ack {msg:?}")
            }
            Fate::NoStream if rules.recreate_stream && !t.stream.alive => {
                t.stream.alive = true;
                r.queue.clear();
                new_epoch(t, &mut r, 0);
                "the relay creates its stream anew, new epoch".to_owned()
            }
            // Publishing into no stream, for ever.
            Fate::NoStream if !t.stream.alive => return None,
            Fate::NoStream | Fate::Failed => {
                let again = if rules.resend_all { r.queue.len() } else { 1 };
                for entry in r.queue.iter_mut().take(again) {
                    entry.1 = Fate::Pending;
                }
                format!("ack of {msg:?} fails: publish again")
            }
        };
        t.relay = Some(r);
        Some(what)
    });
    // The relay crashes.
    next(&|t| {
        if t.relay.is_none() || t.faults.crashes >= budget.crashes {
            return None;
        }
        t.faults.crashes += 1;
        t.relay = None;
        Some("relay crashes".to_owned())
    });
    // A relay starts over the slot (creating the stream if it is missing).
    next(&|t| {
        if t.relay.is_some() {
            return None;
        }
        t.stream.alive = true;
        let mut r = Relay {
            epoch: 0,
            n: 0,
            read: t.slot,
            queue: Vec::new(),
            stored: 0,
            recorded: 0,
        };
        let what = match begin(t, rules.resume) {
            Some((epoch, n)) => {
                r.epoch = epoch;
                r.n = n;
                format!("relay starts at {}, continues epoch {epoch}", t.slot)
            }
            None => {
                let covered = if rules.resume == ResumeRule::LastRecord {
                    t.slot
                } else {
                    0
                };
                new_epoch(t, &mut r, covered);
                format!("relay starts at {}, new epoch {}", t.slot, r.epoch)
            }
        };
        t.started = true;
        t.relay = Some(r);
        Some(what)
    });
    // The stream is lost, or deleted and created anew by someone else.
    for alive in [false, true] {
        next(&|t| {
            let (used, max) = if alive {
                (&mut t.faults.recreated, budget.recreated)
            } else {
                (&mut t.faults.stream_lost, budget.stream_lost)
            };
            if *used >= max || !t.stream.alive {
                return None;
            }
            *used += 1;
            t.stream.generation += 1;
            t.stream.alive = alive;
            t.stream.msgs.clear();
            Some(
                if alive {
                    "stream created anew"
                } else {
                    "stream lost"
                }
                .to_owned(),
            )
        });
    }
    // Someone advances the slot while no relay reads it.
    next(&|t| {
        if t.relay.is_some() || t.faults.advanced >= budget.advanced || t.slot >= t.committed {
            return None;
        }
        t.faults.advanced += 1;
        t.slot = t.committed;
        Some(format!("slot advanced to {}", t.slot))
    });
    // The consumer reads.
    next(&|t| {
        if !t.stream.alive {
            return None;
        }
        let c = &mut t.consumer;
        if c.generation != t.stream.generation {
            c.generation = t.stream.generation;
            if rules.check_identity {
                c.covered = c.covered.max(t.committed);
                c.next = 0;
                c.epoch = None;
                c.max = 0;
                return Some("consumer: the stream was created anew: gap".to_owned());
            }
            return Some("consumer: (does not notice the new stream)".to_owned());
        }
        let msg = *t.stream.msgs.get(c.next)?;
        c.next += 1;
        if c.epoch != Some(msg.epoch) {
            if c.epoch.is_some() && msg.kind != Kind::Gap {
                c.covered = c.covered.max(t.committed);
            }
            c.epoch = Some(msg.epoch);
            c.max = 0;
        }
        match msg.kind {
            Kind::Gap => c.covered = c.covered.max(t.committed),
            Kind::Event(p) if p < c.max && !rules.deliver_late => {
                return Some(format!("consumer drops {msg:?} as a duplicate"));
            }
            Kind::Event(p) => {
                c.delivered |= 1 << p;
                c.max = c.max.max(p);
                if !rules.applied_by_records {
                    c.applied = c.applied.max(p);
                }
            }
            Kind::Progress(p) => {
                c.max = c.max.max(p);
                c.applied = c.applied.max(p);
            }
            Kind::Beat => {}
        }
        Some(format!("consumer reads {msg:?}"))
    });
    out
}

/// What an exploration found.
#[derive(Debug)]
struct Exploration {
    states: usize,
    finals: usize,
    /// The shortest path to a final state with a stale position, if any.
    counterexample: Option<String>,
}

/// Explores every state reachable under `rules` within `limits`.
fn explore(rules: Rules, limits: Limits) -> Exploration {
    // Each state once, with the index of the state it was first reached from.
    let mut seen: HashMap<Rc<State>, usize> = HashMap::new();
    let mut states: Vec<(Rc<State>, usize)> = Vec::new();
    let start = Rc::new(State::initial());
    seen.insert(start.clone(), 0);
    states.push((start, 0));
    let mut finals = 0;
    let mut at = 0;
    while at < states.len() {
        assert!(
            states.len() <= MAX_STATES,
            "more than {MAX_STATES} states under {rules:?}, {limits:?}: bound the model"
        );
        let s = states[at].0.clone();
        if let Some(p) = s.early() {
            let what = format!("position {p} reported applied before it was delivered, after:");
            return Exploration {
                states: states.len(),
                finals,
                counterexample: Some(trace(&states, at, &what, rules, limits)),
            };
        }
        let next = successors(&s, rules, limits);
        if next.is_empty() {
            finals += 1;
            if let Some(p) = s.stale() {
                let what = format!("position {p} stale for ever after:");
                return Exploration {
                    states: states.len(),
                    finals,
                    counterexample: Some(trace(&states, at, &what, rules, limits)),
                };
            }
        }
        for (t, _) in next {
            if !seen.contains_key(&t) {
                let t = Rc::new(t);
                seen.insert(t.clone(), states.len());
                states.push((t, at));
            }
        }
        at += 1;
    }
    Exploration {
        states: states.len(),
        finals,
        counterexample: None,
    }
}

/// The steps from the initial state to state `at`, after `what`.
fn trace(
    states: &[(Rc<State>, usize)],
    mut at: usize,
    what: &str,
    rules: Rules,
    limits: Limits,
) -> String {
    let last = states[at].0.clone();
    let mut path = vec![at];
    while at != 0 {
        at = states[at].1;
        path.push(at);
    }
    path.reverse();
    let mut out = format!("{what}\n");
    for pair in path.windows(2) {
        let (from, to) = (&states[pair[0]].0, &states[pair[1]].0);
        let step = successors(from, rules, limits)
            .into_iter()
            .find(|(t, _)| t == to.as_ref())
            .map_or_else(|| "?".to_owned(), |(_, what)| what);
        let _ = writeln!(out, "  {step}");
    }
    let _ = write!(out, "final state: {last:?}");
    out
}

/// `CURRENT` finds no stale position within `limits`; `rules` (the current
/// rules with one put back as it was) does.
fn needs(rules: Rules, limits: Limits, what: &str) {
    let old = explore(rules, limits);
    let Some(trace) = &old.counterexample else {
        panic!("{what}: the old rule loses nothing here ({old:?})");
    };
    tracing::info!(states = old.states, %trace, "{what}: the old rule loses an event");
    let now = explore(CURRENT, limits);
    assert!(now.finals > 0, "{now:?}");
    assert!(
        now.counterexample.is_none(),
        "{what}, current rules: {}",
        now.counterexample.unwrap_or_default()
    );
    tracing::info!(states = now.states, "{what}: current rules, none stale");
}

fn limits(positions: u8, faults: Faults) -> Limits {
    Limits { positions, faults }
}

fn one(faults: Faults) -> Limits {
    limits(3, faults)
}

#[test]
fn a_message_stored_after_later_ones_is_delivered() {
    // Issue 18 item 1: republished after a failed acknowledgement, the
    // message lands after a later one; dropping it as a duplicate loses it.
    let l = one(Faults {
        lost: 1,
        ..Faults::default()
    });
    let old = Rules {
        deliver_late: false,
        ..CURRENT
    };
    needs(old, l, "item 1 (late message)");
    assert!(explore(OLD, l).counterexample.is_some());
}

#[test]
fn a_stream_created_anew_under_the_consumer_is_noticed() {
    // Issue 18 item 2.
    let l = one(Faults {
        recreated: 1,
        ..Faults::default()
    });
    let old = Rules {
        check_identity: false,
        ..CURRENT
    };
    needs(old, l, "item 2 (stream created anew)");
    assert!(explore(OLD, l).counterexample.is_some());
}

#[test]
fn a_lost_stream_is_created_again_by_the_relay() {
    // Issue 18 item 3.
    let l = one(Faults {
        stream_lost: 1,
        ..Faults::default()
    });
    let old = Rules {
        recreate_stream: false,
        ..CURRENT
    };
    needs(old, l, "item 3 (stream lost)");
    assert!(explore(OLD, l).counterexample.is_some());
}

#[test]
fn a_slot_advanced_while_the_relay_was_away_starts_a_new_epoch() {
    // Issue 17 item 3: continuing the epoch over a slot someone else moved.
    let l = one(Faults {
        crashes: 1,
        advanced: 1,
        ..Faults::default()
    });
    let old = Rules {
        resume: ResumeRule::AnyEpoch,
        ..CURRENT
    };
    needs(old, l, "issue 17 item 3 (slot advanced)");
    assert!(explore(OLD, l).counterexample.is_some());
}

#[test]
fn an_event_position_does_not_prove_the_events_before_it_were_stored() {
    // The first rule proposed for 17.3 (continue if the epoch's last event or
    // progress position is at or beyond the slot): an event before that
    // position whose acknowledgement failed, a crash before it was published
    // again, and a slot advanced meanwhile lose it.
    let l = limits(
        2,
        Faults {
            lost: 1,
            crashes: 1,
            advanced: 1,
            ..Faults::default()
        },
    );
    let old = Rules {
        resume: ResumeRule::LastPosition,
        ..CURRENT
    };
    needs(old, l, "last position instead of last record");
}

#[test]
fn a_late_event_does_not_end_a_wait_for_the_position_before_it() {
    // Issue 18 follow-up: an event stored after a later one (republished
    // after a failed acknowledgement). Had the later event's position counted
    // as applied, a read-your-writes wait for the earlier one would end before
    // its invalidation arrives.
    let l = one(Faults {
        lost: 1,
        ..Faults::default()
    });
    let old = Rules {
        applied_by_records: false,
        ..CURRENT
    };
    needs(old, l, "applied position from events");
}

#[test]
fn nothing_is_lost_silently_under_faults_together() {
    // Every pair of faults, and the acknowledgement faults with a crash.
    let all = [
        Faults {
            lost: 1,
            ..Faults::default()
        },
        Faults {
            ack_lost: 1,
            ..Faults::default()
        },
        Faults {
            crashes: 1,
            ..Faults::default()
        },
        Faults {
            stream_lost: 1,
            ..Faults::default()
        },
        Faults {
            recreated: 1,
            ..Faults::default()
        },
        Faults {
            advanced: 1,
            ..Faults::default()
        },
    ];
    let mut sets: Vec<Faults> = Vec::new();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            sets.push(a.plus(b));
        }
    }
    sets.push(all[0].plus(&all[1]).plus(&all[2]));
    for faults in sets {
        for rules in [
            CURRENT,
            // Publishing everything in flight again after a failure is about
            // order, not loss: the late message is delivered either way.
            Rules {
                resend_all: false,
                ..CURRENT
            },
        ] {
            let e = explore(rules, limits(2, faults));
            assert!(e.finals > 0, "{e:?}");
            assert!(
                e.counterexample.is_none(),
                "{faults:?}: {}",
                e.counterexample.unwrap_or_default()
            );
        }
    }
}

#[test]
fn the_model_reaches_the_states_it_claims_to() {
    // A model that never crashes, loses or recreates anything proves
    // nothing: each fault must change what the explorer sees.
    let quiet = explore(CURRENT, one(Faults::default()));
    assert!(quiet.counterexample.is_none());
    for faults in [
        Faults {
            lost: 1,
            ..Faults::default()
        },
        Faults {
            ack_lost: 1,
            ..Faults::default()
        },
        Faults {
            crashes: 1,
            ..Faults::default()
        },
        Faults {
            stream_lost: 1,
            ..Faults::default()
        },
        Faults {
            recreated: 1,
            ..Faults::default()
        },
        Faults {
            crashes: 1,
            advanced: 1,
            ..Faults::default()
        },
    ] {
        let e = explore(CURRENT, one(faults));
        assert!(e.states > quiet.states, "{faults:?} adds no state: {e:?}");
    }
}
