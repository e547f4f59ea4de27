//! [`ClosableHub`]: a source's hub until the source shuts down.

use parking_lot::RwLock;

use crate::hub::SignalHub;
use crate::signal::{Health, Signal};
use crate::source::{InlineAttachment, InlineHandler, Subscription};

/// A [`SignalHub`] a source can shut down: every subscription ends, and whatever
/// subscribes or attaches afterwards learns at once that the source has ended.
///
/// The three [`EventSource`](crate::EventSource) methods of a hub-based source are
/// one line each on top of it.
///
/// ```
/// use pgcachewatch_core::{ClosableHub, Health, SignalHub};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let hub = ClosableHub::new(SignalHub::new(16));
/// let mut sub = hub.subscribe();
/// hub.close();
/// assert!(sub.recv().await.is_some()); // the health it started with
/// assert!(sub.recv().await.is_none()); // then the end
/// assert_eq!(hub.health(), Health::Unhealthy);
/// assert!(hub.subscribe().recv().await.is_none());
/// # });
/// ```
#[derive(Debug)]
pub struct ClosableHub {
    hub: RwLock<Option<SignalHub>>,
}

impl ClosableHub {
    /// Wraps an open hub.
    pub fn new(hub: SignalHub) -> Self {
        ClosableHub {
            hub: RwLock::new(Some(hub)),
        }
    }

    /// Runs `f` on the hub unless it is closed.
    pub fn with<R>(&self, f: impl FnOnce(&SignalHub) -> R) -> Option<R> {
        self.hub.read().as_ref().map(f)
    }

    /// A subscription; one that ends at once if the hub is closed.
    pub fn subscribe(&self) -> Subscription {
        self.with(SignalHub::subscribe)
            .unwrap_or_else(|| Subscription::from_stream(futures::stream::empty()))
    }

    /// The hub's health; `Unhealthy` once closed.
    pub fn health(&self) -> Health {
        self.with(SignalHub::health).unwrap_or(Health::Unhealthy)
    }

    /// Attaches `handler` inline (see [`SignalHub::attach_inline`]). On a closed
    /// hub the handler is told `Unhealthy` and dropped at once, which tells its
    /// owner (a dispatcher) that the source has ended.
    pub fn attach_inline(&self, handler: InlineHandler) -> InlineAttachment {
        // Cloned out of the lock: attaching runs the handler, which may take a while.
        let hub = self.hub.read().clone();
        match hub {
            Some(hub) => hub.attach_inline(handler),
            None => {
                let mut handler = handler;
                handler(&Signal::Health(Health::Unhealthy));
                InlineAttachment::new(())
            }
        }
    }

    /// Closes the hub: subscriptions end once every other clone of it is dropped.
    pub fn close(&self) {
        self.hub.write().take();
    }
}
