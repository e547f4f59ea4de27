//! Not built yet (see the commented `[[bin]]` in Cargo.toml and README.md): the
//! pgoutput decoder on arbitrary bytes must never panic. Enable it once the
//! replication source exposes its decoder to fuzzing builds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgcachewatch_backends::replication::fuzz_decode_pgoutput(data);
});
