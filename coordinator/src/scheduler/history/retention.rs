//! Retention, off the scheduler loop: the finished runs past `--retention`
//! are deleted from the history in passes of at most [`MAX_PER_PASS`] runs
//! (one store batch each), then their logs. The loop holds no finished run,
//! so a pass pauses no dispatch; it only shares the store.
//!
//! Records go before logs, so a crash in between leaves orphan log files
//! (the next leadership's sweep deletes them), never a run whose log is
//! gone. A pass cut by a crash (etcd splits a big batch) is finished by the
//! next: a run's `done/at` entry, by which a pass finds it, goes last.

use super::keys;
use crate::logs::LogStore;
use crate::metrics::Metrics;
use crate::model::{RunRecord, now_ms};
use crate::store::{Op, Order, Page, StoreError};
use capstan_proto::ids::{AttemptId, RunId};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Most runs one pass deletes (one store batch).
pub(crate) const MAX_PER_PASS: usize = 500;

/// The next pass after a full one: a backlog (after a long stop, or more
/// runs expiring than a pass takes) is worked off at once.
const BACKLOG_PASS_EVERY: Duration = Duration::from_millis(50);

/// How often retention looks for expired runs: a quarter of the retention,
/// between 100 ms (tests) and a minute.
fn check_every(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// The retention task of one leadership.
pub(crate) struct Retention {
    /// Its store is where the runs are deleted; its cache forgets them.
    pub(crate) history: super::History,
    pub(crate) logs: Arc<dyn LogStore>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) retention: Duration,
}

impl Retention {
    /// Deletes expired runs until `shutdown`, or until a write is fenced
    /// (the leadership is over). A failed pass is logged and tried again.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        loop {
            let wait = match self.pass().await {
                Ok(true) => BACKLOG_PASS_EVERY,
                Ok(false) => check_every(self.retention),
                Err(StoreError::Fenced) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "a retention pass failed; trying again later");
                    check_every(self.retention)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass; true when it was full (more may be due).
    pub(crate) async fn pass(&self) -> Result<bool, StoreError> {
        let started = std::time::Instant::now();
        let ms = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms().saturating_sub(ms);
        let oldest = self
            .history
            .store
            .scan_page(Page {
                prefix: keys::AT,
                from: None,
                limit: MAX_PER_PASS,
                order: Order::Ascending,
            })
            .await?;
        let due: Vec<(String, RunId)> = oldest
            .iter()
            .take_while(|(k, _)| keys::finished_at_ms(k).is_some_and(|t| t <= cutoff))
            .map(|(k, v)| {
                let id = String::from_utf8_lossy(v).into_owned();
                (k.clone(), RunId::from_string(id))
            })
            .collect();
        if due.is_empty() {
            return Ok(false);
        }
        let (batch, runs) = self.deletes(&due).await?;
        self.history.store.apply(batch).await?;
        self.history.forgotten(due.iter().map(|(_, id)| id));
        self.metrics.runs_deleted.inc_by(due.len() as u64);
        let took = started.elapsed();
        self.metrics
            .retention_pass_seconds
            .observe(took.as_secs_f64());
        tracing::info!(runs = due.len(), took_ms = took.as_secs_f64() * 1e3,
            retention = ?self.retention, "deleted finished runs past the retention");
        let attempts: Vec<AttemptId> = runs
            .iter()
            .flat_map(|r| r.tasks.iter().flat_map(|t| &t.attempts))
            .map(|a| a.id.clone())
            .collect();
        for attempt in attempts {
            if let Err(e) = self.logs.delete(&attempt).await {
                tracing::warn!(%attempt, error = %e, "could not delete a log");
            }
        }
        Ok(due.len() == MAX_PER_PASS)
    }

    /// The batch that deletes the `due` runs, and their records. A `done/at`
    /// entry whose record is gone (a pass cut after the record's delete)
    /// only loses that entry.
    async fn deletes(
        &self,
        due: &[(String, RunId)],
    ) -> Result<(Vec<Op>, Vec<RunRecord>), StoreError> {
        let records: Vec<String> = due.iter().map(|(_, id)| keys::record(id)).collect();
        let reads = records.iter().map(|k| self.history.store.get(k));
        let got = futures::future::try_join_all(reads).await?;
        let mut batch = Vec::new();
        let mut runs = Vec::new();
        for ((at, id), bytes) in due.iter().zip(got) {
            // The record's fields the deletes need hold no secret: decoded
            // without opening its sealed password.
            match bytes.map(|b| serde_json::from_slice::<RunRecord>(&b)) {
                // `forget` deletes its `done/at` entry too.
                Some(Ok(run)) => {
                    batch.extend(super::forget(&run));
                    runs.push(run);
                    continue;
                }
                Some(Err(e)) => {
                    tracing::error!(run = %id, error = %e, "an unreadable finished run: deleting its record");
                    batch.push(Op::Delete {
                        key: keys::record(id),
                    });
                }
                None => {}
            }
            // A pass cut after the record's delete may have left its
            // `done/seq` entry; one a newer run now holds is not this run's.
            if let Some(seq) = keys::finished_at_seq(at) {
                let all = super::keys::Index::all().key(seq);
                let entry = self.history.store.get(&all).await?;
                let summary =
                    entry.and_then(|v| serde_json::from_slice::<super::keys::Summary>(&v).ok());
                if summary.is_some_and(|s| &s.id == id) {
                    batch.push(Op::Delete { key: all });
                }
            }
            batch.push(Op::Delete { key: at.clone() });
        }
        Ok((batch, runs))
    }
}
