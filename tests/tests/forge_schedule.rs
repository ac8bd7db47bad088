//! The forge side across a leader kill (issue 22): a repository's cron
//! schedule starts exactly one run per tick, on the leader only, and the
//! commit statuses a run owes are posted by the next leader. Two
//! coordinators on a three-node etcd share one `--forge-key-file`.

use capstan_coordinator::store::Store as _;
use capstan_coordinator::store::etcd::{EtcdStore, connect};
use capstan_tests::git_server::{GitServer, git};
use capstan_tests::*;
use std::collections::BTreeSet;
use std::time::Duration;

const PIPELINE: &str =
    "version: 1\nname: nightly\ntasks:\n  t:\n    steps:\n      - run: echo tick ${{ git.ref }}\n";
/// Every 2 seconds.
const EVERY: u64 = 2;

#[tokio::test]
async fn a_schedule_fires_once_per_tick_across_a_leader_kill() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let server = GitServer::start("bot", "pw-1")?;
    server.create_repo("demo/app")?;
    let tree = work.path().join("app");
    std::fs::create_dir_all(&tree)?;
    git(&tree, &["init", "-q"]);
    std::fs::write(tree.join(".capstan.yaml"), PIPELINE)?;
    git(&tree, &["add", "-A"]);
    git(&tree, &["commit", "-q", "-m", "nightly"]);
    git(
        &tree,
        &["push", "-q", &server.url_with_auth("demo/app"), "HEAD:main"],
    );
    let key = work.path().join("forge.key");
    std::fs::write(&key, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n")?;
    let mut c = TestCluster::builder()
        .replicas(2)
        .etcd()
        .election_ttl_ms(2000)
        .executor("fake")
        .coordinator_args(&["--forge-key-file", &key.display().to_string()])
        .start()
        .await?;
    let (old, _) = c.wait_leader(Duration::from_secs(15)).await?;
    let url = server.url_with_auth("demo/app");
    let schedule = format!("*/{EVERY} * * * * *");
    let out = c.cli(&["repo", "add", "app", "--url", &url, "--schedule", &schedule]);
    assert!(out.status.success(), "{out:?}");
    tokio::time::sleep(Duration::from_secs(3 * EVERY + 1)).await;
    c.kill_replica(old);
    c.wait_new_leader(Some(old), Duration::from_secs(20))
        .await?;
    tokio::time::sleep(Duration::from_secs(3 * EVERY + 1)).await;
    let out = c.cli(&["repo", "remove", "app"]);
    assert!(out.status.success(), "{out:?}");
    // A tick that was due while removing may still be queued: let it land.
    tokio::time::sleep(Duration::from_secs(EVERY)).await;

    let store = EtcdStore::new(connect(&c.etcd().endpoints()).await?, "/capstan/");
    let mut ticks = Vec::new();
    // Runs still going are under `runs/`, finished ones under `done/runs/`.
    let mut stored = store.scan_prefix("runs/").await?;
    stored.extend(store.scan_prefix("done/runs/").await?);
    for (_, value) in stored {
        let run: serde_json::Value = serde_json::from_slice(&value)?;
        let key = run["idempotency_key"].as_str().unwrap_or("").to_string();
        if let Some(tick) = key.strip_prefix("schedule:app:0:") {
            ticks.push(tick.parse::<u64>()?);
        }
    }
    ticks.sort();
    let distinct: BTreeSet<u64> = ticks.iter().copied().collect();
    assert_eq!(distinct.len(), ticks.len(), "a tick ran twice: {ticks:?}");
    let (first, last) = (ticks[0], *ticks.last().unwrap());
    let expected: Vec<u64> = (0..)
        .map(|i| first + i * EVERY)
        .take_while(|t| *t <= last)
        .collect();
    assert_eq!(
        ticks,
        expected,
        "every tick from the first to the last ran once\n{}",
        c.all_logs()
    );
    assert!(
        ticks.len() >= 5,
        "ticks before and after the kill: {ticks:?}"
    );
    let kill_log = c.all_logs();
    assert!(kill_log.contains("scheduled run"), "{kill_log}");
    Ok(())
}

