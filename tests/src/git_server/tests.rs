//! Tests of the git server with the real git CLI.

use super::codec::base64;
use super::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;

/// A git CLI with no machine configuration, prompts or credential helpers.
struct Git {
    home: tempfile::TempDir,
}

impl Git {
    fn new() -> Self {
        Git {
            home: tempfile::tempdir().unwrap(),
        }
    }

    fn command(&self, dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("git");
        cmd.current_dir(dir)
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env_remove("GIT_ASKPASS")
            .env_remove("SSH_ASKPASS")
            .args([
                "-c",
                "credential.helper=",
                "-c",
                "user.name=Capstan Test",
                "-c",
                "user.email=test@capstan.invalid",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, dir: &Path, args: &[&str]) -> Output {
        self.command(dir, args).output().expect("running git")
    }

    #[track_caller]
    fn ok(&self, dir: &Path, args: &[&str]) -> String {
        let out = self.run(dir, args);
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Incompressible bytes, so the pack really is as big as the file.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn base64_matches_rfc_4648_vectors() {
    let cases = [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];
    for (input, want) in cases {
        assert_eq!(base64(input.as_bytes()), want);
    }
}

#[test]
fn clone_push_over_a_mebibyte_and_clone_again() {
    let server = GitServer::start("bot", "s3cret p@ss").unwrap();
    server.create_repo("demo/manifests").unwrap();
    let git = Git::new();
    let work = tempfile::tempdir().unwrap();
    let url = server.url_with_auth("demo/manifests");

    git.ok(work.path(), &["clone", "--quiet", &url, "one"]);
    let one = work.path().join("one");
    std::fs::write(one.join("README"), "hello\n").unwrap();
    let big = noise(2 * 1024 * 1024, 0x5eed);
    std::fs::write(one.join("big.bin"), &big).unwrap();
    git.ok(&one, &["add", "."]);
    git.ok(&one, &["commit", "--quiet", "-m", "first"]);
    git.ok(&one, &["push", "--quiet", "origin", "HEAD:refs/heads/main"]);
    assert!(
        server.shared.stats.chunked_requests.load(Ordering::Relaxed) >= 1,
        "a push over 1 MiB should arrive chunked"
    );

    git.ok(work.path(), &["clone", "--quiet", &url, "two"]);
    let two = work.path().join("two");
    assert_eq!(std::fs::read(two.join("big.bin")).unwrap(), big);
    assert_eq!(
        std::fs::read_to_string(two.join("README")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        git.ok(&one, &["rev-parse", "HEAD"]),
        git.ok(&two, &["rev-parse", "HEAD"])
    );
    assert_eq!(git.ok(&two, &["branch", "--show-current"]), "main");

    // Connections were reused: more requests than connections.
    let stats = &server.shared.stats;
    assert!(
        stats.requests.load(Ordering::Relaxed) > stats.connections.load(Ordering::Relaxed),
        "requests {} connections {}",
        stats.requests.load(Ordering::Relaxed),
        stats.connections.load(Ordering::Relaxed)
    );
}

#[test]
fn wrong_or_missing_credentials_are_refused() {
    let server = GitServer::start("bot", "right").unwrap();
    server.create_repo("app").unwrap();
    let git = Git::new();
    let work = tempfile::tempdir().unwrap();

    let wrong = server.url_with_auth("app").replace(":right@", ":wrong@");
    let out = git.run(work.path(), &["clone", &wrong, "a"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Authentication failed"), "{stderr}");

    let out = git.run(work.path(), &["clone", &server.url("app"), "b"]);
    assert!(!out.status.success());
    assert!(server.shared.stats.unauthorized.load(Ordering::Relaxed) >= 2);
    assert!(!work.path().join("a").exists() && !work.path().join("b").exists());

    // The raw answer carries the challenge and a Content-Length.
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.write_all(b"GET /app.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        answer.contains("WWW-Authenticate: Basic realm=\"capstan\"\r\n"),
        "{answer}"
    );
    assert!(answer.contains("Content-Length: "), "{answer}");

    // A push with the wrong password is refused too.
    git.ok(
        work.path(),
        &["clone", "--quiet", &server.url_with_auth("app"), "c"],
    );
    let c = work.path().join("c");
    git.ok(&c, &["commit", "--quiet", "--allow-empty", "-m", "x"]);
    let out = git.run(&c, &["push", &wrong, "HEAD:refs/heads/main"]);
    assert!(!out.status.success());
    let out = git.run(
        server.root(),
        &[
            "--git-dir",
            "app.git",
            "rev-parse",
            "--verify",
            "--quiet",
            "refs/heads/main",
        ],
    );
    assert!(!out.status.success(), "nothing was pushed");
}

#[test]
fn concurrent_pushes_one_is_rejected_as_non_fast_forward() {
    let server = GitServer::start("bot", "pw").unwrap();
    server.create_repo("race").unwrap();
    let git = Git::new();
    let work = tempfile::tempdir().unwrap();
    let url = server.url_with_auth("race");

    git.ok(work.path(), &["clone", "--quiet", &url, "seed"]);
    let seed = work.path().join("seed");
    git.ok(&seed, &["commit", "--quiet", "--allow-empty", "-m", "base"]);
    git.ok(
        &seed,
        &["push", "--quiet", "origin", "HEAD:refs/heads/main"],
    );

    let clones: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|name| {
            git.ok(work.path(), &["clone", "--quiet", &url, name]);
            let dir = work.path().join(name);
            std::fs::write(dir.join(format!("{name}.txt")), name).unwrap();
            git.ok(&dir, &["add", "."]);
            git.ok(&dir, &["commit", "--quiet", "-m", name]);
            dir
        })
        .collect();

    let children: Vec<_> = clones
        .iter()
        .map(|dir| {
            git.command(dir, &["push", "origin", "HEAD:refs/heads/main"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let ok: Vec<bool> = outputs.iter().map(|o| o.status.success()).collect();
    assert_eq!(
        ok.iter().filter(|&&x| x).count(),
        1,
        "exactly one push wins: {outputs:?}"
    );
    let loser = ok.iter().position(|&x| !x).unwrap();
    let stderr = String::from_utf8_lossy(&outputs[loser].stderr);
    // Rejected by the client after seeing the new ref ("fetch first"), or
    // by the server's ref lock/compare when both raced to the update.
    assert!(
        stderr.contains("rejected") || stderr.contains("failed to push"),
        "{stderr}"
    );

    // Pushing again without fetching is still a non-fast-forward.
    let out = git.run(&clones[loser], &["push", "origin", "HEAD:refs/heads/main"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[rejected]"), "{stderr}");

    // Fetch, rebase, push: both changes land.
    git.ok(
        &clones[loser],
        &["pull", "--quiet", "--rebase", "origin", "main"],
    );
    git.ok(
        &clones[loser],
        &["push", "--quiet", "origin", "HEAD:refs/heads/main"],
    );
    git.ok(work.path(), &["clone", "--quiet", &url, "check"]);
    let check = work.path().join("check");
    assert!(check.join("a.txt").exists() && check.join("b.txt").exists());
}

#[test]
fn gzip_request_bodies_reach_http_backend() {
    let server = GitServer::start("bot", "pw").unwrap();
    server.create_repo("gz").unwrap();
    let git = Git::new();
    let work = tempfile::tempdir().unwrap();
    let url = server.url_with_auth("gz");
    git.ok(work.path(), &["clone", "--quiet", &url, "up"]);
    let up = work.path().join("up");
    // Commits at distinct, increasing times: the fetch negotiation walks
    // the client's commits newest first, and commits made within one
    // second tie, which could put `base` (common with the server) in the
    // first round of `have`s; the server is then ready at once and the
    // second, gzipped, request never comes.
    let commit_at = |dir: &Path, msg: &str, at: u64| {
        let date = format!("@{at} +0000");
        let out = git
            .command(dir, &["commit", "--quiet", "--allow-empty", "-m", msg])
            .env("GIT_COMMITTER_DATE", &date)
            .env("GIT_AUTHOR_DATE", &date)
            .output()
            .expect("running git");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    commit_at(&up, "base", 1_700_000_000);
    git.ok(&up, &["push", "--quiet", "origin", "HEAD:refs/heads/main"]);
    git.ok(work.path(), &["clone", "--quiet", &url, "down"]);
    let down = work.path().join("down");
    // Many local commits the server lacks: the fetch negotiation sends
    // enough `have` lines that git gzips the request body.
    for i in 0..200 {
        commit_at(&down, &format!("local {i}"), 1_700_001_000 + i);
    }
    commit_at(&up, "remote", 1_700_002_000);
    git.ok(&up, &["push", "--quiet", "origin", "HEAD:refs/heads/main"]);
    git.ok(&down, &["fetch", "--quiet", "origin"]);
    assert_eq!(
        git.ok(&down, &["rev-parse", "origin/main"]),
        git.ok(&up, &["rev-parse", "HEAD"])
    );
    assert!(server.shared.stats.gzip_requests.load(Ordering::Relaxed) >= 1);
}

#[test]
fn drop_stops_the_server() {
    let server = GitServer::start("u", "p").unwrap();
    let addr = server.addr();
    let root = server.root().to_path_buf();
    let idle = TcpStream::connect(addr).unwrap();
    drop(server);
    assert!(TcpStream::connect(addr).is_err(), "the port is closed");
    assert!(!root.exists(), "the repositories are deleted");
    let mut buf = [0u8; 1];
    assert_eq!(
        (&idle).read(&mut buf).unwrap_or(0),
        0,
        "open connections are shut down"
    );
}
