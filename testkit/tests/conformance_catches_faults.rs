//! The conformance suite must fail sources that break the contract, naming the check.

use std::panic::AssertUnwindSafe;

use futures::{FutureExt, StreamExt};
use pgcachewatch_core::{
    BoxError, Event, EventSource, GapReason, Health, Operation, SignalHub, Subscription,
};
use pgcachewatch_testkit::conformance::{self, async_trait, Capabilities, SourceDriver};

/// The ways the test source misbehaves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Reports Healthy again after an interruption without a gap.
    NoGapBeforeHealthy,
    /// A subscription's first signal is not its health.
    NoHealthFirst,
    /// Delivers each event twice.
    Duplicates,
    /// Subscriptions never end.
    NeverEnds,
}

#[derive(Debug)]
struct Broken {
    hub: SignalHub,
    fault: Fault,
}

impl EventSource for Broken {
    fn subscribe(&self) -> Subscription {
        let mut sub = self.hub.subscribe();
        match self.fault {
            Fault::NoHealthFirst => {
                let _ = sub.try_recv(); // swallow the health signal
                sub
            }
            Fault::NeverEnds => {
                Subscription::from_stream(sub.into_stream().chain(futures::stream::pending()))
            }
            _ => sub,
        }
    }
    fn health(&self) -> Health {
        self.hub.health()
    }
}

struct Driver<'a>(&'a Broken);

#[async_trait]
impl SourceDriver for Driver<'_> {
    async fn emit(&self, table: &str) -> Result<(), BoxError> {
        let event = Event::new("ch", Operation::Insert, "public", table);
        if self.0.fault == Fault::Duplicates {
            self.0.hub.publish(event.clone());
        }
        self.0.hub.publish(event);
        Ok(())
    }
    async fn interrupt(&self) -> Result<(), BoxError> {
        let hub = &self.0.hub;
        hub.set_health(Health::Unhealthy);
        hub.gap(GapReason::ConnectionLost {
            detail: "test".into(),
        });
        if self.0.fault != Fault::NoGapBeforeHealthy {
            hub.gap(GapReason::Reconnected);
        }
        hub.set_health(Health::Healthy);
        Ok(())
    }
    async fn shutdown(&self) -> Result<(), BoxError> {
        // A hub cannot be closed from outside; dropping our reference is not enough
        // while `Broken` holds it, which is the point of the NeverEnds fault.
        Ok(())
    }
}

/// Runs `check` against a source with `fault` and returns its panic message.
async fn failure_of<F, Fut>(fault: Fault, check: F) -> String
where
    F: FnOnce(&'static Broken, &'static Driver<'static>, &'static Capabilities) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let source: &'static Broken = Box::leak(Box::new(Broken {
        hub: SignalHub::new(16),
        fault,
    }));
    let driver: &'static Driver<'static> = Box::leak(Box::new(Driver(source)));
    let caps: &'static Capabilities = Box::leak(Box::new(
        Capabilities::new().delivery_timeout(std::time::Duration::from_millis(200)),
    ));
    let outcome = AssertUnwindSafe(check(source, driver, caps))
        .catch_unwind()
        .await;
    let Err(panic) = outcome else {
        panic!("the suite accepted a source with fault {fault:?}");
    };
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[tokio::test]
async fn missing_gap_before_healthy_fails_interrupt() {
    let msg = failure_of(Fault::NoGapBeforeHealthy, |s, d, c| async move {
        conformance::interrupt(s, d, c).await
    })
    .await;
    assert!(msg.contains("'interrupt'") && msg.contains("Gap"), "{msg}");
}

#[tokio::test]
async fn missing_health_first_fails_health_first() {
    let msg = failure_of(Fault::NoHealthFirst, |s, d, c| async move {
        conformance::health_first(s, d, c).await
    })
    .await;
    assert!(msg.contains("'health_first'"), "{msg}");
}

#[tokio::test]
async fn duplicates_fail_ordering() {
    let msg = failure_of(Fault::Duplicates, |s, d, c| async move {
        conformance::ordering(s, d, c).await
    })
    .await;
    assert!(msg.contains("'ordering'"), "{msg}");
}

#[tokio::test]
async fn endless_subscriptions_fail_shutdown() {
    let msg = failure_of(Fault::NeverEnds, |s, d, c| async move {
        conformance::shutdown(s, d, c).await
    })
    .await;
    assert!(
        msg.contains("'shutdown'") && msg.contains("timed out"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_conforming_hub_source_passes_the_checks_it_can() {
    let source = Broken {
        hub: SignalHub::new(16),
        fault: Fault::NeverEnds,
    };
    let driver = Driver(&source);
    let caps = Capabilities::new().lag_buffer(16);
    conformance::health_first(&source, &driver, &caps).await;
    conformance::ordering(&source, &driver, &caps).await;
    conformance::fan_out(&source, &driver, &caps).await;
    conformance::late_subscriber(&source, &driver, &caps).await;
    conformance::lag_gap(&source, &driver, &caps).await;
    conformance::interrupt(&source, &driver, &caps).await;
}
