//! Replays a recorded event log into a strategy under a virtual clock and prints
//! every decision with the event, gap or deadline tick that caused it.
//!
//! ```text
//! cargo run -p pgcachewatch-examples --bin replay                      # a shipped fixture, Greedy
//! cargo run -p pgcachewatch-examples --bin replay -- events.jsonl --strategy windowed
//! cargo run -p pgcachewatch-examples --bin replay -- --strategy timed --interval-ms 50 --speed 1
//! ```
//!
//! Record your own log with `pgcachewatch record events.jsonl --duration 30s`.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use pgcachewatch::strategies::{Greedy, Timed, Windowed};
use pgcachewatch::testkit::eventlog::EventLogReader;
use pgcachewatch::testkit::replay::{Replayer, Speed};
use pgcachewatch::InvalidationStrategy;

/// The fixture replayed when no LOG is given.
const DEFAULT_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../testkit/fixtures/mixed_writes.jsonl"
);

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StrategyName {
    /// Drop everything on every event.
    Greedy,
    /// Drop everything once per batch of events (count or time window).
    Windowed,
    /// Drop everything at most once per interval.
    Timed,
}

/// Replay an event log and print the invalidation decisions.
#[derive(Debug, Parser)]
struct Args {
    /// The event log (JSON lines, as `pgcachewatch record` writes it). Default: a
    /// fixture recorded from PostgreSQL and shipped with the testkit.
    log: Option<PathBuf>,
    /// The strategy to replay into.
    #[arg(long, value_enum, default_value_t = StrategyName::Greedy)]
    strategy: StrategyName,
    /// Windowed: flush after this many events.
    #[arg(long, default_value_t = 10)]
    max_events: usize,
    /// Windowed: flush this long after the first event of a batch (milliseconds).
    #[arg(long, default_value_t = 100)]
    window_ms: u64,
    /// Timed: the minimum time between flushes (milliseconds).
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Replay speed: 0 (default) as fast as possible, 1 recorded speed, 10 ten times faster.
    #[arg(long, default_value_t = 0.0)]
    speed: f64,
}

fn strategy(args: &Args) -> Box<dyn InvalidationStrategy<String>> {
    match args.strategy {
        StrategyName::Greedy => Box::new(Greedy::new()),
        StrategyName::Windowed => Box::new(Windowed::new(
            args.max_events,
            Duration::from_millis(args.window_ms),
        )),
        StrategyName::Timed => Box::new(Timed::new(Duration::from_millis(args.interval_ms))),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let path = args
        .log
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_FIXTURE));
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let reader = EventLogReader::new(BufReader::new(file))
        .with_context(|| format!("reading {}", path.display()))?;
    let header = reader.header().clone();
    println!("log:      {}", path.display());
    if let Some(source) = &header.source {
        println!("source:   {source}");
    }
    if let Some(at) = header.recorded_at {
        println!("recorded: {at}");
    }
    println!("strategy: {:?}\n", strategy(&args));

    let speed = if args.speed > 0.0 {
        Speed::Scaled { factor: args.speed }
    } else {
        Speed::AsFastAsPossible
    };
    let report = Replayer::new(strategy(&args))
        .speed(speed)
        .run_reader(reader)
        .with_context(|| format!("replaying {}", path.display()))?;
    println!("{report}");
    Ok(())
}
