//! `NatsSource` ingest next to a raw `async-nats` consumer reading the same
//! stream, in one run.
//!
//! Each round, for each reader in turn (alternating which goes first; the
//! other is not running):
//!
//! 1. the reader starts at the end of a fresh in-memory stream;
//! 2. `--messages` relay event messages (the relay's own JSON,
//!    [`WireMessage::to_json`], of an `UPDATE` event with a row key and a
//!    commit position, about the size the relay publishes) are published with
//!    core NATS publishes, as fast as the client sends them: publishing is
//!    not the bottleneck, reading is;
//! 3. the reader's time is taken from the first publish to its last message.
//!
//! The readers:
//!
//! * **`NatsSource`**: parses each message into an event and delivers it to a
//!   subscription (counted by a task reading it);
//! * **`NatsSource` → cache**: the path a service runs: the source with an
//!   inline [`Dispatcher`] attached (no subscription, no second task), each
//!   event applied by [`Keyed`] to a [`Cache`] (counted by the strategy);
//! * **raw consumer**: a pull consumer with the settings `NatsSource` uses
//!   (from the stream's end, no acknowledgements, consumer state in memory)
//!   that reads every payload byte and nothing more.
//!
//! It prints messages/s per reader per round and the median ratios to the raw
//! consumer (target ≥ 0.8).
//!
//! `cargo run --release -p pgcachewatch-bench --bin nats_ingest [-- --messages 50000 --rounds 5]`
//! (`NATS_URL`, default `nats://127.0.0.1:4222`, with JetStream).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use clap::Parser;
use futures::StreamExt;
use pgcachewatch::nats::wire::{WireKind, WireMessage};
use pgcachewatch::nats::{NatsConnect, NatsSource, StreamSettings};
use pgcachewatch::strategies::Keyed;
use pgcachewatch::{
    Cache, Decision, Dispatcher, Event, EventSource, GapReason, InvalidationStrategy, Lsn,
    Operation, RowKey, Signal,
};

#[derive(Parser)]
struct Args {
    /// NATS with JetStream.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Messages per reader per round.
    #[arg(long, default_value_t = 50_000)]
    messages: usize,
    /// Rounds (each times both readers).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Clone, Copy)]
enum Reader {
    Source,
    Cached,
    Raw,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The library's logs, where RUST_LOG asks for them (off by default).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    anyhow::ensure!(
        args.messages > 0 && args.rounds > 0,
        "--messages and --rounds must be above 0"
    );
    let client = NatsConnect::new(&args.nats_url)
        .name("pgcw-bench-ingest")
        .connect()
        .await
        .context("connecting to NATS (NATS_URL)")?;
    let js = async_nats::jetstream::new(client.clone());
    let payloads = payloads(args.messages);
    println!(
        "NatsSource ingest: {} relay event messages of {} B per reader per round, core-published into an in-memory stream (messages/s)\n",
        args.messages,
        payloads[0].len()
    );
    println!("round    NatsSource    NatsSource → cache    raw consumer    ratios");
    let (mut ratios, mut cached_ratios) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [Reader::Source, Reader::Cached, Reader::Raw]
        } else {
            [Reader::Raw, Reader::Cached, Reader::Source]
        };
        let (mut source_rate, mut cached_rate, mut raw_rate) = (0.0, 0.0, 0.0);
        for reader in order {
            let stream = StreamSettings::new()
                .stream(format!("PGCWINGEST_{}_{round}", std::process::id()))
                .subject_prefix(format!("pgcwingest_{}_{round}", std::process::id()))
                .memory(true);
            stream.ensure(&js).await.context("creating the stream")?;
            let result = match reader {
                Reader::Source => time_source(&args, &client, &stream, &payloads).await,
                Reader::Cached => time_cached(&args, &client, &stream, &payloads).await,
                Reader::Raw => time_raw(&args, &client, &js, &stream, &payloads).await,
            };
            let _ = js.delete_stream(stream.name()).await;
            let rate = args.messages as f64 / result?.as_secs_f64();
            match reader {
                Reader::Source => source_rate = rate,
                Reader::Cached => cached_rate = rate,
                Reader::Raw => raw_rate = rate,
            }
        }
        let (ratio, cached_ratio) = (source_rate / raw_rate, cached_rate / raw_rate);
        ratios.push(ratio);
        cached_ratios.push(cached_ratio);
        println!(
            "{round:>5} {source_rate:>13.0} {cached_rate:>21.0} {raw_rate:>15.0}    {ratio:.3}, {cached_ratio:.3}"
        );
    }
    for (what, mut ratios) in [
        ("NatsSource (subscription)", ratios),
        ("NatsSource → cache (inline)", cached_ratios),
    ] {
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        println!(
            "median {what} ÷ raw consumer: {median:.3} (target ≥ 0.8: {})",
            if median >= 0.8 { "met" } else { "not met" }
        );
    }
    Ok(())
}

