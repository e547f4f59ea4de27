//! A source keeps running while a dispatcher or a subscription uses it, even after
//! the code that built it dropped its own handle (a setup function that returns
//! only the dispatcher's handle). Against the real local PostgreSQL for the
//! listener (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`).

use std::time::Duration;

use pgcachewatch_backends::InMemorySource;
use pgcachewatch_core::{Cache, Dispatcher, DispatcherHandle, Event, EventSource, Operation};
use pgcachewatch_strategies::Greedy;

const PATIENCE: Duration = Duration::from_secs(10);

async fn load(cache: &Cache<u32, String>, value: &str) {
    let value = value.to_owned();
    cache
        .get_or_load(1, || async move { Ok::<_, std::io::Error>(value) })
        .await
        .unwrap();
}

#[tokio::test]
async fn in_memory_dispatcher_keeps_its_source_after_the_local_handle_is_dropped() {
    let users: Cache<u32, String> = Cache::new(100);
    let (source, handle) = InMemorySource::pair();
    // Built and returned by a "setup function": the source itself is dropped.
    let dispatcher = {
        let source = source;
        Dispatcher::new()
            .attach(Greedy::new(), users.clone())
            .spawn(&source)
    };
    let subscribed = {
        let source = handle.source();
        Dispatcher::new()
            .attach(Greedy::new(), users.clone())
            .spawn_subscribed(&source)
    };
    assert!(!dispatcher.is_finished() && !subscribed.is_finished());
    load(&users, "ann").await;
    assert_eq!(users.get(&1).as_deref(), Some("ann"));
    assert!(handle.publish(Event::new("ch", Operation::Update, "public", "users")));
    dispatcher.sync().await;
    assert_eq!(
        users.get(&1),
        None,
        "the inline dispatcher still invalidates"
    );

    // Even with every source and handle gone, the dispatchers still hold it: they
    // stay attached and the cache keeps caching instead of bypassing.
    drop(handle);
    assert!(!dispatcher.is_finished() && !subscribed.is_finished());
    load(&users, "bob").await;
    assert_eq!(users.get(&1).as_deref(), Some("bob"));
    dispatcher.shutdown().await;
    subscribed.shutdown().await;
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use pgcachewatch_backends::postgres::PgListenerSource;
    use pgcachewatch_testkit::env::{database_url, eventually_within, unique_name as unique};
    use sqlx::PgPool;

    async fn backend_alive(db: &PgPool, pid: u32) -> bool {
        sqlx::query_scalar("SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1")
            .bind(i32::try_from(pid).unwrap())
            .fetch_one(db)
            .await
            .unwrap()
    }

    async fn notify(db: &PgPool, channel: &str) {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(r#"{"operation": "update", "schema": "public", "table": "users"}"#)
            .execute(db)
            .await
            .unwrap();
    }

    /// What a newcomer writes: connect, spawn, return the handle, drop the source.
    async fn setup(
        pool: &PgPool,
        channel: &str,
        users: &Cache<u32, String>,
    ) -> (DispatcherHandle, u32) {
        let source = PgListenerSource::from_pool(pool)
            .channel(channel)
            .connect()
            .await
            .unwrap();
        let pid = source.stats().backend_pid.unwrap();
        let handle = Dispatcher::new()
            .attach(Greedy::new(), users.clone())
            .spawn(&source);
        (handle, pid)
    }

    #[tokio::test]
    async fn dropping_the_local_listener_does_not_stop_invalidation() {
        let db = PgPool::connect(&database_url())
            .await
            .expect("PostgreSQL must be running at DATABASE_URL");
        let channel = unique("pgcw_keep");
        let users: Cache<u32, String> = Cache::new(100);
        let (dispatcher, pid) = setup(&db, &channel, &users).await;

        // The source is gone from the caller's hands; the listener is not.
        assert!(backend_alive(&db, pid).await);
        assert!(!dispatcher.is_finished());
        for round in 0..3 {
            load(&users, &format!("v{round}")).await;
            assert!(users.get(&1).is_some(), "cached (the source is healthy)");
            notify(&db, &channel).await;
            eventually_within(PATIENCE, "the notification invalidated the entry", || {
                users.get(&1).is_none()
            })
            .await;
        }

        // The dispatcher was the last user: dropping it stops the listener.
        drop(dispatcher);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while backend_alive(&db, pid).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "listener backend {pid} still connected"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_subscription_keeps_the_listener_and_shutdown_still_ends_it() {
        let db = PgPool::connect(&database_url()).await.unwrap();
        let channel = unique("pgcw_keep_sub");
        let source = PgListenerSource::from_pool(&db)
            .channel(&channel)
            .connect()
            .await
            .unwrap();
        let mut sub = source.subscribe();
        let keeper = source.clone();
        drop(source);
        drop(keeper);
        assert!(matches!(
            sub.recv().await,
            Some(pgcachewatch_core::Signal::Health(_))
        ));
        notify(&db, &channel).await;
        let signal = tokio::time::timeout(PATIENCE, sub.recv())
            .await
            .expect("an event within 10 s")
            .expect("the subscription is alive");
        assert_eq!(signal.as_event().map(|e| e.table.as_str()), Some("users"));

        // An explicit shutdown still ends everything.
        let source = PgListenerSource::from_pool(&db)
            .channel(&channel)
            .connect()
            .await
            .unwrap();
        let mut sub = source.subscribe();
        source.shutdown().await;
        drop(source);
        let ended =
            tokio::time::timeout(PATIENCE, async { while sub.recv().await.is_some() {} }).await;
        assert!(ended.is_ok(), "subscription did not end after shutdown");
    }
}
