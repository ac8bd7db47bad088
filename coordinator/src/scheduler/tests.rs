//! State-machine tests: no I/O, time driven by hand.

use super::lease::{ConnLease, HeartbeatFilter};
use super::state::*;
use crate::api::pipeline::build_run;
use crate::model::*;
use capstan_proto::api::v1::SubmitRunRequest;
use capstan_proto::ids::{AttemptId, RunId, RunnerId};
use capstan_proto::runner::v1 as rpb;
use rpb::coordinator_message::Kind as Down;
use rpb::runner_message::Kind as Up;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};

type Rx = mpsc::UnboundedReceiver<Result<rpb::CoordinatorMessage, tonic::Status>>;

struct Harness {
    st: SchedulerState,
    now: Instant,
}

struct TestRunner {
    id: RunnerId,
    secret: String,
    conn: u64,
    rx: Rx,
    /// What the connection's reader task does with each message.
    filter: HeartbeatFilter,
    lease: Arc<ConnLease>,
}

const DIAMOND: &str = r#"
version: 1
name: diamond
tasks:
  a: { steps: [ { run: "echo a" } ] }
  b: { needs: [a], steps: [ { run: "echo b" } ] }
  c: { needs: [a], steps: [ { run: "echo c" } ] }
  d: { needs: [b, c], steps: [ { run: "echo d" } ] }
"#;

impl Harness {
    /// Infrastructure retries at once, unless a test sets a backoff
    /// ([`Harness::with_timing`]).
    fn new() -> Self {
        Self::with_timing(Timing {
            infra_backoff: Duration::ZERO,
            ..Timing::default()
        })
    }

    fn with_timing(timing: Timing) -> Self {
        Self {
            st: SchedulerState::new(1, timing),
            now: Instant::now(),
        }
    }

    fn submit(&mut self, yaml: &str) -> RunId {
        let id = self.submit_unsettled(yaml);
        self.settle();
        id
    }

    /// Submits without dispatching or delivering anything.
    fn submit_unsettled(&mut self, yaml: &str) -> RunId {
        let run = build_run(SubmitRunRequest {
            pipeline_yaml: yaml.into(),
            file_name: "t.yaml".into(),
            ..Default::default()
        })
        .expect("valid pipeline");
        self.st.submit(run).0
    }

    fn runner(&mut self, name: &str, capacity: u32, labels: &[(&str, &str)]) -> TestRunner {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (id, secret) = self.st.register(name, labels, capacity, "test", self.now);
        self.connect(id, secret, vec![])
    }

    fn connect(&mut self, id: RunnerId, secret: String, running: Vec<String>) -> TestRunner {
        let (tx, rx) = mpsc::unbounded_channel();
        let (conn, lease) = self
            .st
            .attach(
                rpb::Hello {
                    runner_id: id.to_string(),
                    runner_secret: secret.clone(),
                    protocol_version: capstan_proto::PROTOCOL_VERSION,
                    running_attempts: running,
                    ..Default::default()
                },
                tx,
                self.now,
            )
            .expect("attach");
        let mut r = TestRunner {
            id,
            secret,
            conn,
            rx,
            filter: HeartbeatFilter::new(Arc::clone(&lease)),
            lease,
        };
        self.settle();
        assert!(matches!(r.next(), Some(Down::Welcome(_))));
        r
    }

    /// Dispatches and delivers the outbox (as the actor does after a commit).
    fn settle(&mut self) {
        self.st.dispatch(self.now);
        for out in self.st.take_effects().take_outbox() {
            out.deliver();
        }
    }

    fn send(&mut self, r: &TestRunner, kind: Up) -> Result<(), StateError> {
        let res = self.st.on_runner_message(&r.id, r.conn, kind, self.now);
        self.settle();
        res
    }

    /// A message through the Control stream's reader, as the API does:
    /// it renews the lease and reaches the scheduler only if it must.
    /// True if it reached the scheduler.
    fn via_reader(&mut self, r: &mut TestRunner, kind: Up) -> bool {
        if !r.filter.pass(&kind, self.now) {
            return false;
        }
        self.send(r, kind).unwrap();
        true
    }

    /// A plain heartbeat through the reader.
    fn beat(&mut self, r: &mut TestRunner) -> bool {
        self.via_reader(
            r,
            Up::Heartbeat(rpb::Heartbeat {
                free_slots: 0,
                load: 0.0,
                draining: false,
            }),
        )
    }

    fn accept(&mut self, r: &mut TestRunner) -> rpb::Offer {
        let Some(Down::Offer(offer)) = r.next() else {
            panic!("expected an offer")
        };
        self.send(
            r,
            Up::Accept(rpb::OfferAccepted {
                attempt_id: offer.attempt_id.clone(),
            }),
        )
        .unwrap();
        offer
    }

    fn finish(&mut self, r: &mut TestRunner, attempt: &str, outcome: rpb::AttemptOutcome) {
        self.send(
            r,
            Up::Finished(rpb::TaskFinished {
                attempt_id: attempt.into(),
                outcome: outcome as i32,
                exit_code: Some(if outcome == rpb::AttemptOutcome::Succeeded {
                    0
                } else {
                    1
                }),
                message: "done".into(),
                log_length: 0,
                outputs: [("digest".to_string(), format!("sha256:{attempt}"))].into(),
            }),
        )
        .unwrap();
        // Once the report is durable the runner is told it may forget it.
        match r.next() {
            Some(Down::Welcome(w)) => assert_eq!(w.acknowledged, vec![attempt.to_string()]),
            other => panic!("expected the report's acknowledgement, got {other:?}"),
        }
    }

    fn states(&self, run: &RunId) -> Vec<(String, StoredTaskState)> {
        self.run(run)
            .tasks
            .iter()
            .map(|t| (t.name.clone(), t.state))
            .collect()
    }

    fn state_of(&self, run: &RunId, task: &str) -> StoredTaskState {
        self.states(run)
            .into_iter()
            .find(|(n, _)| n == task)
            .unwrap()
            .1
    }

    fn run(&self, id: &RunId) -> &RunRecord {
        self.st.run(id).expect("a known run")
    }

    fn slot(&self, id: &RunnerId) -> &RunnerSlot {
        self.st.runner(id).expect("a known runner")
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.st.sweep(self.now);
        self.settle();
    }
}

impl TestRunner {
    fn next(&mut self) -> Option<Down> {
        self.rx
            .try_recv()
            .ok()
            .and_then(|m| m.ok())
            .and_then(|m| m.kind)
    }
}

use StoredTaskState::*;

