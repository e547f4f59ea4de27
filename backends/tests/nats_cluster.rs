//! The relay and `NatsSource` on a three-node NATS cluster of the test's own
//! (routes between three `nats-server`s on 127.0.0.1), the stream replicated
//! three times (`StreamSettings::replicas`), the deployment users run in
//! production:
//!
//! * the stream's leader killed under writes: "no responders" while a new
//!   leader is elected is not "stream missing"; the relay publishes again at
//!   once (it used to look the stream up, wait on lookups nobody could answer
//!   and stall 10–15 s), keeps its epoch, and nothing is lost;
//! * the node holding a `NatsSource`'s consumer killed while the source's own
//!   connection (to another node) stays up: the source makes a new consumer
//!   and goes on (it used to wait on the dead one).
//!
//! What must hold is asserted (every event, no `Gap`, one epoch); how long
//! each took is printed, never asserted. Needs `nats-server`.
#![cfg(feature = "nats")]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcachewatch_backends::memory::InMemorySource;
use pgcachewatch_backends::nats::{NatsConnect, NatsSource, Relay, StreamSettings};
use pgcachewatch_core::{Event, Signal, Subscription};
use pgcachewatch_testkit::env::unique_name;
use support::{check_no_silent_loss, OwnCluster};

fn replicated_stream() -> StreamSettings {
    let name = unique_name("pgcwc");
    StreamSettings::new()
        .stream(name.to_uppercase())
        .subject_prefix(name)
        .replicas(3)
}

fn event(i: usize) -> Event {
    support::event_at(&format!("e{i}"), Some(1_000 + i as u64 * 10))
}

async fn healthy_source(urls: &str, stream: &StreamSettings) -> (NatsSource, Subscription) {
    support::healthy_source(urls, stream, Duration::from_secs(5)).await
}

