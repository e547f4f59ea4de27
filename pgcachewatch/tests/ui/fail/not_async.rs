#[pgcachewatch::cached]
fn name(id: u32) -> String {
    id.to_string()
}

fn main() {}
