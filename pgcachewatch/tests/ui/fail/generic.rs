#[pgcachewatch::cached]
async fn name<T: ToString>(id: T) -> String {
    id.to_string()
}

fn main() {}
