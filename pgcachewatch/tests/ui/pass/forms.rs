//! Every form of the attribute compiles, and the generated handles have the
//! types the documentation promises.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use pgcachewatch::strategies::Greedy;
use pgcachewatch::{cached, Cache, Event};

struct Pool;

#[derive(Debug, thiserror::Error)]
#[error("database error")]
struct DbError;

/// A macro-made cache with every option, keyed by one argument.
#[cached(
    name = "users",
    capacity = 10_000,
    ttl = "1m30s",
    tables = ["users", "public.teams"],
    key = id,
    strategy = Greedy::with_predicate(|e: &Event| e.table == "users"),
    source = "main",
)]
pub async fn user_name(pool: &Pool, id: i64) -> Result<String, Arc<DbError>> {
    let _ = pool;
    if id < 0 {
        return Err(DbError.into());
    }
    Ok(format!("user {id}"))
}

/// A `Duration` expression as time-to-live, a computed key.
#[cached(ttl = Duration::from_secs(5), key = (a, b.len()), key_type = (u8, usize))]
async fn computed(a: u8, b: String) -> usize {
    a as usize + b.len()
}

static OWNED: LazyLock<Cache<(u8, String), Vec<u8>>> = LazyLock::new(|| Cache::new(10));

/// A cache the user owns, every argument the key.
#[cached(cache = OWNED, tables = ["users"])]
async fn owned(a: u8, b: String) -> Vec<u8> {
    let _ = b;
    vec![a]
}

struct Repo;

static COUNTS: LazyLock<Cache<u32, u32>> = LazyLock::new(|| Cache::new(10));

impl Repo {
    /// An associated function (no receiver) that names `Self`: in an `impl`
    /// block, the cache is named with `cache = …`.
    #[cached(cache = COUNTS)]
    async fn count(n: u32) -> u32 {
        Self::double(n)
    }

    fn double(n: u32) -> u32 {
        n * 2
    }
}

fn main() {
    let _: &'static Cache<i64, String> = user_name_cache();
    let _: &'static Cache<(u8, usize), usize> = computed_cache();
    let _ = Repo::count;
    let _ = owned;
}
