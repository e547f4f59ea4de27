//! `record`: write received signals to a JSON-lines event log the testkit replays
//! (format: `pgcachewatch::testkit::eventlog`).

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result};
use pgcachewatch::testkit::eventlog::{EventLogWriter, LogHeader};
use pgcachewatch::Signal;

use super::watch;
use crate::StopArgs;

pub(crate) async fn record(
    url: Option<&str>,
    file: &Path,
    channels: Vec<String>,
    stop: StopArgs,
) -> Result<()> {
    let (source, target) = watch::connect(url, channels.clone()).await?;
    let out = File::create(file).with_context(|| format!("creating {}", file.display()))?;
    let header = LogHeader::new().source(format!(
        "postgres {} channel(s) {}",
        target.describe(),
        channels.join(",")
    ));
    let start = Instant::now();
    let mut writer = EventLogWriter::with_header(BufWriter::new(out), header)
        .with_context(|| format!("writing {}", file.display()))?
        .starting_at(start);
    eprintln!(
        "recording {channels:?} at {} to {}; Ctrl-C to stop",
        target.describe(),
        file.display()
    );

    let mut events = 0u64;
    let result = watch::pump(&source, stop, |signal| {
        writer.write_signal(signal, Instant::now())?;
        // Flushed per record: whatever stops the process, the file holds every
        // signal received so far, each on a complete line.
        writer.flush()?;
        if matches!(signal, Signal::Event(_)) {
            events += 1;
        }
        Ok(())
    })
    .await;
    source.shutdown().await;
    let flushed = writer.flush();
    let stopped = result?;
    flushed.with_context(|| format!("flushing {}", file.display()))?;
    eprintln!(
        "-- stopped: {stopped}; recorded {events} events ({} lines with header and \
         health/gap records) to {} in {:.1} s",
        writer.lines_written(),
        file.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
