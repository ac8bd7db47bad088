//! Checkout over smart HTTP with basic auth: `git http-backend` behind a
//! small HTTP/1.1 server in the test, credentials from a runner secret.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use capstan_runner::git::{GitError, checkout};
use capstan_runner::secrets::Secret;

const USER: &str = "bot";
const PASSWORD: &str = "s3cret-pass";

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@example.com"])
        .args(["-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git (scripts/testbed up installs it)");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A bare repository `root/repo.git` with two commits; returns the first id.
fn bare_repo(root: &Path) -> String {
    let src = root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    git(&src, &["init", "-q"]);
    std::fs::write(src.join("v.txt"), "one\n").unwrap();
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "one"]);
    let first = git(&src, &["rev-parse", "HEAD"]);
    std::fs::write(src.join("v.txt"), "two\n").unwrap();
    git(&src, &["commit", "-q", "-am", "two"]);
    git(
        root,
        &["clone", "-q", "--bare", src.to_str().unwrap(), "repo.git"],
    );
    first
}

/// Serves `git http-backend` for `root` with basic auth; returns the port.
fn serve(root: PathBuf) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    );
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let root = root.clone();
            let expected = expected.clone();
            std::thread::spawn(move || {
                let _ = handle(conn, &root, &expected);
            });
        }
    });
    port
}

fn handle(conn: TcpStream, root: &Path, expected_auth: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let (mut auth, mut content_type, mut length) = (String::new(), String::new(), 0usize);
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "authorization" => auth = v.trim().to_owned(),
                "content-type" => content_type = v.trim().to_owned(),
                "content-length" => length = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    if auth != expected_auth {
        return out.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut child = Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REQUEST_METHOD", &method)
        .env("CONTENT_TYPE", &content_type)
        .env("CONTENT_LENGTH", length.to_string())
        .env("REMOTE_USER", USER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(&body)?;
    let output = child.wait_with_output()?;
    let split = output
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| {
            output
                .stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, 2))
        })
        .unwrap_or((0, 0));
    let head = String::from_utf8_lossy(&output.stdout[..split.0]).to_string();
    let payload = &output.stdout[split.0 + split.1..];
    let mut status = "200 OK".to_owned();
    let mut headers = String::new();
    for h in head.lines() {
        match h.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("status") => status = v.trim().to_owned(),
            Some(_) => headers.push_str(&format!("{h}\r\n")),
            None => {}
        }
    }
    write!(
        out,
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    )?;
    out.write_all(payload)
}

#[tokio::test(flavor = "multi_thread")]
async fn checkout_over_http_with_credentials_from_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let first = bare_repo(dir.path());
    let port = serve(dir.path().to_owned());
    let url = format!("http://127.0.0.1:{port}/repo.git");

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
