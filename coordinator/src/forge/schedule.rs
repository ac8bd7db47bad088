//! Cron schedules of registered repositories (`repo add --schedule`), run
//! by the leader only.
//!
//! Each tick of a schedule starts one run of the pipeline at the head of
//! the repository's first branch pattern (`main` when it has none, or the
//! first is a glob). The tick is the run's idempotency key
//! (`schedule:<repo>:<n>:<unix seconds>`), and the last tick started is
//! stored (`schedule-ticks/...`) after its run is queued: a leader that dies
//! between the two leaves a tick that its successor starts again, and the
//! key makes that a no-op. A successor also starts the ticks that fell due
//! during the failover (up to [`MAX_CATCH_UP`] of them; older ones are
//! skipped with a log line), so every tick runs exactly once.

use super::Forges;
pub(crate) use super::cron::parse_cron;
use super::fetch::Source;
use super::repos::RepoRecord;
use super::submit::{RunOf, submit};
use crate::api::{LeaderCtx, Shared};
use crate::store::Op;
use chrono::{DateTime, TimeZone as _, Utc};
use std::sync::Arc;
use std::time::Duration;

const TICKS: &str = "schedule-ticks/";
/// `schedules:` of the pipeline file last pushed to the schedule branch.
const PIPELINE_SCHEDULES: &str = "pipeline-schedules/";
/// Missed ticks started by a new leader, at most (the latest ones).
pub(crate) const MAX_CATCH_UP: usize = 10;
/// New and removed repositories are seen within this long.
const RESCAN: Duration = Duration::from_secs(2);

fn tick_key(repo: &RepoRecord, n: &str) -> String {
    format!("{TICKS}{}@{}/{n}", repo.name, repo.created_at_ms)
}

fn branch(repo: &RepoRecord) -> String {
    match repo.branches.first() {
        Some(b) if !b.contains('*') => b.clone(),
        _ => "main".into(),
    }
}

/// Runs the schedules until the leadership ends.
pub(crate) async fn run(forges: Arc<Forges>, shared: Shared, leader: LeaderCtx) {
    let token = leader.token.clone();
    tokio::select! {
        _ = tick_loop(&forges, &shared) => {}
        _ = token.cancelled() => {}
    }
}

async fn tick_loop(forges: &Forges, shared: &Shared) {
    loop {
        let repos = forges.repos.list().await.unwrap_or_default();
        let mut wake = Utc::now() + RESCAN;
        for repo in &repos {
            for (n, expr) in schedules_of(forges, repo).await {
                let Ok(schedule) = parse_cron(&expr) else {
                    continue;
                };
                if let Some(next) = due(forges, shared, repo, &n, &schedule).await {
                    wake = wake.min(next);
                }
            }
        }
        let sleep = (wake - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::time::sleep(sleep.max(Duration::from_millis(20))).await;
    }
}

fn pipeline_key(repo: &RepoRecord) -> String {
    format!("{PIPELINE_SCHEDULES}{}@{}", repo.name, repo.created_at_ms)
}

/// The schedules of a repository by their id: the registration's (`0`,
/// `1`, ...), then those of its pipeline file as last pushed (`p0`, ...).
async fn schedules_of(forges: &Forges, repo: &RepoRecord) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = repo
        .schedules
        .iter()
        .enumerate()
        .map(|(n, e)| (n.to_string(), e.clone()))
        .collect();
    if let Ok(Some(v)) = forges.store.get(&pipeline_key(repo)).await {
        let from_file: Vec<String> = serde_json::from_slice(&v).unwrap_or_default();
        out.extend(
            from_file
                .into_iter()
                .enumerate()
                .map(|(n, e)| (format!("p{n}"), e)),
        );
    }
    out
}

/// Records the `schedules:` of the pipeline file pushed to the
/// repository's schedule branch (those the cron parser reads; the others
/// are logged and left out).
pub(crate) async fn record_pipeline_schedules(
    forges: &Forges,
    repo: &RepoRecord,
    branch_pushed: &str,
    yaml: &str,
) {
    if branch_pushed != branch(repo) {
        return;
    }
    let Ok(p) = capstan_pipeline::parse(&repo.pipeline, yaml) else {
        return;
    };
    let mut good = Vec::new();
    for expr in p.schedules {
        match parse_cron(&expr) {
            Ok(_) => good.push(expr),
            Err(e) => {
                tracing::warn!(repo = %repo.name, error = %e, "a schedule of the pipeline file is left out")
            }
        }
    }
    let op = Op::Put {
        key: pipeline_key(repo),
        value: serde_json::to_vec(&good).expect("strings serialize"),
    };
    if let Err(e) = forges.store.apply(vec![op]).await {
        tracing::warn!(repo = %repo.name, error = %e, "cannot store the pipeline file's schedules");
    }
}

