//! The logical-replication event source (feature `replication`).
//!
//! This module holds, so far, the protocol code without I/O: the pgoutput
//! decoder and the transaction assembler.

#![allow(dead_code)] // wired up by the source in the next step

mod assembler;
mod pgoutput;
