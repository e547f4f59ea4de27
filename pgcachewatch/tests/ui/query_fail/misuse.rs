#[pgcachewatch::cached(query = "SELECT id FROM users WHERE id = $1", tables = ["users"])]
async fn declared(id: i64) -> Result<Option<(i64,)>, pgcachewatch::query::CachedQueryError>;

#[pgcachewatch::cached(query = "SELECT id FROM users WHERE id = $1")]
async fn with_body(id: i64) -> Result<Option<(i64,)>, pgcachewatch::query::CachedQueryError> {
    todo!()
}

#[pgcachewatch::cached(query = "SELECT id FROM users WHERE id = $1")]
async fn not_a_result(id: i64) -> Option<(i64,)>;

#[pgcachewatch::cached(query = "UPDATE users SET name = 'x' WHERE id = $1")]
async fn a_write(id: i64) -> Result<Option<(i64,)>, pgcachewatch::query::CachedQueryError>;

fn main() {}
