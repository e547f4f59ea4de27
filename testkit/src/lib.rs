//! # pgcachewatch-testkit
//!
//! Tools for testing pgcachewatch and the policies built on it.
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]
