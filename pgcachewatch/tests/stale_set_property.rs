//! The stale-set race as a property: random interleavings of loads that start,
//! writes, invalidations that arrive late, and loads that finish, on the real
//! cache. No read that starts after the invalidation of a write was processed may
//! return a value older than that write.
//!
//! Futures are polled by hand (no runtime), so every interleaving is exact and a
//! failure shrinks to a short, readable list of steps.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::task::noop_waker_ref;
use pgcachewatch::{Cache, Decision, InvalidationTarget, TableRef};
use proptest::prelude::*;
use tokio::sync::oneshot;

const KEYS: u8 = 2;

/// How a read goes through the cache: every loading method must close the race.
#[derive(Clone, Copy, Debug)]
enum Method {
    GetOrLoadTagged,
    TryGetWith,
    OptionallyGetWith,
}

#[derive(Clone, Copy)]
enum Step {
    /// A read of `key` starts (hit, join a load, or start one that reads the table now).
    Read(u8, Method),
    /// `insert` of `key`'s current value (as a writer that just committed it would).
    Insert(u8),
    /// `remove(key)`.
    Remove(u8),
    /// `get` and `contains_key` of `key`, checked at once.
    Peek(u8),
    /// The `n`-th oldest unfinished loader may return.
    Release(u8),
    /// A write commits to `key`; its notification is queued.
    Write(u8),
    /// The oldest queued notification is processed, as a key, table or full invalidation.
    Deliver(Scope),
}

#[derive(Clone, Copy, Debug)]
enum Scope {
    Key,
    Table,
    All,
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Read(k, m) => write!(f, "read k{k} ({m:?})"),
            Step::Insert(k) => write!(f, "insert k{k}'s current value"),
            Step::Remove(k) => write!(f, "remove k{k}"),
            Step::Peek(k) => write!(f, "get / contains_key k{k}"),
            Step::Release(n) => write!(f, "release loader #{n}"),
            Step::Write(k) => write!(f, "write k{k}"),
            Step::Deliver(s) => write!(f, "deliver oldest notification as {s:?}"),
        }
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..KEYS, prop_oneof![
            Just(Method::GetOrLoadTagged),
            Just(Method::TryGetWith),
            Just(Method::OptionallyGetWith),
        ]).prop_map(|(k, m)| Step::Read(k, m)),
        1 => (0..KEYS).prop_map(Step::Insert),
        1 => (0..KEYS).prop_map(Step::Remove),
        1 => (0..KEYS).prop_map(Step::Peek),
        3 => (0..4u8).prop_map(Step::Release),
        2 => (0..KEYS).prop_map(Step::Write),
        1 => Just(Step::Deliver(Scope::Key)),
        1 => Just(Step::Deliver(Scope::Table)),
        1 => Just(Step::Deliver(Scope::All)),
    ]
}

type ReadFuture = Pin<Box<dyn Future<Output = Result<u64, pgcachewatch::Error>>>>;

struct PendingRead {
    key: u8,
    /// The version whose invalidation had been processed when the read started.
    must_see: u64,
    future: ReadFuture,
}

struct World {
    cache: Cache<u8, u64>,
    table: Arc<Mutex<HashMap<u8, u64>>>,
    /// Gates of loaders that have started and wait to return.
    gates: Arc<Mutex<Vec<oneshot::Sender<()>>>>,
    queued: Vec<(u8, u64)>,
    processed: HashMap<u8, u64>,
    reads: Vec<PendingRead>,
}

impl World {
    fn new() -> Self {
        World {
            cache: Cache::new(16),
            table: Arc::default(),
            gates: Arc::default(),
            queued: Vec::new(),
            processed: HashMap::new(),
            reads: Vec::new(),
        }
    }

