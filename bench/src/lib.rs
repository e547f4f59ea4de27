//! Code the benchmark programs in `src/bin/` share.

pub mod figures;

/// `n` payloads as a trigger sends them in a burst: one table, in
/// `json_build_object`'s layout, only `sent_at` (its fraction) and `txid`
/// differing, as `burst`'s transaction sends them.
pub fn burst_payloads(n: u64) -> Vec<String> {
    (1..=n)
        .map(|g| {
            format!(
                "{{\"operation\" : \"update\", \"schema\" : \"public\", \"table\" : \"burst\", \
                 \"sent_at\" : \"2026-11-25T11:00:00.{:06}+00:00\", \"txid\" : {g}}}",
                g % 1_000_000
            )
        })
        .collect()
}
