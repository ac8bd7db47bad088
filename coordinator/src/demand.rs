//! The demand signal for autoscalers: `GET /api/v1/demand` on the HTTP
//! port (read scope), in the shape KEDA's `metrics-api` scaler reads, and
//! the same figures as the `capstan_demand_*` gauges.
//!
//! Figures are per `runs-on` label set of the queued and running tasks:
//! queued, running, the connected runners that match and their free slots,
//! the oldest queued task's age, and whether any runner could ever take the
//! set (`matchable`): a registered runner (connected or not), a live
//! single-use runner token, or a `--runner-pool` whose labels match. A set
//! no one can take is the stall autoscalers are blamed for (jobs queued
//! forever for labels no pool has); it is reported, not hidden.
//!
//! `?runner_labels=k=v,k=v` answers for one pool instead: the tasks runners
//! with those labels could take, summed, as top-level numbers (KEDA's
//! `valueLocation: queued`).
//!
//! Doors: imports the scheduler's snapshot types and `dispatch::labels_match`;
//! `http` serves [`routes`] and calls [`publish`] before each scrape.

use crate::api::Role;
use crate::metrics::Metrics;
use crate::model::now_ms;
use crate::scheduler::Command;
use crate::scheduler::dispatch::labels_match;
use crate::scheduler::state::DemandSnapshot;
use crate::tokens::{Scope, Tokens};
use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::watch;

/// One `runs-on` label set's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct LabelSetDemand {
    /// `k=v,k=v`, sorted; empty: tasks any runner may take.
    pub(crate) labels: String,
    pub(crate) queued: u32,
    pub(crate) running: u32,
    /// Connected runners whose labels match.
    pub(crate) runners: u32,
    /// Their slots that would take work now.
    pub(crate) free_slots: u32,
    pub(crate) oldest_queued_seconds: f64,
    /// Some runner, runner token or declared pool could take these tasks.
    pub(crate) matchable: bool,
}

/// The whole answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Demand {
    pub(crate) label_sets: Vec<LabelSetDemand>,
    pub(crate) queued: u32,
    pub(crate) running: u32,
    pub(crate) free_slots: u32,
    /// Queued tasks of label sets that are not `matchable`.
    pub(crate) unmatched_queued: u32,
}

/// The answer for one pool (`?runner_labels=`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct PoolDemand {
    pub(crate) runner_labels: String,
    pub(crate) queued: u32,
    pub(crate) running: u32,
    pub(crate) free_slots: u32,
    pub(crate) oldest_queued_seconds: f64,
}

