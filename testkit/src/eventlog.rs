//! The event log: a JSON-lines recording of what a source emitted, and when.
//!
//! # Format (version 2)
//!
//! The first line is a header; every other non-blank line is one record:
//!
//! ```text
//! {"pgcachewatch_log":2,"recorded_at":"2025-01-01T12:00:00Z","source":"postgres channel pgcachewatch"}
//! {"offset_us":0,"health":"healthy"}
//! {"offset_us":1520,"event":{"channel":"pgcachewatch","operation":"update","schema":"public","table":"users","received_at":"2025-01-01T12:00:00.001520Z","txid":741}}
//! {"offset_us":9000,"health":"unhealthy"}
//! {"offset_us":9000,"gap":{"reason":"connection_lost","detail":"terminated by administrator"}}
//! {"offset_us":250000,"gap":{"reason":"reconnected"}}
//! {"offset_us":250000,"health":"healthy"}
//! ```
//!
//! * `offset_us` is microseconds since the start of the recording. Offsets never
//!   decrease; replay uses them to reproduce the timing.
//! * The rest of the line is one signal in the JSON form the NATS relay's
//!   messages share ([`SignalRecord`](pgcachewatch_core::SignalRecord), one
//!   definition for both): exactly one of `event`, `gap`, `health`,
//!   `progress`.
//!
//! Version 2 names an event with a commit position (logical replication) by
//! what its fields hold: `slot`, `xid32` (the 32-bit transaction id), `lsn`
//! with `lsn_u64`; it adds the `slot_lost` gap reason and `progress_u64`.
//! Events without a position (`LISTEN`) are written as in version 1. Version 1
//! logs are read as before. Unknown fields are ignored (later minor additions
//! stay readable); a header with a higher version is rejected.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use pgcachewatch::{Event, Operation};
//! use pgcachewatch::testkit::eventlog::{EventLogReader, EventLogWriter, LogHeader, LogRecord, RecordKind};
//!
//! let mut buf = Vec::new();
//! let mut writer = EventLogWriter::with_header(&mut buf, LogHeader::new().source("doc test"))?;
//! let event = Event::new("ch", Operation::Insert, "public", "users");
//! writer.write_record(&LogRecord::new(Duration::from_millis(5), RecordKind::Event(event)))?;
//! writer.flush()?;
//!
//! let mut reader = EventLogReader::new(buf.as_slice())?;
//! assert_eq!(reader.header().source.as_deref(), Some("doc test"));
//! let record = reader.next().unwrap()?;
//! assert_eq!(record.offset, Duration::from_millis(5));
//! assert!(matches!(record.kind, RecordKind::Event(ref e) if e.table == "users"));
//! assert!(reader.next().is_none());
//! # Ok::<_, pgcachewatch::testkit::eventlog::LogError>(())
//! ```

use std::fmt;
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pgcachewatch_core::{GapReason, Signal};
use serde::{Deserialize, Serialize};

/// The format version this crate writes and the highest it reads.
pub const LOG_VERSION: u32 = 2;

/// Why a log could not be read or written. Every variant that concerns a line
/// names it (1-based).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// Reading or writing failed.
    #[error("I/O error at line {line}: {source}")]
    Io {
        /// The line being read or written.
        line: u64,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The input is empty: not even a header.
    #[error("empty event log: expected a header line {{\"pgcachewatch_log\":2,...}}")]
    MissingHeader,
    /// The first line is not a valid header.
    #[error("line {line}: not a pgcachewatch event-log header: {detail}")]
    BadHeader {
        /// The header's line (the first non-blank line).
        line: u64,
        /// What is wrong.
        detail: String,
    },
    /// The header announces a version this crate cannot read.
    #[error("line {line}: event-log version {found} is not supported (this reader knows up to {LOG_VERSION})")]
    UnsupportedVersion {
        /// The header's line.
        line: u64,
        /// The version found.
        found: u64,
    },
    /// A record line is not valid.
    #[error("line {line}: invalid record: {detail}")]
    BadRecord {
        /// The record's line.
        line: u64,
        /// What is wrong.
        detail: String,
    },
    /// A record's offset is smaller than the one before it.
    #[error("line {line}: offset {offset_us} µs is before the previous record's {previous_us} µs")]
    OffsetWentBack {
        /// The record's line.
        line: u64,
        /// Its offset.
        offset_us: u64,
        /// The previous record's offset.
        previous_us: u64,
    },
}

