//! One conformance suite that every [`EventSource`] backend runs.
//!
//! The checks are plain `pub async fn`s taking the source as `&dyn EventSource` and
//! a [`SourceDriver`] that makes it emit, interrupts its connection and shuts it
//! down. Each backend's tests implement the driver (and a [`SourceHarness`] that
//! builds fresh pairs) and call [`run_all`], directly and through
//! `Box<dyn EventSource>` / `Arc<dyn EventSource>`. Differences between backends
//! are [`Capabilities`], not copies of the suite.
//!
//! Every wait is bounded ([`Capabilities::delivery_timeout`], 10 s by default), and
//! every failure panics with a message naming the check, e.g.
//! `conformance check 'ordering': expected event "t3", got "t4"`.
//!
//! # Example
//!
//! The in-memory source (see `backends/tests/memory_conformance.rs` for the real one):
//!
//! ```
//! use pgcachewatch::testkit::conformance::async_trait; // re-exported: no extra dependency
//! use pgcachewatch::memory::{InMemoryHandle, InMemorySource};
//! use pgcachewatch::{BoxError, Event, Operation};
//! use pgcachewatch::testkit::conformance::{run_all, Capabilities, SourceDriver, SourceHarness};
//!
//! struct Driver(InMemoryHandle);
//!
//! #[async_trait]
//! impl SourceDriver for Driver {
//!     async fn emit(&self, table: &str) -> Result<(), BoxError> {
//!         self.0.publish(Event::new("ch", Operation::Insert, "public", table));
//!         Ok(())
//!     }
//!     async fn interrupt(&self) -> Result<(), BoxError> {
//!         self.0.disconnect("conformance");
//!         self.0.reconnect();
//!         Ok(())
//!     }
//!     async fn shutdown(&self) -> Result<(), BoxError> {
//!         self.0.close();
//!         Ok(())
//!     }
//! }
//!
//! struct Harness;
//!
//! #[async_trait]
//! impl SourceHarness for Harness {
//!     type Source = InMemorySource;
//!     type Driver = Driver;
//!     async fn fresh(&self) -> Result<(InMemorySource, Driver), BoxError> {
//!         let (source, handle) = InMemorySource::with_capacity(16);
//!         Ok((source, Driver(handle)))
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! run_all(&Harness, &Capabilities::new().lag_buffer(16)).await;
//! # });
//! ```

use std::fmt;
use std::future::Future;
use std::time::Duration;

pub use async_trait::async_trait;
use pgcachewatch_core::{BoxError, Event, EventSource, GapReason, Health, Signal, Subscription};

/// Drives a source under test the way the outside world would.
///
/// The PostgreSQL backend implements `emit` with `pg_notify`, `interrupt` with
/// `pg_terminate_backend`; the in-memory one with its handle.
#[async_trait]
pub trait SourceDriver: Send + Sync {
    /// Makes the source emit one event whose [`Event::table`] is exactly `table`
    /// (a short `[a-z0-9_]` string the check chooses; it is a tag, not necessarily
    /// an existing table). Returns once the write is committed; delivery to
    /// subscribers may happen later.
    async fn emit(&self, table: &str) -> Result<(), BoxError>;

    /// Breaks the source's connection. The source must then emit
    /// `Health(Unhealthy)` and a `Gap`, recover (by itself or because this call
    /// let it), and emit a `Gap` followed by `Health(Healthy)`. May return before
    /// recovery.
    async fn interrupt(&self) -> Result<(), BoxError>;

    /// Shuts the source down: every subscription must end.
    async fn shutdown(&self) -> Result<(), BoxError>;
}

/// Builds a fresh, listening (source, driver) pair for each check.
#[async_trait]
pub trait SourceHarness: Send + Sync {
    /// The source type (a concrete source, `Box<dyn EventSource>`, `Arc<…>`, …).
    type Source: EventSource;
    /// Its driver.
    type Driver: SourceDriver;

    /// A new source nobody has subscribed to yet, and its driver.
    async fn fresh(&self) -> Result<(Self::Source, Self::Driver), BoxError>;
}

