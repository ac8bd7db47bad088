//! Finished runs, in the store and out of the scheduler's memory (issue
//! 28): the scheduler holds only the runs still going, so its memory and a
//! new leader's load do not grow with history.
//!
//! A run leaves memory once it is *settled*: finished, with no attempt
//! still active (a cancel its runner has not confirmed keeps it). After
//! the commit that settles it, the `archiver` writes [`archive`]'s ops,
//! which move it from its live record (`runs/<id>`) into the history, and
//! the loop then forgets it. Reads of a run the
//! loop does not hold come here ([`History`]); so does the finished part
//! of a `ListRuns` page. Retention (`retention`) deletes from here, off
//! the loop. Key layout: [`keys`].

pub(crate) mod archiver;
pub(crate) mod keys;
pub(crate) mod retention;

use super::listing::RunQuery;
use crate::model::{RunRecord, StoredRunState, run_key};
use crate::seal::Sealer;
use crate::store::{Op, Order, Page, Store, StoreError};
use capstan_proto::ids::{AttemptId, RunId};
use keys::{Index, Summary};
use lru::LruCache;
use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

/// Runs archived per store batch when a leadership starts.
const ARCHIVE_CHUNK: usize = 200;

/// The first window a page reads: 10^3 seqs.
const FIRST_WINDOW_LEVEL: u32 = 3;

/// Index entries read per store call while looking for a page's matches.
const SCAN_CHUNK: usize = 256;

/// The ops that move settled `run` from the live records to the history,
/// in an order a crash may cut anywhere (etcd splits a big batch): the
/// index entries, then the record, then the live record's delete. Cut
/// before the delete, the run is still live and a later commit (or the
/// next leader's load) archives it again; no reader ever misses it.
pub(crate) fn archive(run: &RunRecord, sealer: &Sealer) -> Vec<Op> {
    let summary = Summary::of(run);
    let value = serde_json::to_vec(&summary).expect("summaries serialize");
    let mut ops: Vec<Op> = Index::of(&summary)
        .iter()
        .map(|i| Op::Put {
            key: i.key(run.seq),
            value: value.clone(),
        })
        .collect();
    for a in run.tasks.iter().flat_map(|t| &t.attempts) {
        ops.push(Op::Put {
            key: keys::attempt(&a.id),
            value: run.id.to_string().into_bytes(),
        });
    }
    if !run.idempotency_key.is_empty() {
        ops.push(Op::Put {
            key: keys::idempotency(&run.idempotency_key),
            value: run.id.to_string().into_bytes(),
        });
    }
    ops.push(Op::Put {
        key: keys::record(&run.id),
        value: super::stored::encode(run, sealer),
    });
    ops.push(Op::Put {
        key: keys::finished_at(run.finished_at_ms, run.seq),
        value: run.id.to_string().into_bytes(),
    });
    ops.push(Op::Delete {
        key: run_key(&run.id),
    });
    ops
}

/// The ops that delete archived `run` (retention), in an order a crash may
/// cut anywhere: its `done/at` entry, which is how retention finds it,
/// goes last, so a cut pass is finished by the next one; before it its
/// `done/seq` entry, which a new leader numbers after.
pub(crate) fn forget(run: &RunRecord) -> Vec<Op> {
    let summary = Summary::of(run);
    // `done/seq` (how the next leader numbers on) stays until the record
    // is gone: a cut pass leaves it, and the next pass deletes it.
    let mut ops: Vec<Op> = Index::of(&summary)
        .iter()
        .filter(|i| **i != Index::all())
        .map(|i| Op::Delete {
            key: i.key(run.seq),
        })
        .collect();
    ops.extend(
        run.tasks
            .iter()
            .flat_map(|t| &t.attempts)
            .map(|a| Op::Delete {
                key: keys::attempt(&a.id),
            }),
    );
    if !run.idempotency_key.is_empty() {
        ops.push(Op::Delete {
            key: keys::idempotency(&run.idempotency_key),
        });
    }
    ops.push(Op::Delete {
        key: keys::record(&run.id),
    });
    ops.push(Op::Delete {
        key: Index::all().key(run.seq),
    });
    ops.push(Op::Delete {
        key: keys::finished_at(run.finished_at_ms, run.seq),
    });
    ops
}

/// The history's part of a `ListRuns` page.
#[derive(Debug, Default)]
pub(crate) struct Finished {
    /// Its newest `limit + 1` matches at most, newest first (one whose
    /// record went meanwhile is left out).
    pub(crate) runs: Vec<RunRecord>,
    /// More than `limit` matched.
    pub(crate) more: bool,
}

