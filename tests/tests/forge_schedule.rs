//! Schedules (issue 22): a repository's cron schedule starts exactly one
//! run per tick, on the leader only, across a kill of the leader. Two
//! coordinators on a three-node etcd share one `--forge-key-file`; the
//! repository lives on the test bed's git server.

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
    for (_, value) in store.scan_prefix("runs/").await? {
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
