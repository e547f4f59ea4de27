#[pgcachewatch::cached(ttl = "60 minutes")]
async fn name(id: u32) -> String {
    id.to_string()
}

fn main() {}
