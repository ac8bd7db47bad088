//! The agent against the test coordinator ([`crate::testing`]): offers,
//! reports, drains, heartbeats, tentative offers and their confirms.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capstan_proto::pipeline::v1::{RunStep, Step, StepState, TaskSpec, step};
use capstan_proto::runner::v1::{
    AttemptOutcome, Cancel, ConfirmOffer, Hello, Offer, Welcome, coordinator_message,
    runner_message,
};
use coordinator_message::Kind as Down;
use runner_message::Kind as Up;
use tokio_util::sync::CancellationToken;

use crate::testing::{self, RUNNER_ID, TOKEN};
use crate::{ExecutorKind, RunnerConfig};

fn config(url: String, token: &str, work_dir: &Path) -> RunnerConfig {
    RunnerConfig {
        coordinators: vec![url],
        registration_token: token.into(),
        name: "r1".into(),
        labels: BTreeMap::from([("os".into(), "linux".into())]),
        capacity: 1,
        executor: ExecutorKind::Fake,
        work_dir: work_dir.to_owned(),
        ..RunnerConfig::default()
    }
}

fn offer(id: &str, scripts: &[&str]) -> Down {
    Down::Offer(Offer {
        leader_epoch: 1,
        attempt_id: id.into(),
        run_id: "run-1".into(),
        task_name: "t".into(),
        attempt_number: 1,
        task: Some(TaskSpec {
            name: "t".into(),
            steps: scripts
                .iter()
                .map(|s| Step {
                    kind: Some(step::Kind::Run(RunStep {
                        script: (*s).into(),
                        image: String::new(),
                    })),
                    ..Step::default()
                })
                .collect(),
            ..TaskSpec::default()
        }),
        offer_timeout_ms: 5000,
        ..Offer::default()
    })
}

/// The next runner message that is not a heartbeat.
async fn next(server: &mut testing::Handle) -> Up {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), server.from_runner.recv())
            .await
            .expect("runner went quiet")
            .expect("channel closed");
        match m.kind {
            Some(Up::Heartbeat(_)) => {}
            Some(kind) => return kind,
            None => panic!("empty runner message"),
        }
    }
}

/// Idle, the runner heartbeats at the welcome's idle interval (500 ms
/// with the fake's 100 ms heartbeat); running an attempt, at the busy
/// one, from the offer on.
/// Heartbeats the runner sends within `window`; other messages are dropped.
async fn count_beats(server: &mut testing::Handle, window: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + window;
    let mut beats = 0;
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, server.from_runner.recv()).await {
        if matches!(m.kind, Some(Up::Heartbeat(_))) {
            beats += 1;
        }
    }
    beats
}

#[tokio::test]
async fn heartbeats_are_rare_when_idle_and_frequent_when_busy() {
    let (mut r, _) = TestRunner::start_on(testing::start().await, ExecutorKind::Fake).await;
    let idle = count_beats(&mut r.server, Duration::from_millis(1600)).await;
    assert!((2..=4).contains(&idle), "{idle} heartbeats in 1.6 s idle");
    r.server.send(offer("att-busy", &["sleep 1600"])).await;
    let busy = count_beats(&mut r.server, Duration::from_millis(1500)).await;
    assert!(busy >= 10, "{busy} heartbeats in 1.5 s busy");
    r.stop().await;
}

/// A coordinator that stops reading a log (here: 30 s per chunk) must
/// not stop the runner's heartbeats: logs have their own connection, so
/// the unread bytes do not hold the Control stream's flow-control window.
#[tokio::test]
async fn heartbeats_go_on_while_the_coordinator_stalls_on_a_log() {
    let server = testing::start_with_window(1 << 20).await;
    server.coordinator.logs.lock().unwrap().chunk_delay = Duration::from_secs(30);
    let (r, _) = TestRunner::start_on(server, ExecutorKind::Fake).await;
    // The work dir lives as long as the test.
    let TestRunner {
        mut server,
        work: _work,
        shutdown,
        task: runner,
        ..
    } = r;
    // Far more than the fake's 1 MiB HTTP/2 windows (stream and
    // connection alike, so the stalled stream fills the connection's).
    server
        .send(offer("att-big", &["output 16000000\nsleep 5000"]))
        .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        server.coordinator.logs.lock().unwrap().streams >= 1,
        "the log was not being shipped"
    );
    // A held window stops the beats altogether (at most one buffered);
    // the bound is low because a loaded machine (the 16 MB output runs
    // beside it) delays beats without stopping them (~15 expected).
    let busy = count_beats(&mut server, Duration::from_millis(3000)).await;
    assert!(busy >= 4, "{busy} heartbeats in 3 s with a stalled log");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), runner).await;
}

