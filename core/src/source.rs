//! The [`EventSource`] trait and the [`Subscription`] it hands out.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::broadcast;

use crate::signal::{GapReason, Health, Signal};

/// Something that produces change signals: a PostgreSQL `LISTEN` connection,
/// the in-memory test source, or (later) a logical-replication slot.
///
/// # Contract
///
/// Every implementation guarantees:
///
/// 1. **Fan-out.** Each call to [`subscribe`](EventSource::subscribe) returns an
///    independent [`Subscription`]; every subscription sees every signal emitted
///    after it was created, in emission order.
/// 2. **No silent loss.** A subscription that falls behind a bounded buffer receives
///    [`Signal::Gap`] with [`GapReason::Lagged`] in place of what it missed; memory
///    stays bounded whether or not anybody reads.
/// 3. **Health first.** The first signal of a new subscription is
///    [`Signal::Health`] with the source's current health.
/// 4. **Gap before healthy.** After any interruption that may have lost events the
///    source emits a `Gap` *after* it is listening again and *before* it reports
///    [`Health::Healthy`]. A *lossless* source (one that resumes from a position,
///    such as a replication slot) may recover without a gap when it lost nothing:
///    it reports `Healthy` only once it has replayed everything up to where the
///    server was when it reconnected. A `Gap` always means events are really gone.
/// 5. **Lagging subscribers are told the health.** A subscription that fell behind
///    gets its `Gap(Lagged)` followed by the source's current health, since a
///    health change may have been among what it missed.
/// 6. **End.** When the source shuts down, subscriptions end (`recv` returns `None`),
///    and inline handlers are dropped — which stops their dispatchers, whose caches
///    then bypass. A source should keep running while an attachment or a
///    subscription it handed out is alive.
///
/// The trait is object-safe: `Box<dyn EventSource>` and `Arc<dyn EventSource>` work
/// wherever a source is expected, so tests swap backends at run time.
///
/// # Example
///
/// Any type that owns a [`SignalHub`](crate::SignalHub) is a source in a few lines:
///
/// ```
/// use pgcachewatch_core::{EventSource, Health, Signal, SignalHub, Subscription};
///
/// #[derive(Debug)]
/// struct Manual(SignalHub);
///
/// impl EventSource for Manual {
///     fn subscribe(&self) -> Subscription { self.0.subscribe() }
///     fn health(&self) -> Health { self.0.health() }
/// }
///
/// # tokio_test_block_on(async {
/// let source = Manual(SignalHub::new(16));
/// let mut sub = source.subscribe();
/// assert!(matches!(sub.recv().await, Some(Signal::Health(Health::Healthy))));
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
pub trait EventSource: Send + Sync + fmt::Debug + 'static {
    /// A new subscription that sees every signal from now on.
    fn subscribe(&self) -> Subscription;

    /// The source's health right now.
    fn health(&self) -> Health;

    /// Optional: runs `handler` synchronously for every signal, in the source's own
    /// task, before subscribers see it (first with the current health), until the
    /// attachment is dropped; the handler is dropped when the source ends. The
    /// [`Dispatcher`](crate::Dispatcher) uses it when offered, to invalidate without
    /// a hop to another task. Sources built on a [`SignalHub`](crate::SignalHub)
    /// forward to [`SignalHub::attach_inline`](crate::SignalHub::attach_inline).
    /// The default returns `None`: not supported, the dispatcher subscribes instead.
    fn attach_inline(&self, handler: InlineHandler) -> Option<InlineAttachment> {
        let _ = handler;
        None
    }

    /// A short name for the source in metrics and logs (the `source` label of
    /// [`telemetry`](crate::telemetry)'s series, with feature `metrics`): its kind
    /// and, where it has one, its name — `listen`, `replication:<slot>`,
    /// `nats:<stream>`, `memory`. The default is `custom`.
    ///
    /// ```
    /// use pgcachewatch_core::{EventSource, Health, SignalHub, Subscription};
    /// #[derive(Debug)]
    /// struct Orders(SignalHub);
    /// impl EventSource for Orders {
    ///     fn subscribe(&self) -> Subscription { self.0.subscribe() }
    ///     fn health(&self) -> Health { self.0.health() }
    ///     fn label(&self) -> String { "orders-feed".into() }
    /// }
    /// let source = Orders(SignalHub::new(16).with_label("orders-feed"));
    /// assert_eq!(source.label(), "orders-feed");
    /// ```
    fn label(&self) -> String {
        "custom".into()
    }
}

/// A callback run for every signal by the emitting task; see
/// [`EventSource::attach_inline`].
pub type InlineHandler = Box<dyn FnMut(&Signal) + Send + 'static>;

/// Keeps an inline handler attached; dropping it detaches the handler.
#[must_use = "dropping the attachment detaches the handler at once"]
pub struct InlineAttachment {
    _detach: Box<dyn Send + Sync>,
}

impl InlineAttachment {
    /// An attachment that runs `detach`'s `Drop` when dropped.
    pub fn new(detach: impl Send + Sync + 'static) -> Self {
        InlineAttachment {
            _detach: Box::new(detach),
        }
    }
}

impl fmt::Debug for InlineAttachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InlineAttachment").finish_non_exhaustive()
    }
}

