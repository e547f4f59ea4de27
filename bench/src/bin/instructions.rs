//! The hot paths' work per operation, counted in instructions next to a
//! baseline counted the same way. Run it through `bash bench/instructions.sh`,
//! which runs each mode under callgrind (valgrind) and divides: unlike a time,
//! an instruction count does not move with a busy machine, so a change of a few
//! percent shows.
//!
//! `instructions MODE N` runs N operations of MODE inside a function named
//! `measure_…` (the script counts only those):
//!
//! * `hit`: [`Cache::get`] on warm keys (as `bench`'s hit path);
//! * `quick-hit`: `quick_cache::sync::Cache::get` on the same keys, the baseline;
//! * `burst-event`: what the listener does for each notification of a burst
//!   once sqlx has decoded it: [`PayloadParser::parse_shared`], emitted in
//!   batches of 256 with [`SignalHub::send_batch`] into an inline
//!   [`Dispatcher`] → [`Greedy`] → [`Cache`], then [`PayloadParser::recycle`]d;
//! * `burst-event-alloc`: the same, each event allocated and freed (not
//!   recycled), the baseline;
//! * `keyed-table-event`: [`Keyed::on_event`] for a keyless event of a mapped
//!   table (table-level triggers, `TRUNCATE`): the whole table is dropped;
//! * `keyed-table-event-owned`: the table list of that decision built as it was
//!   before [`TableRef`] held [`Name`](pgcachewatch::Name)s (the schema and
//!   table copied into new `String`s), the baseline;
//! * `replication-event`: the replication source's decode, without a server:
//!   a pgoutput stream of N single-row `UPDATE` transactions (`Begin`, the
//!   `Relation` once, `Update` whose new row carries the key, `Commit`; each
//!   message behind a 2-byte length) read by
//!   [`pgoutput_stream`] (the
//!   fuzz targets' entry point): every message decoded and assembled into
//!   transactions, one event each (with its row key), as the source's task
//!   does before it publishes; the transactions are then dropped;
//! * `replication-frames`: the same bytes only framed, the baseline: each
//!   message's length and type byte read, every byte summed, no event;
//! * `nats-event`: the `NatsSource`'s parse of N relay messages (events of one
//!   row key each, as the relay writes them) with
//!   [`WireMessage::from_json`], each then dropped;
//! * `nats-bytes`: the same payloads, every byte summed: what a raw consumer
//!   does with a payload it does not read, the baseline;
//! * `nats-value`: the same payloads parsed as a `serde_json::Value`: any JSON
//!   reader's work, a second reference.
//!
//! Every mode also prints the heap allocations per operation (counted by this
//! program's allocator) on stdout.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use pgcachewatch::nats::wire::{WireKind, WireMessage};
use pgcachewatch::source_kit::{PayloadParser, SignalHub};
use pgcachewatch::strategies::{Greedy, Keyed};
use pgcachewatch::{
    Cache, Decision, Dispatcher, Event, Health, InvalidationStrategy, Lsn, Operation, RowKey,
    TableRef,
};
use pgcachewatch_backends::fuzzing::pgoutput_stream;
use pgcachewatch_bench::{emit_batch, parse_batch, BATCH};

const KEYS: u64 = 1000;

/// The system allocator, counting allocations (for the per-operation figure).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let n: u64 = args
        .next()
        .context("usage: instructions MODE N")?
        .parse()
        .context("N: a number of operations")?;
    match mode.as_str() {
        "hit" => {
            let cache: Cache<u64, Arc<String>> = Cache::new(10_000);
            for k in 0..KEYS {
                cache.insert(k, value(k));
            }
            counted(n, || measure_hit(&cache, n));
            if cache.stats().hits != n {
                bail!("measured misses, not hits: {:?}", cache.stats());
            }
        }
        "quick-hit" => {
            let cache = quick_cache::sync::Cache::<u64, Arc<String>>::new(10_000);
            for k in 0..KEYS {
                cache.insert(k, value(k));
            }
            counted(n, || measure_quick_hit(&cache, n));
        }
        "burst-event" | "burst-event-alloc" => burst(n, mode == "burst-event")?,
        "keyed-table-event" | "keyed-table-event-owned" => {
            keyed(n, mode == "keyed-table-event-owned")?
        }
        "replication-event" => {
            let stream = pgoutput_updates(n);
            let mut committed = 0;
            counted(n, || committed = measure_replication(&stream));
            if committed as u64 != n {
                bail!("{committed} of {n} transactions assembled");
            }
        }
        "replication-frames" => {
            let stream = pgoutput_updates(n);
            let mut commits = 0;
            counted(n, || commits = measure_replication_frames(&stream).0);
            if commits != n {
                bail!("{commits} of {n} commits framed");
            }
        }
        "nats-event" | "nats-bytes" | "nats-value" => {
            let payloads = relay_messages(n);
            let mut read = 0;
            counted(n, || {
                read = match mode.as_str() {
                    "nats-event" => measure_nats_event(&payloads),
                    "nats-bytes" => measure_nats_bytes(&payloads),
                    _ => measure_nats_value(&payloads),
                }
            });
            if read != n {
                bail!("{read} of {n} relay messages read");
            }
        }
        _ => bail!(
            "unknown mode {mode:?}: hit, quick-hit, burst-event, burst-event-alloc, \
             keyed-table-event, keyed-table-event-owned, replication-event, \
             replication-frames, nats-event, nats-bytes or nats-value"
        ),
    }
    Ok(())
}

