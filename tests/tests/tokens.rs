//! API tokens (issue 18): every client call needs a token of the right
//! scope; real coordinator and CLI processes, the CLI's exit code 4 and its
//! one-line messages; revocation on a three-replica etcd cluster.

use capstan_proto::api::v1 as api;
use capstan_proto::cluster::v1 as cluster;
use capstan_proto::pipeline::v1::RunState;
use capstan_tests::*;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

/// A run whose one task sleeps (fake executor: milliseconds) long enough to
/// be cancelled.
const SLOW: &str =
    "version: 1\nname: slow\ntasks:\n  t:\n    steps: [ { run: \"sleep 60000\" } ]\n";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The CLI was refused: exit 4 and exactly `error: <message>`.
#[track_caller]
fn assert_denied(out: &Output, message: &str) {
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(stderr(out), format!("error: {message}\n"), "{out:?}");
}

fn write_pipeline(dir: &Path, yaml: &str) -> String {
    let file = dir.join("slow.yaml");
    std::fs::write(&file, yaml).unwrap();
    file.display().to_string()
}

/// `capstan token create` with the cluster's admin token: the new token.
fn cli_token(c: &TestCluster, name: &str, scope: &str, extra: &[&str]) -> String {
    let mut args = vec!["token", "create", "--name", name, "--scope", scope];
    args.extend(extra);
    let out = c.cli(&args);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stderr(&out).contains(&format!("token `{name}`"))
            && stderr(&out).contains("shown only now"),
        "{out:?}"
    );
    stdout(&out).trim().to_string()
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_client_call_needs_a_live_token_of_the_right_scope() -> anyhow::Result<()> {
    let c = TestCluster::builder().executor("fake").start().await?;
    let file = write_pipeline(c.dir(), SLOW);

    // No token, or one the coordinator does not know: UNAUTHENTICATED.
    let none = "this call needs an API token: pass --token or set CAPSTAN_TOKEN";
    assert_denied(&c.cli_with_token(None, &["runs"]), none);
    assert_denied(&c.cli_with_token(None, &["cluster"]), none);
    let unknown = "the API token is not known to this coordinator: pass a valid one with --token or CAPSTAN_TOKEN";
    assert_denied(
        &c.cli_with_token(Some("capstan_forged"), &["runs"]),
        unknown,
    );
    // Raw gRPC, on every client service.
    let bare = c.channel_with(&c.url(), None).await?;
    let err = api::pipeline_service_client::PipelineServiceClient::new(bare.clone())
        .submit_run(api::SubmitRunRequest {
            pipeline_yaml: SLOW.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (tonic::Code::Unauthenticated, none)
    );
    let err = cluster::cluster_service_client::ClusterServiceClient::new(bare.clone())
        .ask_leader(cluster::AskLeaderRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (tonic::Code::Unauthenticated, none)
    );
    let err = api::token_service_client::TokenServiceClient::new(bare)
        .list_tokens(api::ListTokensRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (tonic::Code::Unauthenticated, none)
    );
    // Nothing was queued by any of them.
    assert_eq!(
        c.client()
            .await?
            .list_runs(api::ListRunsRequest {
                limit: 0,
                ..Default::default()
            })
            .await?
            .into_inner()
            .runs
            .len(),
        0
    );

    // A read token reads, and may not submit, cancel, drain or manage tokens.
    let reader = cli_token(&c, "reader", "read", &[]);
    let out = c.cli_with_token(Some(&reader), &["runs"]);
    assert!(out.status.success(), "{out:?}");
    let needs = |scope: &str| {
        format!("this call needs a token with the `{scope}` scope; the token `reader` has `read`")
    };
    assert_denied(
        &c.cli_with_token(Some(&reader), &["submit", &file]),
        &needs("submit"),
    );
    assert_denied(
        &c.cli_with_token(Some(&reader), &["drain", "runner-0"]),
        &needs("admin"),
    );
    assert_denied(
        &c.cli_with_token(Some(&reader), &["token", "list"]),
        &needs("admin"),
    );
    assert_denied(
        &c.cli_with_token(
            Some(&reader),
            &["token", "create", "--name", "x", "--scope", "admin"],
        ),
        &needs("admin"),
    );

    // A submit token's runs carry its name; it cancels its own and no other.
    let alice = cli_token(&c, "alice", "submit", &[]);
    let bob = cli_token(&c, "bob", "submit", &[]);
    let submit = |token: &str| {
        let out = c.cli_with_token(Some(token), &["submit", &file]);
        assert!(out.status.success(), "{out:?}");
        stdout(&out).trim().to_string()
    };
    let alices = submit(&alice);
    let bobs = submit(&bob);
    let out = c.cli_with_token(Some(&reader), &["status", &alices, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["submitted_by"], "alice", "{v}");
    let out = c.cli_with_token(Some(&reader), &["status", &alices]);
    assert!(
        stdout(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .contains("  by alice  "),
        "{out:?}"
    );
    assert_denied(
        &c.cli_with_token(Some(&bob), &["cancel", &alices]),
        &format!(
            "run {alices} was submitted by token `alice`: a `submit` token may cancel only its own runs (an `admin` token may cancel any)"
        ),
    );
    assert_ne!(run_state(&c.get_run(&alices).await?), RunState::Cancelled);
    let out = c.cli_with_token(Some(&alice), &["cancel", &alices]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        run_state(&c.wait_done(&alices, Duration::from_secs(10)).await?),
        RunState::Cancelled
    );
    // An admin cancels anyone's run, and that is audited.
    let out = c.cli(&["cancel", &bobs]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        run_state(&c.wait_done(&bobs, Duration::from_secs(10)).await?),
        RunState::Cancelled
    );

    // Admin: drain and resume, audited with the token's name.
    let out = c.cli(&["drain", "runner-0"]);
    assert!(out.status.success(), "{out:?}");
    let out = c.cli(&["resume", "runner-0"]);
    assert!(out.status.success(), "{out:?}");
    let log = c.process_log("coordinator");
    for action in ["drain", "resume", "cancel", "token create"] {
        assert!(
            log.lines().any(|l| l.contains("audit")
                && l.contains("token=harness-admin")
                && l.contains(&format!("action=\"{action}\""))),
            "no audit event for {action}:\n{log}"
        );
    }
    assert!(log.contains("submitted_by=bob"), "{log}");

    // The list shows names and scopes, never a secret.
    let out = c.cli(&["token", "list", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let names: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["alice", "bob", "harness-admin", "reader"]);
    assert_eq!(v[0]["scope"], "submit");
    for token in [&reader, &alice, &bob, &c.api_token] {
        assert!(!stdout(&out).contains(token.as_str()));
        let text = c.cli(&["token", "list"]);
        assert!(!stdout(&text).contains(token.as_str()));
    }

    // Revoked: refused from the next call on, saying so.
    let out = c.cli(&["token", "revoke", "reader"]);
    assert!(out.status.success(), "{out:?}");
    assert_denied(
        &c.cli_with_token(Some(&reader), &["runs"]),
        "the API token `reader` was revoked: ask an admin for a new one",
    );
    let out = c.cli(&["token", "revoke", "reader"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        stderr(&out),
        "error: no token named `reader` (see `capstan token list`)\n"
    );

    // Expired: refused, saying so.
    let short = cli_token(&c, "short", "read", &["--expires", "1s"]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_denied(
        &c.cli_with_token(Some(&short), &["runs"]),
        "the API token `short` has expired: ask an admin for a new one",
    );

    // A token file works (its trailing newline too); a missing one is a usage error.
    let token_file = c.dir().join("alice.token");
    std::fs::write(&token_file, format!("{alice}\n"))?;
    let out = c.cli_with_token(
        None,
        &["runs", "--token-file", &token_file.display().to_string()],
    );
    assert!(out.status.success(), "{out:?}");
    let out = c.cli_with_token(None, &["runs", "--token-file", "/nonexistent/t"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out)
            .starts_with("error: cannot read the token file /nonexistent/t (--token-file): "),
        "{out:?}"
    );

    // No token is stored in clear: not in the redb file, its WAL or the logs.
    let every = [&reader, &alice, &bob, &short, &c.api_token];
    let stored = files(&c.data_dir());
    assert!(
        stored.iter().any(|p| p.ends_with("state.redb")),
        "{stored:?}"
    );
    assert!(
        stored.iter().any(|p| p.ends_with("state.redb.wal")),
        "{stored:?}"
    );
    for path in stored {
        let bytes = std::fs::read(&path)?;
        for token in every {
            let found = bytes.windows(token.len()).any(|w| w == token.as_bytes());
            assert!(!found, "{} holds a token in clear", path.display());
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_admin_token_is_made_offline() -> anyhow::Result<()> {
    let mut c = TestCluster::builder().runners(0).start().await?;
    // While the coordinator runs its store is locked: the message says what to do instead.
    let err = c
        .create_token_offline("late", "admin", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("make tokens over the API instead: `capstan token create`"),
        "{err}"
    );
    c.terminate_replica(0, Duration::from_secs(10))?;
    let made = c.create_token_offline("ops", "admin", &["--expires", "30d"])?;
    c.start_replica(0).await?;
    let out = c.cli_with_token(Some(&made), &["token", "list", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let ops = v
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ops")
        .expect("ops listed");
    assert_eq!(ops["scope"], "admin");
    assert!(ops["expires"].is_string(), "{ops}");
    // Bad input is refused before anything is stored.
    c.terminate_replica(0, Duration::from_secs(10))?;
    let err = c
        .create_token_offline("bad", "root", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad scope `root`: use read, submit or admin"),
        "{err}"
    );
    let err = c
        .create_token_offline("ops", "read", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("a token named `ops` already exists"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_holds_on_every_replica_and_after_a_failover() -> anyhow::Result<()> {
    let mut c = TestCluster::builder()
        .replicas(3)
        .etcd()
        .runners(0)
        .election_ttl_ms(2000)
        .start()
        .await?;
    let ci = c.create_token("ci", "submit").await?;
    let (leader, _) = c.wait_leader(Duration::from_secs(10)).await?;
    let follower = (leader + 1) % 3;
    let client = c.client_with(Some(&ci)).await?;
    client.list_runs(1).await?;
    // A follower authenticates before it says who leads.
    let err = api::pipeline_service_client::PipelineServiceClient::new(
        c.channel_with(&c.replicas[follower].url(), None).await?,
    )
    .list_runs(api::ListRunsRequest {
        limit: 1,
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    c.client_with(Some(&c.api_token.clone()))
        .await?
        .revoke_token("ci")
        .await?;
    let revoked = "the API token `ci` was revoked: ask an admin for a new one";
    let err = client.list_runs(1).await.unwrap_err();
    assert_eq!(
        err.status().map(|s| (s.code(), s.message())),
        Some((tonic::Code::Unauthenticated, revoked))
    );
    for i in 0..3 {
        let err = api::pipeline_service_client::PipelineServiceClient::new(
            c.channel_with(&c.replicas[i].url(), Some(&ci)).await?,
        )
        .list_runs(api::ListRunsRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (tonic::Code::Unauthenticated, revoked),
            "replica {i}"
        );
    }
    // The new leader refuses it too.
    c.kill_replica(leader);
    c.wait_new_leader(Some(leader), Duration::from_secs(20))
        .await?;
    assert_denied(&c.cli_with_token(Some(&ci), &["runs"]), revoked);
    let out = c.cli(&["runs"]);
    assert!(out.status.success(), "{out:?}");
    // etcd holds hashes only.
    let dump = c.etcd().dump()?;
    assert!(dump.contains("tokens/"), "{dump}");
    for token in [&ci, &c.api_token] {
        assert!(
            !dump.contains(token.as_str()),
            "etcd holds a token in clear"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_runner_name_registers_again_only_with_its_credential_or_an_admin_token()
-> anyhow::Result<()> {
    use capstan_proto::runner::v1 as rpb;
    let mut c = TestCluster::builder().executor("fake").start().await?;
    let taken = "a runner named `spare` is already registered: registering it again needs its current credential (its runner.json) or an admin API token; give a new runner another --name";
    let register = |token: Option<String>, id: &str, secret: &str| {
        let url = c.url();
        let req = rpb::RegisterRequest {
            registration_token: c.token.clone(),
            name: "spare".into(),
            capacity: 1,
            runner_id: id.into(),
            runner_secret: secret.into(),
            ..Default::default()
        };
        let c = &c;
        async move {
            let ch = c.channel_with(&url, token.as_deref()).await?;
            let r = rpb::runner_service_client::RunnerServiceClient::new(ch)
                .register(req)
                .await;
            anyhow::Ok(r.map(tonic::Response::into_inner))
        }
    };
    // A new name with the registration token alone.
    let first = register(None, "", "").await??;
    // The same name again: refused, and nothing changes hands.
    let err = register(None, "", "").await?.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (tonic::Code::PermissionDenied, taken)
    );
    let err = register(None, &first.runner_id, "wrong")
        .await?
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (tonic::Code::PermissionDenied, taken)
    );
    // With its credential: the same id, a new secret (the old one is void).
    let again = register(None, &first.runner_id, &first.runner_secret).await??;
    assert_eq!(again.runner_id, first.runner_id);
    assert_ne!(again.runner_secret, first.runner_secret);
    let err = register(None, &first.runner_id, &first.runner_secret)
        .await?
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (tonic::Code::PermissionDenied, taken)
    );
    // With an admin token; a token of a smaller scope is refused as such.
    let admin = register(Some(c.api_token.clone()), "", "").await??;
    assert_eq!(admin.runner_id, first.runner_id);
    let reader = c.create_token("reader", "read").await?;
    let err = register(Some(reader), "", "").await?.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "this call needs a token with the `admin` scope; the token `reader` has `read`"
    );
    assert!(
        c.process_log("coordinator")
            .lines()
            .any(|l| l.contains("audit")
                && l.contains("token=harness-admin")
                && l.contains("action=\"runner register\"")),
        "{}",
        c.process_log("coordinator")
    );

    // A real runner that lost its runner.json cannot take its old name back:
    // it stops with the coordinator's reason.
    c.kill_runner("runner-0");
    std::fs::remove_file(c.dir().join("work-runner-0").join("runner.json"))?;
    let mut cmd = c.runner_command("runner-0", &c.token.clone());
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let status = wait_exit(
        &mut child,
        Duration::from_secs(15),
        "the runner did not stop",
    )
    .await?;
    assert!(!status.success(), "{status}");
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err)?;
    assert!(
        err.contains(
            "the coordinator refused to register this runner: a runner named `runner-0` is already registered"
        ),
        "{err}"
    );
    Ok(())
}

/// The runner secret in `runner.json` of runner `name` of `c`.
fn runner_secret(c: &TestCluster, name: &str) -> String {
    let path = c.dir().join(format!("work-{name}")).join("runner.json");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("runner.json")).unwrap();
    let secret = json["runner_secret"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        secret.len() >= 16,
        "no runner_secret in {}: {json}",
        path.display()
    );
    secret
}

#[tokio::test(flavor = "multi_thread")]
async fn no_runner_secret_or_registration_token_is_stored_in_clear() -> anyhow::Result<()> {
    // Standalone: the data dir (redb file, WAL, logs).
    let c = TestCluster::builder().runners(1).start().await?;
    c.wait_runners_connected(1, Duration::from_secs(20)).await?;
    let secrets = [runner_secret(&c, "runner-0"), c.token.clone()];
    let stored = files(&c.data_dir());
    assert!(
        stored.iter().any(|p| p.ends_with("state.redb")),
        "{stored:?}"
    );
    for path in stored {
        let bytes = std::fs::read(&path)?;
        for s in &secrets {
            let found = bytes.windows(s.len()).any(|w| w == s.as_bytes());
            assert!(!found, "{} holds a secret in clear", path.display());
        }
    }
    // etcd: every key and value.
    let mut ha = TestCluster::builder()
        .replicas(1)
        .etcd()
        .runners(1)
        .start()
        .await?;
    ha.wait_runners_connected(1, Duration::from_secs(20))
        .await?;
    let secrets = [runner_secret(&ha, "runner-0"), ha.token.clone()];
    let dump = ha.etcd().dump()?;
    assert!(dump.contains("runners/"), "{dump}");
    for s in &secrets {
        assert!(!dump.contains(s.as_str()), "etcd holds a secret in clear");
    }
    Ok(())
}
