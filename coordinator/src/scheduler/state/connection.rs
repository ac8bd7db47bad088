//! Transitions of the runners registry: register, authenticate, a runner's
//! hello on a new Control stream (attach), the stream's end (detach), and
//! `capstan drain` / `capstan resume`.

use super::runners::{Conn, RunnerSlot};
use super::{LossReason, RunnerTx, SchedulerState, StateError};
use crate::model::*;
use crate::scheduler::lease::ConnLease;
use capstan_proto::ids::{AttemptId, RunnerId};
use capstan_proto::runner::v1 as rpb;
use rpb::coordinator_message::Kind as Down;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::time::Instant;

/// What a runner's hello says about the attempts its new connection's
/// welcome answers.
struct Reattach {
    /// Attempts it still runs that stay its own.
    reattached: Vec<String>,
    /// Of those, the ones whose cancel may have been lost with the old stream.
    recancel: Vec<AttemptId>,
    /// Reports of ended attempts it may forget.
    acknowledged: Vec<String>,
    /// Attempts it runs that are no longer its to run.
    stale: Vec<AttemptId>,
}

/// What lets a Register take over a name that is already registered.
#[derive(Clone, Debug)]
pub(crate) enum Takeover {
    /// Only the shared registration token: a new name only.
    Nothing,
    /// The call carried an admin API token.
    Admin,
    /// The runner's current credential (from its `runner.json`).
    Credential { id: RunnerId, secret: String },
}

