//! Property tests: the documented invariants of every strategy, over generated
//! event logs on a virtual clock. A failure shrinks to a short log such as
//! `[+0ms update public.users keys=[1], +250ms GAP]`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use pgcachewatch_core::{Decision, Event, InvalidationStrategy, Operation, RowKey};
use pgcachewatch_strategies::{
    AnyOf, Filter, Greedy, Keyed, OnGap, OtherTables, Route, Sequence, TableFilter, Timed, Windowed,
};
use proptest::prelude::*;
use support::{check_coverage, drive, firing, log, operation, timeline, At, Input, Record, Step};

type Boxed = Box<dyn InvalidationStrategy<u32>>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Cache keys of one row: the row's id, and "the list" (100) on inserts and deletes.
fn row_keys(event: &Event, row: &RowKey) -> Vec<u32> {
    let mut keys: Vec<u32> = row
        .get("id")
        .and_then(|v| v.as_u64())
        .map(|id| id as u32)
        .into_iter()
        .collect();
    if matches!(event.operation, Operation::Insert | Operation::Delete) {
        keys.push(100);
    }
    keys
}

fn keyed_all_tables() -> Keyed<u32> {
    Keyed::new(row_keys)
}

/// Knows `public.users` (and so schema-less `users`), ignores the rest.
fn keyed_users_only() -> Keyed<u32> {
    Keyed::per_table()
        .table("public.users", row_keys)
        .other_tables(OtherTables::Ignore)
}

fn users_filter() -> TableFilter {
    TableFilter::new()
        .tables(["public.users"])
        .operations([Operation::Update, Operation::Delete])
}

/// Whether a step is an event `users_filter` accepts.
fn users_update_or_delete(step: &Step) -> bool {
    step.event().is_some_and(|e| users_filter().matches(&e))
}

struct Named {
    name: &'static str,
    /// A gap returns it to its initial state (false for anything holding a `Timed`,
    /// whose gap flush starts an interval).
    gap_resets_fully: bool,
    strategy: Boxed,
}

/// One of each strategy and combinator, for the properties every one must meet.
fn every_strategy(n: usize, window: Duration) -> Vec<Named> {
    let named = |name, gap_resets_fully, strategy: Boxed| Named {
        name,
        gap_resets_fully,
        strategy,
    };
    vec![
        named("greedy", true, Box::new(Greedy::new())),
        named(
            "greedy(predicate)",
            true,
            Box::new(Greedy::with_predicate(users_filter().into_predicate())),
        ),
        named("windowed", true, Box::new(Windowed::new(n, window))),
        named("timed", false, Box::new(Timed::new(window))),
        named(
            "sequence",
            true,
            Box::new(Sequence::new([Operation::Insert, Operation::Update])),
        ),
        named("keyed", true, Box::new(keyed_all_tables())),
        named("keyed(per table)", true, Box::new(keyed_users_only())),
        named(
            "filter(windowed)",
            true,
            Box::new(Filter::with(users_filter(), Windowed::new(n, window))),
        ),
        named(
            "any_of",
            false,
            Box::new(
                AnyOf::new()
                    .with(keyed_all_tables())
                    .with(Timed::new(window))
                    .with(Windowed::new(n, window)),
            ),
        ),
        named(
            "route",
            false,
            Box::new(
                Route::new()
                    .table("public.users", Windowed::new(n, window))
                    .table("orders", Timed::new(window))
                    .otherwise(keyed_all_tables()),
            ),
        ),
    ]
}

fn strategy(i: usize, n: usize, window: Duration) -> Boxed {
    every_strategy(n, window).swap_remove(i).strategy
}

fn step_at(tl: &[At], input: Input) -> Option<&Step> {
    match input {
        Input::Step(i) => tl.iter().find(|a| a.index == i).map(|a| &a.step),
        Input::Tick => None,
    }
}

fn window() -> impl Strategy<Value = Duration> {
    (0u64..500).prop_map(ms)
}

