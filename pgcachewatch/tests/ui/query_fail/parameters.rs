#[pgcachewatch::cached(query = "SELECT id FROM users WHERE id = $1 AND org_id = $2")]
async fn too_few(id: i64) -> Result<Option<(i64,)>, pgcachewatch::query::CachedQueryError>;

#[pgcachewatch::cached(query = "SELECT id FROM users WHERE name = $1")]
async fn borrowed(name: &str) -> Result<Option<(i64,)>, pgcachewatch::query::CachedQueryError>;

fn main() {}
