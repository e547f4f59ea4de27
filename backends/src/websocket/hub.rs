//! The registry of connected clients and the pump that feeds them.
//!
//! One pump task reads one subscription of the source, serializes each event
//! once and offers it to the bounded buffer of every client of its channel
//! without waiting. A full buffer disconnects that client; a gap or an
//! unhealthy source disconnects every client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use parking_lot::Mutex;
use pgcachewatch_core::{Event, Health, Signal, Subscription};
use tokio::sync::{mpsc, oneshot, watch};

use super::wire::event_json;
use super::{Close, WsStats};

/// What the server keeps for one connected client.
#[derive(Debug)]
struct Slot {
    tx: mpsc::Sender<Utf8Bytes>,
    close: oneshot::Sender<Close>,
}

#[derive(Debug, Default)]
struct State {
    healthy: bool,
    /// The source ended or the server is shutting down: no new clients.
    ended: bool,
    next_id: u64,
    by_channel: HashMap<String, HashMap<u64, Slot>>,
    connected: usize,
}

/// What a newly registered client reads from.
#[derive(Debug)]
pub(super) struct Registration {
    pub(super) id: u64,
    pub(super) rx: mpsc::Receiver<Utf8Bytes>,
    pub(super) close: oneshot::Receiver<Close>,
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
}

/// Shared by the HTTP handlers, the client tasks and the pump.
#[derive(Debug)]
pub(super) struct Hub {
    state: Mutex<State>,
    counters: Counters,
    buffer: usize,
    /// The number of connected clients, for waiting until they are gone.
    connected_tx: watch::Sender<usize>,
}

impl Hub {
    pub(super) fn new(buffer: usize, healthy: bool) -> Arc<Self> {
        Arc::new(Hub {
            state: Mutex::new(State {
                healthy,
                ..State::default()
            }),
            counters: Counters::default(),
            buffer,
            connected_tx: watch::channel(0).0,
        })
    }

    pub(super) fn is_healthy(&self) -> bool {
        let state = self.state.lock();
        state.healthy && !state.ended
    }

    pub(super) fn refused(&self) {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Registers a client of `channel`: from now on it gets that channel's events.
    pub(super) fn register(&self, channel: &str) -> Result<Registration, Refused> {
        let mut state = self.state.lock();
        if state.ended {
            return Err(Refused::Ended);
        }
        if !state.healthy {
            return Err(Refused::Unhealthy);
        }
        let (tx, rx) = mpsc::channel(self.buffer);
        let (close_tx, close_rx) = oneshot::channel();
        let id = state.next_id;
        state.next_id += 1;
        state
            .by_channel
            .entry(channel.to_owned())
            .or_default()
            .insert(
                id,
                Slot {
                    tx,
                    close: close_tx,
                },
            );
        state.connected += 1;
        self.connected_tx.send_replace(state.connected);
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(Registration {
            id,
            rx,
            close: close_rx,
        })
    }

    /// Forgets a client (it left, or its task ended).
    pub(super) fn unregister(&self, channel: &str, id: u64) {
        let mut state = self.state.lock();
        if let Some(clients) = state.by_channel.get_mut(channel) {
            if clients.remove(&id).is_some() {
                if clients.is_empty() {
                    state.by_channel.remove(channel);
                }
                state.connected -= 1;
                self.connected_tx.send_replace(state.connected);
            }
        }
    }

    /// Waits until no client is connected.
    pub(super) async fn all_gone(&self) {
        let mut rx = self.connected_tx.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Offers `event` to every client of its channel; a client whose buffer is
    /// full is disconnected.
    fn deliver(&self, event: &Event) {
        let mut state = self.state.lock();
        let Some(clients) = state.by_channel.get_mut(event.channel.as_str()) else {
            return;
        };
        let text = Utf8Bytes::from(event_json(event));
        let mut behind = Vec::new();
        let mut gone = Vec::new();
        for (id, slot) in clients.iter() {
            match slot.tx.try_send(text.clone()) {
                Ok(()) => {
                    self.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => behind.push(*id),
                // The client's task ended; it unregisters itself too.
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(*id),
            }
        }
        let mut removed = 0;
        for id in gone {
            removed += usize::from(clients.remove(&id).is_some());
        }
        for id in behind {
            if let Some(slot) = clients.remove(&id) {
                removed += 1;
                tracing::warn!(
                    client = id,
                    channel = %event.channel,
                    buffer = self.buffer,
                    "a WebSocket client fell behind; disconnecting it"
                );
                self.counters.lagged.fetch_add(1, Ordering::Relaxed);
                let _ = slot.close.send(Close::lagged(self.buffer));
            }
        }
        if clients.is_empty() {
            state.by_channel.remove(event.channel.as_str());
        }
        if removed > 0 {
            state.connected -= removed;
            self.connected_tx.send_replace(state.connected);
        }
    }

    /// Disconnects every client with `close`; `ended` also refuses new ones.
    fn close_all(&self, close: &Close, ended: bool) {
        let mut state = self.state.lock();
        state.ended |= ended;
        let clients = std::mem::take(&mut state.by_channel);
        let n: usize = clients.values().map(HashMap::len).sum();
        for slot in clients.into_values().flat_map(HashMap::into_values) {
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

    fn set_healthy(&self, healthy: bool) {
        self.state.lock().healthy = healthy;
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
        }
    }
}

/// Feeds the hub from `sub` until the source ends or `stop` fires; then closes
/// every client and refuses new ones.
pub(super) async fn pump(hub: Arc<Hub>, mut sub: Subscription, mut stop: watch::Receiver<bool>) {
    let why = loop {
        let signal = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break Close::shutdown("the server is shutting down"),
            s = sub.recv() => s,
        };
        match signal {
            None => {
                tracing::warn!("the WebSocket server's source ended; closing every client");
                break Close::shutdown("the event source ended");
            }
            Some(Signal::Event(event)) => hub.deliver(&event),
            Some(Signal::Gap(reason)) => {
                // PGCacheWatch's protocol has no way to say "events were lost":
                // the only honest thing is to end each client's connection.
                hub.close_all(&Close::gap(&reason.to_string()), false);
            }
            Some(Signal::Health(Health::Unhealthy)) => {
                hub.set_healthy(false);
                hub.close_all(&Close::unhealthy(), false);
            }
            Some(Signal::Health(Health::Healthy)) => hub.set_healthy(true),
            Some(_) => {}
        }
    };
    hub.close_all(&why, true);
}
