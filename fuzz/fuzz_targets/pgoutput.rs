//! The replication source's pgoutput decoder and transaction assembler on
//! arbitrary bytes (a stream of length-prefixed messages): never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgcachewatch_backends::fuzzing::pgoutput_stream(data);
});