#[test]
fn diamond_runs_in_dependency_order() {
    let mut h = Harness::new();
    let run = h.submit(DIAMOND);
    assert_eq!(h.state_of(&run, "a"), Queued);
    assert_eq!(h.state_of(&run, "d"), Waiting);
    let mut r = h.runner("r1", 2, &[]);
    let a = h.accept(&mut r);
    assert_eq!(a.task_name, "a");
    assert_eq!(a.leader_epoch, 1);
    assert_eq!(h.run(&run).state, StoredRunState::Running);
    h.finish(&mut r, &a.attempt_id, rpb::AttemptOutcome::Succeeded);
    // b and c are both offered at once: the runner has two slots.
    let b = h.accept(&mut r);
    let c = h.accept(&mut r);
    let mut names = [b.task_name.clone(), c.task_name.clone()];
    names.sort();
    assert_eq!(names, ["b", "c"]);
    assert_eq!(h.state_of(&run, "d"), Waiting);
    h.finish(&mut r, &b.attempt_id, rpb::AttemptOutcome::Succeeded);
    assert_eq!(h.state_of(&run, "d"), Waiting, "d still needs c");
    h.finish(&mut r, &c.attempt_id, rpb::AttemptOutcome::Succeeded);
    let d = h.accept(&mut r);
    h.finish(&mut r, &d.attempt_id, rpb::AttemptOutcome::Succeeded);
    assert_eq!(h.run(&run).state, StoredRunState::Succeeded);
    // Outputs of the succeeded attempt are kept on the task.
    assert_eq!(
        h.run(&run).tasks[3].outputs.get("digest"),
        Some(&format!("sha256:{}", d.attempt_id))
    );
}

#[test]
fn failure_skips_dependents_transitively() {
    let mut h = Harness::new();
    let run = h.submit(DIAMOND);
    let mut r = h.runner("r1", 2, &[]);
    let a = h.accept(&mut r);
    h.finish(&mut r, &a.attempt_id, rpb::AttemptOutcome::Failed);
    assert_eq!(
        h.states(&run),
        vec![
            ("a".into(), Failed),
            ("b".into(), Skipped),
            ("c".into(), Skipped),
            ("d".into(), Skipped)
        ]
    );
    assert_eq!(h.run(&run).state, StoredRunState::Failed);
    assert!(h.run(&run).tasks[3].message.contains("skipped"));
}

#[test]
fn script_failures_retry_only_when_asked() {
    let mut h = Harness::new();
    let run =
        h.submit("version: 1\nname: r\ntasks:\n  t:\n    retries: 1\n    steps: [ { run: x } ]\n");
    let mut r = h.runner("r1", 1, &[]);
    let first = h.accept(&mut r);
    h.finish(&mut r, &first.attempt_id, rpb::AttemptOutcome::Failed);
    let second = h.accept(&mut r);
    assert_eq!(second.attempt_number, 2);
    h.finish(&mut r, &second.attempt_id, rpb::AttemptOutcome::Failed);
    assert_eq!(h.state_of(&run, "t"), Failed);
    assert!(r.next().is_none(), "no third attempt");
}

#[test]
fn labels_and_capacity_pick_the_runner() {
    let mut h = Harness::new();
    let mut plain = h.runner("plain", 4, &[("os", "linux")]);
    let mut gpu = h.runner("gpu", 1, &[("os", "linux"), ("gpu", "yes")]);
    let run = h.submit(
        "version: 1\nname: l\ntasks:\n  t:\n    runs-on: [gpu=yes]\n    steps: [ { run: x } ]\n  u:\n    steps: [ { run: x } ]\n",
    );
    let t = h.accept(&mut gpu);
    assert_eq!(t.task_name, "t");
    let u = h.accept(&mut plain);
    assert_eq!(u.task_name, "u", "most free capacity wins");
    // A task no runner matches waits in the queue without blocking others.
    let run2 = h.submit(
        "version: 1\nname: l\ntasks:\n  t:\n    runs-on: [os=windows]\n    steps: [ { run: x } ]\n",
    );
    assert_eq!(h.state_of(&run2, "t"), Queued);
    assert_eq!(h.state_of(&run, "t"), Running);
}

#[test]
fn priority_then_fifo() {
    let mut h = Harness::new();
    let one = "version: 1\nname: p\ntasks:\n  t:\n    steps: [ { run: x } ]\n";
    let low = h.submit(one);
    let mut req = SubmitRunRequest {
        pipeline_yaml: one.into(),
        file_name: "t.yaml".into(),
        priority: 5,
        ..Default::default()
    };
    let (high, _) = h.st.submit(build_run(req.clone()).unwrap());
    req.priority = 0;
    let (low2, _) = h.st.submit(build_run(req).unwrap());
    let mut r = h.runner("r", 1, &[]);
    let o = h.accept(&mut r);
    assert_eq!(o.run_id, high.to_string());
    h.finish(&mut r, &o.attempt_id, rpb::AttemptOutcome::Succeeded);
    let o = h.accept(&mut r);
    assert_eq!(o.run_id, low.to_string());
    h.finish(&mut r, &o.attempt_id, rpb::AttemptOutcome::Succeeded);
    let o = h.accept(&mut r);
    assert_eq!(o.run_id, low2.to_string());
}

#[test]
fn a_runner_cannot_report_on_someone_elses_attempt() {
    let mut h = Harness::new();
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut owner = h.runner("owner", 1, &[]);
    let intruder = h.runner("intruder", 1, &[]);
    let offer = h.accept(&mut owner);
    let err = h
        .send(
            &intruder,
            Up::Finished(rpb::TaskFinished {
                attempt_id: offer.attempt_id.clone(),
                outcome: rpb::AttemptOutcome::Succeeded as i32,
                ..Default::default()
            }),
        )
        .unwrap_err();
    assert!(matches!(err, StateError::NotYourAttempt { .. }));
    assert_eq!(h.state_of(&run, "t"), Running);
    let bad = h.st.authenticate(&owner.id, "not-the-secret");
    assert!(bad.is_err());
    assert!(h.st.authenticate(&owner.id, &owner.secret).is_ok());
}

#[test]
fn a_log_takes_no_bytes_once_its_attempt_has_finished() {
    let mut h = Harness::new();
    h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut owner = h.runner("owner", 1, &[]);
    let intruder = h.runner("intruder", 1, &[]);
    let offer = h.accept(&mut owner);
    let attempt = AttemptId::from_string(offer.attempt_id.clone());
    assert!(h.st.log_writable(&owner.id, &attempt).is_ok());
    let err = h.st.log_writable(&intruder.id, &attempt).unwrap_err();
    assert!(matches!(err, StateError::NotYourAttempt { .. }), "{err}");
    h.send(
        &owner,
        Up::Finished(rpb::TaskFinished {
            attempt_id: offer.attempt_id.clone(),
            outcome: rpb::AttemptOutcome::Succeeded as i32,
            ..Default::default()
        }),
    )
    .unwrap();
    let err = h.st.log_writable(&owner.id, &attempt).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "attempt {} has finished: its log takes no more bytes",
            offer.attempt_id
        )
    );
    assert_eq!(
        crate::api::status::from_state(err).code(),
        tonic::Code::PermissionDenied
    );
}