/// The relay's JSON for `n` one-row UPDATE events at growing positions.
fn payloads(n: usize) -> Vec<bytes::Bytes> {
    (0..n)
        .map(|i| {
            let event = Event::new("pgcachewatch", Operation::Update, "public", "items")
                .with_keys(vec![RowKey::single("id", i as i64)])
                .with_txid(741 + i as i64)
                .with_lsn(Lsn(0x234_CE00 + 100 * i as u64));
            let message = WireMessage {
                epoch: "pg:7312000000000000000/slot:pgcachewatch/5f0c6d1e2a3b4c5d".into(),
                kind: WireKind::Event(event),
            };
            bytes::Bytes::from(message.to_json())
        })
        .collect()
}

/// Publishes every payload (core NATS: the stream stores what it captures).
async fn publish(
    client: &async_nats::Client,
    stream: &StreamSettings,
    payloads: &[bytes::Bytes],
) -> anyhow::Result<Instant> {
    let subject =
        pgcachewatch::nats::subject::table_subject(stream.prefix(), Some("public"), "items");
    let t0 = Instant::now();
    for p in payloads {
        client
            .publish(subject.clone(), p.clone())
            .await
            .context("publishing")?;
    }
    client.flush().await.context("flushing")?;
    Ok(t0)
}

async fn time_source(
    args: &Args,
    client: &async_nats::Client,
    stream: &StreamSettings,
    payloads: &[bytes::Bytes],
) -> anyhow::Result<Duration> {
    let source = NatsSource::builder(NatsConnect::new(&args.nats_url).name("pgcw-bench-source"))
        .stream(stream.clone())
        .buffer(1 << 16)
        .connect()
        .await
        .context("the NatsSource")?;
    let mut sub = source.subscribe();
    let want = payloads.len();
    let reader = tokio::spawn(async move {
        let mut seen = 0;
        while seen < want {
            match tokio::time::timeout(Duration::from_secs(30), sub.recv()).await {
                Ok(Some(Signal::Event(_))) => seen += 1,
                Ok(Some(Signal::Gap(g))) => bail!("the NatsSource reported a gap: {g}"),
                Ok(Some(_)) => {}
                Ok(None) => bail!("the NatsSource ended"),
                Err(_) => bail!("the NatsSource delivered {seen} of {want} events in 30 s"),
            }
        }
        Ok(Instant::now())
    });
    // The source's consumer exists once `connect` returned.
    let t0 = publish(client, stream, payloads).await?;
    let done = reader.await.context("the reading task")??;
    source.shutdown().await;
    Ok(done - t0)
}

/// [`Keyed`] on the benchmark's table, counting the events it is given and
/// saying when the last one came.
#[derive(Debug)]
struct Counted {
    keyed: Keyed<i64>,
    seen: usize,
    want: usize,
    gaps: Arc<AtomicU64>,
    done: Option<tokio::sync::oneshot::Sender<Instant>>,
}

