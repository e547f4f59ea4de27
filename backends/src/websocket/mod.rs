//! A WebSocket server that speaks the protocol of PGCacheWatch's
//! `pg_event_distributor`, fed by any [`EventSource`].
//!
//! The Python library PGCacheWatch (0.4.2) ships a FastAPI app that shares one
//! PostgreSQL connection among many processes: each connects a WebSocket to
//! `/pgpubsub/{channel}` and its `WSEventQueue` parses every text message as an
//! event (`channel`, `operation`, `sent_at`, `table`). [`WsServer`] serves the
//! same URL and the same messages ([`event_json`]) from a pgcachewatch source
//! (the `LISTEN` source, the replication source, a `NatsSource`, …), so those
//! services move to it by changing only the URL they connect to.
//!
//! # Better than the original where it matters
//!
//! * **A burst closes nobody who reads.** The server does not read its source
//!   as one more subscriber (whose buffer, 4,096 signals by default, a large
//!   transaction overflows): it attaches *inline*, and the source's own task
//!   hands each signal to the server's queue as it emits it, without waiting.
//!   One pump task serializes each event once into its channel's ring, shared
//!   by the channel's clients; each client's task writes from the ring at the
//!   pace of its socket. With the defaults, a 45,000-event transaction reaches
//!   every client that reads, and none is closed.
//! * **Only a slow client is disconnected.** A client more than
//!   [`client_buffer`](WsServerBuilder::client_buffer) messages behind the
//!   newest (it stopped reading, or reads slower than events come) is
//!   disconnected with close code [`CLOSE_LAGGED`] and a reason: never left to
//!   grow a queue without bound (the original queues without limit), never
//!   silently skipped, and never the cause of anybody else's disconnection.
//! * **No silent loss.** The protocol has no way to say "events were lost", so
//!   a [`Gap`](pgcachewatch_core::Signal::Gap) from the source closes every
//!   client ([`CLOSE_GAP`]), and so does the source turning unhealthy
//!   ([`CLOSE_UNHEALTHY`]); while it is unhealthy, new connections are refused
//!   with HTTP 503. A gap is what the source reports when events were really
//!   lost (its connection dropped, or — for a source without inline attachment,
//!   read through a subscription — that subscription fell behind). The server
//!   closes every client of its own accord only if it lost events itself: if
//!   its pump did not run while [`feed_buffer`](WsServerBuilder::feed_buffer)
//!   events piled up ([`WsStats::feed_lost`]). `WSEventQueue` does not
//!   reconnect: once its connection is closed, `connection_healthy()` is false
//!   and PGCacheWatch's cache decorator bypasses the cache (every call goes to
//!   the database) until the service builds a new `WSEventQueue`. Stale data
//!   is never served; a service that wants caching back reconnects. (PGCacheWatch logs the closed connection as
//!   critical; for a code other than 1000/1001 asyncio also logs the queue's
//!   task's `ConnectionClosedError` as "Task exception was never retrieved".)
//! * **Bounded connections.** At most
//!   [`max_connections`](WsServerBuilder::max_connections) sockets are open at
//!   once (WebSocket clients and requests being read); more are refused at once
//!   with HTTP 503 and counted ([`WsStats::over_limit`]). Each connection has
//!   [`handshake_timeout`](WsServerBuilder::handshake_timeout) to send its
//!   request and be upgraded: one that sends half a request and waits is closed
//!   then, and counted ([`WsStats::handshake_timeouts`]). Connected clients are
//!   served all the while. The memory a connection can hold before it is a
//!   client is bounded (a 16 KiB request head), so the server's memory is
//!   bounded whatever connects.
//! * **Access control.** It listens on `127.0.0.1:8000` by default. On any other
//!   than a loopback address it refuses to start without a bearer
//!   [`token`](WsServerBuilder::token); with a token, a client must send
//!   `Authorization: Bearer <token>` (checked in constant time) or gets HTTP 401.
//!   Only the configured [`channel`](WsServerBuilder::channel)s are served:
//!   another gets HTTP 404.
//!
//! `GET /up` answers 200 while the source is healthy (503 otherwise), like the
//! original's `/up`.
//!
//! # Memory
//!
//! A channel with clients has a ring of `client_buffer` messages, allocated
//! with its first client (about 64 bytes a place: 4 MiB with the default) and
//! freed with its last; each message in it is held once, whatever the number
//! of clients. A connection still sending its request holds at most a 16 KiB
//! buffer, for at most the handshake timeout. The queue between the source and
//! the pump holds at most `feed_buffer` events, and is nearly always empty.
//!
//! # The Python side
//!
//! ```python
//! import websockets.legacy.client   # WSEventQueue needs the `closed` attribute of websockets' legacy client
//! from pgcachewatch import listeners, strategies, decorators
//!
//! ws = await websockets.legacy.client.connect(
//!     "ws://127.0.0.1:8000/pgpubsub/ch_pgcachewatch_table_change",
//!     # only when the server has a token:
//!     extra_headers={"Authorization": f"Bearer {token}"},
//! )
//! queue = listeners.WSEventQueue()
//! await queue.connect(ws, "ch_pgcachewatch_table_change")
//! ```
//!
//! # Example
//!
//! ```
//! use pgcachewatch::memory::InMemorySource;
//! use pgcachewatch::websocket::WsServer;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let (source, _handle) = InMemorySource::pair();
//! let server = WsServer::builder()
//!     .listen("127.0.0.1:0".parse().unwrap())
//!     .channel("ch_pgcachewatch_table_change")
//!     .start(&source)
//!     .await?;
//! println!("ws://{}/pgpubsub/ch_pgcachewatch_table_change", server.local_addr());
//! assert_eq!(server.stats().clients, 0);
//! server.shutdown().await;
//! # Ok::<(), pgcachewatch::websocket::WsError>(())
//! # }).unwrap();
//! ```

