struct NotARow {
    id: i64,
}

#[pgcachewatch::cached(query = "SELECT id FROM users WHERE id = $1")]
async fn user(id: i64) -> Result<Option<NotARow>, pgcachewatch::query::CachedQueryError>;

fn main() {}
