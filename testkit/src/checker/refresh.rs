//! The checker's refreshes: the real cache built with a refresher that reads
//! the simulated table, and background work run only when the schedule says.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pgcachewatch_core::{Cache, CacheBuilder, Refresh, RefreshTask, WhileUnhealthy};

use super::cache::Value;
use super::schedule::{Row, ROWS};

/// Adjusts the refreshing cache's builder after the checker's own settings.
pub type RefreshingCacheFn =
    Arc<dyn Fn(CacheBuilder<Row, Value>) -> CacheBuilder<Row, Value> + Send + Sync>;

/// What [`ModelChecker::refresh_on_invalidation`](super::ModelChecker::refresh_on_invalidation)
/// turned on.
#[derive(Clone)]
pub(super) struct RefreshCheck {
    /// The rule's bound (and, unless `configure` changes it, the cache's).
    pub(super) stale_within: Option<Duration>,
    pub(super) configure: Option<RefreshingCacheFn>,
}

impl fmt::Debug for RefreshCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshCheck")
            .field("stale_within", &self.stale_within)
            .field("configure", &self.configure.is_some())
            .finish()
    }
}

/// One load a refresh made, recorded by the refresher (which must be `Send`)
/// and moved into the checker's own records right after the refreshes ran.
#[derive(Debug)]
pub(super) struct RefreshLoad {
    pub(super) row: Row,
    pub(super) version: u64,
    pub(super) window: bool,
    pub(super) read_at: Instant,
}

/// The table as the refresher sees it, and what it did.
#[derive(Debug, Default)]
pub(super) struct Io {
    /// Every row's newest visible version (what a load reads).
    pub(super) visible: Vec<u64>,
    /// Every row's newest committed version.
    pub(super) committed: Vec<u64>,
    /// The id the next load gets (the checker's load count when refreshes run).
    pub(super) next_id: u64,
    /// Loads made since the checker last took them.
    pub(super) loads: Vec<RefreshLoad>,
    /// Trace lines since the checker last took them.
    pub(super) notes: Vec<String>,
    /// Refreshes that read their row, in order.
    pub(super) read: u64,
    /// How many of them may return.
    pub(super) released: u64,
}

/// Ready once `released` reaches `n`.
struct Release(Arc<Mutex<Io>>, u64);

impl Future for Release {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        match self.0.lock() {
            Ok(io) if io.released < self.1 => Poll::Pending,
            _ => Poll::Ready(()),
        }
    }
}

/// The refreshing cache's background work and the state it shares.
pub(super) struct RefreshSim {
    pub(super) io: Arc<Mutex<Io>>,
    tasks: Arc<Mutex<Vec<RefreshTask>>>,
    /// The stale clock, in milliseconds (one a step).
    pub(super) now_ms: Arc<AtomicU64>,
    /// The rule's bound.
    pub(super) stale_within: Option<Duration>,
}

impl RefreshSim {
    /// The real cache with a refresher, warming after flushes (every row, no
    /// pause) and at most two refreshes at once, run by this simulation.
    pub(super) fn build(check: &RefreshCheck, policy: WhileUnhealthy) -> (Self, Cache<Row, Value>) {
        let io = Arc::new(Mutex::new(Io {
            visible: vec![0; ROWS as usize],
            committed: vec![0; ROWS as usize],
            ..Io::default()
        }));
        let tasks: Arc<Mutex<Vec<RefreshTask>>> = Arc::default();
        let now_ms = Arc::new(AtomicU64::new(0));
        let refresher = {
            let io = io.clone();
            move |row: Row| {
                let io = io.clone();
                async move {
                    let (value, n) = {
                        let mut g = io.lock().map_err(|_| Poisoned)?;
                        let version = g.visible[row as usize];
                        let committed = g.committed[row as usize];
                        let id = g.next_id;
                        g.next_id += 1;
                        g.read += 1;
                        let n = g.read;
                        let window = committed > version;
                        g.loads.push(RefreshLoad {
                            row,
                            version,
                            window,
                            read_at: Instant::now(),
                        });
                        let unseen = if window {
                            format!("; v{committed} is committed but not yet visible")
                        } else {
                            String::new()
                        };
                        g.notes.push(format!(
                            "refresh #{n} reads row {row} = v{version} (load #{id}){unseen}"
                        ));
                        (Value { version, load: id }, n)
                    };
                    Release(io.clone(), n).await;
                    if let Ok(mut g) = io.lock() {
                        g.notes.push(format!(
                            "refresh #{n} returns v{} (load #{})",
                            value.version, value.load
                        ));
                    }
                    Ok::<_, Poisoned>(value)
                }
            }
        };
        let refresh = Refresh::new(refresher).max_concurrent(2).spawner({
            let tasks = tasks.clone();
            move |task| {
                if let Ok(mut t) = tasks.lock() {
                    t.push(task);
                }
            }
        });
        let base = Instant::now();
        let clock = now_ms.clone();
        let mut builder = Cache::builder()
            .capacity(64)
            .while_unhealthy(policy)
            .refresh_on_invalidation(refresh)
            .warm_after_flush(ROWS as usize, u32::MAX)
            .stale_clock(move || base + Duration::from_millis(clock.load(Ordering::SeqCst)));
        if let Some(d) = check.stale_within {
            builder = builder.serve_stale_within(d);
        }
        if let Some(configure) = &check.configure {
            builder = configure(builder);
        }
        let sim = RefreshSim {
            io,
            tasks,
            now_ms,
            stale_within: check.stale_within,
        };
        (sim, builder.build())
    }

    /// Polls every background task until none makes progress (tasks may start
    /// others: warming starts refreshes).
    pub(super) fn run(&self) {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        loop {
            let mut tasks = match self.tasks.lock() {
                Ok(mut t) => std::mem::take(&mut *t),
                Err(_) => return,
            };
            let before = tasks.len();
            tasks.retain_mut(|t| t.as_mut().poll(&mut cx).is_pending());
            let finished = before - tasks.len();
            let spawned = match self.tasks.lock() {
                Ok(mut t) => {
                    let spawned = t.len();
                    t.extend(tasks);
                    spawned
                }
                Err(_) => return,
            };
            if finished == 0 && spawned == 0 {
                return;
            }
        }
    }

    /// Lets the oldest refresh that read and waits return; `false` if none waits.
    pub(super) fn release_one(&self) -> bool {
        match self.io.lock() {
            Ok(mut g) if g.released < g.read => {
                g.released += 1;
                true
            }
            _ => false,
        }
    }

    /// Lets every refresh return, now and later (the end of a schedule).
    pub(super) fn release_all(&self) {
        if let Ok(mut g) = self.io.lock() {
            g.released = u64::MAX;
        }
    }
}

/// The shared table's lock was poisoned (a panic elsewhere in the checker).
#[derive(Debug, thiserror::Error)]
#[error("the checker's table lock was poisoned")]
struct Poisoned;
