//! TLS and mTLS end to end (issue 18): real coordinator, runner and CLI
//! processes over loopback with certificates from `capstan_tests::certs`.
//! Every refusal is asserted by its whole message.

use capstan_proto::pipeline::v1::RunState;
use capstan_tests::certs::Pki;
use capstan_tests::*;
use std::process::Command;
use std::time::Duration;

const HELLO: &str = r#"
version: 1
name: hello
tasks:
  greet:
    steps:
      - run: echo "hello over tls"
"#;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim_end().to_string()
}

/// The CLI against `server`, with `args` (no --ca-cert unless given).
fn cli(server: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin("capstan"))
        .args(["--server", server])
        .args(args)
        .env_remove("CAPSTAN_CA_CERT")
        .env_remove("CAPSTAN_TOKEN")
        .env_remove("CAPSTAN_TOKEN_FILE")
        .output()
        .expect("run capstan")
}

/// A runner of `c` with only the flags given here and `extra` (no client
/// certificate unless `extra` has one), run until it exits; its log.
async fn refused_runner(c: &TestCluster, name: &str, extra: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(bin("capstan-runner"));
    cmd.args(["--coordinator", &c.url()])
        .args(["--registration-token", &c.token])
        .args(["--name", name])
        .args(["--executor", "fake"])
        .arg("--work-dir")
        .arg(c.dir().join(format!("work-{name}")))
        .arg("--ca-cert")
        .arg(c.pki().expect("a TLS cluster").ca_cert())
        .args(extra)
        .env("RUST_LOG", "info");
    let mut proc = Proc::spawn(cmd, c.dir(), name)?;
    let status = wait_exit(&mut proc.child, Duration::from_secs(20), "the runner exits").await?;
    assert_eq!(status.code(), Some(1), "{}", c.process_log(name));
    Ok(c.process_log(name))
}