mod accept;
mod auth;
mod client;
mod error;
mod feed;
mod hub;
mod wire;

use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use pgcachewatch_core::{EventSource, Health};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

pub use self::error::WsError;
pub use self::wire::event_json;

use self::hub::{Hub, Refused};

/// Where the server listens unless told otherwise: loopback, port 8000 (uvicorn's
/// default, where PGCacheWatch's distributor usually runs).
pub const DEFAULT_WS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8000));
/// The default number of messages a client may fall behind the newest before
/// it is disconnected: a 45,000-event transaction passes a client that reads.
pub const DEFAULT_CLIENT_BUFFER: usize = 65_536;
/// The largest [`client_buffer`](WsServerBuilder::client_buffer) accepted (its
/// ring is allocated with a channel's first client: 64 MiB at this size).
pub const MAX_CLIENT_BUFFER: usize = 1 << 20;
/// The default number of the source's events the server may hold before its
/// pump takes them.
pub const DEFAULT_FEED_BUFFER: usize = 1 << 17;
/// The largest [`feed_buffer`](WsServerBuilder::feed_buffer) accepted.
pub const MAX_FEED_BUFFER: usize = 1 << 24;
/// The default number of connections open at once (clients, and requests
/// being read); more are refused with HTTP 503.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The default time a connection has to send its request and be upgraded.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The default time a closing handshake may take before the connection is dropped.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Close code for a client that fell `client_buffer` messages behind (policy violation).
pub const CLOSE_LAGGED: u16 = 1008;
/// Close code for a gap in the source, or events the server itself dropped:
/// events may have been lost (internal error).
pub const CLOSE_GAP: u16 = 1011;
/// Close code for the source turning unhealthy (internal error).
pub const CLOSE_UNHEALTHY: u16 = 1011;
/// Close code when the server stops or its source ends (going away).
pub const CLOSE_SHUTDOWN: u16 = 1001;

/// The longest close reason a close frame carries (RFC 6455: 125 bytes of payload).
const MAX_REASON: usize = 123;

