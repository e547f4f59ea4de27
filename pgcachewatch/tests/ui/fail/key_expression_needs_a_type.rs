#[pgcachewatch::cached(key = id * 2)]
async fn name(id: u32) -> String {
    id.to_string()
}

fn main() {}
