//! What the cache keeps per key, and the storage around it: the weigher, the
//! eviction listener, and why an entry left ([`RemovalCause`]).

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::generations::{generation_of, plain_word, Generations, Stamp, TableStamp};

/// Why an entry left the cache, as told to an
/// [eviction listener](super::CacheBuilder::eviction_listener).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RemovalCause {
    /// Older than the time-to-live, or idle longer than the time-to-idle.
    Expired,
    /// Invalidated by a decision: its key, or a table it depends on, was written.
    Invalidated,
    /// Dropped by an invalidate-all: a gap (events may have been lost), an
    /// attaching or stopping dispatcher, or [`Decision::All`](crate::Decision::All).
    Flushed,
    /// Evicted to stay within the capacity (entries or weight).
    Size,
    /// Replaced by a newer value for the same key.
    Replaced,
    /// Removed by [`Cache::remove`](super::Cache::remove).
    Explicit,
}

impl RemovalCause {
    /// Whether the cache removed the entry by its own policy (time or size),
    /// rather than because its data changed or you removed it.
    pub fn was_evicted(self) -> bool {
        matches!(self, RemovalCause::Expired | RemovalCause::Size)
    }
}

/// The listener's type: key, value, cause.
pub(crate) type Listener<K, V> = Arc<dyn Fn(&K, V, RemovalCause) + Send + Sync>;
/// The weigher's type: the weight of one entry.
pub(crate) type WeighFn<K, V> = Arc<dyn Fn(&K, &V) -> u64 + Send + Sync>;

/// One cached value and what decides whether it may still be served.
///
/// Kept to two words (for a pointer-sized value), because every hit clones it
/// inside the storage's read lock: measured, a 32-byte entry made hits about a
/// third slower than a 16-byte one (`bench --quick`, "hit path"). An entry of a
/// cache without time limits, eviction listener or unhealthy serving, and
/// without tags, is its value and its generation; everything else lives out of
/// line in [`Meta`], shared by its clones.
#[derive(Clone)]
pub(crate) struct Entry<V> {
    pub(crate) value: V,
    stamp: Packed,
}

/// What only some entries need: tags, age, idleness, identity for the listener.
struct Meta {
    /// The generation its load started in (`untagged`, or `all` when tagged).
    gen: u64,
    tags: Option<Arc<[TableStamp]>>,
    /// `all` when the load started (tells a flush from an invalidation).
    all: u64,
    /// When its load started, in nanoseconds since [`epoch`] (TTL and the
    /// unhealthy bound count from here).
    born: u64,
    /// Tells this entry apart from a later one for the same key.
    serial: u64,
    /// Last read, in nanoseconds since [`epoch`]; with a time-to-idle.
    last_read: Option<AtomicU64>,
}

/// What an entry needs kept beyond the generation.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Needs {
    /// Its age (a time-to-live, or serving while unhealthy within a bound).
    pub(crate) age: bool,
    /// Its last read (a time-to-idle).
    pub(crate) idle: bool,
    /// An identity (an eviction listener), given as the serial.
    pub(crate) serial: Option<u64>,
}

impl<V> Entry<V> {
    /// An entry for a load stamped `stamp` that started at `loaded_at`.
    pub(crate) fn new(value: V, stamp: Stamp, loaded_at: Instant, needs: Needs) -> Self {
        let packed = if stamp.tags.is_none() && !needs.age && !needs.idle && needs.serial.is_none()
        {
            Packed::generation(stamp.gen)
        } else {
            Packed::meta(Arc::new(Meta {
                gen: stamp.gen,
                tags: stamp.tags,
                all: stamp.all,
                born: nanos_of(loaded_at),
                serial: needs.serial.unwrap_or(0),
                last_read: needs.idle.then(|| AtomicU64::new(nanos_since_epoch())),
            }))
        };
        Entry {
            value,
            stamp: packed,
        }
    }