fn show(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn as_runs_on(labels: &BTreeMap<String, String>) -> HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn age_seconds(queued_at_ms: i64, now_ms: i64) -> f64 {
    if queued_at_ms == 0 {
        0.0
    } else {
        (now_ms - queued_at_ms).max(0) as f64 / 1000.0
    }
}

/// The figures of `snap` at `now_ms`; `pools` are label sets some runner
/// could have that none registered has now (live runner tokens' labels,
/// `--runner-pool`).
pub(crate) fn figures(
    snap: &DemandSnapshot,
    pools: &[BTreeMap<String, String>],
    now_ms: i64,
) -> Demand {
    let mut out = Demand {
        label_sets: Vec::new(),
        queued: 0,
        running: 0,
        free_slots: snap.runners.iter().map(|r| r.free_slots).sum(),
        unmatched_queued: 0,
    };
    for (labels, d) in &snap.tasks {
        let runs_on = as_runs_on(labels);
        let matching = snap
            .runners
            .iter()
            .filter(|r| labels_match(&runs_on, &r.labels));
        let (mut runners, mut free_slots, mut registered) = (0, 0, false);
        for r in matching {
            registered = true;
            if r.connected {
                runners += 1;
                free_slots += r.free_slots;
            }
        }
        let matchable = registered || pools.iter().any(|p| labels_match(&runs_on, p));
        out.queued += d.queued;
        out.running += d.running;
        if !matchable {
            out.unmatched_queued += d.queued;
        }
        out.label_sets.push(LabelSetDemand {
            labels: show(labels),
            queued: d.queued,
            running: d.running,
            runners,
            free_slots,
            oldest_queued_seconds: age_seconds(d.oldest_queued_at_ms, now_ms),
            matchable,
        });
    }
    out
}

/// What runners with `labels` could take of `snap`.
pub(crate) fn for_pool(
    snap: &DemandSnapshot,
    labels: &BTreeMap<String, String>,
    now_ms: i64,
) -> PoolDemand {
    let mut out = PoolDemand {
        runner_labels: show(labels),
        queued: 0,
        running: 0,
        free_slots: 0,
        oldest_queued_seconds: 0.0,
    };
    let mut oldest = 0;
    for (set, d) in &snap.tasks {
        if !labels_match(&as_runs_on(set), labels) {
            continue;
        }
        out.queued += d.queued;
        out.running += d.running;
        if d.oldest_queued_at_ms != 0 && (oldest == 0 || d.oldest_queued_at_ms < oldest) {
            oldest = d.oldest_queued_at_ms;
        }
    }
    let pool = as_runs_on(labels);
    out.free_slots = snap
        .runners
        .iter()
        .filter(|r| r.connected && labels_match(&pool, &r.labels))
        .map(|r| r.free_slots)
        .sum();
    out.oldest_queued_seconds = age_seconds(oldest, now_ms);
    out
}

/// Sets the `capstan_demand_*` gauges to `d` (label sets gone since the
/// last scrape are dropped).
pub(crate) fn publish(metrics: &Metrics, d: Option<&Demand>) {
    let g = &metrics.demand;
    g.clear();
    let Some(d) = d else { return };
    g.unmatched_total.set(i64::from(d.unmatched_queued));
    for s in &d.label_sets {
        let key = vec![("labels".to_string(), s.labels.clone())];
        g.queued.get_or_create(&key).set(i64::from(s.queued));
        g.running.get_or_create(&key).set(i64::from(s.running));
        g.free_slots
            .get_or_create(&key)
            .set(i64::from(s.free_slots));
        g.oldest_queued
            .get_or_create(&key)
            .set(s.oldest_queued_seconds);
        if !s.matchable {
            g.unmatched.get_or_create(&key).set(i64::from(s.queued));
        }
    }
}

/// What the demand routes need.
#[derive(Clone)]
pub(crate) struct DemandState {
    pub(crate) role: watch::Receiver<Role>,
    pub(crate) tokens: Arc<Tokens>,
    pub(crate) runner_tokens: Arc<crate::runner_tokens::RunnerTokens>,
    /// `--runner-pool`: label sets autoscaled pools serve.
    pub(crate) pools: Arc<Vec<BTreeMap<String, String>>>,
}

impl DemandState {
    /// The figures now, on the leader; `None` on a follower (or while the
    /// scheduler stops).
    pub(crate) async fn current(&self) -> Option<Demand> {
        let snap = self.snapshot().await?;
        Some(self.figures(&snap).await)
    }

    /// The figures of `snap`, with the pools some runner could have now:
    /// `--runner-pool` and the live runner tokens' labels.
    async fn figures(&self, snap: &DemandSnapshot) -> Demand {
        let mut pools = (*self.pools).clone();
        match self.runner_tokens.live_labels(now_ms()).await {
            Ok(live) => pools.extend(live),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read runner tokens for the demand figures")
            }
        }
        figures(snap, &pools, now_ms())
    }

    async fn snapshot(&self) -> Option<DemandSnapshot> {
        let scheduler = match &*self.role.borrow() {
            Role::Leader(ctx) => ctx.scheduler.clone(),
            Role::Follower => return None,
        };
        scheduler
            .ask(|reply| Command::Demand { reply })
            .await
            .ok()?
            .ok()
    }
}

pub(crate) fn routes(state: DemandState) -> Router {
    Router::new()
        .route("/api/v1/demand", get(demand))
        .with_state(state)
}

