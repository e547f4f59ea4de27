//! Dispatching on a task of its own, from a subscription.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::shared::{CloseOnDrop, Shared};
use super::sleep_until;
use crate::source::{Subscription, TryRecvError};

/// How many ready signals are applied before the task yields to the runtime.
const BURST: usize = 1024;

/// Runs until `stop`, or until the subscription ends; closes the dispatcher when
/// it ends for any reason (including abort and panic).
pub(super) async fn run(
    shared: Arc<Shared>,
    mut sub: Subscription,
    mut stop: oneshot::Receiver<()>,
    mut sync: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) {
    let _close = CloseOnDrop(shared.clone());
    loop {
        if shared.is_closed() {
            return;
        }
        let deadline = shared.lock().bindings.deadline();
        let next = tokio::select! {
            biased;
            _ = &mut stop => return,
            s = sub.recv() => s,
            Some(reply) = sync.recv() => {
                // Everything emitted before the request is buffered by now.
                let closed = drain(&shared, &mut sub);
                let _ = reply.send(());
                if closed {
                    return;
                }
                continue;
            }
            _ = sleep_until(deadline) => {
                shared.tick();
                continue;
            }
        };
        let Some(mut signal) = next else {
            tracing::warn!("event source ended; caches will bypass from now on");
            return;
        };
        // Apply this signal and whatever else is already buffered, in one burst.
        let mut n = 0;
        {
            let mut state = shared.lock();
            loop {
                state.bindings.apply(&signal);
                n += 1;
                if n == BURST {
                    break;
                }
                match sub.try_recv() {
                    Ok(s) => signal = s,
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
            state.bindings.tick();
        }
        if n == BURST {
            tokio::task::yield_now().await;
        }
    }
}

/// Applies every buffered signal; `true` if the subscription has ended.
fn drain(shared: &Shared, sub: &mut Subscription) -> bool {
    let mut state = shared.lock();
    loop {
        match sub.try_recv() {
            Ok(signal) => state.bindings.apply(&signal),
            Err(TryRecvError::Empty) => return false,
            Err(TryRecvError::Closed) => return true,
        }
    }
}
