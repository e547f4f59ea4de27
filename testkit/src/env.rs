//! Where tests find their database, names that no other test uses, free
//! ports for servers of their own, and a bounded wait for a condition.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The database the tests talk to: `DATABASE_URL`, or the local default
/// `postgres://postgres@127.0.0.1:5432/test`.
///
/// ```
/// assert!(pgcachewatch::testkit::env::database_url().starts_with("postgres"));
/// ```
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// The database URL used when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The root certificate that signed the test server's TLS certificate:
/// `PGCW_TEST_SSLROOTCERT` (the test command sets it for the cluster it
/// starts), else [`DEFAULT_SSLROOTCERT`], the certificate Debian's clusters
/// serve.
///
/// ```
/// let root = pgcachewatch_testkit::env::server_root_cert();
/// assert!(!root.is_empty());
/// ```
pub fn server_root_cert() -> String {
    std::env::var("PGCW_TEST_SSLROOTCERT")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_SSLROOTCERT.to_owned())
}

/// The root certificate used when `PGCW_TEST_SSLROOTCERT` is not set: Debian's
/// self-signed "snakeoil" certificate.
pub const DEFAULT_SSLROOTCERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// `prefix` followed by the process id and a per-process counter mixed with the
/// clock: unique across the tests of one binary and across binaries running in
/// parallel against one database. Lower case letters, digits and `_` only, so it
/// is a valid unquoted SQL identifier if `prefix` is one.
///
/// ```
/// use pgcachewatch::testkit::env::unique_name;
/// assert_ne!(unique_name("t"), unique_name("t"));
/// ```
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}_{}_{n}_{:08x}", std::process::id(), nanos)
}

/// A TCP port on 127.0.0.1 that is free now, for a server a test starts
/// (PostgreSQL, nats-server). It is picked below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, 32768 and up by default): a port
/// from `bind(0)` lies in that range, where any outgoing connection may take it
/// between the pick and the server's own `bind`. Falls back to `bind(0)` when
/// that range cannot be read or nothing below it is free.
///
/// ```
/// let port = pgcachewatch::testkit::env::free_local_port()?;
/// std::net::TcpListener::bind(("127.0.0.1", port))?;
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// When not even `bind(0)` finds a port.
pub fn free_local_port() -> std::io::Result<u16> {
    use std::hash::BuildHasher;
    use std::net::TcpListener;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 11_000 {
        let random = std::collections::hash_map::RandomState::new();
        for attempt in 0..100_u64 {
            let port = 10_000 + (random.hash_one(attempt) % u64::from(low - 10_000)) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The NATS server the tests talk to: `NATS_URL`, or the local default
/// `nats://127.0.0.1:4222` (JetStream on; `bash .ci/test` starts one of its own).
///
/// ```
/// assert!(pgcachewatch::testkit::env::nats_url().starts_with("nats://"));
/// ```
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| DEFAULT_NATS_URL.to_owned())
}

/// The NATS URL used when `NATS_URL` is not set.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// Waits until `cond` holds, checking every 5 ms, for at most `within`.
///
/// # Panics
///
/// If `cond` still does not hold after `within` (it is a test): the message
/// names `what` was awaited.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// let start = std::time::Instant::now();
/// pgcachewatch::testkit::env::eventually_within(Duration::from_secs(1), "20 ms passed", || {
///     start.elapsed() >= Duration::from_millis(20)
/// })
/// .await;
/// # });
/// ```
pub async fn eventually_within(
    within: std::time::Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