/// What a backend can do, and how long to wait for it.
///
/// ```
/// use std::time::Duration;
/// use pgcachewatch::testkit::conformance::Capabilities;
/// let caps = Capabilities::new().lag_buffer(16).delivery_timeout(Duration::from_secs(30));
/// assert_eq!(caps.lag_buffer, Some(16));
/// assert!(caps.interrupt);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Capabilities {
    /// The number of signals a subscriber may fall behind before it is guaranteed a
    /// [`GapReason::Lagged`] gap (the real bound: a tokio broadcast rounds its
    /// capacity up to a power of two). `None` skips the lag check.
    pub lag_buffer: Option<usize>,
    /// Whether [`SourceDriver::interrupt`] is supported (default `true`).
    pub interrupt: bool,
    /// The longest wait for any one expected signal (default 10 s).
    pub delivery_timeout: Duration,
    /// How many subscribers the fan-out check uses (default 8).
    pub subscribers: usize,
    /// How many events the ordering and fan-out checks emit (default 50).
    pub events: usize,
    /// How many interrupt/recover rounds the interrupt check runs (default 2).
    pub interrupt_rounds: usize,
    /// The source recovers from an interruption without losing anything (a
    /// logical-replication slot): the interrupt check then demands `Unhealthy`,
    /// then `Healthy` with **no** `Gap` in between, and delivery, exactly once, of
    /// an event written while the source was down (default `false`: the check
    /// demands the gaps a lossy source owes).
    pub lossless: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self::new()
    }
}

impl Capabilities {
    /// Defaults: no lag check, interruption supported, 10 s per wait.
    pub fn new() -> Self {
        Capabilities {
            lag_buffer: None,
            interrupt: true,
            delivery_timeout: Duration::from_secs(10),
            subscribers: 8,
            events: 50,
            interrupt_rounds: 2,
            lossless: false,
        }
    }

    /// Declares the source lossless (builder style; see [`Capabilities::lossless`]).
    pub fn lossless(mut self) -> Self {
        self.lossless = true;
        self
    }

    /// Runs the lag check with this per-subscriber bound (builder style).
    pub fn lag_buffer(mut self, signals: usize) -> Self {
        self.lag_buffer = Some(signals);
        self
    }

    /// Skips the interrupt check (builder style).
    pub fn without_interrupt(mut self) -> Self {
        self.interrupt = false;
        self
    }

    /// Sets the longest wait for one signal (builder style).
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// Sets the fan-out subscriber count (builder style).
    pub fn subscribers(mut self, n: usize) -> Self {
        self.subscribers = n.max(2);
        self
    }

    /// Sets the event count of the ordering and fan-out checks (builder style).
    pub fn events(mut self, n: usize) -> Self {
        self.events = n.max(1);
        self
    }

    /// Sets the number of interrupt rounds (builder style).
    pub fn interrupt_rounds(mut self, n: usize) -> Self {
        self.interrupt_rounds = n.max(1);
        self
    }
}

/// The checks [`run_all`] runs, in order, by name.
pub const CHECKS: [&str; 7] = [
    "health_first",
    "ordering",
    "fan_out",
    "late_subscriber",
    "lag_gap",
    "interrupt",
    "shutdown",
];

/// Runs every check, each on a fresh pair from `harness`, and shuts each source
/// down afterwards. Panics on the first failure, naming the check.
pub async fn run_all<H: SourceHarness>(harness: &H, caps: &Capabilities) {
    for name in CHECKS {
        let (source, driver) = match harness.fresh().await {
            Ok(pair) => pair,
            Err(e) => panic!("conformance check '{name}': harness could not build a source: {e}"),
        };
        tracing::info!(check = name, "conformance check starting");
        let src: &dyn EventSource = &source;
        let drv: &dyn SourceDriver = &driver;
        match name {
            "health_first" => health_first(src, drv, caps).await,
            "ordering" => ordering(src, drv, caps).await,
            "fan_out" => fan_out(src, drv, caps).await,
            "late_subscriber" => late_subscriber(src, drv, caps).await,
            "lag_gap" => lag_gap(src, drv, caps).await,
            "interrupt" => interrupt(src, drv, caps).await,
            _ => shutdown(src, drv, caps).await,
        }
        if name != "shutdown" {
            // Best effort: a failing shutdown is the shutdown check's business.
            let _ = driver.shutdown().await;
        }
    }
}