/// The first line of a log: the format version and where the recording came from.
///
/// ```
/// use pgcachewatch::testkit::eventlog::LogHeader;
/// let h = LogHeader::new().source("postgres channel pgcachewatch");
/// assert_eq!(h.version, 2);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LogHeader {
    /// Format version ([`LOG_VERSION`]).
    #[serde(rename = "pgcachewatch_log")]
    pub version: u64,
    /// When the recording started, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_at: Option<DateTime<Utc>>,
    /// What was recorded (a channel, a database, "generated"), free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Anything else worth knowing, free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Default for LogHeader {
    fn default() -> Self {
        Self::new()
    }
}

impl LogHeader {
    /// A version-[`LOG_VERSION`] header recorded now, with no source or note.
    pub fn new() -> Self {
        LogHeader {
            version: u64::from(LOG_VERSION),
            recorded_at: Some(Utc::now()),
            source: None,
            note: None,
        }
    }

    /// Sets the source description (builder style).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Sets the note (builder style).
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// Sets the recording time (builder style); `None` for generated logs.
    pub fn recorded_at(mut self, at: Option<DateTime<Utc>>) -> Self {
        self.recorded_at = at;
        self
    }
}

/// What a record says happened: an event, a gap, a health change or a
/// lossless source's progress. The same type, and the same JSON form, as the
/// body of a NATS relay message.
pub use pgcachewatch_core::SignalRecord as RecordKind;

/// One line of a log after the header: what happened, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    /// Time since the start of the recording.
    pub offset: Duration,
    /// What happened.
    pub kind: RecordKind,
}

impl LogRecord {
    /// A record at `offset`.
    pub fn new(offset: Duration, kind: RecordKind) -> Self {
        LogRecord { offset, kind }
    }

    /// The record of a signal a source emitted at `offset`.
    pub fn from_signal(signal: &Signal, offset: Duration) -> Self {
        // A signal kind newer than this format: the safe reading is "something
        // may have been lost".
        let kind = RecordKind::from_signal(signal).unwrap_or_else(|| {
            RecordKind::Gap(GapReason::Injected {
                detail: format!("unrecorded signal: {signal:?}").into(),
            })
        });
        LogRecord { offset, kind }
    }

    /// The signal this record replays as.
    pub fn to_signal(&self) -> Signal {
        self.kind.to_signal()
    }
}

/// A whole log in memory: header and records.
///
/// ```
/// use pgcachewatch::testkit::eventlog::EventLog;
/// let text = "{\"pgcachewatch_log\":1}\n{\"offset_us\":0,\"health\":\"healthy\"}\n";
/// let log = EventLog::parse(text)?;
/// assert_eq!(log.records.len(), 1);
/// assert_eq!(EventLog::parse(&log.to_string())?, log);
/// # Ok::<_, pgcachewatch::testkit::eventlog::LogError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct EventLog {
    /// The header line.
    pub header: LogHeader,
    /// The records, in order.
    pub records: Vec<LogRecord>,
}

impl EventLog {
    /// An empty log with this header.
    pub fn new(header: LogHeader) -> Self {
        EventLog {
            header,
            records: Vec::new(),
        }
    }

    /// Reads a whole log, stopping at the first error.
    ///
    /// # Errors
    ///
    /// The first [`LogError`] met.
    pub fn read(input: impl BufRead) -> Result<Self, LogError> {
        let mut reader = EventLogReader::new(input)?;
        let records = reader.by_ref().collect::<Result<Vec<_>, _>>()?;
        Ok(EventLog {
            header: reader.header,
            records,
        })
    }

    /// Parses a log held in a string.
    ///
    /// # Errors
    ///
    /// The first [`LogError`] met.
    pub fn parse(text: &str) -> Result<Self, LogError> {
        Self::read(text.as_bytes())
    }

    /// Writes the log.
    ///
    /// # Errors
    ///
    /// [`LogError::Io`] if writing fails.
    pub fn write(&self, output: impl Write) -> Result<(), LogError> {
        let mut w = EventLogWriter::with_header(output, self.header.clone())?;
        for r in &self.records {
            w.write_record(r)?;
        }
        w.flush()
    }
}

impl fmt::Display for EventLog {
    /// The log in its JSON-lines form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = Vec::new();
        self.write(&mut buf).map_err(|_| fmt::Error)?;
        f.write_str(&String::from_utf8_lossy(&buf))
    }
}

// ---- wire form -------------------------------------------------------------

#[derive(Serialize)]
struct WireRecordOut<'a> {
    offset_us: u64,
    #[serde(flatten)]
    kind: &'a RecordKind,
}

#[derive(Deserialize)]
struct WireRecord {
    offset_us: u64,
    #[serde(flatten)]
    kind: RecordKind,
}

