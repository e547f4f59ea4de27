//! What `NatsSource` subscribers see when things break: a NATS server
//! restarted under load, a subscriber away while the stream keeps (or
//! discards) what it missed, and NATS credentials. Real NATS: the shared server
//! (`NATS_URL`) or a nats-server of the test's own. No timing assertions.
#![cfg(feature = "nats")]

mod support;

use std::time::Duration;

use pgcachewatch_backends::memory::InMemorySource;
use pgcachewatch_backends::nats::{NatsAuth, NatsConnect, NatsError, NatsSource, Relay};
use pgcachewatch_core::{Event, EventSource, GapReason, Health, Operation, Signal};
use pgcachewatch_testkit::env::nats_url;
use pgcachewatch_testkit::proxy::FaultProxy;
use support::{check_no_silent_loss, event_index, fresh_stream, until, OwnNats};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restarted_under_load_loses_nothing_silently() {
    let mut server = OwnNats::start(&[]).await;
    let stream = fresh_stream().memory(false);
    let (upstream, handle) = InMemorySource::with_capacity(1 << 16);
    let relay = Relay::builder(NatsConnect::new(server.url()))
        .stream(stream.clone())
        .heartbeat_interval(Duration::from_millis(100))
        .start(&upstream)
        .await
        .expect("relay");
    let mut subs = Vec::new();
    let mut sources = Vec::new();
    for _ in 0..3 {
        let (source, sub) =
            support::healthy_source(&server.url(), &stream, Duration::from_secs(2)).await;
        subs.push(sub);
        sources.push(source);
    }
    let total = 600;
    for i in 0..total {
        handle.publish(Event::new(
            "ch",
            Operation::Insert,
            "public",
            format!("e{i}"),
        ));
        if i == total / 3 {
            server.restart().await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for (n, sub) in subs.iter_mut().enumerate() {
        let last = format!("e{}", total - 1);
        let seen = until(sub, "the last event", |s| {
            s.as_event().is_some_and(|e| e.table == last)
        })
        .await;
        assert!(
            seen.iter()
                .any(|s| matches!(s, Signal::Health(Health::Unhealthy))),
            "subscriber {n} never went unhealthy while NATS was down"
        );
        let (received, gaps) = check_no_silent_loss(&seen, total);
        eprintln!("subscriber {n}: {received}/{total} events, {gaps} gaps");
        let healthy = until(sub, "healthy again", |s| {
            matches!(s, Signal::Health(Health::Healthy))
        });
        if !sources[n].health().is_healthy() {
            healthy.await;
        }
    }
    relay.shutdown().await;
}

/// Pauses the subscriber's connection, publishes `n` events, then cuts it: the
/// subscriber was away while they were written and resumes from its sequence.
async fn away_while_written(max_messages: i64, n: usize) -> Vec<Signal> {
    let stream = fresh_stream().max_messages(max_messages);
    let (upstream, handle) = InMemorySource::pair();
    let relay = Relay::builder(NatsConnect::new(nats_url()))
        .stream(stream.clone())
        .heartbeat_interval(Duration::from_millis(100))
        .start(&upstream)
        .await
        .expect("relay");
    let nats = support::nats_addr();
    let proxy = FaultProxy::start(nats).await.expect("proxy");
    let (source, mut sub) = support::healthy_source(
        &format!("nats://{}", proxy.addr()),
        &stream,
        Duration::from_secs(30),
    )
    .await;
    proxy.pause();
    for i in 0..n {
        handle.publish(Event::new(
            "ch",
            Operation::Insert,
            "public",
            format!("e{i}"),
        ));
    }
    // Wait until the relay stored them all (status, not time).
    while relay.status().events < n as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.cut();
    proxy.resume();
    // The last event, or — when the stream's limits discarded it too (its
    // heartbeats keep arriving) — recovery after a gap that says so.
    let last = format!("e{}", n - 1);
    let mut lagged = false;
    let seen = until(
        &mut sub,
        "the last event, or recovery after a Lagged gap",
        |s| {
            lagged |= matches!(s, Signal::Gap(GapReason::Lagged { .. }));
            s.as_event().is_some_and(|e| e.table == last)
                || (lagged && matches!(s, Signal::Health(Health::Healthy)))
        },
    )
    .await;
    source.shutdown().await;
    relay.shutdown().await;
    support::delete_stream(&nats_url(), &stream).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_away_for_a_while_resumes_from_its_sequence() {
    let seen = away_while_written(-1, 50).await;
    let events: Vec<usize> = seen.iter().filter_map(event_index).collect();
    assert_eq!(
        events,
        (0..50).collect::<Vec<_>>(),
        "every event, in order, once"
    );
    assert!(
        !seen.iter().any(Signal::is_gap),
        "nothing was lost, so no gap: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_sequence_was_discarded_gets_a_gap() {
    let seen = away_while_written(5, 50).await;
    assert!(
        seen.iter()
            .any(|s| matches!(s, Signal::Gap(GapReason::Lagged { .. }))),
        "the stream discarded what the subscriber had not read: a Lagged gap: {seen:?}"
    );
    // Whatever slipped through before the pause took effect came before the
    // gap; everything missing is covered by it.
    check_no_silent_loss(&seen, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_used_and_a_wrong_one_is_a_clear_error() {
    let server = OwnNats::start(&["--user", "relay", "--pass", "s3cret"]).await;
    let wrong = NatsConnect::new(server.url())
        .auth(NatsAuth::UserPassword {
            user: "relay".into(),
            password: "wrong".into(),
        })
        .connect_timeout(Duration::from_secs(2));
    let err = tokio::time::timeout(Duration::from_secs(20), wrong.connect())
        .await
        .expect("a wrong credential must not hang")
        .expect_err("a wrong credential must fail");
    assert!(matches!(err, NatsError::Connect { .. }), "{err:?}");
    assert!(
        err.to_string().to_lowercase().contains("auth"),
        "the error says why: {err}"
    );
    let (upstream, _handle) = InMemorySource::pair();
    let relay_err = Relay::builder(wrong.clone())
        .start(&upstream)
        .await
        .expect_err("relay refuses");
    assert!(
        relay_err.to_string().to_lowercase().contains("auth"),
        "{relay_err}"
    );
    let source_err = NatsSource::builder(wrong)
        .connect()
        .await
        .expect_err("source refuses");
    assert!(
        source_err.to_string().to_lowercase().contains("auth"),
        "{source_err}"
    );

    let right = NatsConnect::new(server.url()).auth(NatsAuth::UserPassword {
        user: "relay".into(),
        password: "s3cret".into(),
    });
    let stream = fresh_stream();
    let (upstream, handle) = InMemorySource::pair();
    let relay = Relay::builder(right.clone())
        .stream(stream.clone())
        .heartbeat_interval(Duration::from_millis(100))
        .start(&upstream)
        .await
        .expect("relay with the right password");
    let source = NatsSource::builder(right)
        .stream(stream)
        .connect()
        .await
        .expect("source");
    let mut sub = source.subscribe();
    until(&mut sub, "healthy", |s| {
        matches!(s, Signal::Health(Health::Healthy))
    })
    .await;
    handle.publish(Event::new("ch", Operation::Insert, "public", "e0"));
    until(&mut sub, "e0", |s| event_index(s) == Some(0)).await;
    relay.shutdown().await;

    let token_server = OwnNats::start(&["--auth", "t0ken"]).await;
    let bad = NatsConnect::new(token_server.url())
        .auth(NatsAuth::Token("nope".into()))
        .connect_timeout(Duration::from_secs(2));
    assert!(tokio::time::timeout(Duration::from_secs(20), bad.connect())
        .await
        .expect("no hang")
        .is_err());
    let good = NatsConnect::new(token_server.url()).auth(NatsAuth::Token("t0ken".into()));
    good.connect().await.expect("the right token connects");
}

/// A silent partition between a `NatsSource` and NATS (its connection stops
/// carrying anything and is never closed; a new connection would work): the
/// source must notice, reconnect and read what was written meanwhile, rather
/// than wait for the client's pings to run out (async-nats' default: a ping a
/// minute, given up after two unanswered). How long it took is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_silently_cut_from_nats_reconnects_and_reads_on() {
    let stream = fresh_stream();
    let (upstream, handle) = InMemorySource::pair();
    let relay = Relay::builder(NatsConnect::new(nats_url()))
        .stream(stream.clone())
        .heartbeat_interval(Duration::from_millis(100))
        .start(&upstream)
        .await
        .expect("relay");
    let nats = support::nats_addr();
    let proxy = support::SilentProxy::start(nats).await;
    let (source, mut sub) =
        support::healthy_source(&proxy.url(), &stream, Duration::from_secs(2)).await;
    let cut_at = std::time::Instant::now();
    proxy.silence();
    let n = 20;
    for i in 0..n {
        handle.publish(Event::new(
            "ch",
            Operation::Insert,
            "public",
            format!("e{i}"),
        ));
    }
    let last = format!("e{}", n - 1);
    let mut unhealthy_at = None;
    let mut seen = Vec::new();
    let wait = async {
        while let Some(s) = sub.recv().await {
            if matches!(s, Signal::Health(Health::Unhealthy)) && unhealthy_at.is_none() {
                unhealthy_at = Some(cut_at.elapsed());
            }
            let done = s.as_event().is_some_and(|e| e.table == last);
            seen.push(s);
            if done {
                return;
            }
        }
    };
    let arrived = tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .is_ok();
    let (received, gaps) = check_no_silent_loss(&seen, n);
    println!(
        "silent partition of the source: unhealthy after {unhealthy_at:?}, the events written \
         during it arrived after {:?} ({received} of {n}, {gaps} gaps, {} consumers)",
        cut_at.elapsed(),
        source.stats().consumers
    );
    assert!(
        arrived,
        "the source never read on after a silent partition ({received} of {n})"
    );
    assert_eq!((received, gaps), (n, 0));
    source.shutdown().await;
    relay.shutdown().await;
    support::delete_stream(&nats_url(), &stream).await;
}
