//! The registry of connected clients and the pump that feeds them.
//!
//! One pump task takes the source's signals from the [`Feed`] a batch at a
//! time, serializes each event once and sends it into its channel's
//! [`broadcast`] ring, shared by the channel's clients: sending never waits
//! for a client, and the messages are held once however many clients there
//! are. Each client's task reads the ring at its own pace. A client more than
//! `buffer` messages behind the newest is the slow one: it is disconnected
//! (the pump checks after each batch; a client that finds its place
//! overwritten finds out by itself). A gap or an unhealthy source disconnects
//! every client.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use parking_lot::Mutex;
use pgcachewatch_core::{Health, Signal};
use tokio::sync::{broadcast, oneshot, watch};

use super::feed::{Feed, Input};
use super::wire::event_json;
use super::{Close, WsStats};

/// Signals delivered under one lock of the registry, between two yields.
const CHUNK: usize = 256;

/// A pump batch buffer larger than this is shrunk once the batch is done
/// (after a burst).
const KEEP_BATCH_CAPACITY: usize = 4096;

/// What the server keeps for one connected client.
#[derive(Debug)]
struct Slot {
    close: oneshot::Sender<Close>,
    /// Messages the client has taken from the ring: the channel's head when
    /// it registered, plus what it read since.
    taken: Arc<AtomicU64>,
}

/// One served channel with clients: its ring and who reads it. Made for the
/// first client and dropped with the last one (the ring is allocated up front).
#[derive(Debug)]
struct Channel {
    tx: broadcast::Sender<Utf8Bytes>,
    /// Messages sent into the ring since the channel was made.
    head: u64,
    clients: HashMap<u64, Slot>,
}

#[derive(Debug, Default)]
struct State {
    healthy: bool,
    /// The source ended or the server is shutting down: no new clients.
    ended: bool,
    next_id: u64,
    channels: HashMap<String, Channel>,
    connected: usize,
}

/// What a newly registered client reads from. Dropping it unregisters the
/// client (if the hub has not already let it go).
#[derive(Debug)]
pub(super) struct Registration {
    pub(super) id: u64,
    pub(super) rx: broadcast::Receiver<Utf8Bytes>,
    pub(super) taken: Arc<AtomicU64>,
    pub(super) close: oneshot::Receiver<Close>,
    pub(super) guard: Registered,
}

/// Unregisters a client when dropped: when its task ends, or when its
/// upgrade failed and the task never started.
#[derive(Debug)]
pub(super) struct Registered {
    hub: Arc<Hub>,
    channel: String,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.hub.unregister(&self.channel, self.id);
    }
}

/// Why a client was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// The source is unhealthy: the client would wait for events that may never come.
    Unhealthy,
    /// The server is stopping.
    Ended,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    sent: AtomicU64,
    lagged: AtomicU64,
    closed_by_source: AtomicU64,
    over_limit: AtomicU64,
    handshake_timeouts: AtomicU64,
    feed_lost: AtomicU64,
}

/// Shared by the HTTP handlers, the connection and client tasks, and the pump.
#[derive(Debug)]
pub(super) struct Hub {
    state: Mutex<State>,
    counters: Counters,
    /// How far behind the newest message a client may fall.
    buffer: usize,
    /// The number of connected clients, for waiting until they are gone.
    connected_tx: watch::Sender<usize>,
    /// The connection limit, and the permits its connections hold.
    max_connections: usize,
    connections: Arc<tokio::sync::Semaphore>,
}

impl Hub {
    pub(super) fn new(buffer: usize, healthy: bool, max_connections: usize) -> Arc<Self> {
        Arc::new(Hub {
            state: Mutex::new(State {
                healthy,
                ..State::default()
            }),
            counters: Counters::default(),
            buffer,
            connected_tx: watch::channel(0).0,
            max_connections,
            connections: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        })
    }

    pub(super) fn is_healthy(&self) -> bool {
        let state = self.state.lock();
        state.healthy && !state.ended
    }

    /// The permits of the connection limit: one per open connection.
    pub(super) fn connection_permits(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.connections
    }

    pub(super) fn max_connections(&self) -> usize {
        self.max_connections
    }