fn to_wire(record: &LogRecord) -> WireRecordOut<'_> {
    WireRecordOut {
        offset_us: u64::try_from(record.offset.as_micros()).unwrap_or(u64::MAX),
        kind: &record.kind,
    }
}

// ---- writer ----------------------------------------------------------------

/// Writes an event log, one line per record. The header is written on creation.
///
/// Records are buffered by the underlying writer only; call [`flush`](Self::flush)
/// (or wrap a `BufWriter` and flush) before reading the log back.
///
/// ```
/// use std::time::Instant;
/// use pgcachewatch::{Health, Signal};
/// use pgcachewatch::testkit::eventlog::{EventLog, EventLogWriter};
///
/// let start = Instant::now();
/// let mut buf = Vec::new();
/// let mut w = EventLogWriter::new(&mut buf, start)?;
/// w.write_signal(&Signal::Health(Health::Healthy), start)?;
/// w.flush()?;
/// assert_eq!(EventLog::parse(std::str::from_utf8(&buf).unwrap())?.records.len(), 1);
/// # Ok::<_, pgcachewatch::testkit::eventlog::LogError>(())
/// ```
#[derive(Debug)]
pub struct EventLogWriter<W: Write> {
    out: W,
    start: Instant,
    line: u64,
}

impl<W: Write> EventLogWriter<W> {
    /// A writer whose offsets count from `start` (signals stamped earlier get
    /// offset 0), with a default header (recorded now, no source).
    ///
    /// # Errors
    ///
    /// [`LogError::Io`] if the header cannot be written.
    pub fn new(out: W, start: Instant) -> Result<Self, LogError> {
        let mut w = Self::with_header(out, LogHeader::new())?;
        w.start = start;
        Ok(w)
    }

    /// A writer with this header, counting offsets from now.
    ///
    /// # Errors
    ///
    /// [`LogError::Io`] if the header cannot be written.
    pub fn with_header(out: W, header: LogHeader) -> Result<Self, LogError> {
        let mut w = EventLogWriter {
            out,
            start: Instant::now(),
            line: 0,
        };
        let json = serde_json::to_string(&header).map_err(|e| w.io_error(e.into()))?;
        w.write_line(&json)?;
        Ok(w)
    }

    /// Sets the instant offsets count from (builder style).
    pub fn starting_at(mut self, start: Instant) -> Self {
        self.start = start;
        self
    }

    /// Records a signal received at `at`.
    ///
    /// # Errors
    ///
    /// [`LogError::Io`] if writing fails.
    pub fn write_signal(&mut self, signal: &Signal, at: Instant) -> Result<(), LogError> {
        let offset = at.saturating_duration_since(self.start);
        self.write_record(&LogRecord::from_signal(signal, offset))
    }

    /// Writes one record as it is (the caller keeps offsets non-decreasing).
    ///
    /// # Errors
    ///
    /// [`LogError::Io`] if writing fails.
    pub fn write_record(&mut self, record: &LogRecord) -> Result<(), LogError> {
        let json = serde_json::to_string(&to_wire(record)).map_err(|e| self.io_error(e.into()))?;
        self.write_line(&json)
    }

    /// Flushes the underlying writer.
    ///
    /// # Errors
    ///
    /// [`LogError::Io`] if flushing fails.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.out.flush().map_err(|e| self.io_error(e))
    }

    /// How many lines (header included) were written.
    pub fn lines_written(&self) -> u64 {
        self.line
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }

    fn write_line(&mut self, json: &str) -> Result<(), LogError> {
        self.line += 1;
        self.out
            .write_all(json.as_bytes())
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(|e| self.io_error(e))
    }

    fn io_error(&self, source: std::io::Error) -> LogError {
        LogError::Io {
            line: self.line,
            source,
        }
    }
}

// ---- reader ----------------------------------------------------------------

/// Reads an event log: the header on creation, then records as an iterator of
/// `Result<LogRecord, LogError>`.
///
/// Blank lines are skipped. A bad record yields an error naming its line and the
/// iterator goes on with the next line; an I/O error ends the iteration. Never
/// panics, whatever the input.
///
/// ```
/// use pgcachewatch::testkit::eventlog::{EventLogReader, LogError};
/// let text = "{\"pgcachewatch_log\":1}\n{\"offset_us\":0,\"health\":\"sick\"}\n";
/// let mut reader = EventLogReader::new(text.as_bytes())?;
/// let err = reader.next().unwrap().unwrap_err();
/// assert!(matches!(err, LogError::BadRecord { line: 2, .. }), "{err}");
/// # Ok::<_, LogError>(())
/// ```
#[derive(Debug)]
pub struct EventLogReader<R: BufRead> {
    input: R,
    header: LogHeader,
    line: u64,
    last_offset_us: u64,
    done: bool,
    buf: String,
}