/// Expected decisions of a combinator: the merge, in child order, of each
/// child's decision for the same (instant, input).
fn merged(children: &[Vec<Record>]) -> BTreeMap<(Duration, Input), Decision<u32>> {
    let mut out: BTreeMap<(Duration, Input), Decision<u32>> = BTreeMap::new();
    for records in children {
        for r in records {
            let slot = out.entry((r.at, r.input)).or_default();
            *slot = std::mem::take(slot).merge(r.decision.clone());
        }
    }
    out.retain(|_, d| !d.is_nothing());
    out
}

fn key_set(d: &Decision<u32>) -> BTreeSet<u32> {
    d.targets()
        .map(|t| t.keys.iter().copied().collect())
        .unwrap_or_default()
}

proptest! {
    /// Every strategy: a gap yields All and leaves nothing pending; the same input
    /// gives the same decisions; a tick at the deadline moves the deadline on
    /// (asserted by the driver).
    #[test]
    fn every_strategy_flushes_on_gaps_and_is_deterministic(
        steps in log(), n in 1usize..5, window in window()
    ) {
        let tl = timeline(&steps);
        let base = Instant::now();
        for (i, named) in every_strategy(n, window).into_iter().enumerate() {
            let name = named.name;
            let mut first = named.strategy;
            let records = drive(first.as_mut(), &tl, base);
            let again = drive(strategy(i, n, window).as_mut(), &tl, base);
            prop_assert_eq!(&records, &again, "{} is not deterministic", name);

            for (g, item) in tl.iter().enumerate().filter(|(_, a)| a.step.is_gap()) {
                let gap = records.iter().find(|r| r.input == Input::Step(item.index));
                prop_assert_eq!(gap.map(|r| &r.decision), Some(&Decision::All),
                    "{} kept the cache on the gap at step {}", name, item.index);

                // Nothing pending right after the gap.
                let mut upto = strategy(i, n, window);
                let prefix = drive(upto.as_mut(), &tl[..=g], base);
                prop_assert_eq!(prefix.last().map(|r| r.input), Some(Input::Step(item.index)),
                    "{} fired after the gap at step {} with no further input", name, item.index);
                prop_assert_eq!(upto.next_deadline(), None,
                    "{} still has a deadline after the gap at step {}", name, item.index);

                // After a gap, behaves as if new.
                if named.gap_resets_fully {
                    let pos = records.iter().position(|r| r.input == Input::Step(item.index)).unwrap_or(0);
                    let fresh = drive(strategy(i, n, window).as_mut(), &tl[g + 1..], base);
                    prop_assert_eq!(&records[pos + 1..], &fresh[..],
                        "{} remembered something across the gap at step {}", name, item.index);
                }
            }
        }
    }

    /// Greedy: every matching event and every gap drop everything; nothing else does.
    #[test]
    fn greedy_flushes_exactly_on_matching_events(steps in log()) {
        let tl = timeline(&steps);
        let mut g = Greedy::with_predicate(users_filter().into_predicate());
        for r in drive(&mut g, &tl, Instant::now()) {
            let step = step_at(&tl, r.input);
            let expected = step.is_some_and(|s| s.is_gap() || users_update_or_delete(s));
            prop_assert_eq!(&r.decision, &Decision::all_if(expected), "{:?}", r);
            prop_assert_ne!(r.input, Input::Tick);
        }
    }

    /// Windowed: no matching event stays unflushed longer than the window, or past
    /// the max_events-th matching event; no flush without a pending event.
    #[test]
    fn windowed_bounds_delay_and_count(steps in log(), n in 1usize..6, window in window()) {
        let tl = timeline(&steps);
        let mut w = Windowed::with_predicate(n, window, |e: &Event| e.table == "users");
        let records = drive(&mut w, &tl, Instant::now());
        let matching = |s: &Step| s.event().is_some_and(|e| e.table == "users");
        if let Err(why) = check_coverage(&records, &tl, matching, window, Some(n)) {
            return Err(TestCaseError::fail(why));
        }
    }

    /// Windowed fires *only* at count or window end (not early), checked against a
    /// direct model of the documented rule.
    #[test]
    fn windowed_fires_only_at_count_or_window_end(steps in log(), n in 1usize..6, window in window()) {
        let tl = timeline(&steps);
        let mut w = Windowed::new(n, window);
        let mut first: Option<Duration> = None;
        let mut count = 0;
        for r in drive(&mut w, &tl, Instant::now()) {
            let over = first.is_some_and(|f| r.at >= f + window);
            let fire = match step_at(&tl, r.input) {
                None => over,
                Some(s) if s.is_gap() => true,
                Some(_) if over => true,
                Some(_) => {
                    first.get_or_insert(r.at);
                    count += 1;
                    count >= n || first.is_some_and(|f| r.at >= f + window)
                }
            };
            prop_assert_eq!(&r.decision, &Decision::all_if(fire), "{:?}", r);
            if fire {
                first = None;
                count = 0;
            }
        }
    }

    /// Timed: no event goes unflushed past one interval; two flushes other than a
    /// gap's are never closer than one interval; no flush without a pending event.
    #[test]
    fn timed_defers_but_never_drops(steps in log(), interval in window()) {
        let tl = timeline(&steps);
        let mut t = Timed::new(interval);
        let records = drive(&mut t, &tl, Instant::now());
        let is_event = |s: &Step| !s.is_gap();
        if let Err(why) = check_coverage(&records, &tl, is_event, interval, None) {
            return Err(TestCaseError::fail(why));
        }
        let mut last_flush: Option<Duration> = None;
        for r in &records {
            if r.decision != Decision::All {
                continue;
            }
            let gap = step_at(&tl, r.input).is_some_and(Step::is_gap);
            if let (Some(last), false) = (last_flush, gap) {
                prop_assert!(r.at >= last + interval,
                    "flush at {:?} only {:?} after the one at {:?}", r.at, r.at - last, last);
            }
            last_flush = Some(r.at);
        }
    }

    /// Keyed: drops exactly the keys the mapper gives for the event's rows (never an
    /// unrelated key, never keeps a related one); the table when the event has no
    /// keys or is a truncate; and, per table, nothing for tables it does not know.
    #[test]
    fn keyed_drops_exactly_the_related_keys(steps in log()) {
        let tl = timeline(&steps);
        let base = Instant::now();
        for (per_table, mut k) in [(false, keyed_all_tables()), (true, keyed_users_only())] {
            for r in drive(&mut k, &tl, base) {
                let Some(step) = step_at(&tl, r.input) else {
                    return Err(TestCaseError::fail("Keyed asked for a tick"));
                };
                let Some(event) = step.event() else { continue };
                let known = !per_table || event.is_about(Some("public"), "users");
                if !known {
                    prop_assert_eq!(&r.decision, &Decision::Nothing, "{:?}", step);
                    continue;
                }
                match &event.keys {
                    Some(rows) if event.operation != Operation::Truncate => {
                        let oracle: BTreeSet<u32> =
                            rows.iter().flat_map(|row| row_keys(&event, row)).collect();
                        prop_assert_eq!(key_set(&r.decision), oracle, "{:?}", step);
                        prop_assert!(r.decision.targets().is_none_or(|t| t.tables.is_empty()));
                    }
                    _ => prop_assert_eq!(
                        &r.decision,
                        &Decision::tables([event.table_ref()]),
                        "{:?}", step
                    ),
                }
            }
        }
    }

    /// Filter: never fires for an event it rejects, and on the events it accepts
    /// behaves exactly like its inner strategy fed only those events (and all gaps).
    #[test]
    fn filter_passes_only_matching_events_and_all_gaps(
        steps in log(), n in 1usize..5, window in window()
    ) {
        let tl = timeline(&steps);
        let base = Instant::now();
        let mut f = Filter::with(users_filter(), Windowed::new(n, window));
        let records = drive(&mut f, &tl, base);
        for r in &records {
            if step_at(&tl, r.input).is_some_and(|s| !s.is_gap() && !users_update_or_delete(s)) {
                prop_assert_eq!(&r.decision, &Decision::Nothing, "{:?}", r);
            }
        }
        let passed: Vec<At> = tl.iter()
            .filter(|a| a.step.is_gap() || users_update_or_delete(&a.step))
            .cloned()
            .collect();
        let inner = drive(&mut Windowed::new(n, window), &passed, base);
        prop_assert_eq!(firing(&records), firing(&inner));
    }

    /// AnyOf: every decision is the merge of its children's, each driven alone.
    #[test]
    fn any_of_is_the_merge_of_its_children(steps in log(), n in 1usize..5, window in window()) {
        let tl = timeline(&steps);
        let base = Instant::now();
        let children = || -> Vec<Boxed> {
            vec![
                Box::new(keyed_all_tables()),
                Box::new(Windowed::new(n, window)),
                Box::new(Timed::new(window / 2)),
                Box::new(Sequence::new([Operation::Update, Operation::Delete])),
                Box::new(OnGap::keep(Greedy::with_predicate(users_filter().into_predicate()))),
            ]
        };
        let mut any: AnyOf<u32> = children().into_iter().collect();
        let records = drive(&mut any, &tl, base);
        let alone: Vec<Vec<Record>> = children()
            .into_iter()
            .map(|mut c| drive(c.as_mut(), &tl, base))
            .collect();
        prop_assert_eq!(firing(&records), merged(&alone));
    }

    /// Route: each event reaches the strategies of the routes it matches (or the
    /// fallback), gaps reach all; the result is the merge of each driven alone on
    /// its share of the log.
    #[test]
    fn route_is_the_merge_of_its_routes(steps in log(), n in 1usize..5, window in window()) {
        let tl = timeline(&steps);
        let base = Instant::now();
        let mut route: Route<u32> = Route::new()
            .table("public.users", Windowed::new(n, window))
            .table("users", Timed::new(window))
            .table("public.orders", keyed_all_tables())
            .otherwise(Greedy::new());
        let records = drive(&mut route, &tl, base);

        let share = |keep: &dyn Fn(&Event) -> bool| -> Vec<At> {
            tl.iter()
                .filter(|a| a.step.event().is_none_or(|e| keep(&e)))
                .cloned()
                .collect()
        };
        let public_users = |e: &Event| e.is_about(Some("public"), "users");
        let any_users = |e: &Event| e.table == "users";
        let orders = |e: &Event| e.is_about(Some("public"), "orders");
        let rest = |e: &Event| !public_users(e) && !any_users(e) && !orders(e);
        let alone = vec![
            drive(&mut Windowed::new(n, window), &share(&public_users), base),
            drive(&mut Timed::new(window), &share(&any_users), base),
            drive(&mut keyed_all_tables(), &share(&orders), base),
            drive(&mut Greedy::new(), &share(&rest), base),
        ];
        prop_assert_eq!(firing(&records), merged(&alone));
    }

    /// Sequence: fires exactly when the operations since the last gap end with the pattern.
    #[test]
    fn sequence_fires_exactly_on_the_pattern(
        steps in log(), pattern in prop::collection::vec(operation(), 1..4)
    ) {
        let tl = timeline(&steps);
        let mut s = Sequence::new(pattern.clone());
        let mut history: Vec<Operation> = Vec::new();
        for r in drive(&mut s, &tl, Instant::now()) {
            let Some(step) = step_at(&tl, r.input) else {
                return Err(TestCaseError::fail("Sequence asked for a tick"));
            };
            let fire = match step.event() {
                None => {
                    history.clear();
                    true
                }
                Some(e) => {
                    history.push(e.operation);
                    history.ends_with(&pattern)
                }
            };
            prop_assert_eq!(&r.decision, &Decision::all_if(fire), "{:?}", step);
        }
    }

    /// OnGap::keep: gaps drop nothing and leave the inner strategy's pending work to fire.
    #[test]
    fn on_gap_keep_ignores_gaps_only(steps in log(), n in 1usize..5, window in window()) {
        let tl = timeline(&steps);
        let base = Instant::now();
        let records = drive(&mut OnGap::keep(Windowed::new(n, window)), &tl, base);
        let no_gaps: Vec<At> = tl.iter().filter(|a| !a.step.is_gap()).cloned().collect();
        let inner = drive(&mut Windowed::new(n, window), &no_gaps, base);
        prop_assert_eq!(firing(&records), firing(&inner));
    }
}
