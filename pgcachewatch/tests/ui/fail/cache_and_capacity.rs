use std::sync::LazyLock;
use pgcachewatch::Cache;

static NAMES: LazyLock<Cache<u32, String>> = LazyLock::new(|| Cache::new(10));

#[pgcachewatch::cached(cache = NAMES, capacity = 10)]
async fn name(id: u32) -> String {
    id.to_string()
}

fn main() {}
