//! `record`: write received signals to a JSON-lines event log the testkit replays
//! (format: `pgcachewatch::testkit::eventlog`).
//!
//! Records are written in the listener's own task as each notification is parsed
//! (see [`watch`]), into a buffer flushed every [`watch::FLUSH_EVERY`] and on
//! exit: the log holds every event the connection delivered, whatever the burst,
//! and a `gap` record only where events were really lost.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result};
use pgcachewatch::testkit::eventlog::{EventLogWriter, LogHeader};
use pgcachewatch::Signal;

use super::watch::{self, Sink};
use crate::connect::Database;
use crate::StopArgs;

/// Large enough that a burst costs one `write` per ~200 records.
const BUFFER_BYTES: usize = 256 * 1024;

/// The event log being written.
struct Recorder {
    writer: EventLogWriter<BufWriter<File>>,
    events: u64,
}

impl Sink for Recorder {
    fn signal(&mut self, signal: &Signal) -> Result<()> {
        self.writer.write_signal(signal, Instant::now())?;
        if matches!(signal, Signal::Event(_)) {
            self.events += 1;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.writer.flush()?)
    }
}

pub(crate) async fn record(
    db: Database<'_>,
    file: &Path,
    force: bool,
    channels: Vec<String>,
    stop: StopArgs,
    as_json: bool,
) -> Result<()> {
    // Refused before connecting: a capture is not replaced by accident.
    let replacing = file.exists();
    if replacing && !force {
        anyhow::bail!(
            "{} already exists: record would replace it (and the capture in it); \
             choose another FILE, or add --force to replace it",
            file.display()
        );
    }
    let (source, target) = watch::connect(db, channels.clone()).await?;
    let out = if force {
        File::create(file)
    } else {
        // Not there a moment ago: fail rather than replace one created since.
        File::options().write(true).create_new(true).open(file)
    }
    .with_context(|| format!("creating {}", file.display()))?;
    if replacing {
        eprintln!("-- replacing {} (--force)", file.display());
    }
    let header = LogHeader::new().source(format!(
        "postgres {} channel(s) {}",
        target.describe(),
        channels.join(",")
    ));
    let start = Instant::now();
    let writer = EventLogWriter::with_header(BufWriter::with_capacity(BUFFER_BYTES, out), header)
        .with_context(|| format!("writing {}", file.display()))?
        .starting_at(start);
    eprintln!(
        "recording {channels:?} at {} to {}; Ctrl-C to stop",
        target.describe(),
        file.display()
    );

    let recorder = Recorder { writer, events: 0 };
    let result = watch::pump(&source, stop, recorder).await;
    source.shutdown().await;
    let (stopped, recorder) = result.with_context(|| format!("writing {}", file.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    if as_json {
        crate::output::print(&format!(
            "{}\n",
            serde_json::json!({
                "stopped": stopped.to_string(),
                "file": file.display().to_string(),
                "events": recorder.events,
                "lines": recorder.writer.lines_written(),
                "seconds": seconds,
            })
        ))?;
    } else {
        eprint!(
            "-- stopped: {stopped}\n{}",
            crate::output::aligned(&[
                ("file", file.display().to_string()),
                ("events", recorder.events.to_string()),
                (
                    "lines",
                    format!(
                        "{} (with the header and health/gap records)",
                        recorder.writer.lines_written()
                    )
                ),
                ("duration", format!("{seconds:.1} s")),
            ])
        );
    }
    Ok(())
}