impl SchedulerState {
    /// May a runner register as `name`? A new name, yes; an existing one
    /// only with its current credential or an admin token (the shared
    /// registration token alone would hand anyone its id and labels).
    pub(crate) fn may_register(&self, name: &str, takeover: &Takeover) -> Result<(), StateError> {
        let Some(existing) = self.runners.by_name(name) else {
            return Ok(());
        };
        let allowed = match takeover {
            Takeover::Nothing => false,
            Takeover::Admin => true,
            Takeover::Credential { id, secret } => {
                *id == existing && self.authenticate(id, secret).is_ok()
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(StateError::NameTaken(name.to_string()))
        }
    }

    /// Registers a runner, or re-registers one with the same name: the id is
    /// kept and the secret rotated. Returns (id, secret).
    pub(crate) fn register(
        &mut self,
        name: &str,
        labels: BTreeMap<String, String>,
        capacity: u32,
        version: &str,
        now: Instant,
    ) -> (RunnerId, String) {
        let secret = format!(
            "{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        );
        let id = self
            .runners
            .by_name(name)
            .unwrap_or_else(RunnerId::generate);
        let record = RunnerRecord {
            id: id.clone(),
            name: name.to_string(),
            labels,
            capacity: capacity.max(1),
            secret_hash: hash_secret(&secret),
            version: version.to_string(),
            draining: false,
            registered_at_ms: now_ms(),
            tls_identity: None,
            ephemeral: false,
            fixed_labels: false,
            spent: false,
        };
        match self.runners.get_mut(&id) {
            Some(slot) => slot.set_record(record),
            None => self.runners.insert(RunnerSlot::new(record, now, now_ms())),
        }
        self.fx.touch_runner(&id);
        (id, secret)
    }

    /// Records the client certificate's subject a runner registered with.
    pub(crate) fn set_tls_identity(&mut self, id: &RunnerId, identity: Option<String>) {
        if let Some(slot) = self.runners.get_mut(id) {
            let mut record = slot.record().clone();
            record.tls_identity = identity;
            slot.set_record(record);
            self.fx.touch_runner(id);
        }
    }

    /// Makes a just registered runner ephemeral (one task, then gone);
    /// `fixed_labels`: its labels came from its single-use token.
    pub(crate) fn set_ephemeral(&mut self, id: &RunnerId, fixed_labels: bool) {
        if let Some(slot) = self.runners.get_mut(id) {
            let mut record = slot.record().clone();
            record.ephemeral = true;
            record.fixed_labels = fixed_labels;
            record.capacity = 1;
            slot.set_record(record);
            self.fx.touch_runner(id);
        }
    }

    /// Deletes an ephemeral runner that has nothing left to run: it said
    /// GoingAway, or it was lost and its attempts were requeued. Its record
    /// goes from the store with the batch.
    pub(crate) fn forget_ephemeral(&mut self, id: &RunnerId) {
        let Some(slot) = self.runners.get(id) else {
            return;
        };
        if slot.record().ephemeral && slot.active().next().is_none() {
            tracing::info!(runner = %id, name = %slot.record().name, "ephemeral runner gone; its record is deleted");
            self.runners.remove(id);
            self.fx.touch_runner(id);
        }
    }

    /// Under mTLS (`presented` is the connection's certificate subject): a
    /// runner that registered with a certificate must connect with one of
    /// the same subject, so its credential alone, copied to another host,
    /// is not enough.
    pub(crate) fn check_tls_identity(
        &self,
        id: &RunnerId,
        presented: Option<&str>,
    ) -> Result<(), StateError> {
        let (Some(presented), Some(record)) = (presented, self.runners.get(id)) else {
            return Ok(());
        };
        match &record.record().tls_identity {
            Some(registered) if registered != presented => Err(StateError::TlsIdentity {
                registered: registered.clone(),
                presented: presented.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// Checks a runner's credentials.
    pub(crate) fn authenticate(&self, id: &RunnerId, secret: &str) -> Result<(), StateError> {
        match self.runners.get(id) {
            Some(r) if secret_matches(&r.record().secret_hash, secret) => Ok(()),
            _ => Err(StateError::BadRunnerCredentials),
        }
    }

    /// A runner opened its Control stream. Re-attaches the attempts it still
    /// runs, requeues the ones it lost, and cancels the ones it should not
    /// have. Returns the connection id and the lease its reader stamps; the
    /// welcome is already in the outbox.
    pub(crate) fn attach(
        &mut self,
        hello: rpb::Hello,
        tx: RunnerTx,
        now: Instant,
    ) -> Result<(u64, Arc<ConnLease>), StateError> {
        let id = RunnerId::from_string(hello.runner_id.clone());
        self.authenticate(&id, &hello.runner_secret)?;
        if hello.protocol_version != capstan_proto::PROTOCOL_VERSION {
            return Err(StateError::ProtocolVersion {
                got: hello.protocol_version,
                want: capstan_proto::PROTOCOL_VERSION,
            });
        }
        self.next_conn += 1;
        let conn_id = self.next_conn;
        let reported = attempt_ids(&hello.running_attempts);
        let dropped = attempt_ids(&hello.dropped_attempts);
        // The stream's reader answers its heartbeats (api/runner.rs).
        let acks_heartbeats = hello.wants_heartbeat_acks;
        let lease = Arc::new(ConnLease::new(now));
        let slot = self.runners.get_mut(&id).expect("authenticated");
        let conn = Conn::new(conn_id, tx, Arc::clone(&lease), hello.confirms_offers);
        slot.connect(conn, now, now_ms());
        slot.update_from_hello(hello.capacity, hello.labels, hello.version);
        self.fx.touch_runner(&id);
        let held: Vec<AttemptId> = slot.active().cloned().collect();
        let answer = self.reattach(held, &reported, &dropped, now);
        self.welcome(&id, answer, acks_heartbeats);
        Ok((conn_id, lease))
    }

    /// Sorts the attempts the runner `held` and those its hello `reported`
    /// (running) or `dropped` (tentative offers dropped unrun): re-attached,
    /// lost (requeued), acknowledged or stale.
    fn reattach(
        &mut self,
        held: Vec<AttemptId>,
        reported: &BTreeSet<AttemptId>,
        dropped: &BTreeSet<AttemptId>,
        now: Instant,
    ) -> Reattach {
        let mut reattached = Vec::new();
        let mut recancel = Vec::new();
        for a in held {
            if reported.contains(&a) {
                reattached.push(a.to_string());
                // A cancel sent on the old connection may never have arrived.
                if self.runs.attempt_state(&a) == Some(AttemptState::Cancelling) {
                    recancel.push(a.clone());
                }
                // An accept may have been lost with the old connection.
                if let Some((run_id, i)) = self.runs.locate(&a)
                    && let Some(att) = self.runs.attempt_in(&run_id, i, &a)
                    && att.state == AttemptState::Offered
                {
                    self.mark_running(&run_id, i, &a, now);
                }
            } else if dropped.contains(&a) {
                self.lose_attempt(&a, LossReason::OfferDropped, now);
            } else {
                self.lose_attempt(&a, LossReason::RunnerLost, now);
            }
        }
        let mut acknowledged = Vec::new();
        let mut stale = Vec::new();
        for a in reported {
            if reattached.iter().any(|r| r == a.as_str()) {
                continue;
            }
            match self.runs.attempt_state(a) {
                // Ended by the runner's own report: it may forget it.
                Some(AttemptState::Succeeded | AttemptState::Failed | AttemptState::Cancelled) => {
                    acknowledged.push(a.to_string())
                }
                // Superseded (requeued elsewhere) or unknown: stop it, and
                // let the runner forget its report once it has one.
                _ => {
                    acknowledged.push(a.to_string());
                    stale.push(a.clone());
                }
            }
        }
        Reattach {
            reattached,
            recancel,
            acknowledged,
            stale,
        }
    }

    /// The answer to a hello, all of it down the connection just made: the
    /// welcome, the cancels, and a drain if the runner is drained.
    fn welcome(&mut self, id: &RunnerId, answer: Reattach, acks_heartbeats: bool) {
        let epoch = self.epoch;
        let welcome = Down::Welcome(rpb::Welcome {
            leader_epoch: epoch,
            heartbeat_interval_ms: self.timing.heartbeat.as_millis() as u32,
            idle_heartbeat_interval_ms: self.timing.idle_heartbeat.as_millis() as u32,
            lease_ms: self.timing.lease.as_millis() as u32,
            reattached: answer.reattached,
            acknowledged: answer.acknowledged,
            acks_heartbeats,
        });
        self.send_to(id, welcome);
        for a in answer.recancel {
            let cancel = Down::Cancel(rpb::Cancel {
                leader_epoch: epoch,
                attempt_id: a.to_string(),
                reason: "cancelled".into(),
            });
            self.send_to(id, cancel);
        }
        for a in answer.stale {
            self.cancel_stale(id, &a);
        }
        if self
            .runners
            .get(id)
            .is_some_and(|slot| slot.record().draining)
        {
            self.send_to(
                id,
                Down::Drain(rpb::Drain {
                    leader_epoch: epoch,
                }),
            );
        }
    }

    /// The Control stream `conn_id` of `runner` ended. Its attempts keep their
    /// lease: the runner may reconnect in time.
    pub(crate) fn detach(&mut self, runner: &RunnerId, conn_id: u64, now: Instant) {
        if let Some(slot) = self.runners.get_mut(runner) {
            slot.disconnect(conn_id, now);
        }
    }

    pub(crate) fn drain(&mut self, who: &str) -> Result<RunnerId, StateError> {
        let id = self.runners.find(who)?;
        let epoch = self.epoch;
        self.runners.slot_mut(&id).set_draining(true);
        self.fx.touch_runner(&id);
        self.send_to(
            &id,
            Down::Drain(rpb::Drain {
                leader_epoch: epoch,
            }),
        );
        Ok(id)
    }

    /// `capstan resume`: undoes `capstan drain` (persisted). Nothing is sent
    /// to the runner: an agent that got the drain finishes it and exits (the
    /// protocol has no "undrain"), and its heartbeats keep saying
    /// `draining` until then; started again, it is offered work.
    pub(crate) fn resume(&mut self, who: &str) -> Result<RunnerId, StateError> {
        let id = self.runners.find(who)?;
        if self.runners.slot_mut(&id).set_draining(false) {
            self.fx.touch_runner(&id);
        }
        Ok(id)
    }
}

fn attempt_ids(ids: &[String]) -> BTreeSet<AttemptId> {
    ids.iter()
        .map(|a| AttemptId::from_string(a.clone()))
        .collect()
}
