//! A heartbeat timeout leaves nothing behind: the half-open connection is closed
//! on our side at once, instead of sqlx's `UNLISTEN` clean-up task holding it
//! until TCP gives up. Against the real local PostgreSQL through a fault proxy.
//!
//! Linux only: our side of the connection is watched in `/proc/net/tcp`.
#![cfg(all(feature = "postgres", target_os = "linux"))]

use std::str::FromStr;
use std::time::Duration;

use pgcachewatch_backends::postgres::listener::PgListenerSource;
use pgcachewatch_core::{EventSource, GapReason, Signal};
use pgcachewatch_testkit::env::{database_url, eventually_within, unique_name as unique};
use pgcachewatch_testkit::proxy::FaultProxy;
use sqlx::postgres::PgConnectOptions;

const PATIENCE: Duration = Duration::from_secs(10);

/// Local ports of this machine's ESTABLISHED IPv4 TCP connections to `remote_port`
/// on 127.0.0.1 (the proxy's accepted sockets have it as their *local* port).
fn established_to(remote_port: u16) -> Vec<u16> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state) = (fields[1], fields[2], fields[3]);
            let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
            (state == "01" && port(remote)? == remote_port)
                .then(|| port(local))
                .flatten()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_timeout_closes_the_half_open_connection_at_once() {
    let options = PgConnectOptions::from_str(&database_url()).unwrap();
    let upstream = tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let proxy_port = proxy.addr().port();
    let source = PgListenerSource::builder_with_options(options.host("127.0.0.1").port(proxy_port))
        .channel(unique("pgcw_leak"))
        .heartbeat_interval(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(500))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let mut sub = source.subscribe();
    // The one connection to the proxy is the listener's.
    eventually_within(PATIENCE, "only the listener's connection is open", || {
        established_to(proxy_port).len() == 1
    })
    .await;
    let listening = established_to(proxy_port)[0];

    // The network goes silent, TCP on both ends still believes all is well, and
    // the proxy holds on to its side: only our side can close the connection.
    proxy.pause();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let signal = tokio::time::timeout_at(deadline, sub.recv())
            .await
            .expect("a heartbeat timeout within 10 s")
            .expect("the subscription ended");
        if matches!(signal, Signal::Gap(GapReason::HeartbeatTimeout)) {
            break;
        }
    }
    eventually_within(
        PATIENCE,
        "the half-open connection is closed on our side",
        || !established_to(proxy_port).contains(&listening),
    )
    .await;

    // And the source recovers once the network does.
    proxy.resume();
    eventually_within(PATIENCE, "reconnected", || source.stats().reconnects >= 1).await;
    source.shutdown().await;
}
