//! Bytes per cached entry: RSS growth per stored entry, each store in a process
//! of its own (this program re-runs itself once per store and round), next to
//! `quick_cache` (the storage `Cache` is built on), `moka` and a `HashMap` in
//! the same run.
//!
//! ```sh
//! cargo run --release -p pgcachewatch-bench --bin memory -- [--entries 1000000] [--rounds 3]
//! ```
//!
//! Each entry is an `i64` key and a 16-byte `String` value (its heap buffer
//! counts, as it would in a service), every cache sized for exactly the entries
//! stored. RSS is read from `/proc/self/statm` before the store is created and
//! after the last insert. The figure is the median over the rounds; the ratio
//! to `quick_cache` is the target's measure (≤ 1.1 ×).

use std::collections::HashMap;
use std::hint::black_box;
use std::process::Command;

use anyhow::{bail, Context};
use clap::Parser;
use pgcachewatch::Cache;

#[derive(Parser, Debug)]
#[command(about = "bytes per cached entry: pgcachewatch Cache vs quick_cache, moka and HashMap")]
struct Args {
    /// Entries stored in each cache.
    #[arg(long, default_value_t = 1_000_000)]
    entries: u64,
    /// Processes per store; the median is printed.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Internal: measure this store in this process and print its bytes per entry.
    #[arg(long, hide = true)]
    store: Option<String>,
}

const STORES: [&str; 4] = ["pgcachewatch", "quick_cache", "moka", "hashmap"];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.entries == 0 {
        bail!("--entries must be at least 1");
    }
    if let Some(store) = &args.store {
        let bytes = measure(store, args.entries)?;
        println!("{bytes}");
        return Ok(());
    }
    let exe = std::env::current_exe().context("this program's path")?;
    println!(
        "bytes per entry (i64 -> 16-byte String), RSS growth over {} entries, median of {} processes each",
        args.entries, args.rounds
    );
    let mut medians = Vec::new();
    for store in STORES {
        let mut runs = Vec::new();
        for _ in 0..args.rounds.max(1) {
            let out = Command::new(&exe)
                .args(["--store", store, "--entries", &args.entries.to_string()])
                .output()
                .with_context(|| format!("running {} for {store}", exe.display()))?;
            if !out.status.success() {
                bail!(
                    "{store}: {}",
                    String::from_utf8_lossy(&out.stderr).trim_end()
                );
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let bytes: f64 = text
                .trim()
                .parse()
                .with_context(|| format!("{store} printed {text:?}"))?;
            runs.push(bytes);
        }
        runs.sort_by(f64::total_cmp);
        let median = runs[runs.len() / 2];
        medians.push((store, median, runs));
    }
    let quick = medians
        .iter()
        .find(|(s, ..)| *s == "quick_cache")
        .map(|(_, m, _)| *m)
        .unwrap_or(f64::NAN);
    println!(
        "{:<14} {:>10} {:>14}  runs",
        "store", "bytes", "x quick_cache"
    );
    for (store, median, runs) in &medians {
        let runs: Vec<String> = runs.iter().map(|r| format!("{r:.1}")).collect();
        println!(
            "{store:<14} {median:>10.1} {:>14.2}  {}",
            median / quick,
            runs.join(" ")
        );
    }
    println!("target: pgcachewatch <= 1.1 x quick_cache");
    Ok(())
}

fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .context("no resident size in /proc/self/statm")?;
    Ok(pages * 4096)
}

/// RSS growth per entry of `store` holding `n` entries, in this process.
fn measure(store: &str, n: u64) -> anyhow::Result<f64> {
    let capacity = usize::try_from(n).context("--entries does not fit in memory")?;
    let before = rss_bytes()?;
    let after = match store {
        "pgcachewatch" => {
            let cache: Cache<i64, String> = Cache::new(capacity);
            fill(n, |k, v| cache.insert(k, v));
            check(cache.entry_count(), n)?;
            let after = rss_bytes()?;
            black_box(&cache);
            after
        }
        "quick_cache" => {
            let cache = quick_cache::sync::Cache::<i64, String>::new(capacity);
            fill(n, |k, v| cache.insert(k, v));
            check(cache.len() as u64, n)?;
            let after = rss_bytes()?;
            black_box(&cache);
            after
        }
        "moka" => {
            let cache = moka::sync::Cache::<i64, String>::new(n);
            fill(n, |k, v| cache.insert(k, v));
            cache.run_pending_tasks();
            check(cache.entry_count(), n)?;
            let after = rss_bytes()?;
            black_box(&cache);
            after
        }
        "hashmap" => {
            let mut map: HashMap<i64, String> = HashMap::with_capacity(capacity);
            fill(n, |k, v| {
                map.insert(k, v);
            });
            check(map.len() as u64, n)?;
            let after = rss_bytes()?;
            black_box(&map);
            after
        }
        other => bail!("unknown store {other:?}: one of {STORES:?}"),
    };
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

fn fill(n: u64, mut insert: impl FnMut(i64, String)) {
    for i in 0..n {
        let key = i64::try_from(i).unwrap_or(i64::MAX);
        insert(key, format!("{i:016}"));
    }
}

/// quick_cache and moka may refuse an entry at their capacity: a store holding
/// fewer entries than asked would look smaller than it is.
fn check(held: u64, n: u64) -> anyhow::Result<()> {
    if held * 100 < n * 95 {
        bail!("holds only {held} of {n} entries");
    }
    Ok(())
}
