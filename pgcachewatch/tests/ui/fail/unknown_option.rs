#[pgcachewatch::cached(capacity = 10, size = 10)]
async fn name(id: u32) -> String {
    id.to_string()
}

fn main() {}
