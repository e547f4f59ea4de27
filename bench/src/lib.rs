//! Code the benchmark programs in `src/bin/` share.

pub mod figures;
