//! The history against a real scheduler loop on the in-memory store:
//! finished runs leave memory and are still read, paged and found by key;
//! a new leadership loads only the unfinished; retention deletes every key.

use super::retention::Retention;
use super::*;
use crate::api::pipeline::build_run;
use crate::metrics::Metrics;
use crate::scheduler::listing::RunQuery;
use crate::scheduler::{SchedulerHandle, start, state::Timing};
use crate::store::memory::MemoryStore;
use capstan_proto::api::v1::{Run, SubmitRunRequest};
use capstan_proto::pipeline::v1::RunState;
use tokio_util::sync::CancellationToken;

struct Leader {
    handle: SchedulerHandle,
    metrics: Arc<Metrics>,
    token: CancellationToken,
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

async fn lead(store: &Arc<dyn Store>) -> Leader {
    let metrics = Arc::new(Metrics::default());
    let (scheduler, handle) = start(
        Arc::clone(store),
        Arc::new(crate::logs::memory::MemoryLogStore::new()),
        Timing::default(),
        Arc::clone(&metrics),
        Sealer::from_key(&[1; 32]),
        1,
    )
    .await
    .unwrap();
    let token = CancellationToken::new();
    tokio::spawn(scheduler.run(token.child_token()));
    Leader {
        handle,
        metrics,
        token,
    }
}

fn request(name: &str, key: &str) -> RunRecord {
    build_run(SubmitRunRequest {
        pipeline_yaml: format!(
            "version: 1\nname: {name}\ntasks:\n  t:\n    steps: [ {{ run: x }} ]\n"
        ),
        idempotency_key: key.into(),
        repo: "http://bob:pw@git.example/r.git".into(),
        ..Default::default()
    })
    .unwrap()
}

impl Leader {
    async fn submit(&self, name: &str, key: &str) -> RunId {
        let quota = crate::limits::Quota::UNLIMITED;
        self.handle
            .submit(request(name, key), quota)
            .await
            .unwrap()
            .unwrap()
    }
    async fn cancel(&self, id: &RunId) -> Run {
        self.handle
            .cancel_run(id.clone(), None)
            .await
            .unwrap()
            .unwrap()
    }
    async fn get(&self, id: &RunId) -> Run {
        self.handle.get_run(id.clone()).await.unwrap().unwrap()
    }
    fn held(&self) -> i64 {
        self.metrics.runs_held.get()
    }
    /// Waits until the loop holds `n` runs (the archiver's answers come
    /// after its write).
    async fn wait_held(&self, n: i64) {
        for _ in 0..500 {
            if self.held() == n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{} runs held, not {n}", self.held());
    }
    /// Every run `q` lists, page after page of `limit`.
    async fn list_all(&self, mut q: RunQuery) -> Vec<String> {
        let mut ids = Vec::new();
        loop {
            let (page, next) = self.handle.list_runs(q.clone()).await.unwrap().unwrap();
            ids.extend(page.into_iter().map(|r| r.id));
            let Some(next) = next else { return ids };
            q.before_seq = Some(next[1..].parse().unwrap());
        }
    }
}

fn query(limit: usize) -> RunQuery {
    RunQuery {
        limit,
        ..RunQuery::default()
    }
}

#[tokio::test]
async fn finished_runs_leave_memory_and_every_read_still_finds_them() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let l = lead(&store).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            l.submit(if i % 2 == 0 { "even" } else { "odd" }, &format!("k{i}"))
                .await,
        );
    }
    for id in &ids[..3] {
        assert_eq!(l.cancel(id).await.state, RunState::Cancelled as i32);
    }
    l.wait_held(2).await;
    for id in &ids[..3] {
        assert!(
            store.get(&run_key(id)).await.unwrap().is_none(),
            "a live record left"
        );
        assert!(store.get(&keys::record(id)).await.unwrap().is_some());
    }
    let archived = store.get(&keys::record(&ids[0])).await.unwrap().unwrap();
    assert!(
        !String::from_utf8_lossy(&archived).contains(":pw@"),
        "the password is sealed"
    );
    // Read from the history, the URL whole again (the leader may clone with it).
    let run = l.get(&ids[0]).await;
    assert_eq!(run.state, RunState::Cancelled as i32);
    assert_eq!(
        l.cancel(&ids[0]).await.id,
        ids[0].to_string(),
        "a cancel of a finished run answers it"
    );
    let (attempts, done) = l
        .handle
        .attempts(ids[0].clone(), None)
        .await
        .unwrap()
        .unwrap();
    assert!(attempts.is_empty() && done);
    let rx = l.handle.watch_run(ids[1].clone()).await.unwrap().unwrap();
    assert_eq!(rx.borrow().state, RunState::Cancelled as i32);

    // Pages of 2, newest first, each run once, while one more arrives.
    let (first, next) = l.handle.list_runs(query(2)).await.unwrap().unwrap();
    let newest: Vec<String> = ids.iter().rev().map(|i| i.to_string()).collect();
    assert_eq!(
        first.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        newest[..2]
    );
    let late = l.submit("even", "late").await;
    let mut q = query(2);
    q.before_seq = Some(next.unwrap()[1..].parse().unwrap());
    let rest = l.list_all(q).await;
    assert_eq!(rest, newest[2..]);
    let all = l.list_all(query(1)).await;
    assert_eq!(all.len(), 6);
    assert_eq!(all[0], late.to_string());
    // Filters, on both the held runs and the history.
    let by = |f: fn(&mut RunQuery)| {
        let mut q = query(10);
        f(&mut q);
        q
    };
    let even = l.list_all(by(|q| q.pipeline = Some("even".into()))).await;
    assert_eq!(
        even,
        [
            late.to_string(),
            ids[4].to_string(),
            ids[2].to_string(),
            ids[0].to_string()
        ]
    );
    let cancelled = l
        .list_all(by(|q| {
            q.state = Some(crate::model::StoredRunState::Cancelled)
        }))
        .await;
    assert_eq!(
        cancelled,
        [ids[2].to_string(), ids[1].to_string(), ids[0].to_string()]
    );
    let repo = l
        .list_all(by(|q| {
            q.repo = Some("http://bob:***@git.example/r.git".into())
        }))
        .await;
    assert_eq!(repo.len(), 6, "repositories are matched redacted");
    let queued = l
        .list_all(by(|q| q.state = Some(crate::model::StoredRunState::Queued)))
        .await;
    assert_eq!(queued.len(), 3);

    // A new leadership loads only the unfinished runs, numbers after the
    // history, and still finds a finished run's idempotency key.
    drop(l);
    let l = lead(&store).await;
    assert_eq!(l.held(), 3);
    assert_eq!(
        l.submit("odd", "k0").await,
        ids[0],
        "a repeat of a finished run's key"
    );
    let newer = l.submit("odd", "new").await;
    assert_eq!(l.list_all(query(3)).await[0], newer.to_string());
    assert_eq!(l.list_all(query(3)).await.len(), 7);
}

