//! `#[pgcachewatch::cached]` at compile time: every form compiles, and misuse is
//! an error pointing at the offending token (the `.stderr` files under
//! `tests/ui/fail`; regenerate with `TRYBUILD=overwrite` and review the diff).

#[test]
fn cached_attribute_compiles_and_rejects_misuse() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