#[tokio::test]
async fn runs_offers_reports_and_drains() {
    let (r, hello) = TestRunner::start_on(testing::start().await, ExecutorKind::Fake).await;
    let TestRunner {
        mut server,
        work: dir,
        shutdown,
        task: runner,
        ..
    } = r;
    assert_eq!(hello.runner_id, RUNNER_ID);
    assert_eq!(hello.protocol_version, capstan_proto::PROTOCOL_VERSION);
    assert!(dir.path().join("runner.json").exists());

    server
        .send(offer(
            "att-1",
            &["echo hello\nsleep 300", "echo bye\nexit 3", "echo never"],
        ))
        .await;
    assert!(matches!(next(&mut server).await, Up::Accept(a) if a.attempt_id == "att-1"));
    // Full: a second offer is rejected while att-1 runs.
    server.send(offer("att-2", &["echo x"])).await;
    let mut steps = Vec::new();
    let finished = loop {
        match next(&mut server).await {
            Up::Reject(r) => {
                assert_eq!(r.attempt_id, "att-2");
                assert_eq!(r.reason, "no free slot");
            }
            Up::Step(s) => steps.push((s.step_index, s.state(), s.exit_code)),
            Up::Finished(f) => break f,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        steps,
        [
            (0, StepState::Running, None),
            (0, StepState::Succeeded, Some(0)),
            (1, StepState::Running, None),
            (1, StepState::Failed, Some(3)),
        ]
    );
    assert_eq!(finished.outcome(), AttemptOutcome::Failed);
    assert_eq!(finished.exit_code, Some(3));
    assert_eq!(finished.message, "step 2 (run) exited with 3");
    let expected = "$ echo hello\nhello\n$ echo bye\nbye\n";
    assert_eq!(finished.log_length, expected.len() as u64);
    {
        let logs = server.coordinator.logs.lock().unwrap();
        assert_eq!(String::from_utf8_lossy(&logs.logs["att-1"]), expected);
    }
    assert!(!dir.path().join("attempts/att-1").exists());

    // A cancelled attempt.
    server.send(offer("att-3", &["echo start\nhang"])).await;
    assert!(matches!(next(&mut server).await, Up::Accept(_)));
    assert!(matches!(next(&mut server).await, Up::Step(_)));
    server
        .send(Down::Cancel(Cancel {
            leader_epoch: 1,
            attempt_id: "att-3".into(),
            reason: "run cancelled".into(),
        }))
        .await;
    let finished = loop {
        match next(&mut server).await {
            Up::Step(s) => assert_ne!(s.state(), StepState::Succeeded),
            Up::Finished(f) => break f,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(finished.outcome(), AttemptOutcome::Cancelled);

    // Drain: GoingAway, then run returns Ok.
    shutdown.cancel();
    assert!(matches!(next(&mut server).await, Up::GoingAway(_)));
    tokio::time::timeout(Duration::from_secs(10), runner)
        .await
        .expect("runner did not stop")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn wrong_registration_token_is_a_clear_error() {
    let server = testing::start().await;
    let dir = tempfile::tempdir().unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        crate::run(
            config(server.url(), "wrong", dir.path()),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("runner kept retrying");
    let text = format!("{:#}", result.unwrap_err());
    assert!(
        text.contains("the coordinator refused to register this runner: bad registration token"),
        "{text}"
    );
}

/// A tentative offer of one `touch MARKER` step, for the shell executor.
fn tentative_touch(id: &str, epoch: u64, marker: &Path) -> Down {
    let Down::Offer(mut offer) = offer(id, &[&format!("touch {}", marker.display())]) else {
        unreachable!("offer() makes offers")
    };
    offer.leader_epoch = epoch;
    offer.tentative = true;
    Down::Offer(offer)
}

fn confirm(id: &str, epoch: u64) -> Down {
    Down::Confirm(ConfirmOffer {
        leader_epoch: epoch,
        attempt_id: id.into(),
    })
}

/// The runner messages other than heartbeats sent within `window`.
async fn quiet_for(server: &mut testing::Handle, window: Duration) -> Vec<Up> {
    let deadline = tokio::time::Instant::now() + window;
    let mut said = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, server.from_runner.recv()).await {
        match m.kind {
            Some(Up::Heartbeat(_)) | None => {}
            Some(kind) => said.push(kind),
        }
    }
    said
}

/// Waits (up to 10 s) until `done` holds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A shell runner with one slot, started, past its first hello.
/// A real runner (`crate::run`) against the fake coordinator.
struct TestRunner {
    server: testing::Handle,
    work: tempfile::TempDir,
    /// Where the steps leave their marker files.
    marks: tempfile::TempDir,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestRunner {
    /// A runner with `executor` connected to `server`, past its hello.
    async fn start_on(mut server: testing::Handle, executor: ExecutorKind) -> (Self, Hello) {
        let work = tempfile::tempdir().unwrap();
        let marks = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let mut config = config(server.url(), TOKEN, work.path());
        config.executor = executor;
        let task = tokio::spawn(crate::run(config, shutdown.clone()));
        let Up::Hello(hello) = next(&mut server).await else {
            panic!("expected hello")
        };
        let runner = Self {
            server,
            work,
            marks,
            shutdown,
            task,
        };
        (runner, hello)
    }

    /// A shell-executor runner on a fresh fake coordinator.
    async fn shell() -> Self {
        let (runner, hello) = Self::start_on(testing::start().await, ExecutorKind::Shell).await;
        assert!(hello.confirms_offers, "the runner confirms offers");
        runner
    }

    fn marker(&self, name: &str) -> PathBuf {
        self.marks.path().join(name)
    }

    /// The entries of the work dir's `sub` dir, spares left out.
    fn leftovers(&self, sub: &str) -> Vec<String> {
        testing::dir_names(&self.work.path().join(sub))
            .into_iter()
            .filter(|n| !n.starts_with(crate::workdir::SPARE))
            .collect()
    }

    /// Offers `id` at once (not tentative) and checks it runs: so the
    /// runner's one slot is free.
    async fn runs_another(&mut self, id: &str) {
        let marker = self.marker(id);
        let Down::Offer(mut o) = tentative_touch(id, 1, &marker) else {
            unreachable!()
        };
        o.tentative = false;
        self.server.send(Down::Offer(o)).await;
        assert!(
            matches!(next(&mut self.server).await, Up::Accept(a) if a.attempt_id == id),
            "the slot was not free"
        );
        let finished = loop {
            match next(&mut self.server).await {
                Up::Step(_) => {}
                Up::Finished(f) => break f,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(finished.attempt_id, id);
        assert_eq!(finished.outcome(), AttemptOutcome::Succeeded);
        assert!(marker.exists());
    }

    /// Offers a tentative `touch` step as `id` and waits until the
    /// runner accepted and prepared it; the file the step would make.
    async fn prepared_tentative(&mut self, id: &str, epoch: u64) -> PathBuf {
        let marker = self.marker("ran");
        self.server.send(tentative_touch(id, epoch, &marker)).await;
        assert!(matches!(next(&mut self.server).await, Up::Accept(a) if a.attempt_id == id));
        let prepared = self.work.path().join("attempts").join(id).join("workspace");
        eventually("the attempt is prepared", || prepared.is_dir()).await;
        marker
    }

    /// A dropped attempt: even confirmed now, nothing of it runs or is
    /// reported, its files go, and its slot takes the next offer.
    async fn assert_dropped(&mut self, id: &str, marker: &Path) {
        self.server.send(confirm(id, 1)).await;
        let said = quiet_for(&mut self.server, Duration::from_millis(500)).await;
        assert!(said.is_empty(), "reported {said:?} for a dropped attempt");
        assert!(!marker.exists(), "the dropped attempt ran");
        eventually("the dropped attempt's files are gone", || {
            self.leftovers("attempts").is_empty() && self.leftovers("spool").is_empty()
        })
        .await;
        self.runs_another("att-next").await;
        assert!(!marker.exists());
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

#[tokio::test]
async fn an_acknowledged_attempts_spool_becomes_the_spool_spare() {
    use std::os::unix::fs::MetadataExt;
    let (mut r, _) = TestRunner::start_on(testing::start().await, ExecutorKind::Fake).await;
    r.server.send(offer("att-1", &["echo hello"])).await;
    assert!(matches!(next(&mut r.server).await, Up::Accept(a) if a.attempt_id == "att-1"));
    let spools = r.work.path().join("spool");
    let spool = spools.join("att-1.log");
    eventually("the spool is made", || spool.exists()).await;
    let ino = std::fs::metadata(&spool).unwrap().ino();
    while !matches!(next(&mut r.server).await, Up::Finished(_)) {}
    r.server
        .send(Down::Welcome(Welcome {
            leader_epoch: 1,
            acknowledged: vec!["att-1".into()],
            ..Default::default()
        }))
        .await;
    // The same inode, emptied, and nothing else: no new file was made.
    eventually("the acknowledged spool becomes the spare", || {
        testing::dir_names(&spools) == [crate::workdir::SPARE]
            && std::fs::metadata(spools.join(crate::workdir::SPARE))
                .is_ok_and(|m| m.ino() == ino && m.len() == 0)
    })
    .await;
    r.stop().await;
}

#[tokio::test]
async fn a_tentative_offer_runs_nothing_until_its_confirm() {
    let mut r = TestRunner::shell().await;
    // Epoch 2: the runner now ignores anything of epoch 1.
    let marker = r.prepared_tentative("att-t", 2).await;
    // A confirm from an older leader is fenced.
    r.server.send(confirm("att-t", 1)).await;
    let said = quiet_for(&mut r.server, Duration::from_millis(500)).await;
    assert!(said.is_empty(), "said {said:?} before the confirm");
    assert!(!marker.exists(), "the step ran before the confirm");

    r.server.send(confirm("att-t", 2)).await;
    let finished = loop {
        match next(&mut r.server).await {
            Up::Step(_) => {}
            Up::Finished(f) => break f,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(finished.outcome(), AttemptOutcome::Succeeded);
    assert!(marker.exists(), "the step did not run after the confirm");
    r.stop().await;
}

#[tokio::test]
async fn an_unconfirmed_attempt_is_dropped_when_the_stream_ends() {
    let mut r = TestRunner::shell().await;
    let marker = r.prepared_tentative("att-d", 1).await;

    r.server.end_stream();
    // It reconnects without the attempt: a coordinator that did write
    // the offer requeues it as lost.
    let Up::Hello(hello) = next(&mut r.server).await else {
        panic!("expected a new hello")
    };
    assert!(hello.running_attempts.is_empty(), "{hello:?}");
    assert_eq!(
        hello.dropped_attempts,
        ["att-d"],
        "so it is requeued uncounted"
    );
    // A confirm that comes too late (on the new stream) runs nothing.
    r.assert_dropped("att-d", &marker).await;
    r.stop().await;
}

#[tokio::test]
async fn a_cancel_before_the_confirm_runs_nothing_and_reports_it_cancelled() {
    let mut r = TestRunner::shell().await;
    let marker = r.marker("ran");
    r.server.send(tentative_touch("att-c", 1, &marker)).await;
    assert!(matches!(next(&mut r.server).await, Up::Accept(_)));
    r.server
        .send(Down::Cancel(Cancel {
            leader_epoch: 1,
            attempt_id: "att-c".into(),
            reason: "run cancelled".into(),
        }))
        .await;
    // The coordinator holds the attempt and the slot until it hears.
    let Up::Finished(finished) = next(&mut r.server).await else {
        panic!("expected the cancelled attempt's report, and nothing before it")
    };
    assert_eq!(finished.attempt_id, "att-c");
    assert_eq!(finished.outcome(), AttemptOutcome::Cancelled);
    assert_eq!(finished.log_length, 0);
    r.assert_dropped("att-c", &marker).await;
    r.stop().await;
}

/// A partitioned coordinator sends no RST: its stream just goes quiet. A
/// runner whose heartbeats go unanswered drops the stream and reconnects,
/// its attempt still running and listed for re-attach; while heartbeats are
/// answered it keeps the stream.
#[tokio::test]
async fn a_coordinator_that_stops_answering_heartbeats_is_left_and_the_attempt_kept() {
    let server = testing::start().await;
    server
        .coordinator
        .acks_heartbeats
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut r, first) = TestRunner::start_on(server, ExecutorKind::Fake).await;
    assert!(first.wants_heartbeat_acks, "{first:?}");
    r.server.send(offer("att-w", &["sleep 4000"])).await;
    assert!(matches!(next(&mut r.server).await, Up::Accept(_)));
    // Ten busy heartbeats, all answered: the stream stays.
    let window = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(m) = tokio::time::timeout_at(window, r.server.from_runner.recv()).await {
        let kind = m.expect("channel closed").kind;
        assert!(
            !matches!(kind, Some(Up::Hello(_))),
            "reconnected although every heartbeat was answered"
        );
    }
    let muted = tokio::time::Instant::now();
    r.server
        .coordinator
        .muted
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let hello = loop {
        match next(&mut r.server).await {
            Up::Hello(hello) => break hello,
            Up::Step(_) => {}
            other => panic!("expected a new hello, got {other:?}"),
        }
    };
    println!(
        "runner left a silent coordinator after {} ms (heartbeat 100 ms)",
        muted.elapsed().as_millis()
    );
    assert_eq!(
        hello.running_attempts,
        ["att-w"],
        "kept running for re-attach"
    );
    r.server
        .coordinator
        .muted
        .store(false, std::sync::atomic::Ordering::SeqCst);
    r.stop().await;
}
