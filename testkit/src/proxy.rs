//! [`FaultProxy`]: a TCP proxy that can freeze or cut connections on demand.
//!
//! Put it between a client and a server (PostgreSQL, say) to produce the network
//! faults a test needs and a real network produces at random:
//!
//! * [`pause`](FaultProxy::pause): nothing is forwarded in either direction, yet
//!   every socket stays open. To both ends the connection is *half-open*: writes
//!   succeed, nothing ever answers, and TCP reports no error (what a silently
//!   dropped NAT entry or an unplugged cable looks like).
//! * [`resume`](FaultProxy::resume): forwarding continues, nothing was lost.
//! * [`cut`](FaultProxy::cut): every current connection is closed at once (both
//!   ends see end-of-file); new connections are accepted as usual.
//!
//! Only tokio's networking: no root, no iptables.
//!
//! ```
//! use pgcachewatch::testkit::proxy::FaultProxy;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! // An echo server to stand in for PostgreSQL.
//! let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let upstream = server.local_addr()?;
//! tokio::spawn(async move {
//!     while let Ok((mut s, _)) = server.accept().await {
//!         tokio::spawn(async move {
//!             let (mut r, mut w) = s.split();
//!             let _ = tokio::io::copy(&mut r, &mut w).await;
//!         });
//!     }
//! });
//! let proxy = FaultProxy::start(upstream).await?;
//! let mut client = tokio::net::TcpStream::connect(proxy.addr()).await?;
//! client.write_all(b"ping").await?;
//! let mut buf = [0; 4];
//! client.read_exact(&mut buf).await?;
//! assert_eq!(&buf, b"ping");
//! proxy.cut();
//! assert_eq!(client.read(&mut buf).await?, 0); // closed
//! # Ok::<_, std::io::Error>(())
//! # }).unwrap();
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A TCP proxy on `127.0.0.1` that forwards to one upstream address and injects
/// faults: [`pause`](Self::pause) (half-open), [`resume`](Self::resume),
/// [`cut`](Self::cut). See the [module docs](self).
///
/// Dropping the proxy stops accepting and closes every connection it forwards.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    paused: watch::Sender<bool>,
    /// Bumped by every `cut`; connections close when it passes the value they started with.
    cuts: watch::Sender<u64>,
    live: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    accept_task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards every accepted connection to `upstream`.
    ///
    /// # Errors
    ///
    /// If the listening socket cannot be bound.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (paused, _) = watch::channel(false);
        let (cuts, _) = watch::channel(0u64);
        let live = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let accept_task = tokio::spawn(accept_loop(
            listener,
            upstream,
            paused.subscribe(),
            cuts.subscribe(),
            live.clone(),
            accepted.clone(),
        ));
        Ok(FaultProxy {
            addr,
            upstream,
            paused,
            cuts,
            live,
            accepted,
            accept_task,
        })
    }

    /// Where clients connect: `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where connections are forwarded.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Stops forwarding in both directions; sockets stay open (half-open
    /// connections). New connections are accepted but forward nothing either.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Forwards again, including whatever was held back while paused.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Whether the proxy is paused.
    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Closes every current connection (both sides see end-of-file). Later
    /// connections are accepted and forwarded as usual (unless paused).
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Connections open right now (accepted and not yet closed).
    pub fn connection_count(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Connections accepted since the start.
    pub fn accepted_count(&self) -> usize {
        self.accepted.load(Ordering::Acquire)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        // Close every connection: their tasks see the cut, and then the senders go.
        self.cuts.send_modify(|n| *n += 1);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    paused: watch::Receiver<bool>,
    cuts: watch::Receiver<u64>,
    live: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                tracing::warn!(error = %e, "fault proxy: accept failed");
                continue;
            }
        };
        accepted.fetch_add(1, Ordering::AcqRel);
        let guard = LiveGuard::new(live.clone());
        let paused = paused.clone();
        let mut cuts = cuts.clone();
        let started_at = *cuts.borrow_and_update();
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                _ = cuts.wait_for(|&n| n != started_at) => {}
                result = forward(client, upstream, paused) => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "fault proxy: connection ended");
                    }
                }
            }
            // Dropping the sockets here closes both ends.
        });
    }
}

