//! The state a running dispatcher shares between whoever applies signals (the
//! source's task, inline, or the dispatcher's own task), its deadline timer, and
//! its handle.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::applied::Applied;
use super::binding::{Bindings, Counters};
use crate::signal::Signal;
use crate::sync::{AtomicBool, Mutex, MutexGuard, Rearm};

/// The bindings and the deadline the timer sleeps until, under one lock: a
/// deadline computed by whoever applies a signal and the timer's own reading
/// can never cross (a deadline read, then an event, then a stale `armed` write
/// would leave the timer asleep for ever).
pub(super) struct State {
    pub(super) bindings: Bindings,
    armed: Option<Instant>,
}

pub(super) struct Shared {
    state: Mutex<State>,
    rearm: Rearm,
    closed: AtomicBool,
    pub(super) counters: Arc<Counters>,
    pub(super) applied: Arc<Applied>,
}

impl Shared {
    pub(super) fn new(bindings: Bindings) -> Arc<Self> {
        Arc::new(Shared {
            counters: bindings.counters.clone(),
            applied: bindings.applied.clone(),
            state: Mutex::new(State {
                bindings,
                armed: None,
            }),
            rearm: Rearm::default(),
            closed: AtomicBool::new(false),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Applies one signal and re-arms the timer if a sooner deadline appeared.
    #[inline]
    pub(super) fn apply(&self, signal: &Signal) {
        let mut state = self.state.lock();
        state.bindings.apply(signal);
        self.rearm_if_sooner(&mut state);
    }

    /// Call with the lock held after changing the bindings.
    pub(super) fn rearm_if_sooner(&self, state: &mut State) {
        let deadline = state.bindings.deadline();
        if deadline.is_some() && (state.armed.is_none() || deadline < state.armed) {
            state.armed = deadline;
            // A wake-up is kept if the timer is not waiting yet: never lost.
            self.rearm.notify();
        }
    }

    /// The timer's reading: the earliest deadline, now armed.
    pub(super) fn arm(&self) -> Option<Instant> {
        let mut state = self.state.lock();
        let deadline = state.bindings.deadline();
        state.armed = deadline;
        deadline
    }

    pub(super) fn tick(&self) {
        self.state.lock().bindings.tick();
    }

    pub(super) async fn rearmed(&self) {
        self.rearm.notified().await;
    }

    #[cfg(all(test, pgcachewatch_loom))]
    fn wait_rearmed(&self) {
        self.rearm.wait();
    }

    /// Stops dispatching for good: every target is flushed and left unhealthy.
    pub(super) fn close(&self) {
        self.close_as(false);
    }

    /// [`close`](Self::close); `deliberate` when shut down on purpose.
    pub(super) fn close_as(&self, deliberate: bool) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.state.lock().bindings.close(deliberate);
        self.rearm.notify();
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Closes the dispatcher when dropped: held by every task that drives it, so a
/// task that ends for any reason (done, aborted, panicked) leaves its caches
/// bypassing instead of silently stale.
pub(super) struct CloseOnDrop(pub(super) Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Interleaving model tests (loom): see `crate::sync` for how to run them.
#[cfg(all(test, pgcachewatch_loom))]
mod loom_tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::dispatcher::binding::{Binding, Bound};
    use crate::event::{Event, Operation};
    use crate::health::{HealthBoard, HealthVote};
    use crate::strategy::{Decision, InvalidationStrategy};
    use crate::InvalidationTarget;

    /// Defers every event: wants a tick a second after the first one.
    #[derive(Debug, Default)]
    struct Defers(Option<Instant>);

    impl InvalidationStrategy<u32> for Defers {
        fn on_event(&mut self, _: &Event, now: Instant) -> Decision<u32> {
            self.0.get_or_insert(now + Duration::from_secs(1));
            Decision::Nothing
        }
        fn next_deadline(&self) -> Option<Instant> {
            self.0
        }
    }

    struct Sink(std::sync::Arc<HealthBoard>);

    impl InvalidationTarget<u32> for Sink {
        fn apply(&self, _: &Decision<u32>) {}
        fn health_vote(&self) -> HealthVote {
            HealthVote::new(self.0.clone())
        }
    }

    fn shared() -> Arc<Shared> {
        let bound: Box<dyn Binding> = Box::new(Bound::new(
            Defers::default(),
            Sink(std::sync::Arc::default()),
        ));
        Shared::new(Bindings::new(vec![bound]))
    }

    /// The timer reads "no deadline" while an event creating one is applied: in
    /// every interleaving the timer is woken and then sees the deadline (a lost
    /// wake-up would leave it blocked for ever, which loom reports).
    #[test]
    fn loom_a_deadline_set_while_the_timer_arms_is_never_lost() {
        loom::model(|| {
            let shared = shared();
            let applier = {
                let shared = shared.clone();
                loom::thread::spawn(move || {
                    let event = Event::new("ch", Operation::Update, "public", "t");
                    shared.apply(&Signal::Event(std::sync::Arc::new(event)));
                })
            };
            let mut deadline = shared.arm();
            while deadline.is_none() {
                shared.wait_rearmed();
                deadline = shared.arm();
            }
            applier.join().expect("applier");
            assert!(shared.arm().is_some());
        });
    }

    /// Closing races applying: the timer always learns it is closed.
    #[test]
    fn loom_close_wakes_the_timer() {
        loom::model(|| {
            let shared = shared();
            let closer = {
                let shared = shared.clone();
                loom::thread::spawn(move || shared.close())
            };
            while !shared.is_closed() {
                if shared.arm().is_none() && !shared.is_closed() {
                    shared.wait_rearmed();
                }
            }
            closer.join().expect("closer");
        });
    }
}
