//! `listen`: print events as they arrive, with their notification latency.

use anyhow::Result;
use pgcachewatch::{Event, Signal};

use super::watch::{self, Latencies};
use crate::StopArgs;

pub(crate) async fn listen(
    url: Option<&str>,
    channels: Vec<String>,
    as_json: bool,
    stop: StopArgs,
) -> Result<()> {
    let (source, target) = watch::connect(url, channels.clone()).await?;
    eprintln!(
        "listening on {channels:?} at {}; Ctrl-C to stop",
        target.describe()
    );
    let mut latencies = Latencies::default();
    let stopped = watch::pump(&source, stop, |signal| {
        match signal {
            Signal::Event(event) => {
                let micros = event
                    .latency()
                    .and_then(|d| d.num_microseconds())
                    .map(|us| us as f64);
                if let Some(us) = micros {
                    latencies.add(us);
                }
                if as_json {
                    crate::output::print(&format!("{}\n", serde_json::to_string(&**event)?))?;
                } else {
                    crate::output::print(&format!("{}\n", line(event, micros)))?;
                }
            }
            Signal::Gap(reason) => eprintln!("-- gap: {reason} (caches flush here)"),
            Signal::Health(health) => eprintln!("-- source is {health:?}"),
            other => eprintln!("-- {other:?}"),
        }
        Ok(())
    })
    .await?;
    let stats = source.stats();
    source.shutdown().await;
    eprintln!("-- stopped: {stopped}; {latencies}; listener stats: {stats:?}");
    Ok(())
}

fn line(event: &Event, latency_micros: Option<f64>) -> String {
    let table = match &event.schema {
        Some(schema) => format!("{schema}.{}", event.table),
        None => event.table.clone(),
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
