//! Dispatching on a task of its own, from a subscription.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::binding::Bindings;
use super::sleep_until;
use crate::source::{Subscription, TryRecvError};

/// How many ready signals are applied before the task yields to the runtime.
const BURST: usize = 1024;

/// Runs until `stop`, or until the subscription ends; then closes the bindings.
pub(super) async fn run(
    bindings: Arc<Mutex<Bindings>>,
    mut sub: Subscription,
    mut stop: oneshot::Receiver<()>,
    mut sync: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) {
    loop {
        let deadline = bindings.lock().deadline();
        let next = tokio::select! {
            biased;
            _ = &mut stop => break,
            s = sub.recv() => s,
            Some(reply) = sync.recv() => {
                // Everything emitted before the request is buffered by now.
                let closed = drain(&bindings, &mut sub);
                let _ = reply.send(());
                if closed {
                    break;
                }
                continue;
            }
            _ = sleep_until(deadline) => {
                bindings.lock().tick();
                continue;
            }
        };
        let Some(mut signal) = next else {
            tracing::warn!("event source ended; caches will bypass from now on");
            break;
        };
        // Apply this signal and whatever else is already buffered, in one burst.
        let mut n = 0;
        {
            let mut b = bindings.lock();
            loop {
                b.apply(&signal);
                n += 1;
                if n == BURST {
                    break;
                }
                match sub.try_recv() {
                    Ok(s) => signal = s,
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
            b.tick();
        }
        if n == BURST {
            tokio::task::yield_now().await;
        }
    }
    bindings.lock().close();
}

/// Applies every buffered signal; `true` if the subscription has ended.
fn drain(bindings: &Mutex<Bindings>, sub: &mut Subscription) -> bool {
    let mut b = bindings.lock();
    loop {
        match sub.try_recv() {
            Ok(signal) => b.apply(&signal),
            Err(TryRecvError::Empty) => return false,
            Err(TryRecvError::Closed) => return true,
        }
    }
}
