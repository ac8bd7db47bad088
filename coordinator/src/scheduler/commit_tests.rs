//! Tests of the loop's commit (real [`Scheduler`] task, a store the test
//! holds): what leaves before the store write and what only after it.

use super::*;
use crate::api::pipeline::build_run;
use crate::store::memory::MemoryStore;
use crate::store::{Op, Page};
use async_trait::async_trait;
use capstan_proto::api::v1::SubmitRunRequest;
use capstan_proto::runner::v1 as rpb;
use rpb::coordinator_message::Kind as Down;
use rpb::runner_message::Kind as Up;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc::error::TryRecvError;

const EPOCH: u64 = 7;
const WAIT: Duration = Duration::from_secs(10);

/// A [`MemoryStore`] whose writes, while `held`, each wait for the test's
/// verdict: let through (`true`) or failed (`false`).
struct HeldStore {
    inner: MemoryStore,
    held: AtomicBool,
    writes: mpsc::UnboundedSender<oneshot::Sender<bool>>,
    /// Offers a test's forwarder has passed on (see
    /// `the_tasks_carrying_tentative_offers_run_before_the_write`), and
    /// that count as each write began.
    offers_passed_on: std::sync::atomic::AtomicUsize,
    passed_on_at_writes: std::sync::Mutex<Vec<usize>>,
}

#[async_trait]
impl Store for HeldStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }

    async fn scan_page(&self, page: Page<'_>) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.scan_page(page).await
    }

    async fn apply(&self, batch: Vec<Op>) -> Result<(), StoreError> {
        self.passed_on_at_writes
            .lock()
            .unwrap()
            .push(self.offers_passed_on.load(Ordering::SeqCst));
        if self.held.load(Ordering::SeqCst) {
            let (verdict, wait) = oneshot::channel();
            let _ = self.writes.send(verdict);
            if !wait.await.unwrap_or(false) {
                return Err(StoreError::Write("failed by the test".into()));
            }
        }
        self.inner.apply(batch).await
    }
}

type Rx = mpsc::UnboundedReceiver<Result<rpb::CoordinatorMessage, tonic::Status>>;

/// A running scheduler over a [`HeldStore`].
struct Fixture {
    store: Arc<HeldStore>,
    /// One verdict sender per write made while held.
    writes: mpsc::UnboundedReceiver<oneshot::Sender<bool>>,
    handle: SchedulerHandle,
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
    _shutdown: tokio_util::sync::DropGuard,
}

/// A runner attached to the fixture's scheduler.
struct Attached {
    id: RunnerId,
    secret: String,
    conn: u64,
    rx: Rx,
}

impl Fixture {
    async fn start() -> Self {
        let (tx, writes) = mpsc::unbounded_channel();
        let store = Arc::new(HeldStore {
            inner: MemoryStore::new(),
            held: AtomicBool::new(false),
            writes: tx,
            offers_passed_on: Default::default(),
            passed_on_at_writes: Default::default(),
        });
        let (scheduler, handle) = start(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::new(crate::logs::memory::MemoryLogStore::new()),
            state::Timing::default(),
            Arc::new(Metrics::default()),
            crate::seal::Sealer::from_key(&[1; 32]),
            EPOCH,
        )
        .await
        .unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(scheduler.run(shutdown.child_token()));
        Self {
            store,
            writes,
            handle,
            task,
            _shutdown: shutdown.drop_guard(),
        }
    }

    /// Registers runner `name` (one slot) and attaches it; the welcome is
    /// taken off its stream.
    async fn runner(&self, name: &str, confirms_offers: bool) -> Attached {
        let (id, secret) = self.register(name).await;
        let mut r = self.attach(id, secret, confirms_offers, vec![]).await;
        assert!(matches!(recv(&mut r.rx).await, Some(Down::Welcome(_))));
        r
    }

    /// Answered after the next commit: a barrier for what was told before.
    async fn register(&self, name: &str) -> (RunnerId, String) {
        let name = name.to_string();
        self.handle
            .ask(|reply| Command::Register {
                name,
                takeover: crate::scheduler::state::Takeover::Nothing,
                labels: BTreeMap::new(),
                capacity: 1,
                version: "test".into(),
                identity: None,
                ephemeral: None,
                reply,
            })
            .await
            .unwrap()
            .unwrap()
    }

    async fn attach(
        &self,
        id: RunnerId,
        secret: String,
        confirms_offers: bool,
        dropped: Vec<String>,
    ) -> Attached {
        let (tx, rx) = mpsc::unbounded_channel();
        let hello = rpb::Hello {
            runner_id: id.to_string(),
            runner_secret: secret.clone(),
            protocol_version: capstan_proto::PROTOCOL_VERSION,
            confirms_offers,
            dropped_attempts: dropped,
            ..Default::default()
        };
        let (conn, _lease) = self
            .handle
            .ask(|reply| Command::Attach {
                hello,
                identity: None,
                tx,
                reply,
            })
            .await
            .unwrap()
            .unwrap();
        Attached {
            id,
            secret,
            conn,
            rx,
        }
    }

