//! The compose cluster (deploy/compose) end to end: `up`, a pipeline with
//! container steps submitted from the host through the published ports with
//! TLS and the admin token, its logs, a refused call without a token, a
//! plaintext URL refused, every coordinator healthy by its image's TLS
//! health check, the leader's container killed and the CLI still
//! submitting through the given ports, `down` leaving nothing behind.

use capstan_tests::compose::ComposeCluster;

const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/compose/hello.yaml");

/// A container's health and the output of its last checks.
const HEALTH: &str = "{{.State.Health.Status}} {{range .State.Health.Log}}{{.Output}}{{end}}";

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn compose_cluster_up_submit_failover_down() -> anyhow::Result<()> {
    // A short election TTL: the failover below waits for it.
    let c = ComposeCluster::up("e2e", &[("CAPSTAN_ELECTION_TTL_MS", "2000")])?;
    assert_eq!(c.servers().len(), 3, "{:?}", c.servers());
    for s in c.servers() {
        assert!(
            s.starts_with("https://127.0.0.1:"),
            "published on loopback: {s}"
        );
    }
    // The leader advertises its in-network name, which this host cannot
    // resolve: the CLI reaches it through the published ports it was given.
    let leader = c.leader_service()?;
    // The images' health check speaks TLS (`capstan-coordinator health`):
    // every coordinator reports healthy, and said `ok` to get there.
    for service in ["coordinator-1", "coordinator-2", "coordinator-3"] {
        let container = c.container(service)?;
        let health = capstan_tests::wait::poll_until_blocking(
            std::time::Duration::from_secs(30),
            std::time::Duration::from_millis(500),
            || {
                let out = std::process::Command::new("docker")
                    .args(["inspect", "-f", HEALTH, &container])
                    .output()?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                Ok(text.starts_with("healthy ").then_some(text))
            },
        )?;
        let health =
            health.ok_or_else(|| anyhow::anyhow!("{service} never healthy\n{}", c.logs()))?;
        assert!(health.contains("ok"), "{service}: {health}");
    }

    let out = c.cli(&["submit", HELLO, "--follow"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.logs());
    let runs = c.cli(&["runs", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&runs.stdout)?;
    let id = v["runs"][0]["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(v["runs"][0]["state"], "succeeded", "{v}");
    let logs = String::from_utf8(c.cli(&["logs", &id]).stdout)?;
    assert!(logs.contains("[hello] hello from capstan in "), "{logs}");
    assert!(logs.contains("[goodbye] goodbye, world\n"), "{logs}");

    // Tokens are on: no token, no answer (exit 4, auth).
    let out = c
        .cli_command()
        .env_remove("CAPSTAN_TOKEN_FILE")
        .args(["runs"])
        .output()?;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    // TLS is on: a plaintext URL to a published port is refused (exit 3).
    let plain = c.servers()[0].replace("https://", "http://");
    let out = c
        .cli_command()
        .env("CAPSTAN_SERVER", &plain)
        .args(["runs"])
        .output()?;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("requires TLS"), "{}", stderr(&out));

    // The leader's container dies; the CLI, given the same three ports,
    // submits to the new leader (its hints name in-network addresses).
    let killed = std::process::Command::new("docker")
        .args(["kill", &c.container(&leader)?])
        .output()?;
    assert!(killed.status.success(), "{}", stderr(&killed));
    let started = std::time::Instant::now();
    let out = c.cli(&["submit", HELLO, "--follow"]);
    assert!(
        out.status.success(),
        "after {:?}: {}\n{}",
        started.elapsed(),
        stderr(&out),
        c.logs()
    );
    let new = c.leader_service()?;
    assert_ne!(new, leader, "a new leader");
    c.down()
}

/// `etcd-backup` while the cluster runs, a run made after it, then
/// `etcd-restore`: the cluster comes back with the runs of the snapshot and
/// without the later one, on new ports the rewritten env file names, and
/// takes new work.
#[test]
fn etcd_backup_and_restore_bring_back_the_snapshot() -> anyhow::Result<()> {
    let mut c = ComposeCluster::up("restore", &[("CAPSTAN_ELECTION_TTL_MS", "2000")])?;
    let before = submit(&c)?;
    let snapshot = tempfile::tempdir()?;
    let file = snapshot.path().join("etcd.db");
    let file_arg = file.to_str().expect("utf-8 path");
    c.run_script("etcd-backup", &[file_arg])?;
    let after = submit(&c)?;
    c.run_script("etcd-restore", &[file_arg])?;
    let ids: Vec<String> = capstan_tests::wait::poll_until_blocking(
        std::time::Duration::from_secs(60),
        std::time::Duration::from_millis(500),
        || {
            let out = c.cli(&["runs", "-o", "json"]);
            out.status.success().then(|| run_ids(&out)).transpose()
        },
    )?
    .ok_or_else(|| anyhow::anyhow!("no leader after the restore\n{}", c.logs()))?;
    assert!(
        ids.contains(&before),
        "{before} missing after the restore: {ids:?}"
    );
    assert!(
        !ids.contains(&after),
        "{after} is newer than the snapshot: {ids:?}"
    );
    let again = submit(&c)?;
    assert_ne!(again, after);
    c.down()
}

/// Submits hello.yaml and follows it to success; its run id.
fn submit(c: &ComposeCluster) -> anyhow::Result<String> {
    let out = c.cli(&["submit", HELLO, "--follow"]);
    anyhow::ensure!(out.status.success(), "{}\n{}", stderr(&out), c.logs());
    let runs = c.cli(&["runs", "-o", "json"]);
    Ok(run_ids(&runs)?.into_iter().next().unwrap_or_default())
}

/// The ids in `capstan runs -o json`, newest first.
fn run_ids(out: &std::process::Output) -> anyhow::Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(String::from))
        .collect())
}

/// `up` without the images says which one and the command that makes it,
/// and starts nothing.
#[test]
fn compose_up_without_the_images_says_how_to_build_them() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let project = format!("cps-noimages-{}", std::process::id());
    let out =
        std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/compose/up"))
            .env("CAPSTAN_COMPOSE_PROJECT", &project)
            .env("CAPSTAN_COMPOSE_STATE", state.path().join("state"))
            .env("CAPSTAN_TAG", "no-such-tag")
            .stdin(std::process::Stdio::null())
            .output()?;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(
            "image capstan/etcd:no-such-tag is missing: run `deploy/images/build no-such-tag` first"
        ),
        "{err}"
    );
    let left = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label=com.docker.compose.project={project}"))
        .output()?;
    assert!(left.stdout.is_empty(), "up started something");
    assert!(
        !state.path().join("state").exists(),
        "up made no state before checking"
    );
    Ok(())
}
