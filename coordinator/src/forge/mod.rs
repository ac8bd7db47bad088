//! The forge side (issue 22): registered repositories whose pushes start
//! runs, signed push webhooks on the HTTP port, the pipeline file fetched
//! at the pushed commit, commit statuses posted back to the forge, and cron
//! schedules.
//!
//! Layout:
//! - `repos`: registered repositories in the store;
//! - `fetch`: the pipeline file at one commit (git2, cached by SHA);
//! - `payload`: the push events of GitHub, Gitea and GitLab;
//! - `webhook`: `POST /hooks/{github,gitea,gitlab}` (verify, resolve, fetch, submit);
//! - `submit`: a run of a repository's pipeline at a commit, queued on the leader;
//! - `status`: commit statuses owed (in the store) and posted with retries;
//! - `pulls`: pull requests opened for a runner's `git-push` (pull-request mode);
//! - `client`: the one HTTP client of the forge APIs;
//! - `cron`: cron expressions (the `cron` crate);
//! - `schedule`: cron schedules, on the leader only.
//!
//! Doors: `api` (Shared: the leader's scheduler, the parser thread),
//! `store`, `scheduler::Command`; `server.rs` builds a [`Forges`] and
//! starts [`leader_tasks`], `http.rs` merges [`webhook::router`].

pub(crate) mod client;
pub(crate) mod cron;
pub(crate) mod fetch;
pub(crate) mod payload;
pub(crate) mod pulls;
pub(crate) mod repos;
pub(crate) mod schedule;
pub(crate) mod status;
pub(crate) mod submit;
pub(crate) mod webhook;

use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A forge whose webhooks and status API Capstan speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Forge {
    Github,
    Gitea,
    Gitlab,
}

impl Forge {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Forge::Github => "github",
            Forge::Gitea => "gitea",
            Forge::Gitlab => "gitlab",
        }
    }

    /// The headers that carry `token` to this forge's API.
    pub(crate) fn auth(self, token: &str) -> Vec<(&'static str, String)> {
        match self {
            Forge::Github => vec![
                ("authorization", format!("Bearer {token}")),
                ("accept", "application/vnd.github+json".into()),
            ],
            Forge::Gitea => vec![("authorization", format!("token {token}"))],
            Forge::Gitlab => vec![("private-token", token.to_string())],
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Forge> {
        match s {
            "github" => Some(Forge::Github),
            "gitea" => Some(Forge::Gitea),
            "gitlab" => Some(Forge::Gitlab),
            _ => None,
        }
    }
}

/// What the webhook handler, the status poster and the schedules share.
pub(crate) struct Forges {
    pub(crate) repos: repos::Repos,
    pub(crate) fetcher: fetch::Fetcher,
    pub(crate) statuses: status::Statuses,
    /// Base of the run links (`--public-url`, no trailing `/`).
    pub(crate) public_url: String,
    /// The coordinator's store (owed statuses, schedule ticks).
    pub(crate) store: Arc<dyn crate::store::Store>,
    /// Where status posts are counted.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

impl Forges {
    /// The forge side of a replica: its secrets sealed with `sealer`, the
    /// fetch cache under the data dir.
    pub(crate) fn open(
        store: Arc<dyn crate::store::Store>,
        config: &crate::config::CoordinatorConfig,
        http: Option<&tokio::net::TcpListener>,
        sealer: crate::seal::Sealer,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Forges {
        let (settings, data_dir) = (&config.forge, &config.data_dir);
        let http = http.and_then(|h| h.local_addr().ok());
        let public_url = settings
            .public_url
            .clone()
            .or_else(|| http.map(|a| format!("http://{a}")))
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string();
        Forges {
            repos: repos::Repos::new(store.clone(), sealer),
            fetcher: fetch::Fetcher::new(data_dir.join("forge-cache")),
            statuses: status::Statuses::new(store.clone()),
            public_url,
            store,
            metrics,
        }
    }

    /// The dashboard link of a run.
    pub(crate) fn run_url(&self, run: &str) -> String {
        format!("{}/runs/{run}", self.public_url)
    }
}

/// [`leader_tasks`] for `forges`, shared from then on.
pub(crate) fn start(
    forges: Forges,
    shared: &crate::api::Shared,
    tracker: &tokio_util::task::TaskTracker,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Arc<Forges> {
    let forges = Arc::new(forges);
    leader_tasks(forges.clone(), shared.clone(), tracker, shutdown.clone());
    forges
}

/// Starts the leader-only work each time this replica leads: owed commit
/// statuses and the schedules. Both stop with the leadership.
pub(crate) fn leader_tasks(
    forges: Arc<Forges>,
    shared: crate::api::Shared,
    tracker: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut role = shared.role.clone();
    let inner = tracker.clone();
    tracker.spawn(async move {
        loop {
            let leader = match &*role.borrow_and_update() {
                crate::api::Role::Leader(ctx) => Some(ctx.clone()),
                crate::api::Role::Follower => None,
            };
            if let Some(ctx) = leader {
                inner.spawn(status::resume(forges.clone(), ctx.clone()));
                inner.spawn(schedule::run(forges.clone(), shared.clone(), ctx));
            }
            tokio::select! {
                changed = role.changed() => if changed.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
        }
    });
}