impl InvalidationStrategy<i64> for Counted {
    fn on_event(&mut self, event: &Event, now: Instant) -> Decision<i64> {
        self.seen += 1;
        if self.seen == self.want {
            if let Some(done) = self.done.take() {
                let _ = done.send(Instant::now());
            }
        }
        self.keyed.on_event(event, now)
    }
    fn on_gap(&mut self, reason: &GapReason, now: Instant) -> Decision<i64> {
        self.gaps.fetch_add(1, Ordering::Relaxed);
        self.keyed.on_gap(reason, now)
    }
    fn reads_clock(&self) -> bool {
        false
    }
}

async fn time_cached(
    args: &Args,
    client: &async_nats::Client,
    stream: &StreamSettings,
    payloads: &[bytes::Bytes],
) -> anyhow::Result<Duration> {
    let source = NatsSource::builder(NatsConnect::new(&args.nats_url).name("pgcw-bench-cached"))
        .stream(stream.clone())
        .connect()
        .await
        .context("the NatsSource")?;
    let cache: Cache<i64, Arc<str>> = Cache::new(100_000);
    let (done, finished) = tokio::sync::oneshot::channel();
    let gaps = Arc::new(AtomicU64::new(0));
    let strategy = Counted {
        keyed: Keyed::per_table().table("public.items", |_: &Event, row: &RowKey| {
            row.get("id").and_then(|v| v.as_i64())
        }),
        seen: 0,
        want: payloads.len(),
        gaps: gaps.clone(),
        done: Some(done),
    };
    let dispatcher = Dispatcher::new()
        .attach(strategy, cache.clone())
        .spawn(&source);
    if !dispatcher.is_inline() {
        bail!("the NatsSource refused an inline dispatcher");
    }
    let t0 = publish(client, stream, payloads).await?;
    let last = match tokio::time::timeout(Duration::from_secs(30), finished).await {
        Ok(Ok(at)) => at,
        _ => bail!(
            "the cache was given {} of {} events in 30 s",
            dispatcher.stats().events,
            payloads.len()
        ),
    };
    if gaps.load(Ordering::Relaxed) > 0 {
        bail!("the NatsSource reported a gap");
    }
    // The cache first: a cache whose dispatcher stops says so, loudly.
    drop(cache);
    drop(dispatcher);
    source.shutdown().await;
    Ok(last - t0)
}

async fn time_raw(
    _args: &Args,
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    stream: &StreamSettings,
    payloads: &[bytes::Bytes],
) -> anyhow::Result<Duration> {
    let handle = js.get_stream(stream.name()).await.context("the stream")?;
    let consumer = handle
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::New,
            ack_policy: AckPolicy::None,
            filter_subjects: vec![format!("{}.>", stream.prefix())],
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .context("the raw consumer")?;
    let mut messages = consumer
        .messages()
        .await
        .context("the raw consumer's messages")?;
    let want = payloads.len();
    let reader = tokio::spawn(async move {
        let mut seen = 0;
        let mut sum = 0_u64;
        while seen < want {
            match tokio::time::timeout(Duration::from_secs(30), messages.next()).await {
                Ok(Some(Ok(m))) => {
                    sum = m
                        .payload
                        .iter()
                        .fold(sum, |acc, b| acc.wrapping_add(u64::from(*b)));
                    seen += 1;
                }
                // A pull that went unanswered (seen here under a publish flood;
                // `NatsSource` then makes a new consumer): the stream asks again.
                Ok(Some(Err(e))) if e.kind() == pull::MessagesErrorKind::MissingHeartbeat => {
                    eprintln!("the raw consumer missed an idle heartbeat after {seen} messages; reading on");
                }
                Ok(Some(Err(e))) => bail!("the raw consumer: {e}"),
                Ok(None) => bail!("the raw consumer ended"),
                Err(_) => bail!("the raw consumer read {seen} of {want} messages in 30 s"),
            }
        }
        std::hint::black_box(sum);
        Ok(Instant::now())
    });
    let t0 = publish(client, stream, payloads).await?;
    let done = reader.await.context("the reading task")??;
    Ok(done - t0)
}