    fn read(&mut self, key: u8, method: Method) {
        let (cache, table, gates) = (self.cache.clone(), self.table.clone(), self.gates.clone());
        // The loader reads the table when it starts, then takes its time.
        let loader = move || async move {
            let version = table.lock().map(|t| t.get(&key).copied().unwrap_or(0));
            let (tx, rx) = oneshot::channel();
            if let Ok(mut g) = gates.lock() {
                g.push(tx);
            }
            let _ = rx.await;
            version.map_err(|_| std::io::Error::other("poisoned"))
        };
        let future: ReadFuture = match method {
            Method::GetOrLoadTagged => {
                Box::pin(async move { cache.get_or_load_tagged(key, &["t"], loader).await })
            }
            Method::TryGetWith => Box::pin(async move {
                cache
                    .try_get_with(key, loader)
                    .await
                    .map_err(|e| pgcachewatch::Error::Config(e.to_string()))
            }),
            Method::OptionallyGetWith => Box::pin(async move {
                cache
                    .optionally_get_with(key, || async move { loader().await.ok() })
                    .await
                    .ok_or_else(|| pgcachewatch::Error::Config("no value".into()))
            }),
        };
        let must_see = self.processed.get(&key).copied().unwrap_or(0);
        self.reads.push(PendingRead {
            key,
            must_see,
            future,
        });
    }

    fn apply(&mut self, step: Step) -> Result<(), String> {
        match step {
            Step::Read(k, m) => self.read(k, m),
            Step::Insert(k) => {
                let current = self
                    .table
                    .lock()
                    .map_err(|e| e.to_string())?
                    .get(&k)
                    .copied();
                self.cache.insert(k, current.unwrap_or(0));
            }
            Step::Remove(k) => {
                self.cache.remove(&k);
            }
            Step::Peek(k) => {
                let must_see = self.processed.get(&k).copied().unwrap_or(0);
                if let Some(v) = self.cache.get(&k) {
                    if v < must_see {
                        return Err(format!(
                            "get k{k} returned v{v}, but v{must_see} was notified"
                        ));
                    }
                } else if self.cache.contains_key(&k) {
                    return Err(format!("contains_key k{k} is true but get found nothing"));
                }
            }
            Step::Release(n) => {
                let mut gates = self.gates.lock().map_err(|e| e.to_string())?;
                if !gates.is_empty() {
                    let i = n as usize % gates.len();
                    let _ = gates.remove(i).send(());
                }
            }
            Step::Write(k) => {
                let mut table = self.table.lock().map_err(|e| e.to_string())?;
                let v = table.entry(k).or_insert(0);
                *v += 1;
                self.queued.push((k, *v));
            }
            Step::Deliver(scope) => {
                if !self.queued.is_empty() {
                    let (k, v) = self.queued.remove(0);
                    let decision = match scope {
                        Scope::Key => Decision::keys([k]),
                        Scope::Table => Decision::tables([TableRef::new("public", "t")]),
                        Scope::All => Decision::All,
                    };
                    self.cache.apply(&decision);
                    self.processed.insert(k, v);
                }
            }
        }
        self.poll_reads()
    }

    /// Polls every pending read until none makes progress; checks finished ones.
    fn poll_reads(&mut self) -> Result<(), String> {
        let mut cx = Context::from_waker(noop_waker_ref());
        loop {
            let mut progressed = false;
            let mut i = 0;
            while i < self.reads.len() {
                if let Poll::Ready(result) = self.reads[i].future.as_mut().poll(&mut cx) {
                    let read = self.reads.remove(i);
                    let got = result.map_err(|e| e.to_string())?;
                    if got < read.must_see {
                        return Err(format!(
                            "read of k{} returned v{got}, but v{} had been notified before it started",
                            read.key, read.must_see
                        ));
                    }
                    progressed = true;
                } else {
                    i += 1;
                }
            }
            if !progressed {
                return Ok(());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn no_read_returns_a_value_older_than_a_processed_notification(
        steps in proptest::collection::vec(step(), 1..40)
    ) {
        let mut world = World::new();
        for (i, s) in steps.iter().enumerate() {
            if let Err(stale) = world.apply(*s) {
                prop_assert!(false, "step {i} ({s:?}): {stale}");
            }
        }
        // Let every loader finish: all reads complete and are checked too.
        while !world.gates.lock().map(|g| g.is_empty()).unwrap_or(true) {
            if let Err(stale) = world.apply(Step::Release(0)) {
                prop_assert!(false, "draining: {stale}");
            }
        }
        prop_assert!(world.reads.is_empty(), "a read never finished");
    }
}