/// The statuses a run owes are stored: a leader killed while the run is in
/// progress leaves its `success` to the next leader.
#[tokio::test]
async fn owed_commit_statuses_survive_a_leader_kill() -> anyhow::Result<()> {
    use capstan_proto::pipeline::v1::RunState;
    use capstan_tests::forge_api::{Forge, Recorder, deliver, push_payload};
    let work = tempfile::tempdir()?;
    let tree = work.path().join("app");
    std::fs::create_dir_all(&tree)?;
    git(&tree, &["init", "-q", "-b", "main"]);
    std::fs::write(
        tree.join(".capstan.yaml"),
        "version: 1\nname: slow\ntasks:\n  t:\n    steps:\n      - run: sleep 6\n",
    )?;
    git(&tree, &["add", "-A"]);
    git(&tree, &["commit", "-q", "-m", "slow"]);
    let sha = git(&tree, &["rev-parse", "HEAD"]);
    let url = format!("file://{}", tree.display());
    let key = work.path().join("forge.key");
    std::fs::write(&key, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n")?;
    let status = Recorder::start()?;
    let mut c = TestCluster::builder()
        .replicas(2)
        .etcd()
        .election_ttl_ms(2000)
        .executor("shell")
        .coordinator_args(&["--forge-key-file", &key.display().to_string()])
        .start()
        .await?;
    let (old, _) = c.wait_leader(Duration::from_secs(15)).await?;
    let api = status.url();
    let out = c.cli(&[
        "repo",
        "add",
        "app",
        "--url",
        &url,
        "--forge",
        "github",
        "--api-url",
        &api,
        "--status-token",
        "tok",
    ]);
    assert!(out.status.success(), "{out:?}");
    let secret = String::from_utf8(out.stdout)?
        .split_whitespace()
        .last()
        .unwrap()
        .to_string();
    let body = push_payload(Forge::Github, &url, "refs/heads/main", &sha, &sha);
    // A follower refuses (the forge redelivers), queueing nothing.
    let (code, v) = deliver(
        c.replicas[1 - old].http,
        Forge::Github,
        "ha-0",
        &secret,
        &body,
    )?;
    assert_eq!(code, 503, "{v}");
    let (code, v) = deliver(c.replicas[old].http, Forge::Github, "ha-1", &secret, &body)?;
    assert_eq!(code, 202, "{v}");
    let id = v["runs"][0]["run"].as_str().unwrap().to_string();
    c.wait_run(&id, Duration::from_secs(20), |r| {
        capstan_tests::run_state(r) == RunState::Running
    })
    .await?;
    // The pending status is posted by the run's watch, beside the run: it
    // may reach the forge a moment after the run is already running.
    let pending = poll_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        async || {
            let r = status.requests();
            Ok((!r.is_empty()).then_some(r))
        },
    )
    .await?
    .unwrap_or_default();
    assert_eq!(pending.len(), 1, "pending: {pending:?}");
    assert_eq!(pending[0].body["state"], "pending", "{pending:?}");
    c.kill_replica(old);
    c.wait_new_leader(Some(old), Duration::from_secs(20))
        .await?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    assert_eq!(
        capstan_tests::run_state(&run),
        RunState::Succeeded,
        "{}",
        c.all_logs()
    );
    let posted = poll_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        async || {
            let r = status.requests();
            Ok((r.iter().any(|p| p.body["state"] == "success")).then_some(r))
        },
    )
    .await?
    .unwrap_or_else(|| {
        panic!(
            "no success status: {:?}\n{}",
            status.requests(),
            c.all_logs()
        )
    });
    let states: Vec<_> = posted
        .iter()
        .map(|p| p.body["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        states.last().map(String::as_str),
        Some("success"),
        "{states:?}"
    );
    assert!(
        states.iter().all(|s| s == "pending" || s == "success"),
        "{states:?}"
    );
    Ok(())
}
