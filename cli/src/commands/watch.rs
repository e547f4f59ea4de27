//! What `listen` and `record` share: connect a [`PgListenerSource`] and feed its
//! signals to a callback until `--count`, `--duration`, Ctrl-C, or the source ends.

use std::fmt;

use anyhow::{anyhow, Result};
use pgcachewatch::postgres::listener::PgListenerSource;
use pgcachewatch::{Error, EventSource, Signal};

use crate::connect::Target;
use crate::StopArgs;

/// Connects and LISTENs on `channels`.
pub(crate) async fn connect(
    url: Option<&str>,
    channels: Vec<String>,
) -> Result<(PgListenerSource, Target)> {
    let target = Target::resolve(url)?;
    let source = PgListenerSource::builder_with_options(target.options.clone())
        .channels(channels)
        .connect()
        .await
        .map_err(|e| match e {
            // Where the settings came from matters for connection trouble only.
            Error::Connection { .. } => {
                anyhow!("{e} (settings from {})\n{}", target.origin, Target::hint())
            }
            other => anyhow!(other),
        })?;
    Ok((source, target))
}

/// Why [`pump`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    Count,
    Duration,
    Interrupted,
    SourceEnded,
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stopped::Count => "--count reached",
            Stopped::Duration => "--duration elapsed",
            Stopped::Interrupted => "interrupted",
            Stopped::SourceEnded => "the source shut down",
        })
    }
}

/// Feeds every signal to `on_signal` until a stop condition; `--count` counts events.
pub(crate) async fn pump(
    source: &PgListenerSource,
    stop: StopArgs,
    mut on_signal: impl FnMut(&Signal) -> Result<()>,
) -> Result<Stopped> {
    let mut sub = source.subscribe();
    let deadline = stop.duration.map(|d| tokio::time::Instant::now() + d);
    let until_deadline = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut events = 0u64;
    if stop.count == Some(0) {
        return Ok(Stopped::Count);
    }
    loop {
        tokio::select! {
            biased;
            _ = &mut ctrl_c => return Ok(Stopped::Interrupted),
            () = &mut until_deadline => return Ok(Stopped::Duration),
            signal = sub.recv() => {
                let Some(signal) = signal else { return Ok(Stopped::SourceEnded) };
                on_signal(&signal)?;
                if matches!(signal, Signal::Event(_)) {
                    events += 1;
                    if stop.count.is_some_and(|n| events >= n) {
                        return Ok(Stopped::Count);
                    }
                }
            }
        }
    }
}

/// Latencies in microseconds, summarized at the end.
#[derive(Debug, Default)]
pub(crate) struct Latencies(Vec<f64>);

impl Latencies {
    pub(crate) fn add(&mut self, micros: f64) {
        self.0.push(micros);
    }
}

impl fmt::Display for Latencies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no latencies (no event carried sent_at)");
        }
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        write!(
            f,
            "latency p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs over {} events",
            at(0.5),
            at(0.99),
            v[v.len() - 1],
            v.len()
        )
    }
}