impl<R: BufRead> EventLogReader<R> {
    /// Reads and checks the header.
    ///
    /// # Errors
    ///
    /// [`LogError::MissingHeader`], [`LogError::BadHeader`],
    /// [`LogError::UnsupportedVersion`] or [`LogError::Io`].
    pub fn new(input: R) -> Result<Self, LogError> {
        let mut reader = EventLogReader {
            input,
            header: LogHeader::new(),
            line: 0,
            last_offset_us: 0,
            done: false,
            buf: String::new(),
        };
        if !reader.next_line()? {
            return Err(LogError::MissingHeader);
        }
        let line = reader.line;
        let value: serde_json::Value =
            serde_json::from_str(&reader.buf).map_err(|e| LogError::BadHeader {
                line,
                detail: e.to_string(),
            })?;
        let version = value
            .get("pgcachewatch_log")
            .ok_or_else(|| LogError::BadHeader {
                line,
                detail: "no \"pgcachewatch_log\" version field".into(),
            })?;
        let found = version.as_u64().ok_or_else(|| LogError::BadHeader {
            line,
            detail: format!("version must be a positive integer, found {version}"),
        })?;
        if found == 0 || found > u64::from(LOG_VERSION) {
            return Err(LogError::UnsupportedVersion { line, found });
        }
        reader.header = serde_json::from_value(value).map_err(|e| LogError::BadHeader {
            line,
            detail: e.to_string(),
        })?;
        Ok(reader)
    }

    /// The header.
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// The number of the last line read (1-based).
    pub fn line(&self) -> u64 {
        self.line
    }

    /// Reads the next non-blank line into `buf`; `false` at the end.
    fn next_line(&mut self) -> Result<bool, LogError> {
        loop {
            self.buf.clear();
            self.line += 1;
            match self.input.read_line(&mut self.buf) {
                Ok(0) => return Ok(false),
                Ok(_) if self.buf.trim().is_empty() => continue,
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    // Not UTF-8: the line is consumed by `read_line`; report it.
                    return Err(LogError::BadRecord {
                        line: self.line,
                        detail: "not valid UTF-8".into(),
                    });
                }
                Err(source) => {
                    return Err(LogError::Io {
                        line: self.line,
                        source,
                    })
                }
            }
        }
    }

    fn parse_record(&mut self) -> Result<LogRecord, LogError> {
        let line = self.line;
        let wire: WireRecord =
            serde_json::from_str(&self.buf).map_err(|e| LogError::BadRecord {
                line,
                detail: e.to_string(),
            })?;
        let offset_us = wire.offset_us;
        let record = LogRecord {
            offset: Duration::from_micros(offset_us),
            kind: wire.kind,
        };
        if offset_us < self.last_offset_us {
            return Err(LogError::OffsetWentBack {
                line,
                offset_us,
                previous_us: self.last_offset_us,
            });
        }
        self.last_offset_us = offset_us;
        Ok(record)
    }
}

