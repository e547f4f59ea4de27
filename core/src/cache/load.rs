//! Loading through the cache: single-flight, stamped with generations, stored
//! only while still valid.
//!
//! The protocol, in one place:
//!
//! 1. A miss takes the key's flight-table shard lock, and either joins the
//!    flight in the table (if it is still valid and young enough) or leads a new
//!    one, stamped with the generations current *now*, before the loader reads.
//! 2. Only the flight in the table may store. A per-key invalidation removes it
//!    from the table and detaches it; a flight that replaces another detaches the
//!    one it replaces. A table invalidation or a flush bumps generations, which
//!    the stamp check sees.
//! 3. The leader publishes under the shard lock: stored if still in the table, not
//!    detached, its stamp current and the cache not bypassing; then every waiter
//!    gets the same outcome. An error is shared and never stored.
//! 4. A leader that is cancelled, or panics before publishing, abandons the
//!    flight: its waiters retry, one of them as the new leader.

use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use super::flight::{Failure, Flight, Outcome};
use super::store::RemovalCause;
use super::{Cache, FlightShard, FLIGHT_SHARDS};
use crate::event::{IntoTableRef, TableRef};

pub(super) enum Role<V> {
    Hit(V),
    Lead(Arc<Flight<V>>),
    Wait(Arc<Flight<V>>),
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Loads `key` through the cache. `own` turns this caller's loader error into
    /// the shared failure and this caller's error; `shared` turns a failure of a
    /// load led by another caller into this caller's error (`None`: it cannot be
    /// expressed, so this caller loads on its own).
    pub(super) async fn load_through<F, Fut, E, R>(
        &self,
        key: K,
        tags: impl FnOnce() -> Vec<TableRef>,
        loader: F,
        own: impl Fn(E) -> (Failure, R),
        shared: impl Fn(&Failure) -> Option<R>,
    ) -> Result<V, R>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let inner = &*self.inner;
        if let Some(v) = self.lookup(&key) {
            self.count_hit(&key);
            return Ok(v);
        }
        if self.bypassing() {
            inner.counters.bypass();
            return loader().await.map_err(|e| {
                inner.counters.load_error();
                own(e).1
            });
        }
        let tables = tags();

        // Find a flight to join, or lead a new one (the miss is counted there,
        // under the flight lock, once).
        let mut may_join = true;
        let mut counted = false;
        let flight = loop {
            let role = self.join_or_lead(&key, &tables, may_join, !counted);
            counted = true;
            match role {
                Role::Hit(v) => return Ok(v),
                Role::Lead(flight) => break flight,
                Role::Wait(flight) => match flight.wait().await {
                    Some(Ok(v)) => return Ok(v),
                    Some(Err(failure)) => match shared(&failure) {
                        Some(e) => return Err(e),
                        // Its error is of another type than this caller's: load anew.
                        None => may_join = false,
                    },
                    // The leader was cancelled: try again (perhaps as the leader).
                    None => {}
                },
            }
        };