/// A close code and reason sent to a client.
#[derive(Debug, Clone)]
struct Close {
    code: u16,
    reason: String,
}

impl Close {
    fn new(code: u16, reason: String) -> Self {
        let mut reason = reason;
        if reason.len() > MAX_REASON {
            let mut end = MAX_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Close { code, reason }
    }
    fn lagged(buffer: usize) -> Self {
        Close::new(
            CLOSE_LAGGED,
            format!("client fell behind: {buffer} messages unread; reconnect"),
        )
    }
    fn gap(reason: &str) -> Self {
        Close::new(CLOSE_GAP, format!("events may have been lost ({reason})"))
    }
    fn unhealthy() -> Self {
        Close::new(
            CLOSE_UNHEALTHY,
            "the event source is unhealthy: writes may go unnoticed".to_owned(),
        )
    }
    fn shutdown(reason: &str) -> Self {
        Close::new(CLOSE_SHUTDOWN, reason.to_owned())
    }
}

/// The WebSocket server; see the [module documentation](self).
#[derive(Debug)]
#[non_exhaustive]
pub struct WsServer;

impl WsServer {
    /// A builder with the defaults: `127.0.0.1:8000`, no token, no channel yet.
    pub fn builder() -> WsServerBuilder {
        WsServerBuilder::default()
    }
}

/// Configures and starts a [`WsServer`].
///
/// A non-loopback address without a token does not start:
///
/// ```
/// use pgcachewatch::memory::InMemorySource;
/// use pgcachewatch::websocket::{WsError, WsServer};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let (source, _handle) = InMemorySource::pair();
/// let builder = WsServer::builder()
///     .listen("0.0.0.0:0".parse().unwrap())
///     .channel("ch_pgcachewatch_table_change")
///     .client_buffer(256);
/// let refused = builder.clone().start(&source).await.unwrap_err();
/// assert!(matches!(refused, WsError::TokenRequired { .. }));
/// // With a token, clients must send `Authorization: Bearer <token>`.
/// let server = builder.token("a-long-random-secret").start(&source).await?;
/// server.shutdown().await;
/// # Ok::<(), WsError>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct WsServerBuilder {
    listen: SocketAddr,
    token: Option<String>,
    channels: BTreeSet<String>,
    client_buffer: usize,
    feed_buffer: usize,
    close_timeout: Duration,
    max_connections: usize,
    handshake_timeout: Duration,
}