/// A named check: bounded waits and panics that say which check failed.
struct Check<'a> {
    name: &'static str,
    caps: &'a Capabilities,
}

impl Check<'_> {
    fn fail(&self, msg: impl fmt::Display) -> ! {
        panic!("conformance check '{}': {msg}", self.name)
    }

    async fn within<T>(&self, what: &str, fut: impl Future<Output = T>) -> T {
        match tokio::time::timeout(self.caps.delivery_timeout, fut).await {
            Ok(v) => v,
            Err(_) => self.fail(format_args!(
                "timed out after {:?} waiting for {what}",
                self.caps.delivery_timeout
            )),
        }
    }

    /// The next signal other than [`Signal::Progress`] (a position report of a
    /// lossless source, neither an event, a gap nor a health change: no check is
    /// about it, and sources that never send it are unaffected).
    async fn recv(&self, sub: &mut Subscription, what: &str) -> Signal {
        loop {
            match self.within(what, sub.recv()).await {
                Some(Signal::Progress(_)) => continue,
                Some(s) => return s,
                None => self.fail(format_args!("subscription ended while waiting for {what}")),
            }
        }
    }

    async fn emit(&self, driver: &dyn SourceDriver, table: &str) {
        if let Err(e) = driver.emit(table).await {
            self.fail(format_args!("driver.emit({table:?}) failed: {e}"));
        }
    }

    /// Subscribes; asserts the first signal is a health signal; waits for healthy.
    async fn subscribe_healthy(&self, source: &dyn EventSource) -> Subscription {
        let mut sub = source.subscribe();
        match self.recv(&mut sub, "the first signal (health)").await {
            Signal::Health(Health::Healthy) => return sub,
            Signal::Health(Health::Unhealthy) => {}
            other => self.fail(format_args!(
                "the first signal of a subscription must be Health, got {}",
                describe(&other)
            )),
        }
        loop {
            match self.recv(&mut sub, "the source to become healthy").await {
                Signal::Health(Health::Healthy) => return sub,
                Signal::Event(e) => self.fail(format_args!(
                    "event {:?} arrived while the source was unhealthy",
                    e.table
                )),
                _ => {}
            }
        }
    }

    /// The next event, skipping nothing: a gap or health change here is a failure.
    async fn next_event(&self, sub: &mut Subscription, expected: &str) -> Event {
        let what = format!("event {expected:?}");
        match self.recv(sub, &what).await {
            Signal::Event(e) => (*e).clone(),
            other => self.fail(format_args!(
                "expected event {expected:?}, got {} (no loss or health change was provoked)",
                describe(&other)
            )),
        }
    }

    async fn expect_event(&self, sub: &mut Subscription, expected: &str, who: &str) {
        let e = self.next_event(sub, expected).await;
        if e.table != expected {
            self.fail(format_args!(
                "{who}: expected event {expected:?}, got {:?} (out of order or lost)",
                e.table
            ));
        }
    }
}

/// `0..caps.events` in batches small enough that no reading subscriber lags.
fn batches(caps: &Capabilities) -> impl Iterator<Item = std::ops::Range<usize>> {
    let size = caps
        .lag_buffer
        .map_or(caps.events, |b| (b / 2).max(1))
        .min(caps.events)
        .max(1);
    let total = caps.events;
    (0..total)
        .step_by(size)
        .map(move |start| start..(start + size).min(total))
}

fn describe(signal: &Signal) -> String {
    match signal {
        Signal::Event(e) => format!("event {:?}", e.table),
        Signal::Gap(r) => format!("gap ({r})"),
        Signal::Health(h) => format!("health {h:?}"),
        other => format!("{other:?}"),
    }
}

/// Contract 3: a new subscription's first signal is the source's health, and a
/// listening source says `Healthy` both there and from [`EventSource::health`].
pub async fn health_first(
    source: &dyn EventSource,
    driver: &dyn SourceDriver,
    caps: &Capabilities,
) {
    let c = Check {
        name: "health_first",
        caps,
    };
    let _warm = c.subscribe_healthy(source).await;
    if source.health() != Health::Healthy {
        c.fail("a subscriber saw Healthy but source.health() says Unhealthy");
    }
    let mut sub = source.subscribe();
    match c.recv(&mut sub, "the first signal (health)").await {
        Signal::Health(Health::Healthy) => {}
        other => c.fail(format_args!(
            "the first signal of a subscription to a healthy source must be Health(Healthy), got {}",
            describe(&other)
        )),
    }
    c.emit(driver, "health_first").await;
    c.expect_event(&mut sub, "health_first", "subscriber").await;
}