    pub(super) fn refused(&self) {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn over_limit(&self) {
        self.counters.over_limit.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn handshake_timed_out(&self) {
        self.counters
            .handshake_timeouts
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` messages a client took to send.
    pub(super) fn sent(&self, n: usize) {
        self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Registers a client of `channel`: from now on it gets that channel's events.
    pub(super) fn register(self: &Arc<Self>, channel: &str) -> Result<Registration, Refused> {
        let mut state = self.state.lock();
        if state.ended {
            return Err(Refused::Ended);
        }
        if !state.healthy {
            return Err(Refused::Unhealthy);
        }
        let id = state.next_id;
        state.next_id += 1;
        let buffer = self.buffer;
        let entry = state
            .channels
            .entry(channel.to_owned())
            .or_insert_with(|| Channel {
                tx: broadcast::channel(buffer).0,
                head: 0,
                clients: HashMap::new(),
            });
        let rx = entry.tx.subscribe();
        let taken = Arc::new(AtomicU64::new(entry.head));
        let (close_tx, close_rx) = oneshot::channel();
        entry.clients.insert(
            id,
            Slot {
                close: close_tx,
                taken: taken.clone(),
            },
        );
        state.connected += 1;
        self.connected_tx.send_replace(state.connected);
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(Registration {
            id,
            rx,
            taken,
            close: close_rx,
            guard: Registered {
                hub: self.clone(),
                channel: channel.to_owned(),
                id,
            },
        })
    }

    /// Forgets a client (it left, or its task ended).
    fn unregister(&self, channel: &str, id: u64) {
        let mut state = self.state.lock();
        let Some(ch) = state.channels.get_mut(channel) else {
            return;
        };
        if ch.clients.remove(&id).is_some() {
            if ch.clients.is_empty() {
                state.channels.remove(channel);
            }
            state.connected -= 1;
            self.connected_tx.send_replace(state.connected);
        }
    }

    /// A client found its place in the ring overwritten: it fell behind.
    /// Forgets it and counts it (unless the pump already did); returns the
    /// reason to close it with.
    pub(super) fn fell_behind(&self, channel: &str, id: u64) -> Close {
        let mut state = self.state.lock();
        if let Some(ch) = state.channels.get_mut(channel) {
            if ch.clients.remove(&id).is_some() {
                if ch.clients.is_empty() {
                    state.channels.remove(channel);
                }
                state.connected -= 1;
                self.connected_tx.send_replace(state.connected);
                self.counters.lagged.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    client = id,
                    %channel,
                    buffer = self.buffer,
                    "a WebSocket client fell behind; disconnecting it"
                );
            }
        }
        Close::lagged(self.buffer)
    }

    /// Waits until no client is connected.
    pub(super) async fn all_gone(&self) {
        let mut rx = self.connected_tx.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Delivers `signals` in order: each event to the ring of its channel (if
    /// it has clients), health changes and gaps to every client; then
    /// disconnects the clients now more than `buffer` messages behind.
    fn deliver(&self, signals: &[Signal]) {
        let mut state = self.state.lock();
        let mut sent_to: Vec<&str> = Vec::new();
        for signal in signals {
            match signal {
                Signal::Event(event) => {
                    let Some(ch) = state.channels.get_mut(event.channel.as_str()) else {
                        continue;
                    };
                    // An error only means that no receiver is left: the
                    // clients still registered are leaving.
                    let _ = ch.tx.send(Utf8Bytes::from(event_json(event)));
                    ch.head += 1;
                    let channel = event.channel.as_str();
                    if !sent_to.contains(&channel) {
                        sent_to.push(channel);
                    }
                }
                Signal::Gap(reason) => {
                    // PGCacheWatch's protocol has no way to say "events were
                    // lost": the only honest thing is to end each client's
                    // connection.
                    self.close_all_locked(&mut state, &Close::gap(&reason.to_string()), false);
                    sent_to.clear();
                }
                Signal::Health(Health::Unhealthy) => {
                    state.healthy = false;
                    self.close_all_locked(&mut state, &Close::unhealthy(), false);
                    sent_to.clear();
                }
                Signal::Health(Health::Healthy) => state.healthy = true,
                _ => {}
            }
        }
        for channel in sent_to {
            self.drop_laggards_locked(&mut state, channel);
        }
    }

    /// Disconnects the clients of `channel` more than `buffer` messages behind.
    fn drop_laggards_locked(&self, state: &mut State, channel: &str) {
        let Some(ch) = state.channels.get_mut(channel) else {
            return;
        };
        let head = ch.head;
        let buffer = self.buffer as u64;
        let behind: Vec<u64> = ch
            .clients
            .iter()
            .filter(|(_, slot)| head.saturating_sub(slot.taken.load(Ordering::Acquire)) > buffer)
            .map(|(id, _)| *id)
            .collect();
        if behind.is_empty() {
            return;
        }
        for id in &behind {
            if let Some(slot) = ch.clients.remove(id) {
                tracing::warn!(
                    client = id,
                    %channel,
                    buffer,
                    "a WebSocket client fell behind; disconnecting it"
                );
                let _ = slot.close.send(Close::lagged(self.buffer));
            }
        }
        if ch.clients.is_empty() {
            state.channels.remove(channel);
        }
        self.counters
            .lagged
            .fetch_add(behind.len() as u64, Ordering::Relaxed);
        state.connected -= behind.len();
        self.connected_tx.send_replace(state.connected);
    }

    /// Disconnects every client with `close`; `ended` also refuses new ones.
    fn close_all(&self, close: &Close, ended: bool) {
        let mut state = self.state.lock();
        self.close_all_locked(&mut state, close, ended);
    }

    fn close_all_locked(&self, state: &mut State, close: &Close, ended: bool) {
        state.ended |= ended;
        let channels = std::mem::take(&mut state.channels);
        let n: usize = channels.values().map(|c| c.clients.len()).sum();
        for slot in channels.into_values().flat_map(|c| c.clients.into_values()) {
            let _ = slot.close.send(close.clone());
        }
        if n > 0 {
            if !ended {
                self.counters
                    .closed_by_source
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            tracing::warn!(
                clients = n,
                code = close.code,
                reason = %close.reason,
                "closing every WebSocket client"
            );
        }
        state.connected -= n;
        self.connected_tx.send_replace(state.connected);
    }

    pub(super) fn stats(&self) -> WsStats {
        let (healthy, clients) = {
            let state = self.state.lock();
            (state.healthy && !state.ended, state.connected)
        };
        let c = &self.counters;
        WsStats {
            healthy,
            clients,
            accepted: c.accepted.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            lagged: c.lagged.load(Ordering::Relaxed),
            closed_by_source: c.closed_by_source.load(Ordering::Relaxed),
            connections: self
                .max_connections
                .saturating_sub(self.connections.available_permits()),
            over_limit: c.over_limit.load(Ordering::Relaxed),
            handshake_timeouts: c.handshake_timeouts.load(Ordering::Relaxed),
            feed_lost: c.feed_lost.load(Ordering::Relaxed),
        }
    }
}

/// Feeds the hub from `feed` until the source ends or `stop` fires; then
/// closes every client and refuses new ones. `input` keeps the feed filled
/// while the pump runs.
pub(super) async fn pump(
    hub: Arc<Hub>,
    feed: Arc<Feed>,
    input: Input,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch: VecDeque<Signal> = VecDeque::new();
    let why = loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break Close::shutdown("the server is shutting down"),
            () = feed.ready() => {}
        }
        let taken = feed.take(&mut batch);
        for chunk in batch.make_contiguous().chunks(CHUNK) {
            hub.deliver(chunk);
            // A burst is many chunks: let the clients' tasks write meanwhile.
            tokio::task::consume_budget().await;
        }
        batch.clear();
        if batch.capacity() > KEEP_BATCH_CAPACITY {
            batch.shrink_to(KEEP_BATCH_CAPACITY);
        }
        if taken.lost > 0 {
            hub.counters
                .feed_lost
                .fetch_add(taken.lost, Ordering::Relaxed);
            tracing::error!(
                lost = taken.lost,
                "the WebSocket server fell behind its source and dropped events; closing every client"
            );
            hub.close_all(
                &Close::gap(&format!(
                    "the server fell behind its source: {} events dropped",
                    taken.lost
                )),
                false,
            );
        }
        if taken.ended {
            tracing::warn!("the WebSocket server's source ended; closing every client");
            break Close::shutdown("the event source ended");
        }
    };
    drop(input);
    hub.close_all(&why, true);
}
