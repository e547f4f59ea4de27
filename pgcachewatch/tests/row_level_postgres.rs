//! Row-level invalidation end to end against the real PostgreSQL: the installer's
//! row-mode triggers send primary keys, the listener parses them, `Keyed` maps
//! them to cache keys, and only the rows written leave the cache.
#![cfg(feature = "postgres")]

use std::time::{Duration, Instant};

use pgcachewatch::postgres::{Installer, PgListenerSource, TableName};
use pgcachewatch::strategies::Keyed;
use pgcachewatch::{Cache, Dispatcher, Event, RowKey};
use pgcachewatch_testkit::env::{database_url, unique_name};
use sqlx::PgPool;

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn load(cache: &Cache<i64, String>, db: &PgPool, table: &str, id: i64) -> String {
    let sql = format!("SELECT name FROM public.{table} WHERE id = $1");
    cache
        .get_or_load(id, || {
            sqlx::query_scalar::<_, String>(&sql).bind(id).fetch_one(db)
        })
        .await
        .expect("row exists")
}

#[tokio::test]
async fn an_update_drops_only_the_rows_it_wrote_and_truncate_drops_the_table() {
    let db = PgPool::connect(&database_url())
        .await
        .expect("PostgreSQL at DATABASE_URL");
    let table = unique_name("pgcw_rows");
    let channel = unique_name("pgcw_rows_ch");
    sqlx::raw_sql(&format!(
        "CREATE TABLE public.{table} (id bigint PRIMARY KEY, name text NOT NULL);
         INSERT INTO public.{table} SELECT g, 'row ' || g FROM generate_series(1, 3) g;"
    ))
    .execute(&db)
    .await
    .expect("create table");
    let installer = Installer::new().channel(&channel).row_keys(true);
    let tables = [TableName::new("public", &table).expect("valid name")];
    installer.install(&db, &tables).await.expect("install");

    let source = PgListenerSource::builder(database_url())
        .channel(&channel)
        .connect()
        .await
        .expect("listen");
    let cache: Cache<i64, String> = Cache::new(100);
    let by_id = Keyed::new(|_: &Event, row: &RowKey| row.get("id").and_then(|v| v.as_i64()));
    let dispatcher = Dispatcher::new()
        .attach(by_id, cache.clone())
        .spawn(&source);

    for id in 1..=3 {
        load(&cache, &db, &table, id).await;
    }
    sqlx::query(&format!(
        "UPDATE public.{table} SET name = 'two' WHERE id = 2"
    ))
    .execute(&db)
    .await
    .expect("update");
    wait_until("row 2 leaves the cache", || cache.get(&2).is_none()).await;
    assert_eq!(
        cache.get(&1).as_deref(),
        Some("row 1"),
        "an unrelated row was dropped"
    );
    assert_eq!(
        cache.get(&3).as_deref(),
        Some("row 3"),
        "an unrelated row was dropped"
    );
    assert_eq!(load(&cache, &db, &table, 2).await, "two");

    sqlx::query(&format!("DELETE FROM public.{table} WHERE id IN (1, 3)"))
        .execute(&db)
        .await
        .expect("delete");
    wait_until("rows 1 and 3 leave the cache", || {
        cache.get(&1).is_none() && cache.get(&3).is_none()
    })
    .await;
    assert_eq!(cache.get(&2).as_deref(), Some("two"));

    // TRUNCATE carries no keys: the whole table goes.
    sqlx::query(&format!("TRUNCATE public.{table}"))
        .execute(&db)
        .await
        .expect("truncate");
    wait_until("the truncate empties the cache", || cache.get(&2).is_none()).await;

    dispatcher.shutdown().await;
    source.shutdown().await;
    installer.uninstall(&db, &tables).await.expect("uninstall");
    sqlx::raw_sql(&format!("DROP TABLE public.{table}"))
        .execute(&db)
        .await
        .expect("drop");
}