/// Contract 1 (order): events arrive in emission order, none lost, none doubled.
/// Emits in batches of half [`Capabilities::lag_buffer`] so the reader never lags.
pub async fn ordering(source: &dyn EventSource, driver: &dyn SourceDriver, caps: &Capabilities) {
    let c = Check {
        name: "ordering",
        caps,
    };
    let mut sub = c.subscribe_healthy(source).await;
    for batch in batches(caps) {
        for i in batch.clone() {
            c.emit(driver, &format!("t{i}")).await;
        }
        for i in batch {
            c.expect_event(&mut sub, &format!("t{i}"), "subscriber")
                .await;
        }
    }
    while let Ok(extra) = sub.try_recv() {
        if matches!(extra, Signal::Progress(_)) {
            continue;
        }
        c.fail(format_args!(
            "unexpected signal after the last event: {}",
            describe(&extra)
        ));
    }
}

/// Contract 1 (fan-out): every one of several subscribers sees every event, in order.
pub async fn fan_out(source: &dyn EventSource, driver: &dyn SourceDriver, caps: &Capabilities) {
    let c = Check {
        name: "fan_out",
        caps,
    };
    let mut subs = Vec::with_capacity(caps.subscribers);
    for _ in 0..caps.subscribers {
        subs.push(c.subscribe_healthy(source).await);
    }
    for batch in batches(caps) {
        for i in batch.clone() {
            c.emit(driver, &format!("f{i}")).await;
        }
        for (n, sub) in subs.iter_mut().enumerate() {
            let who = format!("subscriber {n} of {}", caps.subscribers);
            for i in batch.clone() {
                c.expect_event(sub, &format!("f{i}"), &who).await;
            }
        }
    }
}

/// A subscription sees the signals emitted after it was created, not those before.
pub async fn late_subscriber(
    source: &dyn EventSource,
    driver: &dyn SourceDriver,
    caps: &Capabilities,
) {
    let c = Check {
        name: "late_subscriber",
        caps,
    };
    let mut early = c.subscribe_healthy(source).await;
    c.emit(driver, "before").await;
    c.expect_event(&mut early, "before", "early subscriber")
        .await;
    let mut late = c.subscribe_healthy(source).await;
    c.emit(driver, "after").await;
    c.expect_event(&mut early, "after", "early subscriber")
        .await;
    c.expect_event(
        &mut late,
        "after",
        "late subscriber (must not see \"before\")",
    )
    .await;
}