/// Reads of the finished runs. Cheap to clone (clones share the cache).
#[derive(Clone)]
pub(crate) struct History {
    store: Arc<dyn Store>,
    sealer: Sealer,
    /// Records read lately. An archived record never changes, so a cached
    /// one is never stale; retention drops what it deletes.
    cache: Arc<Mutex<LruCache<RunId, Arc<RunRecord>>>>,
    /// Bumped by every [`History::forgotten`]: a read that began before
    /// does not put what it read into the cache (the run may be gone).
    generation: Arc<std::sync::atomic::AtomicU64>,
}

/// Finished runs kept decoded: the pages a dashboard's live lists ask for
/// every two seconds, and more (a few MB at most).
const CACHED_RUNS: usize = 1024;

impl History {
    pub(crate) fn new(store: Arc<dyn Store>, sealer: Sealer) -> Self {
        let size = NonZeroUsize::new(CACHED_RUNS).expect("not zero");
        Self {
            store,
            sealer,
            cache: Arc::new(Mutex::new(LruCache::new(size))),
            generation: Default::default(),
        }
    }

    /// The finished run `id`, if the history holds it.
    pub(crate) async fn get(&self, id: &RunId) -> Result<Option<Arc<RunRecord>>, StoreError> {
        self.read(id).await?.transpose()
    }

