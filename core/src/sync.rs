//! The synchronisation primitives the dispatcher's shared state is built on:
//! `parking_lot` and tokio in normal builds; `loom`'s model-checked versions when
//! built with `--cfg pgcachewatch_loom`, so the interleaving tests in
//! `dispatcher/shared.rs` explore every schedule of the real code.
//!
//! Run them with:
//!
//! ```sh
//! RUSTFLAGS="--cfg pgcachewatch_loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p pgcachewatch-core --lib --release loom
//! ```

#[cfg(not(pgcachewatch_loom))]
mod imp {
    pub(crate) use parking_lot::{Mutex, MutexGuard};
    pub(crate) use std::sync::atomic::AtomicBool;

    /// Wakes the deadline timer; a wake-up sent while nobody waits is kept.
    #[derive(Debug, Default)]
    pub(crate) struct Rearm(tokio::sync::Notify);

    impl Rearm {
        pub(crate) fn notify(&self) {
            self.0.notify_one();
        }

        pub(crate) async fn notified(&self) {
            self.0.notified().await;
        }
    }
}

#[cfg(pgcachewatch_loom)]
mod imp {
    pub(crate) use loom::sync::atomic::AtomicBool;
    pub(crate) use loom::sync::MutexGuard;

    /// loom's mutex with `parking_lot`'s signature (no poisoning).
    #[derive(Debug)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }
    }

    /// loom's notify: a wake-up sent while nobody waits is kept.
    #[derive(Debug, Default)]
    pub(crate) struct Rearm(loom::sync::Notify);

    impl Rearm {
        pub(crate) fn notify(&self) {
            self.0.notify();
        }

        /// Blocks (in the model) until notified.
        pub(crate) fn wait(&self) {
            self.0.wait();
        }

        pub(crate) async fn notified(&self) {
            self.0.wait();
        }
    }
}

pub(crate) use imp::*;