/// Starts the ticks of one schedule that are due; returns its next tick.
async fn due(
    forges: &Forges,
    shared: &Shared,
    repo: &RepoRecord,
    n: &str,
    schedule: &cron::Schedule,
) -> Option<DateTime<Utc>> {
    let key = tick_key(repo, n);
    let store = &forges.store;
    let now = Utc::now();
    let last = match store.get(&key).await {
        Ok(Some(v)) => String::from_utf8_lossy(&v).parse::<i64>().ok(),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(repo = %repo.name, error = %e, "cannot read the schedule's last tick");
            return Some(now + RESCAN);
        }
    };
    let Some(last) = last else {
        // First sight of this schedule: it starts from now.
        put_tick(forges, &key, now.timestamp()).await;
        return schedule.after(&now).next();
    };
    let since = Utc.timestamp_opt(last, 0).single()?;
    let missed: Vec<DateTime<Utc>> = schedule.after(&since).take_while(|t| *t <= now).collect();
    if missed.len() > MAX_CATCH_UP {
        tracing::warn!(repo = %repo.name, schedule = n, skipped = missed.len() - MAX_CATCH_UP,
            "ticks missed while no coordinator led are skipped");
    }
    for tick in missed
        .iter()
        .skip(missed.len().saturating_sub(MAX_CATCH_UP))
    {
        if !fire(forges, shared, repo, n, *tick).await {
            return Some(now + RESCAN); // retried on the next pass
        }
        put_tick(forges, &key, tick.timestamp()).await;
    }
    schedule.after(&now).next()
}

async fn put_tick(forges: &Forges, key: &str, secs: i64) {
    let op = Op::Put {
        key: key.to_string(),
        value: secs.to_string().into_bytes(),
    };
    if let Err(e) = forges.store.apply(vec![op]).await {
        tracing::warn!(%key, error = %e, "cannot store the schedule's last tick");
    }
}

/// Queues the run of one tick; false to try again later.
async fn fire(
    forges: &Forges,
    shared: &Shared,
    repo: &RepoRecord,
    n: &str,
    tick: DateTime<Utc>,
) -> bool {
    let secrets = match forges.repos.secrets(repo) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(repo = %repo.name, error = %e, "schedule: cannot open the repository's secrets");
            return true;
        }
    };
    let git_ref = format!("refs/heads/{}", branch(repo));
    let sha = match forges
        .fetcher
        .head(&repo.url, &secrets.fetch_login, &git_ref)
        .await
    {
        Ok(sha) => sha,
        Err(e) => {
            tracing::warn!(repo = %repo.name, error = %e, "schedule: cannot fetch the branch head; retrying");
            return false;
        }
    };
    let src = Source {
        url: &repo.url,
        login: &secrets.fetch_login,
        sha: &sha,
        git_ref: &git_ref,
    };
    let yaml = match forges.fetcher.file(&src, &repo.pipeline).await {
        Ok((y, _)) => y,
        Err(e) => {
            tracing::warn!(repo = %repo.name, tick = %tick, error = %e, "schedule: no pipeline file; tick skipped");
            return true;
        }
    };
    let what = RunOf {
        repo,
        yaml,
        sha: &sha,
        git_ref: &git_ref,
        key: format!("schedule:{}:{n}:{}", repo.name, tick.timestamp()),
        by: "schedule",
    };
    match submit(shared, what).await {
        Ok(q) => {
            tracing::info!(target: "schedule", repo = %repo.name, schedule = n, tick = %tick,
                run = %q.run, new = q.new, %sha, "scheduled run");
            true
        }
        Err(e) if e.code() == tonic::Code::Unavailable => false,
        Err(e) => {
            tracing::warn!(repo = %repo.name, tick = %tick, error = %e.message(), "schedule: run refused; tick skipped");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_and_six_field_expressions() {
        let s = parse_cron("0 3 * * *").unwrap();
        let from = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        let next = s.after(&from).next().unwrap();
        assert_eq!(next, Utc.with_ymd_and_hms(2026, 1, 2, 3, 0, 0).unwrap());
        let every2 = parse_cron("*/2 * * * * *").unwrap();
        let ticks: Vec<_> = every2.after(&from).take(2).collect();
        assert_eq!((ticks[1] - ticks[0]).num_seconds(), 2);
        let err = parse_cron("every day").unwrap_err();
        assert!(err.contains("bad cron expression `every day`"), "{err}");
    }
}
