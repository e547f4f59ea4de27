//! The relay at the edges of its stream: a NATS restart that loses a
//! memory-backed stream, a NATS restart while messages with positions are in
//! flight, two relays over different upstreams writing into one stream, and an
//! upstream that lost events. What every subscriber must see: every event, or
//! a `Gap` where something is gone. Real NATS (the shared server at `NATS_URL`,
//! or a nats-server of the test's own). No timing assertions.
#![cfg(feature = "nats")]

mod support;

use std::time::Duration;

use pgcachewatch_backends::memory::{InMemoryHandle, InMemorySource};
use pgcachewatch_backends::nats::{NatsConnect, NatsSource, Relay, RelayHandle, StreamSettings};
use pgcachewatch_core::{Event, GapReason, Health, Signal, Subscription};
use pgcachewatch_testkit::env::nats_url;
use support::{check_no_silent_loss, fresh_stream, until, OwnNats};

fn event(table: &str, lsn: Option<u64>) -> Event {
    support::event_at(table, lsn)
}

async fn relay(url: &str, stream: &StreamSettings, upstream: &InMemorySource) -> RelayHandle {
    Relay::builder(NatsConnect::new(url))
        .stream(stream.clone())
        .heartbeat_interval(Duration::from_millis(100))
        .start(upstream)
        .await
        .expect("relay")
}

async fn healthy_source(url: &str, stream: &StreamSettings) -> (NatsSource, Subscription) {
    support::healthy_source(url, stream, Duration::from_secs(2)).await
}

fn publish_range(handle: &InMemoryHandle, range: std::ops::Range<usize>, lsn: bool) {
    for i in range {
        handle.publish(event(&format!("e{i}"), lsn.then_some(1000 + i as u64 * 10)));
    }
}

/// A NATS server restarted with the relay's stream in memory: the stream and
/// everything in it are gone. The relay must create it again and start a new
/// epoch (its gap marker first), and subscribers must get the events written
/// after the restart, with a gap for whatever was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_stream_lost_in_a_nats_restart_is_created_anew_by_the_relay() {
    let mut server = OwnNats::start(&[]).await;
    let stream = fresh_stream();
    let (upstream, handle) = InMemorySource::with_capacity(1 << 12);
    let relay = relay(&server.url(), &stream, &upstream).await;
    let (source, mut sub) = healthy_source(&server.url(), &stream).await;
    publish_range(&handle, 0..10, false);
    let mut seen = until(&mut sub, "e9", |s| {
        s.as_event().is_some_and(|e| e.table == "e9")
    })
    .await;

    server.restart().await;
    // The relay notices when its next heartbeat finds no stream.
    let recreated = async {
        while relay.status().epochs < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), recreated)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the relay never created its stream again: {:?}",
                relay.status()
            )
        });
    publish_range(&handle, 10..20, false);
    seen.extend(
        until(&mut sub, "e19, written after the restart", |s| {
            s.as_event().is_some_and(|e| e.table == "e19")
        })
        .await,
    );
    let before = seen
        .iter()
        .position(|s| s.as_event().is_some_and(|e| e.table == "e9"))
        .expect("e9");
    assert!(
        seen[before..].iter().any(Signal::is_gap),
        "the stream's contents were lost without a gap: {seen:?}"
    );
    check_no_silent_loss(&seen, 20);
    assert!(relay.status().epochs >= 2, "{:?}", relay.status());
    until(&mut sub, "healthy again", |s| {
        matches!(s, Signal::Health(Health::Healthy))
    })
    .await;
    source.shutdown().await;
    relay.shutdown().await;
}

/// Events with commit positions, and the NATS server restarted (file storage:
/// the stream survives) while they are published: acknowledgements fail, the
/// relay publishes again, and JetStream may store a message after later ones.
/// Every event must reach the subscriber, or a gap must cover it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_while_positions_are_in_flight_loses_nothing_silently() {
    let mut server = OwnNats::start(&[]).await;
    let stream = fresh_stream().memory(false);
    let (upstream, handle) = InMemorySource::with_capacity(1 << 16);
    let relay = relay(&server.url(), &stream, &upstream).await;
    let (source, mut sub) = healthy_source(&server.url(), &stream).await;
    let total = 600;
    for i in 0..total {
        publish_range(&handle, i..i + 1, true);
        if i % 150 == 75 {
            server.restart().await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Once JetStream acknowledged every event, a last one is stored after all
    // of them, late ones included: the subscriber has read everything when it
    // reads that one.
    let acked = async {
        while relay.status().events < total as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), acked)
        .await
        .unwrap_or_else(|_| panic!("the relay never stored every event: {:?}", relay.status()));
    handle.publish(event("end", None));
    let seen = until(&mut sub, "the end", |s| {
        s.as_event().is_some_and(|e| e.table == "end")
    })
    .await;
    let (received, gaps) = check_no_silent_loss(&seen, total);
    eprintln!(
        "{received}/{total} events, {gaps} gaps, relay retries {}",
        relay.status().retries
    );
    source.shutdown().await;
    relay.shutdown().await;
}

