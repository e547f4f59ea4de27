//! `listen`: print events as they arrive, with their notification latency.
//!
//! Lines are written in the listener's own task (see [`watch`]) into a buffer
//! flushed every [`watch::FLUSH_EVERY`]: a burst is printed in full, never
//! skipped. Gap lines on stderr, which could come once per signal, are printed at
//! most once a second with the count of those left out.

use std::io::{BufWriter, Stdout, Write as _};
use std::time::Instant;

use anyhow::Result;
use pgcachewatch::{Event, Signal};

use super::watch::{self, Latencies, RateLimit, Sink};
use crate::connect::Database;
use crate::StopArgs;

/// Large enough that a burst costs one `write` per few hundred lines.
const BUFFER_BYTES: usize = 64 * 1024;

/// Standard output, and what the summary needs.
struct Printer {
    out: BufWriter<Stdout>,
    as_json: bool,
    latencies: Latencies,
    gaps: RateLimit,
}

impl Sink for Printer {
    fn signal(&mut self, signal: &Signal) -> Result<()> {
        match signal {
            Signal::Event(event) => {
                let micros = event
                    .latency()
                    .and_then(|d| d.num_microseconds())
                    .map(|us| us as f64);
                if let Some(us) = micros {
                    self.latencies.add(us);
                }
                if self.as_json {
                    let json = serde_json::to_string(&**event)?;
                    writeln!(self.out, "{json}")?;
                } else {
                    writeln!(self.out, "{}", line(event, micros))?;
                }
            }
            Signal::Gap(reason) => {
                if let Some(suppressed) = self.gaps.check(Instant::now()) {
                    let left_out = if suppressed > 0 {
                        format!(" ({suppressed} more gaps in the last second not shown)")
                    } else {
                        String::new()
                    };
                    eprintln!("-- gap: {reason} (caches flush here){left_out}");
                }
            }
            Signal::Health(health) => eprintln!("-- source is {health:?}"),
            other => eprintln!("-- {other:?}"),
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.out.flush()?)
    }
}

pub(crate) async fn listen(
    db: Database<'_>,
    channels: Vec<String>,
    as_json: bool,
    stop: StopArgs,
) -> Result<()> {
    let (source, target) = watch::connect(db, channels.clone()).await?;
    eprintln!(
        "listening on {channels:?} at {}; Ctrl-C to stop",
        target.describe()
    );
    let printer = Printer {
        out: BufWriter::with_capacity(BUFFER_BYTES, std::io::stdout()),
        as_json,
        latencies: Latencies::default(),
        gaps: RateLimit::default(),
    };
    let result = watch::pump(&source, stop, printer).await;
    let stats = source.stats();
    source.shutdown().await;
    let (stopped, printer) = result?;
    if printer.gaps.pending() > 0 {
        eprintln!("-- {} more gaps not shown", printer.gaps.pending());
    }
    if as_json {
        // One JSON object on stderr: stdout is the event stream.
        let summary = serde_json::json!({
            "stopped": stopped.to_string(),
            "events": stats.events,
            "latency": printer.latencies.to_json(),
            "malformed": stats.malformed,
            "gaps": stats.gaps,
            "reconnects": stats.reconnects,
            "heartbeats": stats.heartbeats,
            "heartbeat_timeouts": stats.heartbeat_timeouts,
            "last_heartbeat_rtt_us": stats.last_heartbeat_rtt.map(|d| d.as_micros() as u64),
        });
        eprintln!("{summary}");
    } else {
        let latency = match printer.latencies.summary() {
            None => "- (no event carried sent_at)".to_owned(),
            Some((p50, p99, max, _)) => {
                format!("p50 {p50:.0} µs, p99 {p99:.0} µs, max {max:.0} µs")
            }
        };
        eprint!(
            "-- stopped: {stopped}\n{}",
            crate::output::aligned(&[
                ("events", stats.events.to_string()),
                ("latency", latency),
                ("malformed payloads", stats.malformed.to_string()),
                ("gaps", stats.gaps.to_string()),
                ("reconnects", stats.reconnects.to_string()),
                (
                    "heartbeats",
                    format!(
                        "{} answered, {} timed out, last round trip {}",
                        stats.heartbeats,
                        stats.heartbeat_timeouts,
                        crate::output::duration(stats.last_heartbeat_rtt)
                    )
                ),
            ])
        );
    }
    Ok(())
}

fn line(event: &Event, latency_micros: Option<f64>) -> String {
    let table = match &event.schema {
        Some(schema) => format!("{schema}.{}", event.table),
        None => event.table.to_string(),
    };
    let keys = match &event.keys {
        Some(keys) if keys.len() <= 3 => format!(
            "  keys={}",
            serde_json::to_string(keys).unwrap_or_else(|_| "?".into())
        ),
        Some(keys) => format!("  keys=<{} rows>", keys.len()),
        None => String::new(),
    };
    let txid = event
        .txid
        .map(|t| format!("  txid={t}"))
        .unwrap_or_default();
    let latency = latency_micros
        .map(|us| format!("  latency {:.3} ms", us / 1000.0))
        .unwrap_or_default();
    format!(
        "{}  {:<8}  {table}  channel={}{txid}{keys}{latency}",
        event.received_at.format("%H:%M:%S%.6f"),
        event.operation.as_str(),
        event.channel
    )
}
