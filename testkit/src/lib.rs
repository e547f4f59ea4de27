//! # pgcachewatch-testkit
//!
//! Tools for testing pgcachewatch and the policies built on it:
//!
//! * [`eventlog`]: a versioned JSON-lines recording of what a source emitted and
//!   when (the CLI's `record` command writes it), with a reader that reports bad
//!   lines by number and never panics.
//! * [`conformance`]: one suite of checks every
//!   [`EventSource`](pgcachewatch_core::EventSource) backend runs, driven through a
//!   backend-neutral [`SourceDriver`](conformance::SourceDriver).
//! * [`clock`]: a [`VirtualClock`](clock::VirtualClock) for pure strategies.
//! * [`replay`]: feed a log into any
//!   [`InvalidationStrategy`](pgcachewatch_core::InvalidationStrategy) at any speed,
//!   firing its deadlines, and get every decision with its cause as a table.
//! * [`checker`]: the staleness model checker: simulated table, writers, lossy
//!   delivery, health changes, and readers through the real
//!   [`Cache`](pgcachewatch_core::Cache), checked against
//!   [the guarantee](pgcachewatch_core#the-guarantee).
//! * `generators` (feature `proptest`): events, gap reasons, event logs with bursts,
//!   transactions and outages, and checker schedules.
//! * [`scenarios`]: the cache's guarantees (single-flight, errors not cached,
//!   the stale-set race) as scenarios over any way of reading through a cache.
//! * `proxy`: a TCP proxy that pauses or cuts connections on demand.
//! * `cluster`: a throw-away PostgreSQL cluster of a test's own.
//! * [`env`](mod@env): the test database's URL and names unique across parallel tests.
//!
//! ## Features
//!
//! * `proptest` (default): the generators and the staleness model checker. Turn
//!   default features off to get the event log, clock and replay without proptest.
//!
//! ## Dependencies, and why
//!
//! * `serde`/`serde_json`/`chrono`: the log format; `thiserror`: [`eventlog::LogError`].
//! * `tokio` (time, sync, rt): bounded waits in the conformance suite.
//! * `async-trait`: the object-safe [`conformance::SourceDriver`].
//! * `proptest` (optional): generators and the model checker.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]
pub mod proxy;

pub mod checker;
pub mod clock;
pub mod cluster;
pub mod conformance;
pub mod env;
pub mod eventlog;
#[cfg(feature = "proptest")]
#[cfg_attr(docsrs, doc(cfg(feature = "proptest")))]
pub mod generators;
pub mod replay;
pub mod scenarios;