/// Contract 2: a subscriber that does not read while more than
/// [`Capabilities::lag_buffer`] signals are emitted gets a [`GapReason::Lagged`]
/// gap, not silence; it received no more than the buffer holds (memory stays
/// bounded); the events it did get are in order and end with the last one; and
/// a subscriber that kept reading is unaffected; each Lagged gap is followed by
/// the source's health (contract 5). Skipped when `lag_buffer` is `None`.
pub async fn lag_gap(source: &dyn EventSource, driver: &dyn SourceDriver, caps: &Capabilities) {
    let c = Check {
        name: "lag_gap",
        caps,
    };
    let Some(buffer) = caps.lag_buffer else {
        tracing::info!("lag_gap skipped: no lag_buffer capability");
        return;
    };
    let total = buffer * 2 + 8;
    let mut slow = c.subscribe_healthy(source).await;
    let mut fast = c.subscribe_healthy(source).await;
    for i in 0..total {
        c.emit(driver, &format!("l{i}")).await;
        // Keep `fast` within its buffer: it must not lag.
        c.expect_event(&mut fast, &format!("l{i}"), "reading subscriber")
            .await;
    }
    // Everything has now been delivered to the source's buffers: drain `slow`.
    let mut missed_total = 0u64;
    let mut received: Vec<usize> = Vec::new();
    let last = total - 1;
    let mut health_due = false;
    while received.last() != Some(&last) {
        let signal = c.recv(&mut slow, "the lagging subscriber's signals").await;
        if health_due {
            // The contract: a Lagged gap is followed by the source's current health.
            match signal {
                Signal::Health(Health::Healthy) => {
                    health_due = false;
                    continue;
                }
                other => c.fail(format_args!(
                    "after a Lagged gap the source's current health (Healthy) must follow, got {}",
                    describe(&other)
                )),
            }
        }
        match signal {
            Signal::Gap(GapReason::Lagged { missed }) => {
                if missed == 0 {
                    c.fail("Lagged gap with missed = 0");
                }
                missed_total += missed;
                health_due = true;
            }
            Signal::Event(e) => {
                let Some(i) = e.table.strip_prefix('l').and_then(|n| n.parse().ok()) else {
                    c.fail(format_args!("unexpected event {:?}", e.table));
                };
                if received.last().is_some_and(|&prev| i <= prev) {
                    c.fail(format_args!(
                        "lagging subscriber got l{i} after l{}: out of order",
                        received.last().copied().unwrap_or_default()
                    ));
                }
                if missed_total == 0 {
                    c.fail(format_args!(
                        "lagging subscriber got l{i} before any Lagged gap: {total} events \
                         exceed the declared bound of {buffer}, so a gap must come first"
                    ));
                }
                received.push(i);
            }
            other => c.fail(format_args!(
                "expected a Lagged gap or an event, got {}",
                describe(&other)
            )),
        }
    }
    if missed_total == 0 {
        c.fail("a subscriber fell behind but never got a Lagged gap (silent loss)");
    }
    if received.len() > buffer {
        c.fail(format_args!(
            "lagging subscriber was handed {} buffered events, more than the declared bound \
             of {buffer}: memory is not bounded as declared",
            received.len()
        ));
    }
    if (received.len() as u64) + missed_total < total as u64 {
        c.fail(format_args!(
            "{} events received + {missed_total} reported missed < {total} emitted: \
             some loss was not reported",
            received.len()
        ));
    }
}

/// Contract 4: after an interruption the source says `Unhealthy`, then `Gap` (the
/// loss); when it listens again, another `Gap` immediately followed by `Healthy`
/// (at least two gaps in all); events emitted after that arrive. A
/// [lossless](Capabilities::lossless) source may recover without gaps, and must
/// then deliver the event emitted during the interruption. Runs [`Capabilities::interrupt_rounds`] rounds. Skipped when
/// interruption is not supported.
///
/// A [`lossless`](Capabilities::lossless) source owes no gap: it must say
/// `Unhealthy`, then `Healthy` with no `Gap` in between, and deliver exactly once
/// an event written while it was down.
pub async fn interrupt(source: &dyn EventSource, driver: &dyn SourceDriver, caps: &Capabilities) {
    let c = Check {
        name: "interrupt",
        caps,
    };
    if !caps.interrupt {
        tracing::info!("interrupt skipped: not supported by this backend");
        return;
    }
    let mut sub = c.subscribe_healthy(source).await;
    for round in 0..caps.interrupt_rounds {
        let before = format!("before{round}");
        c.emit(driver, &before).await;
        c.expect_event(&mut sub, &before, "subscriber").await;

        if let Err(e) = driver.interrupt().await {
            c.fail(format_args!(
                "driver.interrupt() failed in round {round}: {e}"
            ));
        }
        if caps.lossless {
            recover_losslessly(&c, source, driver, &mut sub, round).await;
            continue;
        }
        // Unhealthy first ...
        match c
            .recv(&mut sub, "Health(Unhealthy) after the interruption")
            .await
        {
            Signal::Health(Health::Unhealthy) => {}
            other => c.fail(format_args!(
                "round {round}: the first signal after an interruption must be \
                 Health(Unhealthy), got {}",
                describe(&other)
            )),
        }
        // ... then a gap, ..., then Gap immediately followed by Healthy.
        let mut gaps = 0usize;
        let mut previous_was_gap = false;
        loop {
            let signal = c
                .recv(&mut sub, "Gap + Health(Healthy) after recovery")
                .await;
            match signal {
                Signal::Gap(_) => {
                    gaps += 1;
                    previous_was_gap = true;
                }
                Signal::Health(Health::Healthy) => {
                    if gaps < 2 {
                        c.fail(format_args!(
                            "round {round}: expected Unhealthy, Gap (the loss), ..., Gap (listening \
                             again), Healthy; saw {gaps} Gap(s) between Unhealthy and Healthy"
                        ));
                    }
                    if !previous_was_gap {
                        c.fail(format_args!(
                            "round {round}: the signal just before Health(Healthy) must be a \
                             Gap (gap-before-healthy), it was not"
                        ));
                    }
                    break;
                }
                Signal::Health(Health::Unhealthy) => previous_was_gap = false,
                Signal::Event(e) => {
                    if gaps == 0 {
                        c.fail(format_args!(
                            "round {round}: event {:?} between Unhealthy and the first Gap",
                            e.table
                        ));
                    }
                    previous_was_gap = false;
                }
                other => c.fail(format_args!(
                    "round {round}: unexpected signal {}",
                    describe(&other)
                )),
            }
        }
        if source.health() != Health::Healthy {
            c.fail(format_args!(
                "round {round}: subscribers saw Healthy but source.health() says Unhealthy"
            ));
        }
        let after = format!("after{round}");
        c.emit(driver, &after).await;
        c.expect_event(&mut sub, &after, "subscriber after recovery")
            .await;
    }
}

