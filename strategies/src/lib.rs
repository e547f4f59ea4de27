//! # pgcachewatch-strategies
//!
//! Ready-made [`InvalidationStrategy`](pgcachewatch_core::InvalidationStrategy)
//! implementations. Every one is pure: state in, decision out, the clock passed in.
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

mod greedy;

pub use greedy::Greedy;
