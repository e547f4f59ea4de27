#[pgcachewatch::cached(query = "SELECT id, now() FROM users WHERE id = $1")]
async fn stamped(id: i64) -> Result<Option<(i64, String)>, pgcachewatch::query::CachedQueryError>;

#[pgcachewatch::cached(query = "SELECT id FROM users ORDER BY random() LIMIT 1")]
async fn any_user() -> Result<(i64,), pgcachewatch::query::CachedQueryError>;

#[pgcachewatch::cached(query = "SELECT id FROM docs WHERE owner = current_user")]
async fn mine() -> Result<Vec<(i64,)>, pgcachewatch::query::CachedQueryError>;

fn main() {}