/// Runs `measure` and prints the allocations it made per operation.
fn counted(n: u64, measure: impl FnOnce()) {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    measure();
    let made = ALLOCATIONS.load(Ordering::Relaxed) - before;
    println!("allocations per operation: {:.2}", made as f64 / n as f64);
}

fn keyed(n: u64, owned: bool) -> anyhow::Result<()> {
    let mut keyed = Keyed::per_table().table("public.users", |_: &Event, row: &RowKey| {
        row.get("id").and_then(|v| v.as_i64())
    });
    let event = Event::new("pgcachewatch", Operation::Update, "public", "users");
    let expected: Decision<i64> = Decision::tables([TableRef::new("public", "users")]);
    if keyed.on_event(&event, Instant::now()) != expected {
        bail!("Keyed did not drop the table for a keyless event");
    }
    counted(n, || {
        if owned {
            measure_keyed_owned(&event, n)
        } else {
            measure_keyed(&mut keyed, &event, n)
        }
    });
    Ok(())
}

#[inline(never)]
fn measure_keyed(keyed: &mut Keyed<i64>, event: &Event, n: u64) {
    let now = Instant::now();
    for _ in 0..n {
        black_box(keyed.on_event(black_box(event), now));
    }
}

/// `TableRef` as it was: the schema and table in `String`s of their own.
struct OwnedTableRef {
    _schema: Option<String>,
    _table: String,
}

#[inline(never)]
fn measure_keyed_owned(event: &Event, n: u64) {
    for _ in 0..n {
        let event = black_box(event);
        // What `Decision::tables([event.table_ref()])` allocated: the list and
        // the two names.
        let tables = vec![OwnedTableRef {
            _schema: event.schema.as_deref().map(str::to_owned),
            _table: event.table.to_string(),
        }];
        black_box(tables);
    }
}

fn value(k: u64) -> Arc<String> {
    Arc::new(format!("value of {k}"))
}

#[inline(never)]
fn measure_hit(cache: &Cache<u64, Arc<String>>, n: u64) {
    for i in 0..n {
        black_box(cache.get(&(i % KEYS)));
    }
}

#[inline(never)]
fn measure_quick_hit(cache: &quick_cache::sync::Cache<u64, Arc<String>>, n: u64) {
    for i in 0..n {
        black_box(cache.get(&(i % KEYS)));
    }
}

fn burst(n: u64, reuse: bool) -> anyhow::Result<()> {
    let payloads = pgcachewatch_bench::burst_payloads(n);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let hub = SignalHub::with_health(1024, Health::Healthy);
        let cache: Cache<u64, u64> = Cache::new(16);
        let dispatcher = Dispatcher::new()
            .attach(Greedy::new(), cache.clone())
            .spawn(&hub);
        let mut parser = PayloadParser::new();
        counted(n, || {
            measure_burst(&hub, &mut parser, &payloads, Utc::now(), reuse)
        });
        let applied = dispatcher.stats().events;
        if applied != n {
            bail!("{applied} of {n} events applied");
        }
        Ok(())
    })
}

#[inline(never)]
fn measure_burst(
    hub: &SignalHub,
    parser: &mut PayloadParser,
    payloads: &[String],
    received_at: DateTime<Utc>,
    reuse: bool,
) {
    let mut batch = Vec::with_capacity(BATCH);
    for chunk in payloads.chunks(BATCH) {
        parse_batch(parser, chunk, received_at, &mut batch);
        emit_batch(hub, parser, &mut batch, reuse);
    }
}

/// The relation id of the table the pgoutput stream changes.
const RELATION: u32 = 16_384;

/// Appends one pgoutput message behind its 2-byte big-endian length (the
/// framing [`pgoutput_stream`] reads).
fn framed(stream: &mut Vec<u8>, message: &[u8]) {
    let len = u16::try_from(message.len()).expect("a short message");
    stream.extend_from_slice(&len.to_be_bytes());
    stream.extend_from_slice(message);
}