    /// Whether the hit path may serve it on one comparison with the
    /// [`gate`](Generations::gate): a plain entry (no tags, times or identity)
    /// of the current generation, while the cache is healthy. An entry this
    /// turns away may still be servable: the full checks decide.
    #[inline]
    pub(crate) fn passes(&self, gate: u64) -> bool {
        self.stamp.word == gate
    }

    /// Whether nothing it depends on was invalidated since its load started.
    #[inline]
    pub(crate) fn is_current(&self, gens: &Generations) -> bool {
        match self.stamp.get() {
            Unpacked::Generation(gen) => gens.is_current_parts(gen, None),
            Unpacked::Meta(m) => gens.is_current_parts(m.gen, m.tags.as_deref()),
        }
    }

    fn meta(&self) -> Option<&Meta> {
        match self.stamp.get() {
            Unpacked::Generation(_) => None,
            Unpacked::Meta(m) => Some(m),
        }
    }

    /// For a stale entry: whether a flush (rather than an invalidation) killed it.
    pub(crate) fn flushed(&self, gens: &Generations) -> bool {
        self.meta().is_some_and(|m| gens.flushed_since(m.all))
    }

    /// How long ago its load started (zero if its cache keeps no ages: one
    /// without a time-to-live that never serves while unhealthy).
    pub(crate) fn age(&self) -> Duration {
        self.meta().map_or(Duration::ZERO, |m| {
            Duration::from_nanos(nanos_since_epoch().saturating_sub(m.born))
        })
    }

    pub(crate) fn serial(&self) -> Option<u64> {
        self.meta().map(|m| m.serial)
    }

    pub(crate) fn touch(&self) {
        if let Some(last) = self.meta().and_then(|m| m.last_read.as_ref()) {
            last.store(nanos_since_epoch(), Ordering::Relaxed);
        }
    }

    pub(crate) fn idle_longer_than(&self, tti: Duration) -> bool {
        self.meta()
            .and_then(|m| m.last_read.as_ref())
            .is_some_and(|last| {
                let idle = nanos_since_epoch().saturating_sub(last.load(Ordering::Relaxed));
                u128::from(idle) > tti.as_nanos()
            })
    }
}

/// One word that is either a generation or an owned `Arc<Meta>`: a generation
/// is stored as its [`plain_word`] (odd), a pointer as itself (even: `Meta` is
/// aligned to 8).
struct Packed {
    word: u64,
    /// Owns an `Arc<Meta>` when the word is a pointer (and gets `Arc`'s
    /// `Send`/`Sync`).
    _owns: PhantomData<Arc<Meta>>,
}

enum Unpacked<'a> {
    Generation(u64),
    Meta(&'a Meta),
}

impl Packed {
    fn generation(gen: u64) -> Self {
        debug_assert!(gen < 1 << 62, "generation out of range");
        Packed {
            word: plain_word(gen),
            _owns: PhantomData,
        }
    }

    fn meta(meta: Arc<Meta>) -> Self {
        let word = Arc::into_raw(meta) as usize as u64;
        debug_assert_eq!(word & 1, 0, "Meta is aligned");
        Packed {
            word,
            _owns: PhantomData,
        }
    }

    fn pointer(&self) -> Option<*const Meta> {
        (self.word & 1 == 0).then_some(self.word as usize as *const Meta)
    }

    #[inline]
    fn get(&self) -> Unpacked<'_> {
        match self.pointer() {
            None => Unpacked::Generation(generation_of(self.word)),
            // SAFETY: an even word came from `Arc::into_raw` in `meta` and this
            // `Packed` holds one strong count, so the `Meta` lives at least as
            // long as `self`.
            Some(p) => Unpacked::Meta(unsafe { &*p }),
        }
    }
}

impl Clone for Packed {
    #[inline]
    fn clone(&self) -> Self {
        if let Some(p) = self.pointer() {
            // SAFETY: `p` came from `Arc::into_raw` and `self` holds a strong
            // count, so the allocation is live; the clone owns the new count.
            unsafe { Arc::increment_strong_count(p) };
        }
        Packed {
            word: self.word,
            _owns: PhantomData,
        }
    }
}

