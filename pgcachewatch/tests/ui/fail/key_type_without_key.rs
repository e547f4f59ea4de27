#[pgcachewatch::cached(key_type = u32)]
async fn name(id: u32) -> String {
    id.to_string()
}

fn main() {}
