//! The Kubernetes manifests (deploy/k8s, deploy/argocd), offline: there is
//! no cluster here, so every overlay is rendered with `kubectl kustomize`
//! and each object validated by `deploy/k8s/check` (Kubernetes 1.32
//! schemas, strict; the CRDs' vendored schemas for Application and
//! ServiceMonitor). The check itself must fail on a broken manifest, and
//! the Secrets `make-secrets` prints must validate too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn check(extra: &[&Path]) -> Output {
    Command::new(deploy().join("k8s/check"))
        .args(extra)
        .output()
        .expect("run deploy/k8s/check")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn every_overlay_and_application_renders_and_validates() {
    let out = check(&[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for (target, objects) in [
        ("deploy/k8s/overlays/dev", 11),
        ("deploy/k8s/overlays/ha", 19),
        ("deploy/argocd/capstan.yaml", 1),
        ("deploy/argocd/application.yaml", 1),
    ] {
        let line = format!("{target}: {objects} objects valid (Kubernetes 1.32.0)");
        assert!(
            stdout.lines().any(|l| l == line),
            "no `{line}` in\n{stdout}"
        );
    }
}

#[test]
fn a_broken_manifest_fails_the_check_naming_the_object_and_field() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replicas: three\n  \
         selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    \
         spec: {containers: [{name: c, image: i}]}\n---\n\
         apiVersion: argoproj.io/v1alpha1\nkind: Application\nmetadata: {name: a}\n\
         spec: {project: default, source: {repoURL: r}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {prots: []}\n---\n\
         apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n---\n\
         apiVersion: keda.sh/v1alpha1\nkind: ScaledJob\nmetadata: {name: j1}\nspec: {jobTargetRef: \
         {template: {spec: {containers: [{name: c, image: i}]}}}, triggers: [{type: metrics-api}]}\n---\n\
         apiVersion: keda.sh/v1alpha1\nkind: ScaledJob\nmetadata: {name: j2}\nspec: {jobTargetRef: \
         {template: {spec: {restartPolicy: Never, containers: [{name: c, image: i, prots: 1}]}}}, \
         triggers: [{type: metrics-api, metadata: {url: u}}]}\n",
    )?;
    let out = check(&[&bad]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    let name = bad.display();
    for expected in [
        format!("{name}: Deployment/x: spec.replicas: 'three' is not of type 'integer', 'null'"),
        format!("{name}: Application/a: spec: 'destination' is a required property"),
        format!(
            "{name}: Service/s: spec: Additional properties are not allowed ('prots' was unexpected)"
        ),
        format!("{name}: ScaledJob/j1: spec.triggers.0: 'metadata' is a required property"),
        // The ScaledJob's job template is checked as a Job, strictly.
        format!(
            "{name}: ScaledJob/j2: spec.jobTargetRef.spec.template.spec.containers.0: \
             Additional properties are not allowed ('prots' was unexpected)"
        ),
        format!(
            "{name}: Widget/w: no schema for example.com/v1 Widget in Kubernetes 1.32.0, and \
             none vendored in deploy/k8s/schemas"
        ),
    ] {
        assert!(
            stdout.lines().any(|l| l == expected),
            "no `{expected}` in\n{stdout}"
        );
    }
    // The committed manifests still pass in the same run.
    assert!(
        stdout.contains("deploy/k8s/overlays/ha: 19 objects valid"),
        "{stdout}"
    );
    Ok(())
}

#[test]
fn make_secrets_prints_valid_secrets_for_the_services_and_replicas() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keep = dir.path().join("keep");
    let make = || {
        Command::new(deploy().join("k8s/make-secrets"))
            .arg("ci-ns")
            .arg(&keep)
            .output()
    };
    let first = make()?;
    assert!(first.status.success(), "{}", text(&first.stderr));
    let manifests = dir.path().join("secrets.yaml");
    std::fs::write(&manifests, &first.stdout)?;
    let out = check(&[&manifests]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("{}: 2 objects valid", manifests.display())),
        "{stdout}"
    );
    let secrets = text(&first.stdout);
    for key in [
        "registration-token:",
        "tls.crt:",
        "tls.key:",
        "ca.crt:",
        "namespace: ci-ns",
    ] {
        assert!(secrets.contains(key), "{key} missing:\n{secrets}");
    }
    let sans = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(keep.join("coordinator.pem"))
        .output()?;
    let sans = text(&sans.stdout);
    for name in [
        "DNS:capstan-coordinator,",
        "DNS:*.capstan-coordinator-headless.ci-ns.svc",
    ] {
        assert!(sans.contains(name), "{name} not in {sans}");
    }
    // Kept material: a second run prints the same Secrets.
    let second = make()?;
    assert_eq!(text(&second.stdout), secrets);
    Ok(())
}
