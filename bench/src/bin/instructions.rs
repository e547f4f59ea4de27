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
//!   recycled), the baseline.

use std::hint::black_box;
use std::sync::Arc;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use pgcachewatch::strategies::Greedy;
use pgcachewatch::{Cache, Dispatcher, Health, PayloadParser, SignalHub};
use pgcachewatch_bench::{emit_batch, parse_batch, BATCH};

const KEYS: u64 = 1000;

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
            measure_hit(&cache, n);
            if cache.stats().hits != n {
                bail!("measured misses, not hits: {:?}", cache.stats());
            }
        }
        "quick-hit" => {
            let cache = quick_cache::sync::Cache::<u64, Arc<String>>::new(10_000);
            for k in 0..KEYS {
                cache.insert(k, value(k));
            }
            measure_quick_hit(&cache, n);
        }
        "burst-event" | "burst-event-alloc" => burst(n, mode == "burst-event")?,
        _ => bail!("unknown mode {mode:?}: hit, quick-hit, burst-event or burst-event-alloc"),
    }
    Ok(())
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
        measure_burst(&hub, &mut parser, &payloads, Utc::now(), reuse);
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