    fn tell(&self, r: &Attached, kind: Up) {
        self.handle.tell(Command::RunnerMessage {
            runner: r.id.clone(),
            conn: r.conn,
            kind,
        });
    }

    fn hold_writes(&self, held: bool) {
        self.store.held.store(held, Ordering::SeqCst);
    }

    /// Submits a one-task run with writes held; returns the submit's
    /// answer (it comes after the commit) and the verdict of the commit's
    /// write, which is waiting in the store now.
    async fn submit_held(
        &mut self,
    ) -> (
        tokio::task::JoinHandle<Result<RunId, SchedulerGone>>,
        oneshot::Sender<bool>,
    ) {
        self.hold_writes(true);
        let run = build_run(SubmitRunRequest {
            pipeline_yaml: "version: 1\nname: c\ntasks:\n  t:\n    steps: [ { run: x } ]\n".into(),
            file_name: "c.yaml".into(),
            ..Default::default()
        })
        .unwrap();
        let handle = self.handle.clone();
        let submitted = tokio::spawn(async move {
            handle
                .ask(|reply| Command::Submit {
                    run: Box::new(run),
                    quota: crate::limits::Quota::UNLIMITED,
                    reply,
                })
                .await
                .map(|r| r.unwrap())
        });
        let verdict = tokio::time::timeout(WAIT, self.writes.recv())
            .await
            .expect("the submit's commit did not write")
            .unwrap();
        (submitted, verdict)
    }

    async fn stored_run(&self, id: &RunId) -> RunRecord {
        let bytes = self.store.inner.get(&run_key(id)).await.unwrap();
        serde_json::from_slice(&bytes.expect("the run is stored")).unwrap()
    }
}

async fn recv(rx: &mut Rx) -> Option<Down> {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("nothing came down the stream")
        .map(|m| m.unwrap().kind.unwrap())
}

/// What is on the stream right now, if anything.
fn sent_now(rx: &mut Rx) -> Result<Down, TryRecvError> {
    rx.try_recv().map(|m| m.unwrap().kind.unwrap())
}

/// The offer already out while the write is held: a tentative one.
fn tentative_offer_sent(rx: &mut Rx) -> rpb::Offer {
    let Ok(Down::Offer(offer)) = sent_now(rx) else {
        panic!("no offer while the write is held")
    };
    assert!(offer.tentative, "{offer:?}");
    offer
}

fn accept(offer: &rpb::Offer) -> Up {
    Up::Accept(rpb::OfferAccepted {
        attempt_id: offer.attempt_id.clone(),
    })
}

#[tokio::test]
async fn a_tentative_offer_leaves_before_the_write_and_its_confirm_after() {
    let mut f = Fixture::start().await;
    let mut r = f.runner("r1", true).await;
    let (submitted, write) = f.submit_held().await;

    // The write is under way, and the offer is already out.
    let offer = tentative_offer_sent(&mut r.rx);
    assert_eq!(
        sent_now(&mut r.rx),
        Err(TryRecvError::Empty),
        "confirmed early"
    );
    // The runner accepts before the write is done; the scheduler takes it
    // in the next turn, after this commit.
    f.tell(&r, accept(&offer));

    f.hold_writes(false);
    write.send(true).unwrap();
    let Some(Down::Confirm(confirm)) = recv(&mut r.rx).await else {
        panic!("expected the confirm")
    };
    assert_eq!(confirm.attempt_id, offer.attempt_id);
    assert_eq!(confirm.leader_epoch, EPOCH);
    let run = submitted.await.unwrap().unwrap();

    f.register("barrier").await;
    let stored = f.stored_run(&run).await;
    let task = &stored.tasks[0];
    assert_eq!(task.state, StoredTaskState::Running);
    assert_eq!(task.attempts.len(), 1);
    assert_eq!(task.attempts[0].id.as_str(), offer.attempt_id);
    assert_eq!(task.attempts[0].state, AttemptState::Running);
    assert_eq!(sent_now(&mut r.rx), Err(TryRecvError::Empty));
}

