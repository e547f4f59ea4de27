//! Attachments and subscriptions that keep their source running.
//!
//! A [`Dispatcher`](pgcachewatch_core::Dispatcher) spawned on a source must not
//! stop invalidating because the application dropped its own handle to the source
//! (a setup function returning the dispatcher's handle but not the source is the
//! classic case: without this, every read would bypass the cache for ever). So
//! every [`InlineAttachment`] and [`Subscription`] a built-in source hands out
//! holds a clone of the source's shared state; the source stops when the last
//! handle *and* the last attachment and subscription are gone, or on an explicit
//! shutdown.

use std::sync::Arc;

use pgcachewatch_core::{InlineAttachment, Subscription};

/// `attachment`, keeping `keep` alive for as long as it is attached.
pub(crate) fn attachment<T: Send + Sync + 'static>(
    attachment: InlineAttachment,
    keep: Arc<T>,
) -> InlineAttachment {
    // Field order is drop order: detach first, then release the source.
    InlineAttachment::new((attachment, keep))
}

/// `subscription`, keeping `keep` alive for as long as it is read.
pub(crate) fn subscription<T: Send + Sync + 'static>(
    subscription: Subscription,
    keep: Arc<T>,
) -> Subscription {
    subscription.with_guard(keep)
}

/// Waits for a source's background task once it has been told to stop; a panic
/// in it is logged (`what` names the task), never propagated.
#[cfg(any(feature = "postgres", feature = "nats", feature = "websocket"))]
pub(crate) async fn join_task(task: Option<tokio::task::JoinHandle<()>>, what: &str) {
    let Some(task) = task else { return };
    if let Err(e) = task.await {
        if e.is_panic() {
            tracing::error!("{what} task panicked: {e}");
        }
    }
}
