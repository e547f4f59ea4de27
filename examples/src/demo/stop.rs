//! Ctrl-C (and SIGTERM), counted from the start, and raced against every phase
//! of the demo, so that whatever it is doing when one arrives, its clean-up runs.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::pin;
use std::task::Poll;

use tokio::sync::watch;

/// The signals received so far; clones share them.
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<u32>);

impl Stop {
    /// Starts counting SIGINT and SIGTERM: from now on neither ends the process
    /// by itself (the demo stops, cleans up and exits). Call it inside the
    /// runtime, first thing.
    pub fn install() -> std::io::Result<Stop> {
        let (tx, rx) = watch::channel(0u32);
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            // Both handlers exist once these return, before anything else runs.
            let mut interrupt = signal(SignalKind::interrupt())?;
            let mut terminate = signal(SignalKind::terminate())?;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        Some(()) = interrupt.recv() => {}
                        Some(()) = terminate.recv() => {}
                        else => break,
                    }
                    tx.send_modify(|n| *n += 1);
                }
            });
        }
        #[cfg(not(unix))]
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                tx.send_modify(|n| *n += 1);
            }
        });
        Ok(Stop(rx))
    }

    /// How many signals have arrived.
    pub fn count(&self) -> u32 {
        *self.0.borrow()
    }

    /// Returns once more than `seen` signals have arrived.
    pub async fn beyond(&self, seen: u32) {
        let mut rx = self.0.clone();
        if rx.wait_for(|n| *n > seen).await.is_err() {
            // The counting task is gone (the runtime is shutting down): no
            // signal can come any more.
            std::future::pending::<()>().await;
        }
    }

    /// Returns once a signal has arrived (at once if one has).
    pub async fn wait(&self) {
        self.beyond(0).await;
    }

    /// `fut`'s output, or `None` if a signal arrives first (or has arrived);
    /// `fut` is then dropped.
    pub async fn race<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        self.race_beyond(0, fut).await
    }

    /// `fut`'s output, or `None` if more than `seen` signals arrive first.
    pub async fn race_beyond<T>(&self, seen: u32, fut: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            () = self.beyond(seen) => None,
            out = fut => Some(out),
        }
    }
}

/// `fut`'s output, or the message of a panic inside it (e.g. printing to a
/// closed pipe), so that what follows (the clean-up) still runs.
pub async fn catch_panic<T>(fut: impl Future<Output = T>) -> Result<T, String> {
    let mut fut = pin!(fut);
    std::future::poll_fn(
        move |cx| match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned()))),
        },
    )
    .await
}