#[test]
fn lost_runner_requeues_as_new_attempt_and_old_reports_are_ignored() {
    let mut h = Harness::new();
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut r1 = h.runner("r1", 1, &[]);
    let first = h.accept(&mut r1);
    h.st.detach(&r1.id, r1.conn, h.now);
    let mut r2 = h.runner("r2", 1, &[]);
    assert!(
        r2.next().is_none(),
        "not requeued before the lease runs out"
    );
    h.advance(Duration::from_secs(6));
    let second = h.accept(&mut r2);
    assert_eq!(second.attempt_number, 2);
    assert_ne!(second.attempt_id, first.attempt_id);
    // r1 comes back claiming the old attempt: it is told to cancel it.
    let (id, secret) = (r1.id.clone(), r1.secret.clone());
    let mut r1 = h.connect(id, secret, vec![first.attempt_id.clone()]);
    assert!(matches!(r1.next(), Some(Down::Cancel(c)) if c.attempt_id == first.attempt_id));
    // Its late success report changes nothing.
    h.finish(&mut r1, &first.attempt_id, rpb::AttemptOutcome::Succeeded);
    assert_eq!(h.state_of(&run, "t"), Running);
    h.finish(&mut r2, &second.attempt_id, rpb::AttemptOutcome::Succeeded);
    assert_eq!(h.run(&run).state, StoredRunState::Succeeded);
    assert_eq!(h.run(&run).tasks[0].infra_failures, 1);
}

#[test]
fn a_broken_stream_requeues_after_the_disconnect_grace_not_the_lease() {
    let mut h = Harness::new();
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut r1 = h.runner("r1", 1, &[]);
    h.accept(&mut r1);
    let mut r2 = h.runner("r2", 1, &[]);
    h.st.detach(&r1.id, r1.conn, h.now);
    let grace = h.st.timing().disconnect_grace;
    h.advance(grace - Duration::from_millis(100));
    assert!(r2.next().is_none(), "still within the disconnect grace");
    h.advance(Duration::from_millis(200));
    let second = h.accept(&mut r2);
    assert_eq!(second.attempt_number, 2);
    assert!(Timing::default().disconnect_grace < Timing::default().lease);
    assert_eq!(h.state_of(&run, "t"), Running);
}

#[test]
fn reconnect_within_lease_reattaches() {
    let mut h = Harness::new();
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut r = h.runner("r1", 1, &[]);
    let offer = h.accept(&mut r);
    h.st.detach(&r.id, r.conn, h.now);
    h.advance(h.st.timing().disconnect_grace - Duration::from_millis(100));
    let mut r = h.connect(
        r.id.clone(),
        r.secret.clone(),
        vec![offer.attempt_id.clone()],
    );
    h.advance(Duration::from_secs(4));
    assert_eq!(h.state_of(&run, "t"), Running);
    h.finish(&mut r, &offer.attempt_id, rpb::AttemptOutcome::Succeeded);
    assert_eq!(h.state_of(&run, "t"), Succeeded);
}

#[test]
fn a_restarted_runner_that_lost_its_attempt_gets_it_requeued_at_once() {
    let mut h = Harness::new();
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut r = h.runner("r1", 1, &[]);
    h.accept(&mut r);
    let mut r = h.connect(r.id.clone(), r.secret.clone(), vec![]);
    let again = h.accept(&mut r);
    assert_eq!(again.attempt_number, 2);
    assert_eq!(h.state_of(&run, "t"), Running);
}

#[test]
fn infra_failures_give_up_after_the_limit() {
    let mut h = Harness::new();
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut r = h.runner("r1", 1, &[]);
    for _ in 0..=Timing::default().max_infra_retries {
        let o = h.accept(&mut r);
        h.finish(&mut r, &o.attempt_id, rpb::AttemptOutcome::Error);
    }
    assert_eq!(h.state_of(&run, "t"), Failed);
    assert!(h.run(&run).tasks[0].message.contains("infrastructure"));
}

#[test]
fn unaccepted_offer_goes_back_to_the_queue() {
    let mut h = Harness::new();
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut silent = h.runner("silent", 1, &[]);
    assert!(matches!(silent.next(), Some(Down::Offer(_))));
    h.advance(Duration::from_secs(6));
    assert_eq!(h.state_of(&run, "t"), Queued);
    let mut other = h.runner("other", 1, &[]);
    let o = h.accept(&mut other);
    assert_eq!(o.attempt_number, 2);
}

#[test]
fn cancel_stops_active_attempts_and_ends_the_run() {
    let mut h = Harness::new();
    let run = h.submit(DIAMOND);
    let mut r = h.runner("r1", 1, &[]);
    let a = h.accept(&mut r);
    h.st.cancel_run(&run, None).unwrap();
    h.settle();
    assert!(matches!(r.next(), Some(Down::Cancel(c)) if c.attempt_id == a.attempt_id));
    assert_eq!(h.run(&run).state, StoredRunState::Cancelled);
    assert!(h.states(&run).iter().all(|(_, s)| *s == Cancelled));
    // The slot frees once the runner confirms.
    assert_eq!(h.slot(&r.id).free_slots(), 0);
    h.finish(&mut r, &a.attempt_id, rpb::AttemptOutcome::Cancelled);
    assert_eq!(h.slot(&r.id).free_slots(), 1);
    assert!(matches!(
        h.st.cancel_run(&RunId::from_string("run-nope"), None),
        Err(StateError::UnknownRun(_))
    ));
}

#[test]
fn a_submit_token_cancels_only_its_own_runs() {
    let mut h = Harness::new();
    let mut run = build_run(SubmitRunRequest {
        pipeline_yaml: DIAMOND.into(),
        file_name: "t.yaml".into(),
        ..Default::default()
    })
    .unwrap();
    run.submitted_by = "alice".into();
    let (id, _) = h.st.submit(run);
    h.settle();
    let err = h.st.cancel_run(&id, Some("bob")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "run {id} was submitted by token `alice`: a `submit` token may cancel only its own runs (an `admin` token may cancel any)"
        )
    );
    assert_eq!(h.run(&id).state, StoredRunState::Queued);
    h.st.cancel_run(&id, Some("alice")).unwrap();
    h.settle();
    assert_eq!(h.run(&id).state, StoredRunState::Cancelled);
}