/// Reads until event `e{last}` arrived (up to 60 s), returning what came.
async fn until_event(sub: &mut Subscription, last: usize) -> Vec<Signal> {
    let name = format!("e{last}");
    let mut seen = Vec::new();
    let wait = async {
        while let Some(s) = sub.recv().await {
            let done = s.as_event().is_some_and(|e| e.table == name);
            seen.push(s);
            if done {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(60), wait).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_leader_killed_under_writes_loses_nothing_and_keeps_the_epoch() {
    let mut cluster = OwnCluster::start().await;
    let urls = cluster.urls();
    let stream = replicated_stream();
    let (upstream, handle) = InMemorySource::pair();
    let relay = Relay::builder(NatsConnect::new(&urls))
        .stream(stream.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .start(&upstream)
        .await
        .expect("relay");
    // Item 7: the stream is replicated as asked.
    {
        let client = NatsConnect::new(&urls).connect().await.expect("NATS");
        let js = async_nats::jetstream::new(client);
        let mut s = js.get_stream(stream.name()).await.expect("stream");
        assert_eq!(s.info().await.expect("info").config.num_replicas, 3);
        // A relay started without a replica count (the CLI's default) keeps
        // the existing stream's: it never reduces it to one copy.
        let unsaid = StreamSettings::new()
            .stream(stream.name())
            .subject_prefix(stream.prefix());
        unsaid.ensure(&js).await.expect("ensure");
        assert_eq!(s.info().await.expect("info").config.num_replicas, 3);
    }
    let (source, mut sub) = healthy_source(&urls, &stream).await;
    let epoch = relay.status().epoch;

    // A steady writer until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (stop, written) = (stop.clone(), written.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                handle.publish(event(i));
                i += 1;
                written.store(i, Ordering::Release);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            handle
        })
    };
    while relay.status().events < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let leader = cluster.stream_leader(stream.name()).await;
    let acked_before = relay.status().acked;
    let killed_at = Instant::now();
    cluster.nodes[leader].kill();
    // When the stream has a new leader (JetStream's own election: the relay
    // cannot publish before it), watched from the side.
    let elected = {
        let (urls, name, killed) = (
            urls.clone(),
            stream.name().to_owned(),
            cluster.names[leader].clone(),
        );
        tokio::spawn(async move {
            let client = NatsConnect::new(&urls).connect().await.expect("NATS");
            let js = async_nats::jetstream::ContextBuilder::new()
                .timeout(Duration::from_millis(500))
                .build(client);
            loop {
                if let Ok(mut s) = js.get_stream(&name).await {
                    if let Ok(info) = s.info().await {
                        if info
                            .cluster
                            .as_ref()
                            .and_then(|c| c.leader.as_ref())
                            .is_some_and(|l| *l != killed)
                        {
                            return killed_at.elapsed();
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // The stall: from the kill to the relay's next acknowledgement.
    while relay.status().acked <= acked_before + 1 && killed_at.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stall = killed_at.elapsed();
    let elected = elected.await.expect("election watch");
    let new_leader = cluster.stream_leader(stream.name()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.nodes[leader].restart().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Release);
    let _handle = writer.await.expect("writer");
    let total = written.load(Ordering::Acquire);

    let seen = until_event(&mut sub, total - 1).await;
    let (received, gaps) = check_no_silent_loss(&seen, total);
    let status = relay.status();
    println!(
        "stream leader {} killed (new leader {}): the relay's first \
         acknowledgement after the kill came after {stall:?} (the side watch, asking the \
         stream's info, saw the new leader after {elected:?}); {} retries; {received} of \
         {total} events received, {gaps} gaps, {} epochs",
        cluster.names[leader], cluster.names[new_leader], status.retries, status.epochs
    );
    assert_eq!(gaps, 0, "a gap although the stream lost nothing");
    assert_eq!(received, total, "events lost");
    assert_eq!(
        status.epochs, 1,
        "a new epoch although the stream lost nothing"
    );
    assert_eq!(status.epoch, epoch);

    source.shutdown().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_whose_consumer_node_dies_makes_a_new_consumer() {
    let mut cluster = OwnCluster::start().await;
    let urls = cluster.urls();
    let stream = replicated_stream();
    let (upstream, handle) = InMemorySource::pair();
    let relay = Relay::builder(NatsConnect::new(&urls))
        .stream(stream.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .start(&upstream)
        .await
        .expect("relay");
    // A source connected to one node only, whose consumer sits on another.
    let mut placed = None;
    for attempt in 0..12 {
        let at = attempt % 3;
        let (source, sub) = healthy_source(&cluster.nodes[at].url(), &stream).await;
        if let Some(holder) = consumer_node(&cluster, &stream, &source).await {
            if holder != at {
                placed = Some((source, sub, at, holder));
                break;
            }
        }
        source.shutdown().await;
    }
    let (source, mut sub, at, holder) = placed.expect("a consumer placed on another node");
    handle.publish(event(0));
    let mut seen = until_event(&mut sub, 0).await;
    let consumers_before = source.stats().consumers;

    let killed_at = Instant::now();
    cluster.nodes[holder].kill();
    for i in 1..=20 {
        handle.publish(event(i));
    }
    seen.extend(until_event(&mut sub, 20).await);
    let recovered = killed_at.elapsed();
    let (received, gaps) = check_no_silent_loss(&seen, 21);
    let stats = source.stats();
    println!(
        "the node holding the consumer ({}) killed, the source connected to {}: the events \
         written after it arrived {recovered:?} later through consumer {} (was {consumers_before}); \
         {} of 20 received, {gaps} gaps",
        cluster.names[holder],
        cluster.names[at],
        stats.consumers,
        received.saturating_sub(1)
    );
    assert_eq!(
        received, 21,
        "events after the consumer's node died never arrived"
    );
    assert!(stats.consumers > consumers_before, "no new consumer");
    cluster.nodes[holder].restart().await;
    source.shutdown().await;
    relay.shutdown().await;
}

/// The node holding `source`'s consumer.
async fn consumer_node(
    cluster: &OwnCluster,
    stream: &StreamSettings,
    source: &NatsSource,
) -> Option<usize> {
    let name = source.stats().consumer?;
    let client = NatsConnect::new(cluster.urls()).connect().await.ok()?;
    let js = async_nats::jetstream::new(client);
    let s = js.get_stream(stream.name()).await.ok()?;
    let info = s.consumer_info(&name).await.ok()?;
    let leader = info.cluster.clone()?.leader?;
    Some(cluster.index(&leader))
}
