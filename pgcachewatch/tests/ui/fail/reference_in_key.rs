struct Pool;

#[pgcachewatch::cached]
async fn name(pool: &Pool, id: u32) -> String {
    let _ = pool;
    id.to_string()
}

fn main() {}