/// The runner's last line: anyhow's `Error: ...` with its causes.
fn fatal_line(log: &str) -> String {
    log.lines()
        .rev()
        .find(|l| l.starts_with("Error: "))
        .unwrap_or_else(|| panic!("no fatal error in the runner's log:\n{log}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_cluster_runs_a_pipeline_and_shows_runner_identities() -> anyhow::Result<()> {
    let c = TestCluster::builder().mtls().start().await?;
    assert!(c.url().starts_with("https://127.0.0.1:"), "{}", c.url());
    let id = c.submit(HELLO).await?;
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");
    let log = String::from_utf8(c.task_log(&id, "greet").await?)?;
    assert!(log.contains("hello over tls"), "{log}");

    // The CLI over TLS: the run, and the identity from the runner's certificate.
    let out = c.cli(&["status", &id, "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let out = c.cli(&["runners", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v[0]["name"], "runner-0");
    assert_eq!(v[0]["tls_identity"], "runner-0");
    let out = c.cli(&["runners"]);
    let text = String::from_utf8(out.stdout)?;
    let header = text.lines().next().unwrap_or_default();
    assert!(header.ends_with("IDENTITY"), "{text}");
    assert!(
        text.lines().nth(1).unwrap().ends_with(" runner-0"),
        "{text}"
    );

    // The HTTP side port over TLS too.
    assert_eq!(c.http_get("/healthz")?, (200, "ok\n".to_string()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_clients_on_tls_ports_are_told_to_use_https() -> anyhow::Result<()> {
    let c = TestCluster::builder().tls().runners(0).start().await?;
    let grpc = c.replicas[0].grpc;
    let out = cli(&format!("http://{grpc}"), &["runs"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        stderr(&out),
        format!(
            "error: cannot connect securely to the coordinator at http://{grpc}: the coordinator \
             requires TLS on this port: use an https:// URL (with --ca-cert if its certificate is \
             from a private CA)"
        )
    );
    let (status, body) = http_get(c.replicas[0].http, "/healthz")?;
    assert_eq!(
        (status, body.as_str()),
        (
            400,
            "this coordinator port requires TLS: use an https:// URL\n"
        )
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn https_to_a_plaintext_port_never_falls_back() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(0).start().await?;
    let pki = Pki::new(&c.dir().join("pki"), "some")?;
    let grpc = c.replicas[0].grpc;
    let ca = pki.ca_cert();
    let out = cli(
        &format!("https://{grpc}"),
        &["--ca-cert", ca.to_str().unwrap(), "runs"],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // The detail is rustls' (a plaintext HTTP/2 server answers the
    // ClientHello with a frame, which is no TLS record).
    let e = stderr(&out);
    assert!(
        e.starts_with(&format!(
            "error: cannot connect securely to the coordinator at https://{grpc}: the server did \
             not answer with TLS ("
        )),
        "{e}"
    );
    assert!(
        e.ends_with(
            "): it may serve plaintext; use an http:// URL for a coordinator without --tls-cert"
        ),
        "{e}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_an_unknown_ca_is_refused_naming_ca_cert() -> anyhow::Result<()> {
    let c = TestCluster::builder().tls().runners(0).start().await?;
    let other = Pki::new(&c.dir().join("other"), "other")?;
    let url = c.url();
    let ca = other.ca_cert();
    let out = cli(&url, &["--ca-cert", ca.to_str().unwrap(), "runs"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        stderr(&out),
        format!(
            "error: cannot connect securely to the coordinator at {url}: the coordinator's \
             certificate is not trusted (invalid peer certificate: UnknownIssuer): pass the CA \
             certificate that signed it with --ca-cert (or CAPSTAN_CA_CERT)"
        )
    );
    // A --ca-cert that is not there is a usage error.
    let out = cli(&url, &["--ca-cert", "/nonexistent/ca.pem", "runs"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        stderr(&out),
        "error: cannot read --ca-cert /nonexistent/ca.pem: No such file or directory (os error 2)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_rotate_without_a_restart_and_an_expired_one_is_refused() -> anyhow::Result<()>
{
    let c = TestCluster::builder().tls().runners(0).start().await?;
    let pki = c.pki().unwrap();
    let ca = pki.ca_cert();
    let http = c.replicas[0].http;
    let before = https_get(http, "/healthz", &ca)?;
    assert_eq!(
        before.server_identity.as_deref(),
        Some("capstan-coordinator")
    );

    // Replaced in place (the files the coordinator was started with).
    pki.server_named("server", "rotated")?;
    let after = https_get(http, "/healthz", &ca)?;
    assert_eq!((after.status, after.body.as_str()), (200, "ok\n"));
    assert_eq!(after.server_identity.as_deref(), Some("rotated"));
    let out = c.cli(&["runs"]);
    assert!(out.status.success(), "the gRPC port serves it too: {out:?}");

    // A half-written key keeps the previous pair.
    std::fs::write(c.server_cert().key, "garbage")?;
    let kept = https_get(http, "/healthz", &ca)?;
    assert_eq!(kept.server_identity.as_deref(), Some("rotated"));
    assert!(
        c.process_log("coordinator").contains(
            "the changed TLS certificate or key cannot be used; still serving the previous one"
        ),
        "{}",
        c.process_log("coordinator")
    );

    pki.expired_server("server")?;
    let url = c.url();
    let out = c.cli(&["runs"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let e = stderr(&out);
    let prefix = format!(
        "error: cannot connect securely to the coordinator at {url}: the coordinator's \
         certificate has expired or is not yet valid (invalid peer certificate: certificate \
         expired: verification time "
    );
    assert!(e.starts_with(&prefix), "{e}");
    assert!(
        e.ends_with("): renew --tls-cert (the coordinator reloads it when the file changes)"),
        "{e}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn runners_without_a_good_client_certificate_are_refused() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .mtls()
        .runners(0)
        .coordinator_args(&["--tls-require-name-match"])
        .start()
        .await?;

    let log = refused_runner(&c, "no-cert", &[]).await?;
    assert_eq!(
        fatal_line(&log),
        "Error: the coordinator refused to register this runner: this coordinator requires \
         runners to present a client certificate (--tls-client-ca): start the runner with \
         --tls-client-cert and --tls-client-key"
    );

    let other = Pki::new(&c.dir().join("other"), "other")?;
    let foreign = other.client("foreign", "foreign")?;
    let log = refused_runner(
        &c,
        "foreign",
        &[
            "--tls-client-cert",
            foreign.cert.to_str().unwrap(),
            "--tls-client-key",
            foreign.key.to_str().unwrap(),
        ],
    )
    .await?;
    assert_eq!(
        fatal_line(&log),
        "Error: the coordinator refused to register this runner: the runner's client \
         certificate is not one this coordinator trusts (invalid peer certificate: \
         UnknownIssuer): issue it from the CA given to the coordinator's --tls-client-ca"
    );

    let someone = c.pki().unwrap().client("someone", "someone-else")?;
    let log = refused_runner(
        &c,
        "impostor",
        &[
            "--tls-client-cert",
            someone.cert.to_str().unwrap(),
            "--tls-client-key",
            someone.key.to_str().unwrap(),
        ],
    )
    .await?;
    assert_eq!(
        fatal_line(&log),
        "Error: the coordinator refused to register this runner: this runner's client \
         certificate is for `someone-else` but its --name is `impostor`; the coordinator \
         requires them to match (--tls-require-name-match)"
    );
    let out = c.cli(&["runners", "-o", "json"]);
    assert_eq!(
        String::from_utf8(out.stdout)?.trim(),
        "[]",
        "none registered"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_credential_with_another_certificate_is_refused() -> anyhow::Result<()> {
    let mut c = TestCluster::builder()
        .mtls()
        .executor("fake")
        .start()
        .await?;
    // runner-0 registered with its certificate (CN runner-0) and cached its
    // credential in its work dir; the same work dir with another host's
    // certificate must not connect as runner-0.
    let mut proc = c.terminate_runner("runner-0").expect("runner-0 runs");
    wait_exit(&mut proc.child, Duration::from_secs(20), "runner-0 drains").await?;
    let other = c.pki().unwrap().client("other", "other-host")?;
    let log = refused_runner(
        &c,
        "runner-0",
        &[
            "--tls-client-cert",
            other.cert.to_str().unwrap(),
            "--tls-client-key",
            other.key.to_str().unwrap(),
        ],
    )
    .await?;
    assert_eq!(
        fatal_line(&log),
        "Error: the coordinator refused this runner's connection: this runner registered with \
         a client certificate for `runner-0`, this connection presents `other-host`"
    );
    // Its logs too: runner-0's credential with the other certificate
    // writes no log byte.
    let cached: serde_json::Value = serde_json::from_slice(&std::fs::read(
        c.dir().join("work-runner-0").join("runner.json"),
    )?)?;
    let tls = capstan_tls::ClientTls {
        ca_cert: Some(c.pki().unwrap().ca_cert()),
        client_cert: Some(other.cert.clone()),
        client_key: Some(other.key.clone()),
    };
    let channel = endpoint(&c.url(), &tls)?.connect().await?;
    let chunk = capstan_proto::runner::v1::LogChunk {
        runner_id: cached["runner_id"].as_str().unwrap_or_default().into(),
        runner_secret: cached["runner_secret"].as_str().unwrap_or_default().into(),
        attempt_id: "att-forged".into(),
        data: b"forged\n".to_vec().into(),
        ..Default::default()
    };
    let err = capstan_proto::runner::v1::runner_service_client::RunnerServiceClient::new(channel)
        .push_logs(tokio_stream::iter(vec![chunk]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert_eq!(
        err.message(),
        "this runner registered with a client certificate for `runner-0`, this connection \
         presents `other-host`"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_beyond_loopback_is_refused_unless_insecure() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let coordinator = |extra: &[&str]| {
        let mut cmd = Command::new(bin("capstan-coordinator"));
        cmd.args(["--listen", &format!("0.0.0.0:{port}")])
            .args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--registration-token", "t"])
            .args(extra);
        cmd
    };
    let out = coordinator(&[]).output()?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stderr(&out),
        format!(
            "capstan-coordinator: refusing to serve plaintext on 0.0.0.0:{port} (--listen), \
             beyond this host: pass --tls-cert and --tls-key, or --insecure to serve without TLS \
             anyway"
        )
    );
    let mut proc = Proc::spawn(coordinator(&["--insecure"]), dir.path(), "insecure")?;
    // It answers in plaintext: here, that this call needs an API token
    // (exit 4), which only a serving coordinator can say.
    let out = eventually(
        Duration::from_secs(20),
        Duration::from_millis(50),
        async || {
            let out = cli(&format!("http://127.0.0.1:{port}"), &["runs"]);
            Ok((out.status.code() == Some(4)).then_some(out))
        },
        || "the --insecure coordinator did not answer".to_string(),
    )
    .await?;
    assert_eq!(
        stderr(&out),
        "error: this call needs an API token: pass --token or set CAPSTAN_TOKEN"
    );
    let log = std::fs::read_to_string(dir.path().join("insecure.log"))?;
    assert!(
        log.contains(&format!(
            "--insecure: serving plaintext on 0.0.0.0:{port} (--listen) beyond this host; \
             tokens and runner secrets cross the network in clear"
        )),
        "{log}"
    );
    proc.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_ca_cert_the_system_roots_decide() -> anyhow::Result<()> {
    let c = TestCluster::builder().tls().runners(0).start().await?;
    let url = c.url();
    // The test CA is in no system store: refused, naming --ca-cert.
    let out = cli(&url, &["runs"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        stderr(&out),
        format!(
            "error: cannot connect securely to the coordinator at {url}: the coordinator's \
             certificate is not trusted (invalid peer certificate: UnknownIssuer): pass the CA \
             certificate that signed it with --ca-cert (or CAPSTAN_CA_CERT)"
        )
    );
    // The system roots are what rustls-native-certs reads, which honours
    // SSL_CERT_FILE: with the test CA there, no --ca-cert is needed.
    let ca = c.pki().expect("a TLS cluster").ca_cert();
    let out = Command::new(bin("capstan"))
        .args(["--server", &url, "runs"])
        .env_remove("CAPSTAN_CA_CERT")
        .env_remove("CAPSTAN_TOKEN_FILE")
        .env("CAPSTAN_TOKEN", &c.api_token)
        .env("SSL_CERT_FILE", &ca)
        .output()?;
    assert!(out.status.success(), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_over_tls_fail_over_and_share_revocations() -> anyhow::Result<()> {
    let mut c = TestCluster::builder()
        .replicas(3)
        .etcd()
        .tls()
        .runners(1)
        .election_ttl_ms(2000)
        .start()
        .await?;
    assert!(
        c.urls().iter().all(|u| u.starts_with("https://")),
        "{:?}",
        c.urls()
    );
    let ci = c.create_token("ci", "submit").await?;
    let (leader, _) = c.wait_leader(Duration::from_secs(10)).await?;
    c.wait_runners_connected(1, Duration::from_secs(20)).await?;

    // The leader dies: the runner and the CLI find the new one over https.
    c.kill_replica(leader);
    let (new_leader, _) = c
        .wait_new_leader(Some(leader), Duration::from_secs(20))
        .await?;
    let file = c.dir().join("hello.yaml");
    std::fs::write(&file, HELLO)?;
    let out = c.cli_with_token(Some(&ci), &["submit", file.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8(out.stdout)?.trim().to_string();
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:?}");

    // Revoked through one replica (the CLI reaches the leader), refused by
    // the other one still up, asked directly.
    let out = c.cli(&["token", "revoke", "ci"]);
    assert!(out.status.success(), "{out:?}");
    let other = (0..3).find(|&i| i != leader && i != new_leader).unwrap();
    let err = capstan_proto::api::v1::pipeline_service_client::PipelineServiceClient::new(
        c.channel_with(&c.replicas[other].url(), Some(&ci)).await?,
    )
    .list_runs(capstan_proto::api::v1::ListRunsRequest {
        limit: 1,
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            tonic::Code::Unauthenticated,
            "the API token `ci` was revoked: ask an admin for a new one"
        )
    );
    let out = c.cli_with_token(Some(&ci), &["runs"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    Ok(())
}

/// `capstan-coordinator --http-listen ADDR [--tls-cert FILE] health`.
fn health(http: std::net::SocketAddr, cert: Option<&std::path::Path>) -> std::process::Output {
    let mut cmd = Command::new(bin("capstan-coordinator"));
    cmd.args(["--http-listen", &http.to_string()]);
    if let Some(cert) = cert {
        cmd.arg("--tls-cert").arg(cert);
    }
    cmd.arg("health")
        .env_remove("CAPSTAN_TLS_CERT")
        .env_remove("CAPSTAN_HTTP_LISTEN")
        .output()
        .expect("run capstan-coordinator health")
}

/// The images' health check: 200 from `/healthz` over TLS, trusting only
/// the certificate the coordinator serves (its names need not match
/// 127.0.0.1); any other certificate, a plaintext probe of the TLS port,
/// or nothing listening fails with what answered.
#[tokio::test(flavor = "multi_thread")]
async fn the_health_command_checks_its_own_port_over_tls_with_the_served_certificate()
-> anyhow::Result<()> {
    let c = TestCluster::builder().tls().runners(0).start().await?;
    let http = c.replicas[0].http;
    let served = c.server_cert().cert;
    let out = health(http, Some(&served));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");

    let other = Pki::new(&c.dir().join("other-pki"), "other")?.server("other")?;
    let out = health(http, Some(&other.cert));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "capstan-coordinator: GET https://{http}/healthz: "
        )) && err.contains("the server's certificate is not the one in the --tls-cert file"),
        "{err}"
    );

    let out = health(http, None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stderr(&out),
        format!("capstan-coordinator: GET http://{http}/healthz answered 400 Bad Request")
    );

    let plain = TestCluster::builder().runners(0).start().await?;
    let out = health(plain.replicas[0].http, None);
    assert!(out.status.success(), "{out:?}");

    let nobody = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let out = health(nobody, None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "capstan-coordinator: GET http://{nobody}/healthz: "
        )),
        "{err}"
    );
    Ok(())
}
