//! The small cache interface the checker reads through.

use std::convert::Infallible;

use futures::future::LocalBoxFuture;
use pgcachewatch_core::{Cache, Dispatcher, InvalidationStrategy};

use super::schedule::Row;

/// What a read returns: the row version the load saw, and which load it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Value {
    /// The row's version when the loader read it (0 before any write).
    pub version: u64,
    /// The checker's number of the load that produced it.
    pub load: u64,
}

/// A loader: reads the simulated table when first polled, then waits for its turn.
pub type Loader = Box<dyn FnOnce() -> LocalBoxFuture<'static, Value>>;

/// The cache interface the checker reads through; it is fed by real
/// [`Dispatcher`]s, one per simulated source.
///
/// Implemented for the real [`Cache`]; implement it for a cache of your own (or a
/// deliberately broken one, to see the checker fail).
pub trait CheckedCache {
    /// The value of `row`, cached or from `loader` (`Err` carries a message).
    fn read(&self, row: Row, loader: Loader) -> LocalBoxFuture<'static, Result<Value, String>>;
    /// Attaches this cache to `dispatcher` with `strategy` (for the real cache:
    /// `dispatcher.attach(strategy, cache.clone())`).
    fn attach(
        &self,
        dispatcher: Dispatcher,
        strategy: Box<dyn InvalidationStrategy<Row>>,
    ) -> Dispatcher;
}

impl CheckedCache for Cache<Row, Value> {
    fn read(&self, row: Row, loader: Loader) -> LocalBoxFuture<'static, Result<Value, String>> {
        let cache = self.clone();
        Box::pin(async move {
            cache
                .get_or_load(
                    row,
                    move || async move { Ok::<_, Infallible>(loader().await) },
                )
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn attach(
        &self,
        dispatcher: Dispatcher,
        strategy: Box<dyn InvalidationStrategy<Row>>,
    ) -> Dispatcher {
        dispatcher.attach(strategy, self.clone())
    }
}