impl Drop for Packed {
    #[inline]
    fn drop(&mut self) {
        if let Some(p) = self.pointer() {
            // SAFETY: `p` came from `Arc::into_raw`, and this `Packed` owns one
            // strong count, given back exactly once here.
            drop(unsafe { Arc::from_raw(p) });
        }
    }
}

/// A process-wide origin for compact timestamps; set when the first cache is
/// built, before any of its loads starts.
pub(crate) fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub(crate) fn nanos_since_epoch() -> u64 {
    nanos_of(Instant::now())
}

fn nanos_of(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// The weigher handed to `quick_cache`: the user's, or one per entry.
pub(crate) struct Weigher<K, V>(pub(crate) Option<WeighFn<K, V>>);

impl<K, V> Clone for Weigher<K, V> {
    fn clone(&self) -> Self {
        Weigher(self.0.clone())
    }
}

impl<K, V> quick_cache::Weighter<K, Entry<V>> for Weigher<K, V> {
    fn weight(&self, key: &K, entry: &Entry<V>) -> u64 {
        // Zero would make an entry unevictable: every entry weighs at least 1.
        self.0.as_ref().map_or(1, |w| w(key, &entry.value).max(1))
    }
}

/// The lifecycle handed to `quick_cache`: reports size evictions to the listener.
pub(crate) struct Evictions<K, V>(pub(crate) Option<Listener<K, V>>);

impl<K, V> Clone for Evictions<K, V> {
    fn clone(&self) -> Self {
        Evictions(self.0.clone())
    }
}

impl<K, V> quick_cache::Lifecycle<K, Entry<V>> for Evictions<K, V> {
    type RequestState = ();

    fn begin_request(&self) -> Self::RequestState {}

    fn on_evict(&self, _state: &mut Self::RequestState, key: K, entry: Entry<V>) {
        if let Some(listener) = &self.0 {
            listener(&key, entry.value, RemovalCause::Size);
        }
    }
}

/// The storage: a bounded concurrent map of entries.
pub(crate) type Store<K, V> = quick_cache::sync::Cache<
    K,
    Entry<V>,
    Weigher<K, V>,
    quick_cache::DefaultHashBuilder,
    Evictions<K, V>,
>;

impl<V> fmt::Debug for Entry<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("age", &self.age())
            .field("serial", &self.serial())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::generations::Generations;

    #[test]
    fn a_plain_entry_is_two_words() {
        assert_eq!(std::mem::size_of::<Entry<Arc<String>>>(), 16);
    }

    #[test]
    fn packed_generations_and_metadata_read_back_and_are_freed() {
        let gens = Generations::new(true);
        let stamp = gens.stamp(&[]);
        let plain = Entry::new(1u8, stamp.clone(), Instant::now(), Needs::default());
        assert!(plain.is_current(&gens) && plain.serial().is_none());
        let needs = Needs {
            age: true,
            idle: true,
            serial: Some(7),
        };
        let rich = Entry::new(2u8, stamp, Instant::now(), needs);
        let copies: Vec<_> = (0..3).map(|_| rich.clone()).collect();
        assert!(copies
            .iter()
            .all(|c| c.is_current(&gens) && c.serial() == Some(7)));
        let Some(p) = rich.stamp.pointer() else {
            panic!("metadata expected")
        };
        // SAFETY: `rich` holds a count, so the allocation is live.
        let meta = unsafe { Arc::from_raw(p) };
        assert_eq!(Arc::strong_count(&meta), 4);
        drop(copies);
        assert_eq!(Arc::strong_count(&meta), 1);
        std::mem::forget(meta);
        gens.bump_all();
        assert!(!plain.is_current(&gens) && !rich.is_current(&gens));
        assert!(rich.flushed(&gens));
    }
}