/// Two relays over different upstreams write into one stream, and their
/// events carry the same commit position (two databases, or two slots of one).
/// Neither may drop the other's message as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_over_different_upstreams_never_deduplicate_each_other() {
    let stream = fresh_stream();
    let (up_a, handle_a) = InMemorySource::pair();
    let (up_b, handle_b) = InMemorySource::pair();
    let relay_a = relay(&nats_url(), &stream, &up_a).await;
    let relay_b = relay(&nats_url(), &stream, &up_b).await;
    let (source, mut sub) = healthy_source(&nats_url(), &stream).await;
    handle_a.publish(event("from_a", Some(500)));
    until(&mut sub, "from_a", |s| {
        s.as_event().is_some_and(|e| e.table == "from_a")
    })
    .await;
    handle_b.publish(event("from_b", Some(500)));
    until(
        &mut sub,
        "from_b, at the same position from another upstream",
        |s| s.as_event().is_some_and(|e| e.table == "from_b"),
    )
    .await;
    source.shutdown().await;
    relay_a.shutdown().await;
    relay_b.shutdown().await;
    support::delete_stream(&nats_url(), &stream).await;
}

/// The relay's upstream lost events (a LISTEN reconnect; a replication slot
/// advanced or recreated under its source: `SlotLost`): the relay starts a
/// new epoch and every subscriber gets a gap before what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_gap_is_a_new_epoch_and_a_gap_for_every_subscriber() {
    let stream = fresh_stream();
    let (upstream, handle) = InMemorySource::pair();
    let relay = relay(&nats_url(), &stream, &upstream).await;
    let (source, mut sub) = healthy_source(&nats_url(), &stream).await;
    let epoch = relay.status().epoch;
    handle.publish(event("before", Some(100)));
    handle.gap(GapReason::SlotLost {
        detail: "slot advanced under the source".into(),
    });
    handle.publish(event("after", Some(300)));
    let seen = until(&mut sub, "after", |s| {
        s.as_event().is_some_and(|e| e.table == "after")
    })
    .await;
    let before = seen
        .iter()
        .position(|s| s.as_event().is_some_and(|e| e.table == "before"))
        .expect("before");
    assert!(
        seen[before..].iter().any(Signal::is_gap),
        "the upstream's gap did not reach the subscriber: {seen:?}"
    );
    assert_ne!(relay.status().epoch, epoch, "a new epoch");
    source.shutdown().await;
    relay.shutdown().await;
    support::delete_stream(&nats_url(), &stream).await;
}

/// Comma-separated server URLs (`nats://a:4222,nats://b:4222`, as a cluster's
/// clients are given) are accepted by the relay and by `NatsSource`: here one
/// server that is down and the running one, in either order, and whitespace
/// around the entries. Before, the whole list was parsed as one URL and
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comma_separated_server_urls_are_accepted() {
    let down = {
        // A port nothing listens on (bound, then released).
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("addr").port()
    };
    let stream = fresh_stream();
    let (upstream, handle) = InMemorySource::pair();
    let relay = relay(
        &format!("nats://127.0.0.1:{down}, {}", nats_url()),
        &stream,
        &upstream,
    )
    .await;
    let (source, mut sub) =
        healthy_source(&format!("{},nats://127.0.0.1:{down}", nats_url()), &stream).await;
    publish_range(&handle, 0..3, false);
    let seen = until(&mut sub, "the last event", |s| {
        s.as_event().is_some_and(|e| e.table == "e2")
    })
    .await;
    let (received, gaps) = check_no_silent_loss(&seen, 3);
    assert_eq!((received, gaps), (3, 0));
    // Entries that are not URLs are refused, naming the entry.
    let err = NatsConnect::new(format!("{}, ::bad::", nats_url()))
        .connect()
        .await
        .expect_err("a malformed entry");
    assert!(err.to_string().contains("::bad::"), "{err}");
    source.shutdown().await;
    relay.shutdown().await;
    support::delete_stream(&nats_url(), &stream).await;
}

/// A relay stopped while NATS is down stops. With NATS gone the client's
/// command queue (2,048 by default) fills and every publish waits out its
/// timeout; a relay publishing its in-flight window again would wait out
/// thousands of them before it looked at its stop signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stopped_while_nats_is_down_stops() {
    let mut server = OwnNats::start(&[]).await;
    let stream = fresh_stream();
    let (upstream, handle) = InMemorySource::with_capacity(1 << 14);
    let relay = Relay::builder(NatsConnect::new(server.url()))
        .stream(stream.clone())
        .heartbeat_interval(Duration::from_millis(100))
        .ack_timeout(Duration::from_millis(500))
        .max_in_flight(4096)
        .start(&upstream)
        .await
        .expect("relay");
    server.kill();
    publish_range(&handle, 0..4096, false);
    // The window fills, its acknowledgements time out, and the relay
    // publishes it again into the full queue.
    let retrying = async {
        while relay.status().retries < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), retrying)
        .await
        .unwrap_or_else(|_| panic!("the relay never retried: {:?}", relay.status()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let in_flight = relay.status().in_flight;
    // A hang, not a duration, is what this catches: the bound is generous.
    tokio::time::timeout(Duration::from_secs(30), relay.shutdown())
        .await
        .unwrap_or_else(|_| panic!("the relay did not stop ({in_flight} messages in flight)"));
}
