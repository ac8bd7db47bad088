//! The archiver, beside the scheduler loop: settled runs go from the live
//! records into the history (`super::archive`), off the commit path. The
//! commit that settles a run writes its live record as any other (one
//! store op); the archiver's batches, several index entries a run, follow
//! on their own, and the loop evicts the runs once told they are archived.
//! On etcd, which splits a batch into transactions of 100 ops run one
//! after another, the archive in the commit cost every dispatch three
//! times the transactions (drain benchmark, etcd: 15,196 -> 5,196 tasks/s).
//!
//! A settled run never changes, so nothing the loop writes races an
//! archive of it. Until it is evicted the loop answers for it; after, the
//! history does: the archive is durable before the loop hears of it.

use super::History;
use crate::model::RunRecord;
use crate::scheduler::Command;
use crate::store::StoreError;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Most runs gathered into one archive pass.
const MAX_PER_PASS: usize = 2000;
/// The wait before a failed archive is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Archives what `settled` brings and tells `scheduler` which runs are in
/// the history now; until `shutdown`, or until a write is fenced (the
/// leadership is over: the next leader archives what is left at its load).
pub(crate) async fn run(
    history: History,
    mut settled: mpsc::UnboundedReceiver<RunRecord>,
    scheduler: mpsc::WeakUnboundedSender<Command>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = settled.recv() => match r {
                Some(r) => r,
                None => return,
            },
        };
        let mut runs = vec![first];
        while runs.len() < MAX_PER_PASS {
            match settled.try_recv() {
                Ok(r) => runs.push(r),
                Err(_) => break,
            }
        }
        loop {
            match history.archive_found(&runs).await {
                Ok(()) => break,
                Err(StoreError::Fenced) => return,
                Err(e) => {
                    tracing::warn!(error = %e, runs = runs.len(), "archiving finished runs failed; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_AFTER) => {}
                    }
                }
            }
        }
        let Some(scheduler) = scheduler.upgrade() else {
            return; // the loop is gone
        };
        let _ = scheduler.send(Command::Archived(runs.into_iter().map(|r| r.id).collect()));
    }
}