impl<R: BufRead> Iterator for EventLogReader<R> {
    type Item = Result<LogRecord, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_line() {
            Ok(true) => Some(self.parse_record()),
            Ok(false) => {
                self.done = true;
                None
            }
            Err(e @ LogError::BadRecord { .. }) => Some(Err(e)),
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgcachewatch_core::{Event, Health, Lsn, Operation, RowKey};

    fn sample() -> EventLog {
        let mut log = EventLog::new(LogHeader::new().source("unit").note("n"));
        let event = Event::new("ch", Operation::Update, "public", "users")
            .with_keys(vec![RowKey::single("id", 7)])
            .with_txid(42);
        let kinds = [
            RecordKind::Health(Health::Healthy),
            RecordKind::Event(event),
            RecordKind::Health(Health::Unhealthy),
            RecordKind::Gap(GapReason::ConnectionLost {
                detail: "killed".into(),
            }),
            RecordKind::Gap(GapReason::Lagged { missed: 3 }),
            RecordKind::Gap(GapReason::HeartbeatTimeout),
            RecordKind::Gap(GapReason::MalformedPayload),
            RecordKind::Gap(GapReason::Injected { detail: "x".into() }),
            RecordKind::Gap(GapReason::Reconnected),
            RecordKind::Health(Health::Healthy),
            RecordKind::Event(
                Event::new("slot", Operation::Insert, "public", "users")
                    .with_lsn(Lsn(0x1_0000_0010))
                    .with_txid(9),
            ),
            RecordKind::Progress(Lsn(0x1_0000_0020)),
            RecordKind::Gap(GapReason::SlotLost {
                detail: "dropped".into(),
            }),
        ];
        for (i, kind) in kinds.into_iter().enumerate() {
            log.records
                .push(LogRecord::new(Duration::from_micros(i as u64 * 10), kind));
        }
        log
    }

    #[test]
    fn round_trips_every_record_kind() {
        let log = sample();
        let text = log.to_string();
        assert_eq!(text.lines().count(), 1 + log.records.len());
        assert_eq!(EventLog::parse(&text).unwrap(), log);
    }

    #[test]
    fn version_1_logs_are_still_read() {
        let text = "{\"pgcachewatch_log\":1}\n{\"offset_us\":1,\"event\":{\"channel\":\"s\",\"operation\":\"update\",\"table\":\"t\",\"received_at\":\"2025-01-01T00:00:00Z\",\"txid\":7,\"lsn\":\"0/20\"}}\n{\"offset_us\":2,\"progress\":\"0/30\"}\n";
        let log = EventLog::parse(text).unwrap();
        assert!(
            matches!(&log.records[0].kind, RecordKind::Event(e) if e.txid == Some(7) && e.lsn == Some(Lsn(0x20)) && e.channel == "s")
        );
        assert_eq!(log.records[1].kind, RecordKind::Progress(Lsn(0x30)));
    }

    #[test]
    fn errors_name_their_line_and_reading_goes_on() {
        let text = "{\"pgcachewatch_log\":1}\n\n{\"offset_us\":5,\"health\":\"healthy\"}\nnot json\n{\"offset_us\":1,\"health\":\"healthy\"}\n{\"offset_us\":6}\n{\"offset_us\":7,\"health\":\"healthy\",\"gap\":{\"reason\":\"reconnected\"}}\n{\"offset_us\":8,\"gap\":{\"reason\":\"reconnected\"}}\n";
        let results: Vec<_> = EventLogReader::new(text.as_bytes()).unwrap().collect();
        assert!(results[0].is_ok());
        assert!(matches!(
            results[1],
            Err(LogError::BadRecord { line: 4, .. })
        ));
        assert!(matches!(
            results[2],
            Err(LogError::OffsetWentBack { line: 5, .. })
        ));
        assert!(matches!(
            results[3],
            Err(LogError::BadRecord { line: 6, .. })
        ));
        assert!(matches!(
            results[4],
            Err(LogError::BadRecord { line: 7, .. })
        ));
        assert!(results[5].is_ok());
        assert_eq!(results.len(), 6);
    }

    #[test]
    fn bad_headers_are_rejected_clearly() {
        assert!(matches!(
            EventLogReader::new("".as_bytes()),
            Err(LogError::MissingHeader)
        ));
        assert!(matches!(
            EventLogReader::new("\n\n{\"x\":1}\n".as_bytes()),
            Err(LogError::BadHeader { line: 3, .. })
        ));
        assert!(matches!(
            EventLogReader::new("{\"pgcachewatch_log\":3}\n".as_bytes()),
            Err(LogError::UnsupportedVersion { found: 3, .. })
        ));
        assert!(matches!(
            EventLogReader::new("{\"pgcachewatch_log\":\"1\"}\n".as_bytes()),
            Err(LogError::BadHeader { .. })
        ));
    }

    #[test]
    fn invalid_utf8_is_an_error_not_a_panic() {
        let mut bytes = b"{\"pgcachewatch_log\":1}\n".to_vec();
        bytes.extend_from_slice(&[0xff, 0xfe, b'\n']);
        bytes.extend_from_slice(b"{\"offset_us\":0,\"health\":\"healthy\"}\n");
        let results: Vec<_> = EventLogReader::new(bytes.as_slice()).unwrap().collect();
        assert!(matches!(
            results[0],
            Err(LogError::BadRecord { line: 2, .. })
        ));
        assert!(results[1].is_ok());
    }

    #[test]
    fn writer_offsets_count_from_start() {
        let start = Instant::now();
        let mut buf = Vec::new();
        let mut w = EventLogWriter::new(&mut buf, start).unwrap();
        w.write_signal(
            &Signal::Gap(GapReason::Reconnected),
            start + Duration::from_millis(3),
        )
        .unwrap();
        w.flush().unwrap();
        let log = EventLog::read(buf.as_slice()).unwrap();
        assert_eq!(log.records[0].offset, Duration::from_millis(3));
    }
}
