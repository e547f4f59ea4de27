//! Deeply nested text: an error or an analysis, never a crash.

use pgcachewatch_query::analyze;

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for depth in [10, 1_000, 30_000] {
        let parens = format!("SELECT {}1{}", "(".repeat(depth), ")".repeat(depth));
        let nots = format!("SELECT * FROM t WHERE {} true", "NOT ".repeat(depth));
        let subqueries = format!("SELECT {}1{}", "(SELECT ".repeat(depth), ")".repeat(depth));
        let ands = format!("SELECT * FROM t WHERE id = 1{}", " AND x = 1".repeat(depth));
        for sql in [parens, nots, subqueries, ands] {
            let _ = analyze(&sql);
        }
    }
}