    /// The finished run `id`: the store's answer, and inside it whether the
    /// record decodes (a page skips one that does not; GetRun says it).
    async fn read(
        &self,
        id: &RunId,
    ) -> Result<Option<Result<Arc<RunRecord>, StoreError>>, StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if let Some(run) = self.cache().get(id) {
            return Ok(Some(Ok(Arc::clone(run))));
        }
        let generation = self.generation.load(SeqCst);
        let Some(bytes) = self.store.get(&keys::record(id)).await? else {
            return Ok(None);
        };
        let run = match self.decode(&keys::record(id), &bytes) {
            Ok(run) => Arc::new(run),
            Err(e) => return Ok(Some(Err(e))),
        };
        let mut cache = self.cache();
        if self.generation.load(SeqCst) == generation {
            cache.put(id.clone(), Arc::clone(&run));
        }
        Ok(Some(Ok(run)))
    }

    /// Retention deleted these runs.
    pub(crate) fn forgotten<'a>(&self, ids: impl IntoIterator<Item = &'a RunId>) {
        let mut cache = self.cache();
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        for id in ids {
            cache.pop(id);
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, LruCache<RunId, Arc<RunRecord>>> {
        // Nothing panics while holding it; a poisoned cache is still whole.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The finished run an earlier submit with idempotency key `key` made.
    pub(crate) async fn by_key(&self, key: &str) -> Result<Option<RunId>, StoreError> {
        let found = self.store.get(&keys::idempotency(key)).await?;
        Ok(found.map(|v| RunId::from_string(String::from_utf8_lossy(&v).into_owned())))
    }

    /// The number after the newest finished run's (0: none).
    pub(crate) async fn next_seq(&self) -> Result<u64, StoreError> {
        let all = Index::all();
        let newest = self
            .store
            .scan_page(Page {
                prefix: &all.0,
                from: None,
                limit: 1,
                order: Order::Ascending,
            })
            .await?;
        Ok(newest
            .first()
            .and_then(|(k, _)| all.seq_of(k))
            .map_or(0, |s| s + 1))
    }

    /// Archives `settled` runs (the archiver's, or ones a new leadership
    /// finds among the live records: a crash before their archive, or a
    /// store written before finished runs left memory), a bounded batch at
    /// a time.
    pub(crate) async fn archive_found(&self, settled: &[RunRecord]) -> Result<(), StoreError> {
        for chunk in settled.chunks(ARCHIVE_CHUNK) {
            let batch = chunk
                .iter()
                .flat_map(|r| archive(r, &self.sealer))
                .collect();
            self.store.apply(batch).await?;
        }
        Ok(())
    }

    /// Which of `attempts` belong to finished runs (the orphan-log sweep):
    /// looked up one by one, a chunk at a time, not by reading the whole
    /// `done/attempts/` range.
    pub(crate) async fn finished_attempts(
        &self,
        attempts: &[AttemptId],
    ) -> Result<HashSet<AttemptId>, StoreError> {
        let mut found = HashSet::new();
        for chunk in attempts.chunks(256) {
            let keys: Vec<String> = chunk.iter().map(keys::attempt).collect();
            let got = futures::future::try_join_all(keys.iter().map(|k| self.store.get(k))).await?;
            found.extend(
                chunk
                    .iter()
                    .zip(got)
                    .filter(|(_, v)| v.is_some())
                    .map(|(a, _)| a.clone()),
            );
        }
        Ok(found)
    }

    /// The newest `q.limit + 1` finished runs that match `q` (one more
    /// than a page tells whether a next page exists), newest first; every
    /// run numbered so far is below `next_seq`.
    ///
    /// The index is read a window of seqs at a time from the newest
    /// possible key on, each window ten times wider than the last one that
    /// ran out: a page of a common filter reads one window, a rare one a
    /// few growing ones, never a range of the whole index at once (etcd
    /// would count all of it).
    pub(crate) async fn page(&self, q: &RunQuery, next_seq: u64) -> Result<Finished, StoreError> {
        let Some(index) = index_for(q) else {
            return Ok(Finished::default());
        };
        let bound = q.before_seq.map_or(next_seq, |b| b.min(next_seq));
        let Some(newest) = bound.checked_sub(1) else {
            return Ok(Finished::default());
        };
        let want = q.limit + 1;
        let mut found: Vec<Summary> = Vec::new();
        // The next inverted seq to read (keys are `u64::MAX - seq`).
        let mut next = u128::from(u64::MAX - newest);
        let mut level = FIRST_WINDOW_LEVEL;
        while found.len() < want && next <= u128::from(u64::MAX) {
            let (prefix, start, end) = index.window(next, level);
            let from = (next > start).then(|| index.inv_key((next - 1) as u64));
            let chunk = self
                .store
                .scan_page(Page {
                    prefix: &prefix,
                    from: from.as_deref(),
                    limit: SCAN_CHUNK,
                    order: Order::Ascending,
                })
                .await?;
            for (key, value) in &chunk {
                match serde_json::from_slice::<Summary>(value) {
                    Ok(s) if q.matches_summary(&s) => found.push(s),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(%key, error = %e, "skipping an unreadable index entry")
                    }
                }
                if found.len() == want {
                    break;
                }
            }
            match chunk.last().and_then(|(k, _)| index.inv_of(k)) {
                // The window holds more: go on in it.
                Some(last) if chunk.len() == SCAN_CHUNK => next = u128::from(last) + 1,
                _ => {
                    next = end;
                    level = (level + 1).min(20);
                }
            }
        }
        Ok(Finished {
            more: found.len() > q.limit,
            runs: self.records(&found).await?,
        })
    }

    /// The records of `found`, in its order; one an index names but the
    /// store no longer holds (deleted meanwhile) is left out.
    async fn records(&self, found: &[Summary]) -> Result<Vec<RunRecord>, StoreError> {
        // One record that does not decode costs its own row, not the page.
        let reads = found.iter().map(|s| async move {
            Ok::<_, StoreError>(match self.read(&s.id).await? {
                Some(Ok(run)) => Some(run),
                Some(Err(e)) => {
                    tracing::error!(run = %s.id, error = %e, "skipping an unreadable finished run");
                    None
                }
                None => None,
            })
        });
        let got = futures::future::try_join_all(reads).await?;
        Ok(got
            .into_iter()
            .flatten()
            .map(Arc::unwrap_or_clone)
            .collect())
    }

    fn decode(&self, key: &str, bytes: &[u8]) -> Result<RunRecord, StoreError> {
        super::stored::decode(bytes, &self.sealer).map_err(|e| {
            StoreError::Read(format!("the record at {key} does not decode: {e}").into())
        })
    }
}

/// The most selective index for `q`, or `None` when no finished run can
/// match (a filter on a state that is never finished).
fn index_for(q: &RunQuery) -> Option<Index> {
    if q.state.is_some_and(|s| !s.is_terminal()) {
        return None;
    }
    Some(if let Some(p) = &q.pipeline {
        Index::pipeline(p)
    } else if let Some(by) = &q.submitted_by {
        Index::submitted_by(by)
    } else if let Some(repo) = &q.repo {
        Index::repo(&capstan_proto::redact::redact_url(repo))
    } else if let Some(s) = q.state.filter(|s| *s != StoredRunState::Succeeded) {
        Index::state(s)
    } else {
        Index::all()
    })
}

#[cfg(test)]
mod tests;
