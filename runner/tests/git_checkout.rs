//! Checkout over smart HTTP with basic auth (the test bed's `GitServer`:
//! `git http-backend` on loopback), credentials from a runner secret.

use std::path::Path;

use capstan_runner::git::{GitError, checkout};
use capstan_runner::secrets::Secret;
use capstan_tests::git_server::{GitServer, git};

const USER: &str = "bot";
const PASSWORD: &str = "s3cret-pass";

/// Pushes two commits to `server`'s empty `repo.git`; returns the first id.
fn two_commits(server: &GitServer, work: &Path) -> String {
    server.create_repo("repo").unwrap();
    git(work, &["init", "-q"]);
    std::fs::write(work.join("v.txt"), "one\n").unwrap();
    git(work, &["add", "."]);
    git(work, &["commit", "-q", "-m", "one"]);
    let first = git(work, &["rev-parse", "HEAD"]);
    std::fs::write(work.join("v.txt"), "two\n").unwrap();
    git(work, &["commit", "-q", "-am", "two"]);
    git(work, &["push", "-q", &server.url_with_auth("repo"), "main"]);
    first
}

#[tokio::test(flavor = "multi_thread")]
async fn checkout_over_http_with_credentials_from_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = GitServer::start(USER, PASSWORD).unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let first = two_commits(&server, &work);
    let url = server.url("repo");

    let good = Secret::Login {
        username: USER.into(),
        password: PASSWORD.into(),
    };
    let dest = dir.path().join("ok");
    let id = checkout(&url, &first, &dest, Some(good)).await.unwrap();
    assert_eq!(id, first);
    assert_eq!(
        std::fs::read_to_string(dest.join("v.txt")).unwrap(),
        "one\n"
    );

    let wrong = Secret::Text(format!("{USER}:not-the-password"));
    let err = checkout(&url, &first, &dir.path().join("wrong"), Some(wrong))
        .await
        .unwrap_err();
    assert!(matches!(err, GitError::Auth { .. }), "{err:?}");
    assert!(err.to_string().contains("authentication failed"), "{err}");

    let err = checkout(&url, &first, &dir.path().join("none"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, GitError::Auth { .. }), "{err:?}");
}
