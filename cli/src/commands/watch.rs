//! What `listen` and `record` share: connect a [`PgListenerSource`] and feed its
//! signals to a [`Sink`] until `--count`, `--duration`, Ctrl-C, or the source ends.
//!
//! The sink runs *inline*, in the listener's own task, as each notification is
//! parsed (like a dispatcher: [`EventSource::attach_inline`]). So it keeps up with
//! any burst the connection delivers: there is no buffer between the listener and
//! the sink to overflow, and a `Gap` in what it sees means events were really
//! lost (connection, heartbeat), never that the command fell behind. A sink that is
//! slower than the burst slows the listener down, and PostgreSQL keeps the rest in
//! its notification queue meanwhile.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, Result};
use pgcachewatch::postgres::PgListenerSource;
use pgcachewatch::{Error, EventSource, Signal};
use tokio::sync::Notify;

pub(crate) use self::rate_limit::RateLimit;
use crate::connect::{Database, Target};
use crate::StopArgs;

mod rate_limit;

/// How often buffered output is flushed while signals keep coming.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Connects and LISTENs on `channels`.
///
/// One plain connection first, through [`Target::connect`]: its errors name the
/// command line's flags and where each setting came from (the listener's own
/// errors speak the library's language).
pub(crate) async fn connect(
    db: Database<'_>,
    channels: Vec<String>,
) -> Result<(PgListenerSource, Target)> {
    let target = db.target()?;
    let probe = target.connect().await?;
    sqlx::Connection::close(probe).await.ok();
    let started = std::time::Instant::now();
    let source = PgListenerSource::builder_with_options(target.options.clone())
        .channels(channels)
        .connect_timeout(target.connect_timeout)
        .connect()
        .await
        .map_err(|e| match e {
            // Took the whole --connect-timeout: the library's timeout.
            Error::Connection { .. } if started.elapsed() >= target.connect_timeout => {
                target.timed_out()
            }
            // Where the settings came from matters for connection trouble only.
            Error::Connection { .. } => {
                anyhow!("{e} (settings from {})\n{}", target.origin, Target::hint())
            }
            other => anyhow!(other),
        })?;
    Ok((source, target))
}

/// Where `listen` and `record` put signals. Called in the listener's task: keep
/// each call short and never wait on anything but a local write.
pub(crate) trait Sink: Send + 'static {
    /// Handles one signal (the first one is the source's health).
    fn signal(&mut self, signal: &Signal) -> Result<()>;
    /// Makes everything handled so far visible (written out); called every
    /// [`FLUSH_EVERY`] and once at the end.
    fn flush(&mut self) -> Result<()>;
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

/// The sink and what the listener's task tells the command's task.
struct State<S> {
    /// `None` once the command took it back.
    sink: Option<S>,
    events: u64,
    count: Option<u64>,
    /// Set once (`--count` reached, the source ended, the sink failed): the sink
    /// is handed nothing after it.
    finished: bool,
    /// Why, until the command's task takes it.
    outcome: Option<Result<Stopped>>,
}

struct Shared<S> {
    state: Mutex<State<S>>,
    /// Woken when `outcome` is set.
    done: Notify,
}

impl<S: Sink> Shared<S> {
    fn lock(&self) -> MutexGuard<'_, State<S>> {
        // A panicking sink leaves nothing half-done that matters here.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn finish(&self, state: &mut State<S>, outcome: Result<Stopped>) {
        if !state.finished {
            state.finished = true;
            state.outcome = Some(outcome);
            self.done.notify_one();
        }
    }

    /// In the listener's task: one signal.
    fn handle(&self, signal: &Signal) {
        let mut state = self.lock();
        let state = &mut *state;
        if state.finished {
            return;
        }
        let Some(sink) = state.sink.as_mut() else {
            return;
        };
        if let Err(e) = sink.signal(signal) {
            self.finish(state, Err(e));
            return;
        }
        if matches!(signal, Signal::Event(_)) {
            state.events += 1;
            if state.count.is_some_and(|n| state.events >= n) {
                self.finish(state, Ok(Stopped::Count));
            }
        }
    }

    fn flush(&self) -> Result<()> {
        match self.lock().sink.as_mut() {
            Some(sink) => sink.flush(),
            None => Ok(()),
        }
    }
}

/// Dropped with the inline handler: by the source when it ends, or when the
/// command detaches.
struct EndGuard<S: Sink>(Arc<Shared<S>>);

impl<S: Sink> Drop for EndGuard<S> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        self.0.finish(&mut state, Ok(Stopped::SourceEnded));
    }
}

/// Feeds every signal to `sink`, in the listener's task, until a stop condition
/// (`--count` counts events); flushes it every [`FLUSH_EVERY`] and at the end.
/// Returns why it stopped and the sink.
pub(crate) async fn pump<S: Sink>(
    source: &PgListenerSource,
    stop: StopArgs,
    sink: S,
) -> Result<(Stopped, S)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            sink: Some(sink),
            events: 0,
            count: stop.count,
            finished: false,
            outcome: None,
        }),
        done: Notify::new(),
    });
    let stopped = if stop.count == Some(0) {
        Ok(Stopped::Count)
    } else {
        let guard = EndGuard(shared.clone());
        let attachment = source
            .attach_inline(Box::new(move |signal: &Signal| guard.0.handle(signal)))
            .ok_or_else(|| anyhow!("the listener does not support inline handlers"))?;
        let stopped = wait(&shared, stop).await;
        // Detaching first: nothing is written after this.
        drop(attachment);
        stopped
    };
    let sink = shared.lock().sink.take();
    let mut sink = sink.ok_or_else(|| anyhow!("the output was taken twice"))?;
    let stopped = stopped?;
    sink.flush()?;
    Ok((stopped, sink))
}

/// Waits for a stop condition, flushing every [`FLUSH_EVERY`] meanwhile.
async fn wait<S: Sink>(shared: &Shared<S>, stop: StopArgs) -> Result<Stopped> {
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
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = &mut ctrl_c => return Ok(Stopped::Interrupted),
            () = &mut until_deadline => return Ok(Stopped::Duration),
            () = shared.done.notified() => {
                if let Some(outcome) = shared.lock().outcome.take() {
                    return outcome;
                }
            }
            _ = flush.tick() => shared.flush()?,
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

impl Latencies {
    /// p50, p99 and max in microseconds, and the count; `None` without samples.
    pub(crate) fn summary(&self) -> Option<(f64, f64, f64, usize)> {
        if self.0.is_empty() {
            return None;
        }
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.99), v[v.len() - 1], v.len()))
    }

    /// The summary as JSON (`null` without samples).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self.summary() {
            None => serde_json::Value::Null,
            Some((p50, p99, max, n)) => serde_json::json!({
                "p50_us": p50, "p99_us": p99, "max_us": max, "events": n,
            }),
        }
    }
}

impl fmt::Display for Latencies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.summary() {
            None => f.write_str("no latencies (no event carried sent_at)"),
            Some((p50, p99, max, n)) => write!(
                f,
                "latency p50 {p50:.0} µs, p99 {p99:.0} µs, max {max:.0} µs over {n} events"
            ),
        }
    }
}
