#[pgcachewatch::cached(capacity = 10, capacity = 20)]
async fn name(id: u32) -> String {
    id.to_string()
}

fn main() {}