#[tokio::test]
async fn a_settled_run_under_the_live_records_is_archived_at_load() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let sealer = Sealer::from_key(&[1; 32]);
    let mut old = request("old", "legacy-key");
    old.state = crate::model::StoredRunState::Succeeded;
    old.seq = 41;
    // Within the default retention (30 days), which runs meanwhile.
    old.finished_at_ms = crate::model::now_ms();
    store
        .apply(vec![Op::Put {
            key: run_key(&old.id),
            value: crate::scheduler::stored::encode(&old, &sealer),
        }])
        .await
        .unwrap();
    let l = lead(&store).await;
    assert_eq!(l.held(), 0);
    assert!(store.get(&run_key(&old.id)).await.unwrap().is_none());
    assert_eq!(l.get(&old.id).await.state, RunState::Succeeded as i32);
    assert_eq!(l.submit("x", "legacy-key").await, old.id);
    let fresh = l.submit("x", "").await;
    let listed = l.list_all(query(10)).await;
    assert_eq!(
        listed,
        [fresh.to_string(), old.id.to_string()],
        "numbered after it"
    );
}

#[tokio::test]
async fn retention_deletes_every_key_of_an_expired_run_and_keeps_the_rest() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let l = lead(&store).await;
    let gone = l.submit("a", "key-a").await;
    l.cancel(&gone).await;
    let kept = l.submit("b", "key-b").await;
    l.wait_held(1).await;
    let before = store.scan_prefix("done/").await.unwrap();
    assert!(before.len() >= 8, "{before:?}");
    let retention = Retention {
        history: History::new(Arc::clone(&store), Sealer::from_key(&[1; 32])),
        logs: Arc::new(crate::logs::memory::MemoryLogStore::new()),
        metrics: Arc::clone(&l.metrics),
        retention: std::time::Duration::from_secs(3600),
    };
    assert!(!retention.pass().await.unwrap(), "nothing is past an hour");
    assert_eq!(
        store.scan_prefix("done/").await.unwrap().len(),
        before.len()
    );
    let retention = Retention {
        retention: std::time::Duration::ZERO,
        ..retention
    };
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert!(
        !retention.pass().await.unwrap(),
        "a pass of one run is not full"
    );
    let left = store.scan_prefix("done/").await.unwrap();
    assert!(left.is_empty(), "keys of a deleted run are left: {left:?}");
    assert_eq!(l.metrics.runs_deleted.get(), 1);
    let err = l.handle.get_run(gone.clone()).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("no run"), "{err}");
    assert_eq!(l.get(&kept).await.state, RunState::Queued as i32);
}

