//! What a `NatsSource` makes of a stream that does not look like one relay
//! publishing in order: a message stored after later ones, and a stream
//! deleted and created anew under it. The messages are written by hand
//! (`RawRelay`), in the order a republishing or restarted relay, or a NATS
//! restart, can leave them. Real NATS (`NATS_URL`). No timing assertions.
#![cfg(feature = "nats")]

mod support;

use std::time::Duration;

use async_nats::jetstream;
use pgcachewatch_backends::nats::wire::WireKind;
use pgcachewatch_backends::nats::{NatsConnect, NatsSource, StreamSettings};
use pgcachewatch_core::{EventSource, GapReason, Health, Signal, Subscription};
use pgcachewatch_testkit::env::nats_url;
use support::{fresh_stream, until, RawRelay};

/// A relay's stream with its first epoch begun (gap marker, heartbeat), and a
/// source reading it, healthy.
async fn healthy_source(stream: &StreamSettings) -> (RawRelay, NatsSource, Subscription) {
    let mut relay = RawRelay::new(&nats_url(), stream, "e1").await;
    relay
        .send(WireKind::Gap(GapReason::Injected {
            detail: "relay started".into(),
        }))
        .await;
    let source = NatsSource::builder(NatsConnect::new(nats_url()))
        .stream(stream.clone())
        .heartbeat_timeout(Duration::from_secs(120))
        .connect()
        .await
        .expect("source");
    let mut sub = source.subscribe();
    relay.beat().await;
    until(&mut sub, "healthy", |s| {
        matches!(s, Signal::Health(Health::Healthy))
    })
    .await;
    (relay, source, sub)
}

fn is_event(s: &Signal, table: &str) -> bool {
    s.as_event().is_some_and(|e| e.table == table)
}

/// A relay republishes the commit at 200 after JetStream stored the one at
/// 300 (its first acknowledgement failed), or a restarted relay replays 200
/// whose first copy was never stored: the stream holds 100, 300, 200. The
/// event at 200 was never delivered before; dropping it as a "duplicate" loses
/// it and leaves its rows stale. It must be delivered (or a gap emitted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stored_after_later_ones_is_delivered_not_dropped() {
    let stream = fresh_stream();
    let (mut relay, source, mut sub) = healthy_source(&stream).await;
    relay.event("t100", 100).await;
    relay.event("t300", 300).await;
    relay.event("t200", 200).await;
    relay.event("t400", 400).await;
    let seen = until(&mut sub, "t400", |s| is_event(s, "t400")).await;
    let t300 = seen.iter().position(|s| is_event(s, "t300")).expect("t300");
    assert!(
        seen.iter().any(|s| is_event(s, "t200")) || seen[t300..].iter().any(Signal::is_gap),
        "the late event at 200 was dropped without a gap: {seen:?}"
    );
    source.shutdown().await;
    support::delete_stream(&nats_url(), &stream).await;
}

/// The stream is deleted and created anew under a reading source (a
/// memory-backed stream after a NATS restart, an operator, a relay recreating
/// it): the new one numbers from 1 again. What the old stream held is gone, so
/// a gap; and what the new one holds must be read, not skipped as "already
/// seen" sequence numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_created_anew_under_a_source_is_a_gap_and_is_read_from_its_start() {
    let stream = fresh_stream();
    let (mut relay, source, mut sub) = healthy_source(&stream).await;
    for i in 0..20u64 {
        relay.event(&format!("a{i}"), 100 + i).await;
    }
    until(&mut sub, "a19", |s| is_event(s, "a19")).await;

    let js = jetstream::new(NatsConnect::new(nats_url()).connect().await.expect("NATS"));
    js.delete_stream(stream.name()).await.expect("delete");
    // The same relay epoch goes on in the new stream, without a gap marker:
    // only the source can tell that the old stream's contents are gone.
    let mut relay = RawRelay::new(&nats_url(), &stream, "e1").await;
    relay.n = 22;
    relay.beat().await;
    relay.event("b0", 200).await;
    relay.event("b1", 201).await;

    let seen = until(&mut sub, "b1", |s| is_event(s, "b1")).await;
    let first_b = seen
        .iter()
        .position(|s| is_event(s, "b0"))
        .expect("b0, the new stream's first event, was skipped");
    assert!(
        seen[..first_b].iter().any(Signal::is_gap),
        "the stream was created anew (its contents gone) without a gap: {seen:?}"
    );
    source.shutdown().await;
    support::delete_stream(&nats_url(), &stream).await;
}

/// The relay republished the commit at 200 after JetStream stored the one at
/// 300 (or a restarted relay replayed it): the stream holds 300, later 200,
/// then the relay's progress record of 300, stored only once every event up
/// to 300 was. A read-your-writes wait for 200 must not end when 300's event
/// is applied: the reader that waited would read the row 200 changed through
/// its cache, stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_a_position_ends_only_once_every_event_up_to_it_was_applied() {
    use std::sync::Arc;

    use pgcachewatch_core::{Cache, Dispatcher, Event, Lsn};
    use pgcachewatch_strategies::Greedy;
    use pgcachewatch_testkit::env::eventually_within;

    let stream = fresh_stream();
    let (mut relay, source, _sub) = healthy_source(&stream).await;
    let t200: Cache<&'static str, i64> = Cache::new(10);
    let t300: Cache<&'static str, i64> = Cache::new(10);
    let dispatcher = Arc::new(
        Dispatcher::new()
            .attach(
                Greedy::with_predicate(|e: &Event| e.table == "t200"),
                t200.clone(),
            )
            .attach(
                Greedy::with_predicate(|e: &Event| e.table == "t300"),
                t300.clone(),
            )
            .spawn(&source),
    );
    // The rows as they were before the writes at 200 and 300.
    t200.insert("row", 1);
    t300.insert("row", 1);
    relay.event("t300", 300).await;
    eventually_within(
        Duration::from_secs(30),
        "the event at 300 is applied",
        || !t300.contains_key(&"row"),
    )
    .await;

    // The writer of 200 waits for its write, then reads through the cache.
    let reader = tokio::spawn({
        let (dispatcher, t200) = (dispatcher.clone(), t200.clone());
        async move {
            dispatcher
                .wait_for_lsn(Lsn(200), Duration::from_secs(60))
                .await
                .expect("the wait for 200 ends");
            t200.get(&"row")
        }
    });
    // The late event lands a while later, then the relay's record.
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.event("t200", 200).await;
    relay.progress(300).await;
    let read = reader.await.expect("reader");
    assert_eq!(
        read, None,
        "the wait for 200 ended before the event at 200 was applied: the reader read the old row"
    );
    assert!(!t200.contains_key(&"row"), "the event at 200 was applied");
    source.shutdown().await;
    support::delete_stream(&nats_url(), &stream).await;
}
