//! `#[pgcachewatch::cached]` keeps every promise of `get_or_load`: the shared
//! scenarios of the test kit (single-flight, errors shared and not cached, the
//! stale-set race) run against macro-cached functions; and the macro's own
//! promises: a declared cache bypasses until its source is attached, is fed by
//! its strategy once it is, and bypasses again when detached.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use pgcachewatch::memory::InMemorySource;
use pgcachewatch::strategies::Greedy;
use pgcachewatch::{cached, Cache, Decision, Event, Operation, TableRef};
use pgcachewatch_testkit::scenarios::{self, GateError, LoadGate};

fn update(table: &str) -> Event {
    Event::new("pgcachewatch", Operation::Update, "public", table)
}

static SF_GATE: LazyLock<LoadGate> = LazyLock::new(LoadGate::new);

#[cached(strategy = Greedy::new(), source = "single-flight", tables = ["users"])]
async fn single_flight_name(id: u32) -> Result<String, GateError> {
    let _ = id;
    SF_GATE.load().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_fn_runs_its_body_once_for_concurrent_misses() {
    let (source, _handle) = InMemorySource::pair();
    let _attached = cached::attach_as("single-flight", source);
    let read = |id| single_flight_name(id);
    scenarios::single_flight(single_flight_name_cache(), &SF_GATE, &read, 64).await;
}

static ERR_GATE: LazyLock<LoadGate> = LazyLock::new(LoadGate::new);

/// An error type that is not `Clone`, returned as `Arc<E>`.
#[derive(Debug, thiserror::Error)]
#[error("wrapped: {0}")]
struct NotClone(GateError);

#[cached(strategy = Greedy::new(), source = "errors")]
async fn erring_name(id: u32) -> Result<String, Arc<NotClone>> {
    let _ = id;
    Ok(ERR_GATE.load().await.map_err(NotClone)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_fn_shares_its_error_and_does_not_cache_it() {
    let (source, _handle) = InMemorySource::pair();
    let _attached = cached::attach_as("errors", source);
    let read = |id| erring_name(id);
    scenarios::error_shared_not_cached(erring_name_cache(), &ERR_GATE, &read, 32).await;
}

static RACE_GATE: LazyLock<LoadGate> = LazyLock::new(LoadGate::new);

#[cached(strategy = Greedy::new(), source = "race", tables = ["users"])]
async fn racing_name(id: u32) -> Result<String, GateError> {
    let _ = id;
    RACE_GATE.load().await
}

#[tokio::test]
async fn a_load_through_a_cached_fn_that_began_before_an_invalidation_is_not_stored() {
    let (source, _handle) = InMemorySource::pair();
    let _attached = cached::attach_as("race", source);
    let read = |id| racing_name(id);
    for decision in [
        Decision::keys([scenarios::KEY]),
        Decision::tables([TableRef::new("public", "users")]),
        Decision::All,
    ] {
        scenarios::stale_set_race(racing_name_cache(), &RACE_GATE, &read, decision).await;
    }
}

static LATE_GATE: LazyLock<LoadGate> = LazyLock::new(LoadGate::new);

#[cached(strategy = Greedy::with_predicate(|e: &Event| e.table == "users"), source = "late")]
async fn late_name(id: u32) -> Result<String, GateError> {
    let _ = id;
    LATE_GATE.load().await
}

#[tokio::test]
async fn a_declared_cache_bypasses_until_attached_and_after_detached() {
    LATE_GATE.set_open(true);
    // Called before any source is attached: nothing would invalidate a stored
    // value, so nothing is stored.
    assert_eq!(late_name(1).await.as_deref(), Ok("value"));
    assert_eq!(late_name(1).await.as_deref(), Ok("value"));
    assert_eq!(LATE_GATE.runs(), 2, "served a value nothing invalidates");
    let cache = late_name_cache();
    assert!(!cache.is_healthy());
    assert_eq!(
        cached::registered("late"),
        vec![Some("late_name".to_string())]
    );

    // Attached: cached, and invalidated by its strategy (only for its table).
    let (source, handle) = InMemorySource::pair();
    let attached = cached::attach_as("late", source);
    assert_eq!(attached.dispatchers(), 1);
    assert!(cache.is_healthy());
    late_name(1).await.expect("loads");
    late_name(1).await.expect("a hit");
    assert_eq!(LATE_GATE.runs(), 3);
    assert!(handle.publish(update("orders")));
    attached.sync().await;
    late_name(1).await.expect("still a hit");
    assert_eq!(LATE_GATE.runs(), 3, "the predicate ignores other tables");
    assert!(handle.publish(update("users")));
    attached.sync().await;
    late_name(1).await.expect("loads again");
    assert_eq!(LATE_GATE.runs(), 4, "the event did not drop the entry");

    // Detached: bypasses again.
    attached.shutdown().await;
    assert!(!cache.is_healthy());
    late_name(1).await.expect("loads");
    assert_eq!(
        LATE_GATE.runs(),
        5,
        "served an entry after its dispatcher stopped"
    );
}

static FIRST_CALL_GATE: LazyLock<LoadGate> = LazyLock::new(LoadGate::new);

#[cached(strategy = Greedy::new(), source = "registers-late")]
async fn registers_after_attach(id: u32) -> Result<String, GateError> {
    let _ = id;
    FIRST_CALL_GATE.load().await
}

#[tokio::test]
async fn a_cache_first_used_after_its_source_was_attached_is_fed_too() {
    FIRST_CALL_GATE.set_open(true);
    let (source, handle) = InMemorySource::pair();
    let attached = cached::attach_as("registers-late", source);
    assert_eq!(attached.dispatchers(), 0, "no function called yet");
    registers_after_attach(1).await.expect("loads");
    assert_eq!(
        attached.dispatchers(),
        1,
        "registered and attached on first use"
    );
    registers_after_attach(1).await.expect("a hit");
    assert_eq!(FIRST_CALL_GATE.runs(), 1);
    assert!(handle.publish(update("users")));
    attached.sync().await;
    registers_after_attach(1).await.expect("loads again");
    assert_eq!(FIRST_CALL_GATE.runs(), 2);
}

// ---- the forms and options -----------------------------------------------------

static OWNED: LazyLock<Cache<u32, String>> = LazyLock::new(|| Cache::new(100));

/// A cache the user owns (a plain, healthy cache), keyed by one argument.
#[cached(cache = OWNED, key = id)]
async fn owned_name(prefix: &str, id: u32) -> String {
    format!("{prefix}{id}")
}

#[tokio::test]
async fn a_user_owned_cache_keyed_by_an_expression() {
    assert_eq!(owned_name("a", 1).await, "a1");
    // Keyed by `id` only: the other argument is not part of the key.
    assert_eq!(owned_name("b", 1).await, "a1");
    assert_eq!(OWNED.get(&1).as_deref(), Some("a1"));
    OWNED.invalidate(&1);
    assert_eq!(owned_name("b", 1).await, "b1");
}

#[cached(capacity = 10, ttl = "50ms", key = (a % 10, b.len()), key_type = (u32, usize))]
async fn computed_key(a: u32, b: String) -> app::Result<String> {
    if b.is_empty() {
        return Err(GateError("empty".into()));
    }
    Ok(format!("{a}{b}"))
}

/// A `Result` alias with the error type built in, as many crates have.
mod app {
    pub(crate) type Result<T> = std::result::Result<T, super::GateError>;
}

#[tokio::test]
async fn options_key_type_ttl_and_a_result_alias() {
    let (source, _handle) = InMemorySource::pair();
    // No strategy: attach it by hand, as any cache.
    let _d = pgcachewatch::Dispatcher::new()
        .attach(Greedy::new(), computed_key_cache().clone())
        .spawn(&source);
    let cache = computed_key_cache();
    assert_eq!(cache.name(), Some("computed_key"));
    assert_eq!(
        computed_key(1, "x".into()).await.ok().as_deref(),
        Some("1x")
    );
    assert_eq!(
        computed_key(11, "y".into()).await.ok().as_deref(),
        Some("1x")
    );
    assert_eq!(cache.get(&(1, 1)).as_deref(), Some("1x"));
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(
        computed_key(11, "y".into()).await.ok().as_deref(),
        Some("11y")
    );
    assert!(computed_key(2, String::new()).await.is_err());
    assert_eq!(cache.get(&(2, 0)), None, "an error was cached");
}

static PLAIN_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[cached(name = "squares", strategy = Greedy::new(), source = "plain")]
pub(crate) async fn square(n: u64) -> u64 {
    PLAIN_RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    n * n
}

#[cached(strategy = Greedy::new(), source = "plain")]
async fn no_arguments() -> Vec<u8> {
    vec![1, 2, 3]
}

#[cached(strategy = Greedy::new(), source = "plain")]
async fn several(a: u8, b: String, mut c: Vec<u8>) -> usize {
    c.push(a);
    b.len() + c.len()
}

#[tokio::test]
async fn plain_values_and_every_argument_as_the_key() {
    let (source, _handle) = InMemorySource::pair();
    let _attached = cached::attach_as("plain", source);
    assert_eq!(square(12).await, 144);
    assert_eq!(square(12).await, 144);
    assert_eq!(PLAIN_RUNS.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(square_cache().name(), Some("squares"));
    assert_eq!(no_arguments().await, vec![1, 2, 3]);
    assert_eq!(no_arguments_cache().get(&()), Some(vec![1, 2, 3]));
    assert_eq!(several(1, "ab".into(), vec![9]).await, 4);
    assert_eq!(several_cache().get(&(1, "ab".into(), vec![9])), Some(4));
}