        let mut guard = LeadGuard {
            cache: self,
            key: &key,
            flight: &flight,
            finished: false,
        };
        inner.counters.load();
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        // The guard stays armed until the flight is published: if cloning or
        // storing the value panics, the waiters are released (they retry)
        // instead of hanging.
        let loaded = loader().await;
        #[cfg(feature = "metrics")]
        inner
            .counters
            .metrics
            .load_duration
            .record(started.elapsed().as_secs_f64());
        let result = match loaded {
            Ok(value) => {
                let mine = value.clone();
                self.finish(&key, &flight, Ok(value));
                Ok(mine)
            }
            Err(e) => {
                let (failure, mine) = own(e);
                self.finish(&key, &flight, Err(failure));
                Err(mine)
            }
        };
        guard.finished = true;
        result
    }

    pub(super) fn flight_shard(&self, key: &K) -> &FlightShard<K, V> {
        let shard = self.inner.hasher.hash_one(key) as usize % FLIGHT_SHARDS;
        &self.inner.flights[shard]
    }

    /// With `count_miss`, counts the miss once this caller has joined or leads
    /// (under the lock: a miss counted is a caller already waiting on a flight).
    pub(super) fn join_or_lead(
        &self,
        key: &K,
        tables: &[TableRef],
        may_join: bool,
        count_miss: bool,
    ) -> Role<V> {
        let inner = &*self.inner;
        let mut flights = self.flight_shard(key).lock();
        // A flight may have finished between the first lookup and this lock.
        if let Some(v) = self.lookup(key) {
            if count_miss {
                self.count_hit(key);
            }
            return Role::Hit(v);
        }
        if let Some(flight) = flights.get(key) {
            // A refresh of the key runs and may serve its previous value.
            if inner.serves_stale {
                if let Some(v) = self.stale_of(flight) {
                    inner.counters.stale_served();
                    return Role::Hit(v);
                }
            }
        }
        if count_miss {
            inner.counters.miss();
            if inner.sampling {
                self.record_read(key);
            }
        }
        if let Some(flight) = flights.get(key) {
            if may_join
                && !flight.is_detached()
                && inner.gens.is_current(&flight.stamp)
                && self.may_join(flight)
            {
                return Role::Wait(flight.clone());
            }
        }
        let flight = Flight::new(inner.gens.stamp(tables));
        if let Some(replaced) = flights.insert(key.clone(), flight.clone()) {
            // Only the flight in the table may store: the one it replaces hands its
            // result to the callers already waiting on it, and nothing else.
            replaced.detach();
        }
        Role::Lead(flight)
    }

    /// Whether a read may share `flight`'s value: it may be as old as the load's
    /// start, so with a time-to-live (or, while unhealthy, a staleness bound) the
    /// load must have started within it.
    fn may_join(&self, flight: &Flight<V>) -> bool {
        let inner = &*self.inner;
        let bound = match inner.while_unhealthy {
            super::WhileUnhealthy::ServeWithin(bound) if !self.is_healthy() => Some(bound),
            _ => None,
        };
        let limit = match (bound, inner.ttl) {
            (Some(b), Some(t)) => Some(b.min(t)),
            (b, t) => b.or(t),
        };
        limit.is_none_or(|limit| flight.started_at.elapsed() <= limit)
    }

    /// Publishes a finished load: stores it if still valid, then wakes the waiters.
    pub(super) fn finish(&self, key: &K, flight: &Arc<Flight<V>>, outcome: Outcome<V>) {
        let inner = &*self.inner;
        let mut replaced = None;
        {
            let mut flights = self.flight_shard(key).lock();
            let in_table = flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight));
            if in_table {
                flights.remove(key);
            }
            match &outcome {
                Ok(value) => {
                    // Checked under the shard lock: `invalidate(key)` takes it too, so
                    // it either detached this flight already or removes the entry after.
                    // A concurrent invalidate-all bumps the generation, which `lookup`
                    // checks on every read.
                    let storable = in_table
                        && !flight.is_detached()
                        && inner.gens.is_current(&flight.stamp)
                        && !self.bypassing();
                    if storable {
                        let entry =
                            self.new_entry(value.clone(), flight.stamp.clone(), flight.started_at);
                        replaced = self.store_entry(key.clone(), entry);
                        if flight.refresh {
                            inner.counters.refresh_served();
                        }
                    } else if flight.refresh {
                        inner.counters.refresh_discarded();
                    } else {
                        inner.counters.discarded_load();
                    }
                }
                Err(_) => inner.counters.load_error(),
            }
        }
        flight.finish(outcome);
        inner.counters.entries(|| inner.store.len() as u64);
        if let Some((key, value, cause)) = replaced {
            self.notify(&key, value, cause);
        }
    }

    /// Stores `entry`; with a listener, returns the entry it replaced and why it
    /// left (to be told once the locks are released).
    pub(super) fn store_entry(
        &self,
        key: K,
        entry: super::store::Entry<V>,
    ) -> Option<(K, V, RemovalCause)> {
        let inner = &*self.inner;
        // With a listener, the old entry is taken out first: the storage would
        // report a replaced value as evicted. Callers hold the key's flight-shard
        // lock, so no other store of this key runs in between.
        let old = match inner.listener {
            Some(_) => inner.store.remove(&key).map(|(_, old)| old),
            None => None,
        };
        inner.store.insert(key.clone(), entry);
        old.map(|old| {
            let cause = self.stale_cause(&old).unwrap_or(RemovalCause::Replaced);
            (key, old.value, cause)
        })
    }
}

/// The tables a tagged load depends on; empty (every table) if any name is invalid.
pub(super) fn resolve_tags<T: IntoTableRef + Clone>(
    tables: &[T],
    cache: Option<&str>,
) -> Vec<TableRef> {
    let mut out = Vec::with_capacity(tables.len());
    for t in tables {
        match t.clone().into_table_ref() {
            Ok(t) => out.push(t),
            Err(e) => {
                tracing::warn!(
                    cache,
                    error = %e,
                    "invalid table tag: the entry depends on every table instead"
                );
                return Vec::new();
            }
        }
    }
    out
}

/// Hands a cancelled (or panicking) leader's flight over: waiters retry instead
/// of hanging.
struct LeadGuard<'a, K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    cache: &'a Cache<K, V>,
    key: &'a K,
    flight: &'a Arc<Flight<V>>,
    finished: bool,
}

impl<K, V> Drop for LeadGuard<'_, K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut flights = self.cache.flight_shard(self.key).lock();
        if flights
            .get(self.key)
            .is_some_and(|f| Arc::ptr_eq(f, self.flight))
        {
            flights.remove(self.key);
        }
        drop(flights);
        self.flight.abandon();
    }
}