impl Default for WsServerBuilder {
    fn default() -> Self {
        WsServerBuilder {
            listen: DEFAULT_WS_LISTEN,
            token: None,
            channels: BTreeSet::new(),
            client_buffer: DEFAULT_CLIENT_BUFFER,
            feed_buffer: DEFAULT_FEED_BUFFER,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

impl fmt::Debug for WsServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsServerBuilder")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("channels", &self.channels)
            .field("client_buffer", &self.client_buffer)
            .field("feed_buffer", &self.feed_buffer)
            .field("close_timeout", &self.close_timeout)
            .field("max_connections", &self.max_connections)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

impl WsServerBuilder {
    /// The address to listen on ([`DEFAULT_WS_LISTEN`]). Port 0 picks a free
    /// port ([`WsServerHandle::local_addr`] says which). A non-loopback address
    /// needs a [`token`](Self::token).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Requires `Authorization: Bearer <token>` from every client. Mandatory on
    /// a non-loopback address; optional on loopback.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Serves `/pgpubsub/<channel>`; repeat for several. Clients of a channel get
    /// the source's events whose [`channel`](pgcachewatch_core::Event::channel) is
    /// that name. At least one is needed.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channels.insert(channel.into());
        self
    }

    /// [`channel`](Self::channel) for each of `channels`.
    pub fn channels<I, S>(mut self, channels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.channels.extend(channels.into_iter().map(Into::into));
        self
    }

    /// How many messages a client may fall behind the newest before it is
    /// disconnected ([`DEFAULT_CLIENT_BUFFER`]; 1 to [`MAX_CLIENT_BUFFER`]). The
    /// socket's own buffers come on top of this.
    ///
    /// It is the largest burst that passes a client that reads more slowly
    /// than events come (every client, during a burst): a client that keeps
    /// up stays connected through any burst up to this size. The buffer is a
    /// ring per channel, shared by the channel's clients: its memory does not
    /// grow with their number (see the [module documentation](self#memory)).
    ///
    /// ```
    /// use pgcachewatch::websocket::WsServer;
    /// // Transactions of up to 200,000 changes pass the clients that read.
    /// let builder = WsServer::builder().channel("ch_pgcachewatch_table_change").client_buffer(200_000);
    /// # drop(builder);
    /// ```
    pub fn client_buffer(mut self, messages: usize) -> Self {
        self.client_buffer = messages;
        self
    }

    /// How many of the source's events the server may hold before its pump
    /// takes them ([`DEFAULT_FEED_BUFFER`]; 1 to [`MAX_FEED_BUFFER`]).
    ///
    /// The source's task hands each event to the server as it emits it and
    /// the pump takes them all at once, so this holds only what arrives while
    /// the pump does not run. If it fills, the server drops events — it then
    /// closes every client with [`CLOSE_GAP`], since they missed events — and
    /// counts them ([`WsStats::feed_lost`]). Each event held costs about
    /// 200 bytes.
    ///
    /// ```
    /// use pgcachewatch::websocket::WsServer;
    /// let builder = WsServer::builder().channel("ch_pgcachewatch_table_change").feed_buffer(1 << 20);
    /// # drop(builder);
    /// ```
    pub fn feed_buffer(mut self, events: usize) -> Self {
        self.feed_buffer = events;
        self
    }

    /// How many connections may be open at once ([`DEFAULT_MAX_CONNECTIONS`];
    /// at least 1): WebSocket clients, and connections whose request is still
    /// being read or answered. A connection beyond that is refused at once
    /// with HTTP 503 (or just closed, when many are refused at the same time),
    /// counted in [`WsStats::over_limit`] and logged (at most once a second).
    /// The clients already connected are not affected.
    ///
    /// Each connection uses a file descriptor: keep the limit below the
    /// process's (`ulimit -n`).
    ///
    /// ```
    /// use pgcachewatch::websocket::WsServer;
    /// let builder = WsServer::builder().channel("ch_pgcachewatch_table_change").max_connections(4096);
    /// # drop(builder);
    /// ```
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections;
        self
    }

    /// How long a connection has to send its whole request and be upgraded to
    /// a WebSocket ([`DEFAULT_HANDSHAKE_TIMEOUT`]; more than zero). A
    /// connection that takes longer — it sent half a request and waits, or
    /// trickles its headers — is closed and counted in
    /// [`WsStats::handshake_timeouts`]; until then it holds one of the
    /// [`max_connections`](Self::max_connections). A deadline, not an idle
    /// timeout: sending a byte now and then does not extend it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgcachewatch::websocket::WsServer;
    /// let builder = WsServer::builder()
    ///     .channel("ch_pgcachewatch_table_change")
    ///     .handshake_timeout(Duration::from_secs(3));
    /// # drop(builder);
    /// ```
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How long the server waits for a client it closes to read up to the close
    /// frame and answer it ([`DEFAULT_CLOSE_TIMEOUT`]); then it drops the
    /// connection.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    fn check(&self) -> Result<(), WsError> {
        if self.channels.is_empty() {
            return Err(WsError::Config(
                "no channel to serve: add at least one".to_owned(),
            ));
        }
        if let Some(c) = self.channels.iter().find(|c| c.is_empty()) {
            return Err(WsError::Config(format!("invalid channel name {c:?}")));
        }
        if !(1..=MAX_CLIENT_BUFFER).contains(&self.client_buffer) {
            return Err(WsError::Config(format!(
                "client_buffer is {}: it must be between 1 and {MAX_CLIENT_BUFFER}",
                self.client_buffer
            )));
        }
        if !(1..=MAX_FEED_BUFFER).contains(&self.feed_buffer) {
            return Err(WsError::Config(format!(
                "feed_buffer is {}: it must be between 1 and {MAX_FEED_BUFFER}",
                self.feed_buffer
            )));
        }
        if !(1..=Semaphore::MAX_PERMITS).contains(&self.max_connections) {
            return Err(WsError::Config(format!(
                "max_connections is {}: it must be at least 1",
                self.max_connections
            )));
        }
        if self.handshake_timeout.is_zero() {
            return Err(WsError::Config(
                "handshake_timeout must be more than zero".to_owned(),
            ));
        }
        match &self.token {
            Some(t) if t.trim().is_empty() => {
                Err(WsError::Config("the bearer token is empty".to_owned()))
            }
            Some(t) if t.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                Err(WsError::Config(
                    "the bearer token contains whitespace or control characters".to_owned(),
                ))
            }
            None if !self.listen.ip().is_loopback() => {
                Err(WsError::TokenRequired { addr: self.listen })
            }
            _ => Ok(()),
        }
    }

    /// Checks the settings, binds, and serves `source`'s events until
    /// [`WsServerHandle::shutdown`] or the source ends.
    ///
    /// # Errors
    ///
    /// [`WsError::Config`] for an invalid setting, [`WsError::TokenRequired`] for a
    /// non-loopback address without a token, [`WsError::Bind`] if the address
    /// cannot be bound.
    pub async fn start<S: EventSource + ?Sized>(
        self,
        source: &S,
    ) -> Result<WsServerHandle, WsError> {
        self.check()?;
        let has_token = self.token.is_some();
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|source| WsError::Bind {
                addr: self.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| WsError::Bind {
            addr: self.listen,
            source,
        })?;
        let hub = Hub::new(
            self.client_buffer,
            source.health() == Health::Healthy,
            self.max_connections,
        );
        let (feed, input) = feed::attach(source, self.feed_buffer);
        let (stop_tx, stop_rx) = watch::channel(false);
        let pump = tokio::spawn(hub::pump(hub.clone(), feed, input, stop_rx.clone()));
        let app = Arc::new(App {
            hub: hub.clone(),
            token: self.token.map(String::into_bytes),
            channels: self.channels.clone(),
            close_timeout: self.close_timeout,
        });
        let router = Router::new()
            .route("/pgpubsub/{channel}", get(pubsub))
            .route("/up", get(up))
            .layer(axum::middleware::map_response(one_request_per_connection))
            .with_state(app);
        let server = tokio::spawn(accept::serve(
            listener,
            router,
            hub.clone(),
            self.handshake_timeout,
            stop_rx,
        ));
        tracing::info!(
            addr = %local_addr,
            channels = ?self.channels,
            token = has_token,
            max_connections = self.max_connections,
            handshake_timeout = ?self.handshake_timeout,
            client_buffer = self.client_buffer,
            "WebSocket server listening"
        );
        Ok(WsServerHandle {
            local_addr,
            hub,
            stop: stop_tx,
            pump: Some(pump),
            server: Some(server),
            close_timeout: self.close_timeout,
        })
    }
}