#[test]
fn an_existing_name_registers_again_only_with_its_credential_or_an_admin_token() {
    let mut h = Harness::new();
    let (id, secret) = h.st.register("r1", BTreeMap::new(), 1, "test", h.now);
    let err = h.st.may_register("r1", &Takeover::Nothing).unwrap_err();
    assert_eq!(
        err.to_string(),
        "a runner named `r1` is already registered: registering it again needs its current credential (its runner.json) or an admin API token; give a new runner another --name"
    );
    let with = |id: &RunnerId, secret: &str| Takeover::Credential {
        id: id.clone(),
        secret: secret.to_string(),
    };
    assert!(matches!(
        h.st.may_register("r1", &with(&id, "wrong")),
        Err(StateError::NameTaken(_))
    ));
    let (other, other_secret) = h.st.register("r2", BTreeMap::new(), 1, "test", h.now);
    assert!(matches!(
        h.st.may_register("r1", &with(&other, &other_secret)),
        Err(StateError::NameTaken(_))
    ));
    h.st.may_register("r1", &with(&id, &secret)).unwrap();
    h.st.may_register("r1", &Takeover::Admin).unwrap();
    h.st.may_register("new", &Takeover::Nothing).unwrap();
}

#[test]
fn secrets_compare_by_their_hashes() {
    assert!(secrets_equal("tok", "tok"));
    assert!(!secrets_equal("tok", "tok2") && !secrets_equal("", "tok"));
    assert!(secret_matches(&hash_secret("s"), "s") && !secret_matches(&hash_secret("s"), "t"));
}

#[test]
fn drained_runner_gets_no_offers() {
    let mut h = Harness::new();
    let mut r = h.runner("r1", 1, &[]);
    h.st.drain("r1").unwrap();
    h.settle();
    assert!(matches!(r.next(), Some(Down::Drain(_))));
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    assert!(r.next().is_none());
    assert_eq!(h.state_of(&run, "t"), Queued);
    assert!(h.st.drain("nobody").is_err());
}

#[test]
fn resume_undoes_drain_for_the_next_connection() {
    let mut h = Harness::new();
    let mut r = h.runner("r1", 1, &[]);
    h.st.drain("r1").unwrap();
    assert!(h.st.effects().is_runner_dirty(&r.id), "drain is persisted");
    h.settle();
    assert!(matches!(r.next(), Some(Down::Drain(_))));
    let id = h.st.resume("r1").unwrap();
    assert_eq!(id, r.id);
    assert!(!h.slot(&r.id).record().draining);
    assert!(h.st.effects().is_runner_dirty(&r.id), "resume is persisted");
    assert!(h.st.resume("nobody").is_err());
    // The runner restarts after its drain: no Drain now, and it gets work.
    let mut r = h.connect(r.id.clone(), r.secret.clone(), vec![]);
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    h.accept(&mut r);
    assert_eq!(h.state_of(&run, "t"), Running);
}

#[test]
fn reload_keeps_assignments_and_requeues_after_grace() {
    let mut h = Harness::new();
    let run = h.submit(DIAMOND);
    let mut r = h.runner("r1", 1, &[]);
    let a = h.accept(&mut r);
    // Simulate a coordinator restart: reload from the records.
    let runs: Vec<RunRecord> = h.st.runs().cloned().collect();
    let runners: Vec<RunnerRecord> = h.st.runners().map(|s| s.record().clone()).collect();
    let runs: Vec<RunRecord> = runs
        .iter()
        .map(|r| serde_json::from_slice(&serde_json::to_vec(r).unwrap()).unwrap())
        .collect();
    h.st = SchedulerState::load(2, Timing::default(), runs, runners, h.now);
    let mut r = h.connect(r.id.clone(), r.secret.clone(), vec![a.attempt_id.clone()]);
    h.finish(&mut r, &a.attempt_id, rpb::AttemptOutcome::Succeeded);
    assert_eq!(h.state_of(&run, "a"), Succeeded);
    assert_eq!(h.st.epoch(), 2);
    let _ = AttemptId::generate();
}

#[test]
fn a_runner_draining_itself_is_not_draining_after_it_restarts() {
    let mut h = Harness::new();
    let r = h.runner("r1", 1, &[]);
    h.send(
        &r,
        Up::Heartbeat(rpb::Heartbeat {
            draining: true,
            ..Default::default()
        }),
    )
    .unwrap();
    assert!(!h.slot(&r.id).accepts_work());
    assert!(!h.slot(&r.id).record().draining, "not persisted");
    let mut r = h.connect(r.id.clone(), r.secret.clone(), vec![]);
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    h.accept(&mut r);
    assert_eq!(h.state_of(&run, "t"), Running);
}

#[test]
fn rejecting_the_offer_of_a_cancelled_task_frees_the_slot() {
    let mut h = Harness::new();
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut r = h.runner("r1", 1, &[]);
    let Some(Down::Offer(offer)) = r.next() else {
        panic!("expected an offer")
    };
    h.st.cancel_run(&run, None).unwrap();
    h.settle();
    h.send(
        &r,
        Up::Reject(rpb::OfferRejected {
            attempt_id: offer.attempt_id,
            reason: "full".into(),
        }),
    )
    .unwrap();
    assert_eq!(h.slot(&r.id).free_slots(), 1);
}

#[test]
fn an_accept_after_the_offer_expired_is_told_to_cancel() {
    let mut h = Harness::new();
    h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut r = h.runner("r1", 1, &[]);
    let Some(Down::Offer(offer)) = r.next() else {
        panic!("expected an offer")
    };
    h.advance(Duration::from_secs(6));
    h.send(
        &r,
        Up::Accept(rpb::OfferAccepted {
            attempt_id: offer.attempt_id.clone(),
        }),
    )
    .unwrap();
    let mut saw_cancel = false;
    while let Some(m) = r.next() {
        saw_cancel |= matches!(m, Down::Cancel(c) if c.attempt_id == offer.attempt_id);
    }
    assert!(saw_cancel);
}

