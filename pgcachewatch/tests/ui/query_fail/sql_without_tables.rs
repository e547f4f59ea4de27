#[pgcachewatch::cached(sql = "SELECT name FROM users WHERE id = $1")]
async fn user_name(id: i64) -> String {
    format!("user {id}")
}

fn main() {}
