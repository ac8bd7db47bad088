//! The one set of wait helpers of the harness: poll a probe until it yields
//! a value, under a deadline. Every "wait until ..." of the clusters, etcd,
//! the OTLP receiver and the bench goes through [`poll_until`] (or
//! [`eventually`], which turns a timeout into an error with a message).
//!
//! The probe runs first, then the deadline is checked, then the poll sleeps:
//! a probe is always tried at least once, and once at the deadline.

use anyhow::anyhow;
use std::time::{Duration, Instant};

/// Polls `probe` every `every` until it returns `Ok(Some(value))`; `Ok(None)`
/// once `timeout` has passed. An `Err` from the probe ends the wait at once
/// (a process that exited, say).
pub async fn poll_until<T>(
    timeout: Duration,
    every: Duration,
    mut probe: impl AsyncFnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<Option<T>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await? {
            return Ok(Some(value));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(every).await;
    }
}

/// [`poll_until`] that fails with `message()` at the deadline.
pub async fn eventually<T>(
    timeout: Duration,
    every: Duration,
    probe: impl AsyncFnMut() -> anyhow::Result<Option<T>>,
    message: impl FnOnce() -> String,
) -> anyhow::Result<T> {
    poll_until(timeout, every, probe)
        .await?
        .ok_or_else(|| anyhow!(message()))
}

/// [`poll_until`] for code that is not async (it sleeps the thread).
pub fn poll_until_blocking<T>(
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<Option<T>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe()? {
            return Ok(Some(value));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(every);
    }
}