/// The lossless half of the interrupt check: an event written right after the
/// interruption arrives exactly once; between `Unhealthy` and `Healthy` there is
/// no `Gap` (a lossless source must not make caches flush for nothing); then an
/// event written afterwards arrives too.
async fn recover_losslessly(
    c: &Check<'_>,
    source: &dyn EventSource,
    driver: &dyn SourceDriver,
    sub: &mut Subscription,
    round: usize,
) {
    let during = format!("during{round}");
    c.emit(driver, &during).await;
    let mut unhealthy = false;
    let mut delivered = false;
    loop {
        match c.recv(sub, "Health(Unhealthy), then Health(Healthy)").await {
            Signal::Health(Health::Unhealthy) => unhealthy = true,
            Signal::Health(Health::Healthy) if unhealthy => break,
            Signal::Gap(reason) => c.fail(format_args!(
                "round {round}: a lossless source emitted a gap ({reason}) while recovering; \
                 nothing was lost, so caches must keep their entries"
            )),
            Signal::Event(e) if e.table == during && !delivered => delivered = true,
            other => c.fail(format_args!(
                "round {round}: expected Unhealthy, then Healthy (and event {during:?} once), got {}",
                describe(&other)
            )),
        }
    }
    if source.health() != Health::Healthy {
        c.fail(format_args!(
            "round {round}: subscribers saw Healthy but source.health() says Unhealthy"
        ));
    }
    if !delivered {
        c.expect_event(
            sub,
            &during,
            "subscriber (an event written while the source was down)",
        )
        .await;
    }
    let after = format!("after{round}");
    c.emit(driver, &after).await;
    c.expect_event(sub, &after, "subscriber after recovery")
        .await;
}

/// Contract 5: when the source shuts down, existing subscriptions end (after any
/// signals still buffered), and subscriptions made afterwards end too.
pub async fn shutdown(source: &dyn EventSource, driver: &dyn SourceDriver, caps: &Capabilities) {
    let c = Check {
        name: "shutdown",
        caps,
    };
    let mut sub = c.subscribe_healthy(source).await;
    c.emit(driver, "last").await;
    c.expect_event(&mut sub, "last", "subscriber").await;
    if let Err(e) = driver.shutdown().await {
        c.fail(format_args!("driver.shutdown() failed: {e}"));
    }
    let end = async {
        let mut n = 0usize;
        while sub.recv().await.is_some() {
            n += 1;
        }
        n
    };
    let trailing = c
        .within("the subscription to end after shutdown", end)
        .await;
    tracing::debug!(trailing, "signals after shutdown before the end");
    let mut after = source.subscribe();
    let end = async { while after.recv().await.is_some() {} };
    c.within("a subscription made after shutdown to end", end)
        .await;
}
