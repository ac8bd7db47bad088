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
/// Missed ticks started by a new leader, at most (the latest ones).
pub(crate) const MAX_CATCH_UP: usize = 10;
/// New and removed repositories are seen within this long.
const RESCAN: Duration = Duration::from_secs(2);

fn tick_key(repo: &RepoRecord, n: usize) -> String {
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
        for repo in repos.iter().filter(|r| !r.schedules.is_empty()) {
            for (n, expr) in repo.schedules.iter().enumerate() {
                let Ok(schedule) = parse_cron(expr) else {
                    continue;
                };
                if let Some(next) = due(forges, shared, repo, n, &schedule).await {
                    wake = wake.min(next);
                }
            }
        }
        let sleep = (wake - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::time::sleep(sleep.max(Duration::from_millis(20))).await;
    }
}

/// Starts the ticks of one schedule that are due; returns its next tick.
async fn due(
    forges: &Forges,
    shared: &Shared,
    repo: &RepoRecord,
    n: usize,
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
    n: usize,
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