/// What the HTTP handlers share.
struct App {
    hub: Arc<Hub>,
    token: Option<Vec<u8>>,
    channels: BTreeSet<String>,
    close_timeout: Duration,
}

/// Every answer but the upgrade closes its connection: a connection serves one
/// request, and holds its place under the limit no longer.
async fn one_request_per_connection(mut response: Response) -> Response {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn refuse(hub: &Hub, status: StatusCode, why: &'static str) -> Response {
    hub.refused();
    (status, why).into_response()
}

/// `GET /pgpubsub/{channel}`: the WebSocket upgrade.
async fn pubsub(
    State(app): State<Arc<App>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // The token first: without it, say nothing about which channels exist.
    if let Some(token) = &app.token {
        if !auth::bearer_matches(&headers, token) {
            tracing::debug!(%channel, "WebSocket client refused: missing or wrong bearer token");
            let mut response = refuse(
                &app.hub,
                StatusCode::UNAUTHORIZED,
                "a bearer token is required\n",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    if !app.channels.contains(&channel) {
        tracing::debug!(%channel, "WebSocket client refused: channel not served");
        return refuse(
            &app.hub,
            StatusCode::NOT_FOUND,
            "this channel is not served\n",
        );
    }
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => {
            app.hub.refused();
            return rejection.into_response();
        }
    };
    // Registered before the handshake completes: no event after the 101 is missed.
    let reg = match app.hub.register(&channel) {
        Ok(reg) => reg,
        Err(Refused::Unhealthy) => {
            return refuse(
                &app.hub,
                StatusCode::SERVICE_UNAVAILABLE,
                "the event source is unhealthy; retry later\n",
            )
        }
        Err(Refused::Ended) => {
            return refuse(
                &app.hub,
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is stopping\n",
            )
        }
    };
    let hub = app.hub.clone();
    let close_timeout = app.close_timeout;
    // Clients send nothing PGCacheWatch reads: keep what they may send small.
    upgrade
        .max_message_size(64 << 10)
        .max_frame_size(64 << 10)
        .on_upgrade(move |socket| client::serve(socket, hub, channel, reg, close_timeout))
}

/// `GET /up`: 200 while the source is healthy, 503 otherwise.
async fn up(State(app): State<Arc<App>>) -> StatusCode {
    if app.hub.is_healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The server's counters, now ([`WsServerHandle::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WsStats {
    /// The source is healthy and the server accepts clients.
    pub healthy: bool,
    /// Clients connected now.
    pub clients: usize,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Requests refused (token, channel, not a WebSocket, source unhealthy).
    pub refused: u64,
    /// Messages handed to clients' sockets.
    pub sent: u64,
    /// Clients disconnected because they fell behind.
    pub lagged: u64,
    /// Clients disconnected because of a gap, the source turning unhealthy,
    /// or events the server dropped.
    pub closed_by_source: u64,
    /// Connections open now: clients, and requests being read or answered (at
    /// most [`max_connections`](WsServerBuilder::max_connections)).
    pub connections: usize,
    /// Connections refused because `max_connections` were open.
    pub over_limit: u64,
    /// Connections closed because they did not finish their request within
    /// the [`handshake_timeout`](WsServerBuilder::handshake_timeout).
    pub handshake_timeouts: u64,
    /// Events the server dropped because its pump fell
    /// [`feed_buffer`](WsServerBuilder::feed_buffer) events behind the source
    /// (every client was then closed with [`CLOSE_GAP`]).
    pub feed_lost: u64,
}

/// A running [`WsServer`]. Dropping it stops the server (as
/// [`shutdown`](Self::shutdown) does, without waiting).
#[derive(Debug)]
#[must_use = "the server stops when its handle is dropped"]
pub struct WsServerHandle {
    local_addr: SocketAddr,
    hub: Arc<Hub>,
    stop: watch::Sender<bool>,
    pump: Option<JoinHandle<()>>,
    server: Option<JoinHandle<()>>,
    close_timeout: Duration,
}

impl Drop for WsServerHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl WsServerHandle {
    /// The address the server listens on (the actual port when it was given 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's counters.
    pub fn stats(&self) -> WsStats {
        self.hub.stats()
    }

    /// Whether the server stopped (shut down, or its source ended).
    pub fn is_finished(&self) -> bool {
        self.pump.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Closes every client (code [`CLOSE_SHUTDOWN`]) and stops listening (a
    /// request still being read is dropped); waits up to the close timeout for
    /// the clients to go.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        crate::keep_alive::join_task(self.pump.take(), "WebSocket pump").await;
        let _ = tokio::time::timeout(self.close_timeout, self.hub.all_gone()).await;
        crate::keep_alive::join_task(self.server.take(), "WebSocket server").await;
    }
}