#[derive(Deserialize)]
struct DemandQuery {
    /// `k=v,k=v`: answer for a pool of runners with these labels.
    runner_labels: Option<String>,
}

async fn demand(
    State(s): State<DemandState>,
    headers: HeaderMap,
    Query(q): Query<DemandQuery>,
) -> Response {
    if let Err(refusal) = crate::http_auth::caller(&s.tokens, &headers, Scope::Read).await {
        return refusal.into_response();
    }
    let pool = match q.runner_labels.as_deref().map(parse_labels).transpose() {
        Ok(pool) => pool,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let Some(snap) = s.snapshot().await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "follower: the leader serves the demand (see /readyz)\n",
        )
            .into_response();
    };
    match pool {
        Some(labels) => Json(for_pool(&snap, &labels, now_ms())).into_response(),
        None => Json(s.figures(&snap).await).into_response(),
    }
}

/// `?runner_labels=k=v,k=v` (empty: the pool of runners without labels).
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    capstan_proto::labels::parse(text).map_err(|e| {
        format!(
            "bad runner_labels `{text}` ({e}): expected k=v,k=v (e.g. runner_labels=pool=linux)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::state::{Supply, TaskDemand};

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn snap() -> DemandSnapshot {
        let mut tasks = BTreeMap::new();
        tasks.insert(
            set(&[("os", "linux")]),
            TaskDemand {
                queued: 3,
                running: 1,
                oldest_queued_at_ms: 10_000,
            },
        );
        tasks.insert(
            set(&[("gpu", "a100")]),
            TaskDemand {
                queued: 2,
                running: 0,
                oldest_queued_at_ms: 4_000,
            },
        );
        DemandSnapshot {
            tasks,
            runners: vec![
                Supply {
                    labels: set(&[("os", "linux"), ("arch", "x86")]),
                    connected: true,
                    free_slots: 0,
                },
                Supply {
                    labels: set(&[("os", "linux")]),
                    connected: false,
                    free_slots: 0,
                },
            ],
        }
    }

    #[test]
    fn label_sets_count_queued_running_matching_runners_and_unmatched() {
        let d = figures(&snap(), &[], 14_000);
        assert_eq!(d.queued, 5);
        assert_eq!(d.running, 1);
        assert_eq!(d.unmatched_queued, 2);
        let gpu = &d.label_sets[0];
        assert_eq!(
            gpu,
            &LabelSetDemand {
                labels: "gpu=a100".into(),
                queued: 2,
                running: 0,
                runners: 0,
                free_slots: 0,
                oldest_queued_seconds: 10.0,
                matchable: false,
            }
        );
        let linux = &d.label_sets[1];
        assert_eq!((linux.runners, linux.queued, linux.running), (1, 3, 1));
        assert!(linux.matchable);
        assert_eq!(linux.oldest_queued_seconds, 4.0);
        // A pool that serves the GPU set makes it matchable.
        let d = figures(&snap(), &[set(&[("gpu", "a100"), ("zone", "b")])], 14_000);
        assert_eq!(d.unmatched_queued, 0);
    }

    #[test]
    fn a_pool_gets_the_sets_its_labels_serve() {
        let p = for_pool(&snap(), &set(&[("os", "linux"), ("arch", "x86")]), 14_000);
        assert_eq!((p.queued, p.running, p.free_slots), (3, 1, 0));
        assert_eq!(p.runner_labels, "arch=x86,os=linux");
        let none = for_pool(&snap(), &set(&[("os", "mac")]), 14_000);
        assert_eq!((none.queued, none.oldest_queued_seconds), (0, 0.0));
    }

    #[test]
    fn runner_labels_parse_or_say_how() {
        assert_eq!(
            parse_labels("pool=eph, os=linux").unwrap(),
            set(&[("pool", "eph"), ("os", "linux")])
        );
        assert!(parse_labels("").unwrap().is_empty());
        let e = parse_labels("pool").unwrap_err();
        assert!(e.contains("expected k=v,k=v"), "{e}");
    }
}
