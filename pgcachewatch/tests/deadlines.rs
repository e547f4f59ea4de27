//! The dispatcher fires time-based strategies at their deadlines, on tokio's clock
//! (so tests with a paused clock are deterministic).

use std::time::{Duration, Instant};

use pgcachewatch::memory::InMemorySource;
use pgcachewatch::{Cache, Decision, Dispatcher, Event, InvalidationStrategy, Operation};

/// Drops everything `delay` after the first event it sees.
#[derive(Debug)]
struct Later {
    delay: Duration,
    due: Option<Instant>,
}

impl<K> InvalidationStrategy<K> for Later {
    fn on_event(&mut self, _: &Event, now: Instant) -> Decision<K> {
        self.due.get_or_insert(now + self.delay);
        Decision::Nothing
    }
    fn on_tick(&mut self, now: Instant) -> Decision<K> {
        match self.due {
            Some(due) if due <= now => {
                self.due = None;
                Decision::All
            }
            _ => Decision::Nothing,
        }
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.due
    }
}

#[tokio::test(start_paused = true)]
async fn a_deferred_invalidation_fires_at_its_deadline_not_before() {
    let (source, handle) = InMemorySource::pair();
    let cache: Cache<u32, u32> = Cache::new(10);
    let strategy = Later {
        delay: Duration::from_secs(5),
        due: None,
    };
    let d = Dispatcher::new()
        .attach(strategy, cache.clone())
        .spawn(&source);
    cache
        .get_or_load(1, || async { Ok::<_, std::io::Error>(1) })
        .await
        .expect("loads");
    handle.publish(Event::new("ch", Operation::Update, "public", "t"));
    d.sync().await;

    tokio::time::sleep(Duration::from_millis(4_900)).await;
    d.sync().await;
    assert_eq!(cache.get(&1), Some(1), "fired before its deadline");

    tokio::time::sleep(Duration::from_millis(200)).await;
    d.sync().await;
    assert_eq!(cache.get(&1), None, "did not fire at its deadline");
    assert_eq!(d.stats().ticks, 1);
    d.shutdown().await;
}