/// A pgoutput (version 1) column value in text form.
fn text_datum(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b't');
    out.extend_from_slice(&i32::try_from(text.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(text);
}

/// What the walsender sends for `n` transactions of one
/// `UPDATE public.users SET name = … WHERE id = …` each (the key unchanged, so
/// no old tuple; `REPLICA IDENTITY DEFAULT`: `id` is flagged as the key), the
/// relation described once, in the first transaction.
fn pgoutput_updates(n: u64) -> Vec<u8> {
    // Microseconds since 2000-01-01: some time in 2025.
    const COMMIT_TIME: i64 = 800_000_000_000_000;
    let mut relation = vec![b'R'];
    relation.extend_from_slice(&RELATION.to_be_bytes());
    relation.extend_from_slice(b"public\0users\0");
    relation.push(b'd');
    relation.extend_from_slice(&2i16.to_be_bytes());
    for (flags, name, type_oid) in [(1u8, &b"id"[..], 20u32), (0, b"name", 25)] {
        relation.push(flags);
        relation.extend_from_slice(name);
        relation.push(0);
        relation.extend_from_slice(&type_oid.to_be_bytes());
        relation.extend_from_slice(&(-1i32).to_be_bytes());
    }
    let mut stream = Vec::new();
    let mut message = Vec::new();
    for i in 0..n {
        let lsn = 0x1_0000_0000 + i * 256;
        let time = COMMIT_TIME + i as i64;
        let xid = 1000 + i as u32;
        message.clear();
        message.push(b'B');
        message.extend_from_slice(&(lsn + 128).to_be_bytes());
        message.extend_from_slice(&time.to_be_bytes());
        message.extend_from_slice(&xid.to_be_bytes());
        framed(&mut stream, &message);
        if i == 0 {
            framed(&mut stream, &relation);
        }
        message.clear();
        message.push(b'U');
        message.extend_from_slice(&RELATION.to_be_bytes());
        message.push(b'N');
        message.extend_from_slice(&2i16.to_be_bytes());
        text_datum(&mut message, (i % KEYS).to_string().as_bytes());
        text_datum(&mut message, format!("user number {i}").as_bytes());
        framed(&mut stream, &message);
        message.clear();
        message.push(b'C');
        message.push(0);
        message.extend_from_slice(&(lsn + 128).to_be_bytes());
        message.extend_from_slice(&(lsn + 176).to_be_bytes());
        message.extend_from_slice(&time.to_be_bytes());
        framed(&mut stream, &message);
    }
    stream
}

/// Decoded and assembled: the transactions committed.
#[inline(never)]
fn measure_replication(stream: &[u8]) -> usize {
    pgoutput_stream(black_box(stream))
}

/// Framed only: (commits seen, the sum of every byte).
#[inline(never)]
fn measure_replication_frames(stream: &[u8]) -> (u64, u8) {
    let mut rest = black_box(stream);
    let mut commits = 0;
    let mut sum = 0u8;
    while let [hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (message, after) = tail.split_at(len);
        rest = after;
        if let Some((&tag, body)) = message.split_first() {
            commits += u64::from(tag == b'C');
            sum = body
                .iter()
                .fold(sum.wrapping_add(tag), |s, b| s.wrapping_add(*b));
        }
    }
    black_box((commits, sum))
}

/// `n` relay messages, each an event of one row key as the relay publishes
/// what the replication source read (its slot, position and xid).
fn relay_messages(n: u64) -> Vec<Vec<u8>> {
    let epoch = "pg:7312345678901234567/slot:pgcachewatch/5f0c2a9e4b7d4c1f";
    (0..n)
        .map(|i| {
            let event = Event::new("pgcachewatch", Operation::Update, "public", "users")
                .with_keys(vec![RowKey::single("id", i % KEYS)])
                .with_txid(1000 + i as i64)
                .with_lsn(Lsn(0x1_0000_0000 + i * 256));
            WireMessage {
                epoch: epoch.into(),
                kind: WireKind::Event(event),
            }
            .to_json()
        })
        .collect()
}

/// Parsed into events: the events read.
#[inline(never)]
fn measure_nats_event(payloads: &[Vec<u8>]) -> u64 {
    let mut events = 0;
    for payload in payloads {
        if let Ok(message) = WireMessage::from_json(black_box(payload)) {
            events += u64::from(matches!(message.kind, WireKind::Event(_)));
            black_box(message);
        }
    }
    events
}

/// Every byte summed: the payloads read.
#[inline(never)]
fn measure_nats_bytes(payloads: &[Vec<u8>]) -> u64 {
    let mut read = 0;
    for payload in payloads {
        let sum = black_box(payload)
            .iter()
            .fold(0u8, |s, b| s.wrapping_add(*b));
        black_box(sum);
        read += 1;
    }
    read
}

/// Parsed as `serde_json::Value`s: the objects read.
#[inline(never)]
fn measure_nats_value(payloads: &[Vec<u8>]) -> u64 {
    let mut read = 0;
    for payload in payloads {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(black_box(payload)) {
            read += u64::from(value.is_object());
            black_box(value);
        }
    }
    read
}
