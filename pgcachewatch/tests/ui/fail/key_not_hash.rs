#[pgcachewatch::cached]
async fn total(amount: f64) -> String {
    amount.to_string()
}

fn main() {}
