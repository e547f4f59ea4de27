//! # pgcachewatch-strategies
//!
//! Ready-made [`InvalidationStrategy`](pgcachewatch_core::InvalidationStrategy)
//! implementations, and combinators to compose them without writing new code.
//!
//! Every strategy is pure and deterministic: state in, decision out, the clock
//! passed in as `now`. None does I/O or reads a clock, so a recorded event log
//! replays identically at any speed, and the property tests of this crate drive
//! them through virtual time. Time-based strategies say when they next want
//! [`on_tick`](pgcachewatch_core::InvalidationStrategy::on_tick) through
//! [`next_deadline`](pgcachewatch_core::InvalidationStrategy::next_deadline); the
//! dispatcher calls it then.
//!
//! ## Which strategy
//!
//! | strategy | drops | when | use it for |
//! |---|---|---|---|
//! | [`Greedy`] | everything | on every matching event | small, hot caches; the safe default |
//! | [`Windowed`] | everything | after N matching events, or a window after the first unflushed one | write storms where a bounded delay is fine: N writes, one reload |
//! | [`Timed`] | everything | at most once per interval; events inside it fire at its end | capping reload rate, with staleness bounded by the interval |
//! | [`Sequence`] | everything | when the latest operations equal a pattern | workflows known to end in a given sequence (PGCacheWatch's `Windowed` code); never alone |
//! | [`Keyed`] | the keys built from the changed rows, or the table | on every event | large caches keyed by row; needs row-level triggers |
//! | [`Filter`] / [`TableFilter`] | what the inner strategy drops | only for chosen tables / operations | narrowing any strategy |
//! | [`AnyOf`] | the union of its children's | whenever any child fires | combining policies (rows + a periodic safety net) |
//! | [`Route`] | what the table's strategy drops | per table | a different policy per table |
//! | [`OnGap`] | nothing, on selected gaps | — | accepting stale data after lost events (deliberately) |
//!
//! ## Gaps
//!
//! A gap (reconnect, lagging subscriber, heartbeat timeout...) means events may
//! have been lost. Every strategy here answers it with
//! [`Decision::All`](pgcachewatch_core::Decision::All) and forgets its pending state
//! (the flush covers it); combinators pass it to every child. To answer otherwise,
//! wrap the strategy in [`OnGap`] or implement
//! [`on_gap`](pgcachewatch_core::InvalidationStrategy::on_gap) yourself.
//!
//! ## Composing
//!
//! ```
//! use std::time::Duration;
//! use pgcachewatch::{Event, Operation, RowKey};
//! use pgcachewatch::strategies::{AnyOf, Filter, Greedy, Keyed, Route, Timed, Windowed};
//!
//! // users: row-level, with a flush at most every 30 s as a safety net;
//! // orders: batched; truncates anywhere: flush; other tables: ignored.
//! let strategy: Route<i64> = Route::new()
//!     .table(
//!         "public.users",
//!         AnyOf::new()
//!             .with(Keyed::new(|_: &Event, row: &RowKey| row.get("id").and_then(|v| v.as_i64())))
//!             .with(Timed::new(Duration::from_secs(30))),
//!     )
//!     .table("public.orders", Windowed::new(100, Duration::from_millis(50)))
//!     .otherwise(Filter::new(Greedy::new()).operations([Operation::Truncate]));
//! # let _ = strategy;
//! ```
//!
//! ## Dependencies
//!
//! Only `pgcachewatch-core`: strategies need no runtime, clock or I/O.
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

mod any_of;
mod filter;
mod greedy;
mod keyed;
mod on_gap;
mod route;
mod sequence;
mod table;
mod timed;
mod windowed;

pub use any_of::{AnyOf, BoxedStrategy};
pub use filter::Filter;
pub use greedy::Greedy;
pub use keyed::{Keyed, OtherTables};
pub use on_gap::OnGap;
pub use route::Route;
pub use sequence::Sequence;
pub use table::{IntoTableRef, TableFilter};
pub use timed::Timed;
pub use windowed::Windowed;