/// redb writes on the scheduler's own thread and blocks it for the fsync
/// (`store::redb::write_here`), so the commit yields first: the task that
/// carries a tentative offer to the runner (tonic's stream task, in the
/// server) must have run when the write begins, or the offer would wait out
/// the fsync on that thread. Here a forwarder task stands in for it; on a
/// current-thread runtime nothing else could run it meanwhile, so the order
/// is exact.
#[tokio::test(flavor = "current_thread")]
async fn the_tasks_carrying_tentative_offers_run_before_the_write() {
    let f = Fixture::start().await;
    let (id, secret) = f.register("r1").await;
    let mut runner = f.attach(id, secret, true, vec![]).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let store = Arc::clone(&f.store);
    tokio::spawn(async move {
        while let Some(m) = runner.rx.recv().await {
            if matches!(
                &m,
                Ok(rpb::CoordinatorMessage {
                    kind: Some(Down::Offer(_)),
                    ..
                })
            ) {
                store.offers_passed_on.fetch_add(1, Ordering::SeqCst);
            }
            let _ = tx.send(m);
        }
    });
    assert!(matches!(recv(&mut rx).await, Some(Down::Welcome(_))));
    let run = build_run(SubmitRunRequest {
        pipeline_yaml: "version: 1\nname: c\ntasks:\n  t:\n    steps: [ { run: x } ]\n".into(),
        file_name: "c.yaml".into(),
        ..Default::default()
    })
    .unwrap();
    f.handle
        .ask(|reply| Command::Submit {
            run: Box::new(run),
            quota: crate::limits::Quota::UNLIMITED,
            reply,
        })
        .await
        .unwrap()
        .unwrap();
    let Some(Down::Offer(offer)) = recv(&mut rx).await else {
        panic!("no offer")
    };
    assert!(offer.tentative, "{offer:?}");
    // The submit is answered after its commit's write: the last one so far.
    let at_writes = f.store.passed_on_at_writes.lock().unwrap().clone();
    assert_eq!(
        at_writes.last(),
        Some(&1),
        "offers passed on as each write began: {at_writes:?}"
    );
}

#[tokio::test]
async fn an_offer_to_a_runner_that_does_not_confirm_waits_for_the_write() {
    let mut f = Fixture::start().await;
    let mut r = f.runner("r1", false).await;
    let (submitted, write) = f.submit_held().await;
    assert_eq!(
        sent_now(&mut r.rx),
        Err(TryRecvError::Empty),
        "an offer left before its write"
    );

    f.hold_writes(false);
    write.send(true).unwrap();
    let Some(Down::Offer(offer)) = recv(&mut r.rx).await else {
        panic!("expected the offer")
    };
    assert!(!offer.tentative);
    submitted.await.unwrap().unwrap();
    f.register("barrier").await;
    assert_eq!(sent_now(&mut r.rx), Err(TryRecvError::Empty), "a confirm");
}

#[tokio::test]
async fn a_failed_write_sends_no_confirm() {
    let mut f = Fixture::start().await;
    let mut r = f.runner("r1", true).await;
    let (submitted, write) = f.submit_held().await;
    let offer = tentative_offer_sent(&mut r.rx);
    f.tell(&r, accept(&offer));

    write.send(false).unwrap();
    let stopped = tokio::time::timeout(WAIT, &mut f.task).await.unwrap();
    assert!(
        stopped.unwrap().is_err(),
        "the scheduler stops on a failed write"
    );
    assert!(submitted.await.unwrap().is_err(), "the submit was answered");
    // The scheduler is gone and the stream with it: the runner drops
    // what it prepared. Nothing else came down it, above all no confirm.
    assert_eq!(recv(&mut r.rx).await, None);
}

/// A runner's stream ends between a tentative offer and its confirm (the
/// write did land); it reconnects without the attempt, saying it dropped it
/// unrun or not. The task is offered again either way; the stored run after
/// that.
async fn dropped_then_reconnected(says_dropped: bool) -> RunRecord {
    let mut f = Fixture::start().await;
    let r = f.runner("r1", true).await;
    let (submitted, write) = f.submit_held().await;
    let Attached {
        id,
        secret,
        conn,
        mut rx,
    } = r;
    let first = tentative_offer_sent(&mut rx);
    // The stream ends before the write is done: the runner drops the
    // attempt, and its confirm goes nowhere.
    drop(rx);
    f.handle.tell(Command::Detach {
        runner: id.clone(),
        conn,
    });
    f.hold_writes(false);
    write.send(true).unwrap();
    let run = submitted.await.unwrap().unwrap();

    // Its next hello does not list the attempt as running: lost, and
    // offered again.
    let dropped = if says_dropped {
        vec![first.attempt_id.clone()]
    } else {
        vec![]
    };
    let mut r = f.attach(id, secret, true, dropped).await;
    assert!(matches!(recv(&mut r.rx).await, Some(Down::Welcome(_))));
    let Some(Down::Offer(again)) = recv(&mut r.rx).await else {
        panic!("the task was not offered again")
    };
    assert_eq!(again.attempt_number, 2);
    assert_ne!(again.attempt_id, first.attempt_id);
    f.register("barrier").await;
    let stored = f.stored_run(&run).await;
    assert_eq!(stored.tasks[0].attempts[0].state, AttemptState::Lost);
    assert_eq!(stored.tasks[0].state, StoredTaskState::Offered);
    stored
}

#[tokio::test]
async fn an_attempt_dropped_unrun_is_requeued_without_counting_a_failure() {
    let stored = dropped_then_reconnected(true).await;
    assert_eq!(
        stored.tasks[0].infra_failures, 0,
        "nothing ran, no runner was lost"
    );
    assert!(
        !stored.tasks[0].message.contains("lost"),
        "{}",
        stored.tasks[0].message
    );
}

#[tokio::test]
async fn an_attempt_missing_from_the_hello_counts_as_a_lost_runner() {
    let stored = dropped_then_reconnected(false).await;
    assert_eq!(stored.tasks[0].infra_failures, 1);
}
