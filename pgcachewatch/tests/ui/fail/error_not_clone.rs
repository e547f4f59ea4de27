#[derive(Debug)]
struct DbError;

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("db")
    }
}

impl std::error::Error for DbError {}

#[pgcachewatch::cached]
async fn name(id: u32) -> Result<String, DbError> {
    Ok(id.to_string())
}

fn main() {}