/// Connects upstream and pumps bytes both ways until either side closes.
async fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    paused: watch::Receiver<bool>,
) -> io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    // The first direction to finish ends the connection: both sockets drop.
    tokio::select! {
        r = pump(client_r, server_w, paused.clone()) => r,
        r = pump(server_r, client_w, paused) => r,
    }
}

/// Copies `from` to `to`, holding data back while paused.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Do not even read while paused: the sender's TCP window fills as on a dead link.
        wait_unpaused(&mut paused).await?;
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        // Data read just before a pause is held until resume.
        wait_unpaused(&mut paused).await?;
        to.write_all(&buf[..n]).await?;
    }
}

async fn wait_unpaused(paused: &mut watch::Receiver<bool>) -> io::Result<()> {
    paused
        .wait_for(|&p| !p)
        .await
        .map(|_| ())
        .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "fault proxy dropped"))
}

/// Counts a connection as live until dropped.
struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn new(live: Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::AcqRel);
        LiveGuard(live)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn echo_server() -> SocketAddr {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(client: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        client.write_all(msg).await.unwrap();
        let mut buf = vec![0; msg.len()];
        client.read_exact(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn forwards_both_ways_and_counts_connections() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut a, b"hello").await, b"hello");
        assert_eq!(roundtrip(&mut b, b"world").await, b"world");
        assert_eq!(proxy.connection_count(), 2);
        assert_eq!(proxy.accepted_count(), 2);
        drop(a);
        crate::env::eventually_within(
            Duration::from_secs(10),
            "a closed connection is no longer counted",
            || proxy.connection_count() == 1,
        )
        .await;
    }

    #[tokio::test]
    async fn pause_holds_data_without_closing_and_resume_delivers_it() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut client, b"before").await, b"before");

        proxy.pause();
        assert!(proxy.is_paused());
        client.write_all(b"during").await.unwrap(); // the write succeeds: half-open
        let mut buf = [0u8; 6];
        let read = tokio::time::timeout(Duration::from_millis(300), client.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "nothing may come back while paused: {read:?}"
        );
        assert_eq!(proxy.connection_count(), 1, "paused connections stay open");

        proxy.resume();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"during");
        assert_eq!(roundtrip(&mut client, b"after").await, b"after");
    }

    #[tokio::test]
    async fn new_connections_while_paused_wait_for_resume() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        proxy.pause();
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        client.write_all(b"queued").await.unwrap();
        let mut buf = [0u8; 6];
        let read = tokio::time::timeout(Duration::from_millis(200), client.read(&mut buf)).await;
        assert!(read.is_err(), "nothing may come back while paused");
        proxy.resume();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"queued");
    }

    #[tokio::test]
    async fn cut_closes_current_connections_and_accepts_new_ones() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut a, b"x").await, b"x");
        proxy.cut();
        let mut buf = [0u8; 1];
        assert_eq!(
            a.read(&mut buf).await.unwrap(),
            0,
            "the client sees end-of-file"
        );
        crate::env::eventually_within(
            Duration::from_secs(10),
            "the cut connection is gone",
            || proxy.connection_count() == 0,
        )
        .await;

        let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut b, b"y").await, b"y");
    }

    #[tokio::test]
    async fn cut_also_closes_paused_connections() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut a, b"x").await, b"x");
        proxy.pause();
        proxy.cut();
        let mut buf = [0u8; 1];
        assert_eq!(a.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut a, b"x").await, b"x");
        drop(proxy);
        let mut buf = [0u8; 1];
        assert_eq!(a.read(&mut buf).await.unwrap(), 0);
    }
}