#[test]
fn a_repeated_idempotency_key_queues_nothing_new() {
    let mut h = Harness::new();
    let req = SubmitRunRequest {
        pipeline_yaml: "version: 1\nname: p\ntasks:\n  t:\n    steps: [ { run: x } ]\n".into(),
        idempotency_key: "key-1".into(),
        ..Default::default()
    };
    let (first, new) = h.st.submit(build_run(req.clone()).unwrap());
    assert!(new);
    let (again, new) = h.st.submit(build_run(req.clone()).unwrap());
    assert!(!new, "the retry queued a second run");
    assert_eq!(again, first);
    assert_eq!(h.st.runs().count(), 1);
    // Another key (or none) is another run.
    let (other, new) = h.st.submit(
        build_run(SubmitRunRequest {
            idempotency_key: "key-2".into(),
            ..req.clone()
        })
        .unwrap(),
    );
    assert!(new && other != first);
    let (none, new) = h.st.submit(
        build_run(SubmitRunRequest {
            idempotency_key: String::new(),
            ..req.clone()
        })
        .unwrap(),
    );
    assert!(new && none != first);
    // A new leader loading the runs still knows the key.
    let runs: Vec<_> = h.st.runs().cloned().collect();
    let mut loaded = SchedulerState::load(2, Timing::default(), runs, Vec::new(), Instant::now());
    let (after, new) = loaded.submit(build_run(req.clone()).unwrap());
    assert!(!new);
    assert_eq!(after, first);
    // An oversized key is refused with the limit.
    let err = build_run(SubmitRunRequest {
        idempotency_key: "k".repeat(129),
        ..req
    })
    .unwrap_err();
    assert!(err.message().contains("limit is 128"), "{err}");
}

#[test]
fn only_settled_runs_are_evicted_and_their_keys_outlive_them_a_while() {
    let mut h = Harness::new();
    let one = "version: 1\nname: p\ntasks:\n  t:\n    steps: [ { run: x } ]\n";
    let keyed = SubmitRunRequest {
        pipeline_yaml: one.into(),
        idempotency_key: "k".into(),
        ..Default::default()
    };
    let (done, _) = h.st.submit(build_run(keyed.clone()).unwrap());
    let busy = h.submit(one);
    let mut r = h.runner("r", 2, &[]);
    let first = h.accept(&mut r);
    let second = h.accept(&mut r);
    let (done_attempt, busy_attempt) = if first.run_id == done.to_string() {
        (first, second)
    } else {
        (second, first)
    };
    h.finish(
        &mut r,
        &done_attempt.attempt_id,
        rpb::AttemptOutcome::Succeeded,
    );
    assert!(h.st.settled(&done) && !h.st.settled(&busy));
    let now = Instant::now();
    let gone = h.st.evict_settled([&done, &busy], now);
    assert_eq!(gone.len(), 1, "only the finished run goes");
    assert_eq!(gone[0].id, done);
    assert!(h.st.run(&done).is_none());
    assert!(h.st.run(&busy).is_some(), "a running run is kept");
    assert_eq!(h.st.runs_held(), 1);
    // The evicted attempt is forgotten: its late report is refused.
    let late = h.send(
        &r,
        Up::Finished(rpb::TaskFinished {
            attempt_id: done_attempt.attempt_id.clone(),
            outcome: rpb::AttemptOutcome::Succeeded as i32,
            ..Default::default()
        }),
    );
    assert!(late.is_err(), "{late:?}");
    // Its idempotency key still names it for a while (a repeat that
    // checked the history before the run settled)...
    let (again, new) = h.st.submit(build_run(keyed.clone()).unwrap());
    assert!(!new && again == done);
    // ...and is let go by a later eviction past that while (the history
    // answers for it then).
    h.finish(
        &mut r,
        &busy_attempt.attempt_id,
        rpb::AttemptOutcome::Succeeded,
    );
    let later = now + std::time::Duration::from_secs(61);
    assert_eq!(h.st.evict_settled([&busy], later).len(), 1);
    let (again, new) = h.st.submit(build_run(keyed).unwrap());
    assert!(new && again != done);
}

// ----- leases renewed by the Control stream's reader ------------------------

#[test]
fn a_runner_that_only_heartbeats_keeps_its_lease() {
    let mut h = Harness::new();
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut r1 = h.runner("r1", 1, &[]);
    let offer = h.accept(&mut r1);
    let mut r2 = h.runner("r2", 1, &[]);
    for _ in 0..20 {
        h.advance(Duration::from_secs(1));
        assert!(
            !h.beat(&mut r1),
            "a heartbeat that changes nothing stays in the reader"
        );
    }
    assert!(
        h.slot(&r1.id).last_seen() + Timing::default().lease <= h.now,
        "the scheduler itself has not heard from r1 for longer than the lease"
    );
    assert_eq!(h.state_of(&run, "t"), Running);
    assert!(r2.next().is_none(), "not requeued");
    assert_eq!(
        h.slot(&r1.id).seen_ms(),
        h.slot(&r1.id).last_seen_ms() + 20_000,
        "runner views show when the reader last heard from it"
    );
    h.finish(&mut r1, &offer.attempt_id, rpb::AttemptOutcome::Succeeded);
    assert_eq!(h.run(&run).state, StoredRunState::Succeeded);
}

#[test]
fn a_runner_that_stops_heartbeating_loses_its_attempts_after_the_lease() {
    let mut h = Harness::new();
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut r1 = h.runner("r1", 1, &[]);
    h.accept(&mut r1);
    let mut r2 = h.runner("r2", 1, &[]);
    for _ in 0..3 {
        h.advance(Duration::from_secs(1));
        h.beat(&mut r1);
    }
    // Silent from here on, its stream still open (a partition).
    h.advance(Duration::from_millis(4900));
    assert!(r2.next().is_none(), "still within the lease");
    h.advance(Duration::from_millis(200));
    let second = h.accept(&mut r2);
    assert_eq!(second.attempt_number, 2);
    assert_eq!(h.state_of(&run, "t"), Running);
    assert!(!h.slot(&r1.id).is_connected(), "forced to reconnect");
}

#[test]
fn a_replaced_connection_does_not_renew_the_lease() {
    let mut h = Harness::new();
    h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut old = h.runner("r1", 1, &[]);
    let offer = h.accept(&mut old);
    let mut r2 = h.runner("r2", 1, &[]);
    let mut new = h.connect(
        old.id.clone(),
        old.secret.clone(),
        vec![offer.attempt_id.clone()],
    );
    // Only the old stream's reader keeps stamping.
    for _ in 0..6 {
        h.advance(Duration::from_secs(1));
        h.beat(&mut old);
    }
    assert_eq!(old.lease.last_seen(), h.now);
    let second = h.accept(&mut r2);
    assert_eq!(
        second.attempt_number, 2,
        "requeued: the new stream was silent"
    );
    assert!(!h.slot(&new.id).is_connected(), "forced to reconnect");
    assert!(new.next().is_none());
}