/// Pages over runs whose seqs lie far apart (windows of the index met
/// empty, full and in part), with a cursor and a rare filter: every run
/// once, newest first, whatever the newest possible seq.
#[tokio::test]
async fn pages_walk_windows_of_the_index_in_order() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let sealer = Sealer::from_key(&[1; 32]);
    let seqs = [0u64, 3, 998, 999, 1000, 1001, 2500, 123_456, 5_000_000];
    let mut batch = Vec::new();
    for (i, &seq) in seqs.iter().enumerate() {
        let mut run = request(if i % 4 == 0 { "rare" } else { "common" }, "");
        run.state = crate::model::StoredRunState::Succeeded;
        run.seq = seq;
        run.finished_at_ms = crate::model::now_ms();
        batch.extend(archive(&run, &sealer));
    }
    store.apply(batch).await.unwrap();
    let history = History::new(store, sealer);
    let walk = |q: RunQuery, next_seq: u64| {
        let history = history.clone();
        async move {
            let mut q = q;
            let mut out = Vec::new();
            loop {
                let page = history.page(&q, next_seq).await.unwrap();
                let more = page.more;
                out.extend(page.runs.iter().take(q.limit).map(|r| r.seq));
                if !more {
                    return out;
                }
                q.before_seq = out.last().copied();
            }
        }
    };
    let newest_first: Vec<u64> = seqs.iter().rev().copied().collect();
    for next_seq in [5_000_001, 1 << 40, u64::MAX] {
        for limit in [1, 2, 3, 50] {
            assert_eq!(
                walk(query(limit), next_seq).await,
                newest_first,
                "limit {limit}"
            );
        }
    }
    let rare = RunQuery {
        pipeline: Some("rare".into()),
        ..query(1)
    };
    assert_eq!(walk(rare, 5_000_001).await, [5_000_000, 1000, 0]);
    // Only what is below the newest seq handed out.
    assert_eq!(walk(query(10), 1001).await, [1000, 999, 998, 3, 0]);
    assert!(walk(query(10), 0).await.is_empty());
}

fn archived(seq: u64, name: &str) -> RunRecord {
    let mut run = request(name, "");
    run.state = crate::model::StoredRunState::Succeeded;
    run.seq = seq;
    run.finished_at_ms = 1_000 + seq as i64;
    run
}

#[tokio::test]
async fn an_unreadable_record_costs_its_row_not_the_page() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let sealer = Sealer::from_key(&[1; 32]);
    let runs: Vec<RunRecord> = (1..=3).map(|s| archived(s, "p")).collect();
    let mut batch: Vec<Op> = runs.iter().flat_map(|r| archive(r, &sealer)).collect();
    batch.push(Op::Put {
        key: keys::record(&runs[1].id),
        value: b"{ not a run".to_vec(),
    });
    store.apply(batch).await.unwrap();
    let history = History::new(store, sealer);
    let page = history.page(&query(10), 10).await.unwrap();
    let seqs: Vec<u64> = page.runs.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [3, 1]);
    assert!(!page.more);
    assert!(history.get(&runs[1].id).await.is_err(), "GetRun says it");
    // A page of one: the bad record is the one more, and there is more.
    let page = history.page(&query(1), 10).await.unwrap();
    assert!(page.more && page.runs.len() == 1, "{page:?}");
}

/// A retention pass cut right after a run's record was deleted leaves its
/// `done/seq` entry (so a new leader still numbers after it) and its
/// `done/at` entry; the next pass deletes both.
#[tokio::test]
async fn a_retention_pass_cut_after_the_record_is_finished_by_the_next() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let sealer = Sealer::from_key(&[1; 32]);
    let run = archived(7, "p");
    store.apply(archive(&run, &sealer)).await.unwrap();
    let ops = forget(&run);
    let cut = ops
        .iter()
        .position(|op| matches!(op, Op::Delete { key } if *key == keys::record(&run.id)))
        .unwrap();
    store.apply(ops[..=cut].to_vec()).await.unwrap();
    let history = History::new(Arc::clone(&store), sealer);
    assert_eq!(
        history.next_seq().await.unwrap(),
        8,
        "numbered after the cut run"
    );
    let retention = Retention {
        history,
        logs: Arc::new(crate::logs::memory::MemoryLogStore::new()),
        metrics: Arc::new(Metrics::default()),
        retention: std::time::Duration::from_secs(1),
    };
    retention.pass().await.unwrap();
    let left = store.scan_prefix("done/").await.unwrap();
    assert!(left.is_empty(), "{left:?}");
}