impl<T: EventSource + ?Sized> EventSource for Arc<T> {
    fn subscribe(&self) -> Subscription {
        (**self).subscribe()
    }
    fn health(&self) -> Health {
        (**self).health()
    }
    fn attach_inline(&self, handler: InlineHandler) -> Option<InlineAttachment> {
        (**self).attach_inline(handler)
    }
    fn label(&self) -> String {
        (**self).label()
    }
}

impl<T: EventSource + ?Sized> EventSource for Box<T> {
    fn subscribe(&self) -> Subscription {
        (**self).subscribe()
    }
    fn health(&self) -> Health {
        (**self).health()
    }
    fn attach_inline(&self, handler: InlineHandler) -> Option<InlineAttachment> {
        (**self).attach_inline(handler)
    }
    fn label(&self) -> String {
        (**self).label()
    }
}

/// Returned by [`Subscription::try_recv`] when no signal is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TryRecvError {
    /// Nothing is buffered right now.
    #[error("no signal is ready")]
    Empty,
    /// The source has shut down; no signal will come.
    #[error("the source has shut down")]
    Closed,
}

/// One subscriber's view of an [`EventSource`]: a sequence of [`Signal`]s.
///
/// Built by a source, from a [`SignalHub`](crate::SignalHub) or from any stream
/// ([`Subscription::from_stream`]).
pub struct Subscription {
    first: Option<Signal>,
    inner: Inner,
    /// Kept alive for as long as the subscription (see [`Subscription::with_guard`]).
    _guard: Option<Box<dyn Send + Sync>>,
}

enum Inner {
    /// The hub's receiver and its health flag (told again after a lag).
    Hub(broadcast::Receiver<Signal>, Arc<AtomicBool>),
    Stream(BoxStream<'static, Signal>),
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner {
            Inner::Hub(..) => "hub",
            Inner::Stream(_) => "stream",
        };
        f.debug_struct("Subscription").field("kind", &kind).finish()
    }
}

impl Subscription {
    pub(crate) fn from_hub(
        first: Signal,
        rx: broadcast::Receiver<Signal>,
        healthy: Arc<AtomicBool>,
    ) -> Self {
        Subscription {
            first: Some(first),
            inner: Inner::Hub(rx, healthy),
            _guard: None,
        }
    }

    /// The gap for `missed` lost signals; the source's current health follows it,
    /// since a health change may have been among them.
    fn lagged(&mut self, missed: u64, healthy: bool) -> Signal {
        self.first = Some(Signal::Health(if healthy {
            Health::Healthy
        } else {
            Health::Unhealthy
        }));
        lagged(missed)
    }

    /// A subscription over any stream of signals, for sources that do not use a
    /// [`SignalHub`](crate::SignalHub). The stream must honour the
    /// [`EventSource`] contract (health first, gaps on loss).
    pub fn from_stream(stream: impl Stream<Item = Signal> + Send + 'static) -> Self {
        Subscription {
            first: None,
            inner: Inner::Stream(stream.boxed()),
            _guard: None,
        }
    }

    /// This subscription, keeping `guard` alive for as long as it exists: a
    /// source hands out subscriptions that keep its background task running (a
    /// reader must not be cut off because the application dropped its own handle
    /// to the source). Costs nothing per signal.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use pgcachewatch_core::SignalHub;
    /// let alive = Arc::new(());
    /// let sub = SignalHub::new(4).subscribe().with_guard(alive.clone());
    /// assert_eq!(Arc::strong_count(&alive), 2);
    /// drop(sub);
    /// assert_eq!(Arc::strong_count(&alive), 1);
    /// ```
    pub fn with_guard(mut self, guard: impl Send + Sync + 'static) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }

    /// The next signal, or `None` once the source has shut down.
    pub async fn recv(&mut self) -> Option<Signal> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        match &mut self.inner {
            Inner::Hub(rx, healthy) => match rx.recv().await {
                Ok(signal) => Some(signal),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let healthy = healthy.load(Ordering::Acquire);
                    Some(self.lagged(missed, healthy))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            },
            Inner::Stream(s) => s.next().await,
        }
    }

    /// The next signal if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Result<Signal, TryRecvError> {
        if let Some(first) = self.first.take() {
            return Ok(first);
        }
        match &mut self.inner {
            Inner::Hub(rx, healthy) => match rx.try_recv() {
                Ok(signal) => Ok(signal),
                Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                    let healthy = healthy.load(Ordering::Acquire);
                    Ok(self.lagged(missed, healthy))
                }
                Err(broadcast::error::TryRecvError::Empty) => Err(TryRecvError::Empty),
                Err(broadcast::error::TryRecvError::Closed) => Err(TryRecvError::Closed),
            },
            Inner::Stream(s) => match s.next().now_or_never() {
                Some(Some(signal)) => Ok(signal),
                Some(None) => Err(TryRecvError::Closed),
                None => Err(TryRecvError::Empty),
            },
        }
    }

    /// This subscription as a `Stream`.
    pub fn into_stream(self) -> BoxStream<'static, Signal> {
        futures::stream::unfold(self, |mut sub| async move {
            sub.recv().await.map(|signal| (signal, sub))
        })
        .boxed()
    }
}

fn lagged(missed: u64) -> Signal {
    static LIMIT: crate::rate_limit::RateLimit = crate::rate_limit::RateLimit::new();
    if let Some(suppressed) = LIMIT.check() {
        tracing::warn!(
            missed,
            suppressed,
            "subscriber lagged behind the source; emitting a gap (at most one such warning a second; `suppressed` were not logged)"
        );
    }
    Signal::Gap(GapReason::Lagged { missed })
}
