//! The EventSource conformance suite against the in-memory source: directly,
//! through `Box<dyn EventSource>` and through `Arc<dyn EventSource>`.

use std::sync::Arc;

use pgcachewatch_backends::{InMemoryHandle, InMemorySource};
use pgcachewatch_core::{BoxError, Event, EventSource, Operation};
use pgcachewatch_testkit::conformance::{
    async_trait, run_all, Capabilities, SourceDriver, SourceHarness,
};

/// The per-subscriber buffer (a power of two: tokio's broadcast rounds up).
const BUFFER: usize = 16;

/// Drives the in-memory source: emit = publish, interrupt = disconnect + reconnect,
/// shutdown = close.
struct Driver(InMemoryHandle);

#[async_trait]
impl SourceDriver for Driver {
    async fn emit(&self, table: &str) -> Result<(), BoxError> {
        if self.0.publish(Event::new(
            "conformance",
            Operation::Insert,
            "public",
            table,
        )) {
            Ok(())
        } else {
            Err(format!("event {table:?} was not delivered (source disconnected or closed)").into())
        }
    }

    async fn interrupt(&self) -> Result<(), BoxError> {
        self.0.disconnect("conformance interrupt");
        self.0.reconnect();
        Ok(())
    }

    async fn shutdown(&self) -> Result<(), BoxError> {
        self.0.close();
        Ok(())
    }
}

/// Hands out fresh pairs, the source wrapped by `wrap`.
struct Harness<S>(fn(InMemorySource) -> S);

#[async_trait]
impl<S: EventSource> SourceHarness for Harness<S> {
    type Source = S;
    type Driver = Driver;

    async fn fresh(&self) -> Result<(S, Driver), BoxError> {
        let (source, handle) = InMemorySource::with_capacity(BUFFER);
        Ok(((self.0)(source), Driver(handle)))
    }
}

fn caps() -> Capabilities {
    Capabilities::new().lag_buffer(BUFFER)
}

#[tokio::test]
async fn in_memory_source_conforms() {
    run_all(&Harness(|s| s), &caps()).await;
}

#[tokio::test]
async fn in_memory_source_conforms_as_box_dyn() {
    run_all(&Harness(|s| Box::new(s) as Box<dyn EventSource>), &caps()).await;
}

#[tokio::test]
async fn in_memory_source_conforms_as_arc_dyn() {
    run_all(&Harness(|s| Arc::new(s) as Arc<dyn EventSource>), &caps()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_source_conforms_on_a_multi_thread_runtime() {
    run_all(&Harness(|s| s), &caps().events(500).subscribers(16)).await;
}
