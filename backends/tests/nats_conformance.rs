//! The `EventSource` conformance suite against [`NatsSource`], fed by a
//! [`Relay`] over the in-memory source, through real NATS (`NATS_URL`, default
//! `nats://127.0.0.1:4222`). The source reaches NATS through a fault proxy, so
//! "interrupt" cuts its connection: it resumes from its stream sequence and
//! loses nothing (the suite runs with the `lossless` capability).
#![cfg(feature = "nats")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use pgcachewatch_backends::memory::{InMemoryHandle, InMemorySource};
use pgcachewatch_backends::nats::{NatsConnect, NatsSource, Relay, RelayHandle, StreamSettings};
use pgcachewatch_core::{BoxError, Event, EventSource, Operation};
use pgcachewatch_testkit::conformance::{
    async_trait, run_all, Capabilities, SourceDriver, SourceHarness,
};
use pgcachewatch_testkit::env::nats_url;
use pgcachewatch_testkit::proxy::FaultProxy;
use tokio::sync::Mutex;

const BUFFER: usize = 16;

struct Driver {
    upstream: InMemoryHandle,
    source: NatsSource,
    proxy: FaultProxy,
    relay: Mutex<Option<RelayHandle>>,
    stream: StreamSettings,
}

#[async_trait]
impl SourceDriver for Driver {
    async fn emit(&self, table: &str) -> Result<(), BoxError> {
        self.upstream
            .publish(Event::new("ch", Operation::Insert, "public", table));
        Ok(())
    }

    async fn interrupt(&self) -> Result<(), BoxError> {
        self.proxy.cut();
        Ok(())
    }

    async fn shutdown(&self) -> Result<(), BoxError> {
        self.source.shutdown().await;
        if let Some(relay) = self.relay.lock().await.take() {
            relay.shutdown().await;
        }
        support::delete_stream(&nats_url(), &self.stream).await;
        Ok(())
    }
}

struct Harness<S> {
    wrap: fn(NatsSource) -> S,
}

#[async_trait]
impl<S: EventSource> SourceHarness for Harness<S> {
    type Source = S;
    type Driver = Driver;

    async fn fresh(&self) -> Result<(S, Driver), BoxError> {
        let stream = support::fresh_stream();
        let (upstream_source, upstream) = InMemorySource::with_capacity(1024);
        let relay = Relay::builder(NatsConnect::new(nats_url()))
            .stream(stream.clone())
            .heartbeat_interval(Duration::from_millis(100))
            .start(&upstream_source)
            .await?;
        let nats: std::net::SocketAddr = nats_url().trim_start_matches("nats://").parse()?;
        let proxy = FaultProxy::start(nats).await?;
        let source = NatsSource::builder(NatsConnect::new(format!("nats://{}", proxy.addr())))
            .stream(stream.clone())
            .heartbeat_timeout(Duration::from_secs(3))
            .buffer(BUFFER)
            .connect()
            .await?;
        let driver = Driver {
            upstream,
            source: source.clone(),
            proxy,
            relay: Mutex::new(Some(relay)),
            stream,
        };
        Ok(((self.wrap)(source), driver))
    }
}

fn caps() -> Capabilities {
    Capabilities::new()
        .lag_buffer(BUFFER)
        .interrupt_rounds(3)
        .lossless()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_source_conforms() {
    run_all(&Harness { wrap: |s| s }, &caps()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_source_conforms_boxed() {
    let boxed = |s: NatsSource| -> Box<dyn EventSource> { Box::new(s) };
    run_all(&Harness { wrap: boxed }, &caps()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_source_conforms_arced() {
    let arced = |s: NatsSource| -> Arc<dyn EventSource> { Arc::new(s) };
    run_all(&Harness { wrap: arced }, &caps()).await;
}