#[test]
fn a_heartbeat_that_changes_state_still_reaches_the_scheduler() {
    let mut h = Harness::new();
    let mut r = h.runner("r1", 1, &[]);
    // Draining itself: forwarded, and the scheduler stops offering.
    assert!(h.via_reader(
        &mut r,
        Up::Heartbeat(rpb::Heartbeat {
            draining: true,
            ..Default::default()
        })
    ));
    assert!(!h.slot(&r.id).accepts_work());
    assert!(!h.via_reader(
        &mut r,
        Up::Heartbeat(rpb::Heartbeat {
            draining: true,
            ..Default::default()
        })
    ));
    // Not draining any more: forwarded too.
    assert!(h.beat(&mut r));
    assert!(h.slot(&r.id).accepts_work());
    assert!(!h.beat(&mut r));

    // A rejected offer pauses the runner; the heartbeat after the reject
    // reaches the scheduler and un-pauses it.
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let Some(Down::Offer(offer)) = r.next() else {
        panic!("expected an offer")
    };
    assert!(h.via_reader(
        &mut r,
        Up::Reject(rpb::OfferRejected {
            attempt_id: offer.attempt_id,
            reason: "full".into(),
        })
    ));
    assert!(h.slot(&r.id).is_paused());
    assert!(r.next().is_none(), "no offer while paused");
    assert!(h.beat(&mut r));
    let again = h.accept(&mut r);
    assert_eq!(again.attempt_number, 2);
    assert_eq!(h.state_of(&run, "t"), Running);
}

#[test]
fn an_ignored_offer_pauses_until_a_heartbeat_the_reader_forwards() {
    let mut h = Harness::new();
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut r = h.runner("r1", 1, &[]);
    assert!(matches!(r.next(), Some(Down::Offer(_))));
    // The runner never answers the offer but keeps heart-beating.
    for _ in 0..4 {
        h.advance(Duration::from_millis(1100));
        assert!(!h.beat(&mut r));
    }
    h.advance(Duration::from_millis(700));
    assert_eq!(h.state_of(&run, "t"), Queued, "the offer expired");
    assert!(h.slot(&r.id).is_paused());
    assert!(r.next().is_none());
    // The scheduler asked the reader for the next heartbeat.
    assert!(h.beat(&mut r));
    assert!(!h.slot(&r.id).is_paused());
    let o = h.accept(&mut r);
    assert_eq!(o.attempt_number, 2);
}

/// A runner that keeps rejecting offers, while heartbeating every second,
/// is offered again after a backoff that doubles (1 s, 2 s, ...), not at
/// each heartbeat; accepting one ends the backoff.
#[test]
fn a_runner_that_keeps_rejecting_offers_backs_off() {
    let mut h = Harness::new();
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut r = h.runner("r1", 1, &[]);
    let reject = |h: &mut Harness, r: &mut TestRunner| {
        let Some(Down::Offer(offer)) = r.next() else {
            panic!("expected an offer")
        };
        assert!(h.via_reader(
            r,
            Up::Reject(rpb::OfferRejected {
                attempt_id: offer.attempt_id,
                reason: "broken".into(),
            })
        ));
    };
    // The first rejection waits only for the next heartbeat.
    reject(&mut h, &mut r);
    assert!(h.beat(&mut r));
    assert!(!h.slot(&r.id).is_paused());
    // The second: 1 s; the third: 2 s. Heartbeats before the end of the
    // backoff keep the runner paused (and are all forwarded).
    for backoff_ms in [1000, 2000] {
        reject(&mut h, &mut r);
        h.advance(Duration::from_millis(backoff_ms - 100));
        assert!(h.beat(&mut r), "forwarded while backing off");
        assert!(h.slot(&r.id).is_paused(), "still backing off");
        assert!(r.next().is_none(), "no offer while backing off");
        h.advance(Duration::from_millis(100));
        assert!(h.beat(&mut r));
        assert!(!h.slot(&r.id).is_paused());
    }
    // Accepting ends it: a rejection after that waits for a heartbeat only.
    let o = h.accept(&mut r);
    assert_eq!(o.attempt_number, 4);
    assert_eq!(h.state_of(&run, "t"), Running);
}

/// A runner that reconnects while backing off is not stuck paused: its new
/// stream forwards the first heartbeat past the backoff; and offers that
/// fail together (one stall) count once.
#[test]
fn a_runner_reconnecting_while_backing_off_gets_offers_after_it() {
    let mut h = Harness::new();
    let yaml = "version: 1\nname: f\ntasks:\n  a:\n    steps: [ { run: x } ]\n  b:\n    steps: [ { run: x } ]\n";
    h.submit(yaml);
    let mut r = h.runner("r1", 2, &[]);
    // Both offers ignored: they expire in one sweep, one failure.
    assert!(matches!(r.next(), Some(Down::Offer(_))));
    assert!(matches!(r.next(), Some(Down::Offer(_))));
    h.advance(Duration::from_secs(6));
    assert!(h.slot(&r.id).is_paused());
    assert!(h.beat(&mut r));
    assert!(!h.slot(&r.id).is_paused(), "one failure: no backoff yet");
    // Offered again and ignored again: the second failure, 1 s of backoff.
    assert!(matches!(r.next(), Some(Down::Offer(_))));
    assert!(matches!(r.next(), Some(Down::Offer(_))));
    h.advance(Duration::from_millis(5100));
    assert!(h.slot(&r.id).is_paused());
    // It reconnects within the backoff.
    let (id, secret) = (r.id.clone(), r.secret.clone());
    drop(r);
    let mut again = h.connect(id, secret, vec![]);
    assert!(h.slot(&again.id).is_paused(), "still backing off");
    h.advance(Duration::from_secs(1));
    assert!(h.beat(&mut again), "the new stream forwards a heartbeat");
    assert!(!h.slot(&again.id).is_paused());
    assert!(matches!(again.next(), Some(Down::Offer(_))));
}

