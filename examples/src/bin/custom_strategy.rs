//! A custom invalidation strategy, end to end, with no database.
//!
//! `CoalescePerTable` collects the tables touched by events and drops their entries
//! together at most once every `every`: a burst of writes to one table costs one
//! invalidation instead of hundreds, and a write is never left un-invalidated for
//! longer than `every`. It shows the three parts of the trait a time-based
//! strategy uses: `on_event`, `next_deadline` and `on_tick` (and keeps the default
//! `on_gap`, which drops everything).
//!
//! `cargo run -p pgcachewatch-examples --bin custom_strategy`

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgcachewatch::memory::InMemorySource;
use pgcachewatch::{Cache, Decision, Dispatcher, Event, InvalidationStrategy, Operation, TableRef};

/// Drops the entries of every touched table, at most once per `every`.
#[derive(Debug)]
struct CoalescePerTable {
    every: Duration,
    pending: BTreeSet<TableRef>,
    due: Option<Instant>,
}

impl CoalescePerTable {
    fn new(every: Duration) -> Self {
        CoalescePerTable {
            every,
            pending: BTreeSet::new(),
            due: None,
        }
    }
}

impl<K> InvalidationStrategy<K> for CoalescePerTable {
    fn on_event(&mut self, event: &Event, now: Instant) -> Decision<K> {
        self.pending.insert(event.table_ref());
        self.due.get_or_insert(now + self.every);
        Decision::Nothing
    }

    fn on_tick(&mut self, now: Instant) -> Decision<K> {
        if self.due.is_some_and(|due| due <= now) {
            self.due = None;
            return Decision::tables(std::mem::take(&mut self.pending));
        }
        Decision::Nothing
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.due
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (source, handle) = InMemorySource::pair();
    let cache: Cache<String, u64> = Cache::builder().name("counts").capacity(1_000).build();
    let dispatcher = Dispatcher::new()
        .attach(
            CoalescePerTable::new(Duration::from_millis(50)),
            cache.clone(),
        )
        .spawn(&source);

    let load = |key: &'static str, table: &'static str, v: u64| {
        let cache = cache.clone();
        async move {
            cache
                .get_or_load_tagged(key.to_string(), &[table], || async move {
                    Ok::<_, std::io::Error>(v)
                })
                .await
        }
    };
    load("n_users", "users", 10).await?;
    load("n_orders", "orders", 20).await?;

    // A burst of 500 writes to `users`.
    for _ in 0..500 {
        handle.publish(Event::new(
            "pgcachewatch",
            Operation::Update,
            "public",
            "users",
        ));
    }
    dispatcher.sync().await;
    println!(
        "right after the burst: n_users cached = {:?} (deferred)",
        cache.get(&"n_users".to_string())
    );

    tokio::time::sleep(Duration::from_millis(80)).await;
    dispatcher.sync().await;
    println!(
        "after the window:      n_users cached = {:?} (dropped)",
        cache.get(&"n_users".to_string())
    );
    println!(
        "                       n_orders cached = {:?} (other table: kept)",
        cache.get(&"n_orders".to_string())
    );

    let d = dispatcher.stats();
    let c = cache.stats();
    println!(
        "events: {}, ticks: {}, table invalidations applied: {} (one for the whole burst)",
        d.events, d.ticks, c.invalidations
    );
    dispatcher.shutdown().await;
    Ok(())
}
