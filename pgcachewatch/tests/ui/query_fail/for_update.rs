#[pgcachewatch::cached(query = "SELECT id FROM users WHERE id = $1 FOR UPDATE")]
async fn locked(id: i64) -> Result<Option<(i64,)>, pgcachewatch::query::CachedQueryError>;

fn main() {}
