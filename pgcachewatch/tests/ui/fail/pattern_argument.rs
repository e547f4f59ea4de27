#[pgcachewatch::cached]
async fn name((a, b): (u32, u32)) -> String {
    (a + b).to_string()
}

fn main() {}
