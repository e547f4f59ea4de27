//! # pgcachewatch-core
//!
//! The database-free heart of pgcachewatch: the [`Event`] model and payload
//! parser, the [`EventSource`] and [`InvalidationStrategy`] traits, the
//! generation-stamped single-flight [`Cache`], and the [`Dispatcher`] that pushes
//! each signal of a source through strategies into caches.
//!
//! Most users depend on the `pgcachewatch` facade crate instead, which re-exports
//! this crate with the backends and strategies.
//!
//! ## The guarantee
//!
//! Once the notification for a committed write has been processed by the
//! [`Dispatcher`], no read through a [`Cache`] that starts afterwards returns a value
//! loaded before that write. Before that, staleness is bounded by notification
//! latency. While the source is unhealthy, reads bypass the cache (the default) or
//! are served only from entries loaded within a configured bound
//! ([`WhileUnhealthy`]). Three mechanisms make it hold:
//!
//! * **generations**: every load is stamped when it starts; an invalidation bumps
//!   the generation; an older stamp is never stored or served (the stale-set race);
//! * **gaps**: anything that can lose events emits [`Signal::Gap`], which strategies
//!   answer with invalidate-all;
//! * **health**: a source reports [`Health::Unhealthy`] while it cannot promise
//!   delivery, and reports healthy again only after it listens and has sent a gap.
//!
//! ## Dependencies, and why
//!
//! * `tokio` (sync, time, rt): the bounded broadcast behind [`SignalHub`], the
//!   single-flight wake-ups, and the dispatcher task. No I/O.
//! * `quick_cache`: entry storage, chosen by measurement (see [`Cache`]).
//! * `parking_lot`: short, uncontended locks around in-flight loads.
//! * `chrono` + `serde`/`serde_json`: timestamps and payloads as PostgreSQL sends them.
//! * `thiserror`: the [`Error`] enum; `tracing`: logs (this crate never prints).
//! * `metrics` (feature `metrics`, off by default): the series of [`telemetry`]
//!   through the `metrics` facade.

#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

mod cache;
pub mod cached;
mod closable_hub;
mod dispatcher;
mod error;
mod event;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod hub;
mod name;
mod payload;
mod position;
mod rate_limit;
mod signal;
mod source;
mod strategy;
mod sync;
#[cfg(feature = "metrics")]
pub mod telemetry;

pub use cache::{
    Cache, CacheBuilder, CacheStats, InvalidationTarget, Refresh, RefreshTask, RemovalCause,
    WhileUnhealthy,
};
pub use closable_hub::ClosableHub;
pub use dispatcher::{Dispatcher, DispatcherHandle, DispatcherStats, WaitError};
pub use error::{BoxError, Error, Result};
pub use event::{
    EnvelopedRecord, Event, IntoTableRef, InvalidTableName, Operation, RowKey, SignalRecord,
    TableRef, UnknownOperation,
};
pub use health::{HasHealthBoard, HealthBoard, HealthSummary, HealthVote};
pub use hub::{SignalHub, DEFAULT_HUB_CAPACITY, MAX_HUB_CAPACITY};
pub use name::Name;
pub use payload::{parse_payload, PayloadError, PayloadParser};
pub use position::{Lsn, ParseLsnError};
pub use signal::{GapReason, Health, Signal};
pub use source::{EventSource, InlineAttachment, InlineHandler, Subscription, TryRecvError};
pub use strategy::{Decision, InvalidationStrategy, Targets};
