#[pgcachewatch::cached]
async fn touch(id: u32) {
    let _ = id;
}

fn main() {}