/// Idle runners heartbeat rarely (5 s by default, the lease's length): one
/// not heard from for longer than a lease keeps what it is offered, and its
/// accept starts the lease.
#[test]
fn an_idle_runner_silent_past_a_lease_keeps_its_offer() {
    let mut h = Harness::new();
    let mut r = h.runner("r", 1, &[]);
    h.advance(h.st.timing().lease * 3);
    h.st.sweep(h.now);
    let run = h.submit("version: 1\nname: i\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    h.st.sweep(h.now);
    let o = h.accept(&mut r);
    assert_eq!(o.attempt_number, 1);
    h.st.sweep(h.now);
    assert_eq!(h.state_of(&run, "t"), Running);
    // Silent past the lease while running: lost, as before.
    h.advance(h.st.timing().lease + Duration::from_millis(1));
    h.st.sweep(h.now);
    assert_ne!(h.state_of(&run, "t"), Running);
}

/// A busy runner's plain heartbeats stop in its stream's reader, so the
/// scheduler's own `last_seen` is as old as the runner's last accept. When
/// the stream breaks, the reader's stamp must still count: the runner gets
/// the disconnect grace to reconnect, not an instant requeue.
#[test]
fn a_broken_stream_of_a_long_running_attempt_still_gets_the_disconnect_grace() {
    let mut h = Harness::new();
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut r1 = h.runner("r1", 1, &[]);
    let offer = h.accept(&mut r1);
    let mut r2 = h.runner("r2", 1, &[]);
    // A minute of running, heart-beating every second through the reader.
    for _ in 0..60 {
        h.advance(Duration::from_secs(1));
        assert!(!h.beat(&mut r1));
    }
    // A network blip: the stream breaks right after a heartbeat.
    h.st.detach(&r1.id, r1.conn, h.now);
    h.advance(Duration::from_millis(100));
    assert!(
        r2.next().is_none(),
        "requeued 100 ms after the stream broke, inside the disconnect grace"
    );
    assert_eq!(h.state_of(&run, "t"), Running);
    // It reconnects within the grace and keeps its attempt.
    h.advance(Duration::from_millis(900));
    let mut r1 = h.connect(
        r1.id.clone(),
        r1.secret.clone(),
        vec![offer.attempt_id.clone()],
    );
    h.finish(&mut r1, &offer.attempt_id, rpb::AttemptOutcome::Succeeded);
    assert_eq!(h.run(&run).state, StoredRunState::Succeeded);
    assert_eq!(h.run(&run).tasks[0].infra_failures, 0);
}

/// The kind of each message in `outbox`, in order, and whether it is a
/// tentative offer.
fn kinds(outbox: &[Outgoing]) -> Vec<(&'static str, bool)> {
    outbox
        .iter()
        .map(|out| match &out.msg().kind {
            Some(Down::Offer(o)) => ("offer", o.tentative),
            Some(Down::Welcome(_)) => ("welcome", false),
            Some(Down::Cancel(_)) => ("cancel", false),
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

#[test]
fn offers_go_tentative_only_behind_nothing_that_waits_for_the_write() {
    let one = "version: 1\nname: o\ntasks:\n  t:\n    steps: [ { run: x } ]\n";
    let mut h = Harness::new();
    h.submit(one);
    let (id, secret) = h.st.register("r1", BTreeMap::new(), 2, "test", h.now);
    let (tx, _rx) = mpsc::unbounded_channel();
    let hello = rpb::Hello {
        runner_id: id.to_string(),
        runner_secret: secret,
        protocol_version: capstan_proto::PROTOCOL_VERSION,
        confirms_offers: true,
        ..Default::default()
    };
    // A new stream and an offer on it in one batch: its welcome (after
    // the write) must come first, so the offer waits for the write too.
    h.st.attach(hello, tx, h.now).unwrap();
    h.st.dispatch(h.now);
    let mut fx = h.st.take_effects();
    assert!(fx.take_tentative_offers().is_empty());
    assert_eq!(kinds(fx.outbox()), [("welcome", false), ("offer", false)]);

    // Next batch: nothing else for that stream, so the offer goes early.
    h.submit_unsettled(one);
    h.st.dispatch(h.now);
    let mut fx = h.st.take_effects();
    let early = fx.take_tentative_offers();
    assert_eq!(kinds(&early), [("offer", true)]);
    assert!(fx.outbox().is_empty());
    let (_, confirm) = early[0].confirm().unwrap();
    let (Some(Down::Confirm(c)), Some(Down::Offer(o))) = (confirm.kind, &early[0].msg().kind)
    else {
        panic!("expected a confirm of the offer")
    };
    assert_eq!(
        (c.leader_epoch, c.attempt_id.as_str()),
        (1, o.attempt_id.as_str())
    );
}

#[test]
fn offers_to_a_runner_that_does_not_confirm_are_never_tentative() {
    let mut h = Harness::new();
    let _r = h.runner("r1", 1, &[]);
    h.submit_unsettled("version: 1\nname: o\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    h.st.dispatch(h.now);
    let mut fx = h.st.take_effects();
    assert!(fx.take_tentative_offers().is_empty());
    assert_eq!(kinds(fx.outbox()), [("offer", false)]);
}

#[test]
fn a_runner_registered_with_a_certificate_connects_only_with_its_subject() {
    let mut h = Harness::new();
    let (id, _) = h.st.register("r1", BTreeMap::new(), 1, "test", h.now);
    // Registered without mTLS: anything goes.
    assert!(h.st.check_tls_identity(&id, Some("anyone")).is_ok());
    h.st.set_tls_identity(&id, Some("r1".into()));
    assert!(h.st.check_tls_identity(&id, Some("r1")).is_ok());
    assert!(h.st.check_tls_identity(&id, None).is_ok(), "mTLS off");
    let e = h.st.check_tls_identity(&id, Some("r2")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "this runner registered with a client certificate for `r1`, this connection presents `r2`"
    );
    // Registering again without a certificate clears it.
    h.st.register("r1", BTreeMap::new(), 1, "test", h.now);
    assert!(h.st.check_tls_identity(&id, Some("r2")).is_ok());
}

#[test]
fn infra_retries_wait_a_growing_jittered_backoff_and_say_so() {
    let (base, max) = (Duration::from_secs(1), Duration::from_secs(3));
    let mut h = Harness::with_timing(Timing {
        infra_backoff: base,
        infra_backoff_max: max,
        ..Timing::default()
    });
    let run = h.submit("version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: x } ]\n");
    let mut r = h.runner("r1", 1, &[]);
    let offer_in = |r: &mut TestRunner| {
        std::iter::from_fn(|| r.next()).find_map(|m| match m {
            Down::Offer(o) => Some(o),
            _ => None,
        })
    };
    let mut o = h.accept(&mut r);
    // Retry n waits within [d/2, d], d = min(base * 2^(n-1), max).
    for (n, d) in [(1u32, 1000u64), (2, 2000), (3, 3000)] {
        h.finish(&mut r, &o.attempt_id, rpb::AttemptOutcome::Error);
        assert_eq!(h.state_of(&run, "t"), Queued);
        let t = &h.run(&run).tasks[0];
        assert!(
            t.message.contains(&format!("infrastructure failure {n}")),
            "{}",
            t.message
        );
        assert!(t.retry_at_ms > 0);
        h.advance(Duration::from_millis(d / 2 - 50));
        assert!(
            offer_in(&mut r).is_none(),
            "retry {n} offered before its backoff"
        );
        h.advance(Duration::from_millis(d / 2 + 150));
        o = offer_in(&mut r).unwrap_or_else(|| panic!("retry {n} not offered after its backoff"));
        assert_eq!(o.attempt_number, n + 1);
        h.send(
            &r,
            Up::Accept(rpb::OfferAccepted {
                attempt_id: o.attempt_id.clone(),
            }),
        )
        .unwrap();
    }
    assert!(max < base * 4, "the cap bounded the third wait");
}

/// Ends `attempt` succeeded, reporting `outputs`.
fn finish_with(h: &mut Harness, r: &mut TestRunner, attempt: &str, outputs: Vec<(String, String)>) {
    h.send(
        r,
        Up::Finished(rpb::TaskFinished {
            attempt_id: attempt.into(),
            outcome: rpb::AttemptOutcome::Succeeded as i32,
            exit_code: Some(0),
            message: String::new(),
            log_length: 0,
            outputs: outputs.into_iter().collect(),
        }),
    )
    .unwrap();
    assert!(matches!(r.next(), Some(Down::Welcome(_))));
}

#[test]
fn outputs_beyond_the_budget_are_not_kept_and_the_message_says_so() {
    use capstan_proto::outputs::{MAX_OUTPUT_BYTES, MAX_OUTPUTS};
    let one = "version: 1\nname: o\ntasks:\n  t: { steps: [ { run: x } ] }\n";
    let mut h = Harness::new();
    let mut r = h.runner("r1", 1, &[]);

    // Too many keys: the runner's own first, then the rest in key order.
    let run = h.submit(one);
    let a = h.accept(&mut r);
    let mut outputs: Vec<(String, String)> = (0..MAX_OUTPUTS + 50)
        .map(|i| (format!("k{i:03}"), "v".to_owned()))
        .collect();
    outputs.push(("digest".into(), "sha256:ab".into()));
    finish_with(&mut h, &mut r, &a.attempt_id, outputs);
    let t = &h.run(&run).tasks[0];
    assert_eq!(t.state, Succeeded);
    assert_eq!(t.outputs.len(), MAX_OUTPUTS);
    assert_eq!(t.outputs["digest"], "sha256:ab");
    assert!(t.outputs.contains_key("k098") && !t.outputs.contains_key("k099"));
    assert_eq!(
        t.message,
        "the runner reported more outputs than a task keeps (at most 100, 64 KiB of keys and \
         values): 51 dropped: `k099`, `k100`, `k101`, `k102`, `k103`, `k104`, `k105`, `k106`, \
         `k107`, `k108`, and 41 more"
    );

    // Too many bytes: a value as big as a run record.
    let run = h.submit(one);
    let a = h.accept(&mut r);
    let outputs = vec![
        ("a".to_owned(), "small".to_owned()),
        ("b".to_owned(), "x".repeat(1 << 20)),
        ("c".to_owned(), "small".to_owned()),
    ];
    finish_with(&mut h, &mut r, &a.attempt_id, outputs);
    let t = &h.run(&run).tasks[0];
    assert_eq!(t.outputs.keys().collect::<Vec<_>>(), ["a"]);
    let bytes: usize = t.outputs.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(bytes <= MAX_OUTPUT_BYTES);
    assert!(t.message.ends_with("2 dropped: `b`, `c`"), "{}", t.message);

    // Within the budget: kept whole, no message.
    let run = h.submit(one);
    let a = h.accept(&mut r);
    finish_with(
        &mut h,
        &mut r,
        &a.attempt_id,
        vec![("k".into(), "v".into())],
    );
    let t = &h.run(&run).tasks[0];
    assert_eq!(t.outputs.len(), 1);
    assert!(t.message.is_empty(), "{}", t.message);
}

#[test]
fn a_finally_task_gets_an_empty_string_for_a_missing_output() {
    let yaml = "version: 1\nname: o\ntasks:\n  \
         build: { steps: [ { run: x } ] }\n  \
         use: { needs: [build], steps: [ { run: \"echo ${{ tasks.build.outputs.tag }}\" } ] }\n  \
         cleanup:\n    needs: [build]\n    finally: true\n    \
         image: \"img-${{ tasks.build.outputs.tag }}\"\n    \
         steps: [ { run: \"echo ${{ tasks.build.outputs.tag }}\" } ]\n";
    let var = "CAPSTAN_OUTPUT_build_tag";
    let mut h = Harness::new();
    let mut r = h.runner("r1", 1, &[]);

    // `build` succeeded without `tag`: `use` fails, `cleanup` runs.
    let run = h.submit(yaml);
    let b = h.accept(&mut r);
    h.finish(&mut r, &b.attempt_id, rpb::AttemptOutcome::Succeeded);
    assert_eq!(h.state_of(&run, "use"), Failed);
    let c = h.accept(&mut r);
    assert_eq!(c.task_name, "cleanup");
    let spec = c.task.unwrap();
    assert_eq!(spec.image, "img-");
    assert_eq!(spec.steps[0].env[var], "");
    h.finish(&mut r, &c.attempt_id, rpb::AttemptOutcome::Succeeded);

    // `build` failed: `use` is skipped, `cleanup` still runs, with "".
    let run = h.submit(yaml);
    let b = h.accept(&mut r);
    h.finish(&mut r, &b.attempt_id, rpb::AttemptOutcome::Failed);
    assert_eq!(h.state_of(&run, "use"), Skipped);
    let c = h.accept(&mut r);
    assert_eq!(c.task_name, "cleanup");
    assert_eq!(c.task.unwrap().image, "img-");
    h.finish(&mut r, &c.attempt_id, rpb::AttemptOutcome::Succeeded);
    assert_eq!(h.state_of(&run, "cleanup"), Succeeded);

    // A recorded output is its value, for a `finally` task too.
    let run = h.submit(yaml);
    let b = h.accept(&mut r);
    finish_with(
        &mut h,
        &mut r,
        &b.attempt_id,
        vec![("tag".into(), "1.2".into())],
    );
    let mut offers = Vec::new();
    for _ in 0..2 {
        let o = h.accept(&mut r);
        h.finish(&mut r, &o.attempt_id, rpb::AttemptOutcome::Succeeded);
        offers.push(o);
    }
    let c = offers.iter().find(|o| o.task_name == "cleanup").unwrap();
    assert_eq!(c.task.as_ref().unwrap().image, "img-1.2");
    assert_eq!(h.state_of(&run, "use"), Succeeded);
}
