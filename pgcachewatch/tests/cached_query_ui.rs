//! `#[pgcachewatch::cached(query = …)]` at compile time (feature `query`): every
//! read form compiles, and what `analyze` refuses without a server (`FOR
//! UPDATE`, `now()`, `random()`, `current_user`, a write, a parameter count
//! that does not match) is a compile error naming the way out (the `.stderr`
//! files under `tests/ui/query_fail`; regenerate with `TRYBUILD=overwrite` and
//! review the diff).

#![cfg(feature = "query")]

#[test]
fn cached_query_attribute_compiles_and_refuses_what_cannot_be_cached() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/query_pass/*.rs");
    t.compile_fail("tests/ui/query_fail/*.rs");
}
