//! Closing a listening connection that may be half-open, without leaking.
//!
//! Dropping sqlx's `PgListener` spawns a task on the current runtime that sends
//! `UNLISTEN *` and waits for the answer before it lets the connection go. On a
//! half-open connection no answer comes: the task, its socket and its buffers
//! stay until TCP gives up (about 15 minutes with Linux's default
//! `tcp_retries2`, since unacknowledged data is in flight; never, behind a
//! middlebox that keeps the connection open), one more per heartbeat timeout.
//!
//! A connection we abandon needs no `UNLISTEN`: its session's LISTENs end with
//! the session. So [`abandon`] drops the listener inside a throwaway runtime
//! that never runs: sqlx's task is spawned there and dropped unpolled when that
//! runtime shuts down, which drops the connection and closes its socket at once.

use sqlx::postgres::PgListener;

/// Closes `listener`'s connection now, without `UNLISTEN` and without leaving a
/// task behind.
pub(crate) fn abandon(listener: PgListener) {
    match tokio::runtime::Builder::new_current_thread().build() {
        Ok(throwaway) => {
            {
                let _inside = throwaway.enter();
                drop(listener);
            }
            // Drops sqlx's clean-up task (and what it spawns while dropped)
            // unpolled; allowed inside an async context, unlike a plain drop.
            throwaway.shutdown_background();
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not close a half-open LISTEN connection at once; sqlx closes it when TCP gives up");
            drop(listener);
        }
    }
}
