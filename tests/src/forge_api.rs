//! A forge's side of the webhook tests: [`Recorder`], a small HTTP server
//! that stands in for the commit status API (it records every request and
//! answers with the statuses it is told to) and the pull request API (it
//! keeps the pull requests POSTed and lists them on GET, as GitHub, Gitea
//! and GitLab do), and [`deliver`], a webhook POST signed as GitHub, Gitea
//! or GitLab sign theirs.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request the recorder got.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Inner {
    requests: Vec<Recorded>,
    /// Statuses to answer, in order; 201 once empty.
    script: VecDeque<u16>,
    /// The pull requests opened, as the forge answers them.
    pulls: Vec<serde_json::Value>,
}

/// Where the stand-in says its pull requests are.
pub const PULL_URL: &str = "https://forge.test/pull/";

/// The pull request API's answer to `method path` (the query dropped), if
/// it is one: GET lists every one opened, POST opens one (GitHub and
/// Gitea's `head`/`base`, GitLab's `source_branch`/`target_branch`).
fn pull_answer(
    method: &str,
    path: &str,
    body: &serde_json::Value,
    pulls: &mut Vec<serde_json::Value>,
) -> Option<(u16, String)> {
    let path = path.split('?').next().unwrap_or(path);
    if !(path.ends_with("/pulls") || path.ends_with("/merge_requests")) {
        return None;
    }
    if method == "GET" {
        return Some((200, serde_json::Value::Array(pulls.clone()).to_string()));
    }
    let field = |a: &str, b: &str| body.get(a).or_else(|| body.get(b)).cloned();
    let (head, base) = (
        field("head", "source_branch")?,
        field("base", "target_branch")?,
    );
    let n = pulls.len() + 1;
    let pr = serde_json::json!({
        "number": n, "html_url": format!("{PULL_URL}{n}"), "web_url": format!("{PULL_URL}{n}"),
        "title": body["title"],
        "head": {"ref": head, "repo": {"full_name": path}},
        "base": {"ref": base, "repo": {"full_name": path}},
        "source_branch": head, "target_branch": base, "source_project_id": 1, "target_project_id": 1,
    });
    pulls.push(pr.clone());
    Some((201, pr.to_string()))
}

/// The recording status API; stops when dropped.
pub struct Recorder {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    stop: Arc<AtomicBool>,
}

impl Recorder {
    pub fn start() -> anyhow::Result<Recorder> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (i, s) = (inner.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let i = i.clone();
                        std::thread::spawn(move || {
                            let _ = serve(conn, &i);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Recorder { addr, inner, stop })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next requests are answered with these statuses, in order.
    pub fn answer_next(&self, codes: &[u16]) {
        self.inner.lock().unwrap().script.extend(codes);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().requests.clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(conn: TcpStream, inner: &Mutex<Inner>) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let (code, answer) = {
        let mut i = inner.lock().unwrap();
        let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        let scripted = i.script.pop_front();
        let answer = match scripted {
            Some(code) => (code, "{}".to_owned()),
            None => {
                pull_answer(&method, &path, &body, &mut i.pulls).unwrap_or((201, "{}".to_owned()))
            }
        };
        i.requests.push(Recorded {
            method,
            path,
            headers,
            body,
        });
        answer
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    )
}

/// HMAC-SHA256 of `body` with `secret`, in hex.
pub fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Which forge a delivery imitates.
#[derive(Clone, Copy, Debug)]
pub enum Forge {
    Github,
    Gitea,
    Gitlab,
}

/// A push payload of `forge` for `clone_url` (shapes from the forges' docs).
pub fn push_payload(
    forge: Forge,
    clone_url: &str,
    git_ref: &str,
    before: &str,
    after: &str,
) -> String {
    match forge {
        Forge::Github | Forge::Gitea => serde_json::json!({
            "ref": git_ref, "before": before, "after": after,
            "created": false, "deleted": after.bytes().all(|b| b == b'0'), "forced": false,
            "compare_url": "", "commits": [{"id": after, "message": "change", "url": ""}],
            "head_commit": {"id": after, "message": "change"},
            "repository": {"id": 1, "name": "app", "full_name": "demo/app",
                "html_url": clone_url.trim_end_matches(".git"), "clone_url": clone_url,
                "ssh_url": "git@localhost:demo/app.git", "default_branch": "main"},
            "pusher": {"login": "dev", "email": "dev@example.com"},
            "sender": {"login": "dev"}
        })
        .to_string(),
        Forge::Gitlab => serde_json::json!({
            "object_kind": "push", "event_name": "push", "before": before, "after": after,
            "ref": git_ref, "checkout_sha": if after.bytes().all(|b| b == b'0') { None } else { Some(after) },
            "user_username": "dev", "project_id": 15,
            "project": {"id": 15, "name": "app", "path_with_namespace": "demo/app",
                "web_url": clone_url.trim_end_matches(".git"), "git_http_url": clone_url,
                "git_ssh_url": "git@localhost:demo/app.git", "default_branch": "main"},
            "commits": [{"id": after, "message": "change"}], "total_commits_count": 1
        })
        .to_string(),
    }
}

/// POSTs a webhook delivery to `addr` (the coordinator's HTTP port):
/// `sign` is the secret (HMAC for GitHub and Gitea, the token for GitLab).
/// Returns (status, JSON body).
pub fn deliver(
    addr: SocketAddr,
    forge: Forge,
    delivery: &str,
    sign: &str,
    body: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let (path, headers) = match forge {
        Forge::Github => (
            "/hooks/github",
            vec![
                ("X-GitHub-Event", "push".to_string()),
                ("X-GitHub-Delivery", delivery.to_string()),
                (
                    "X-Hub-Signature-256",
                    format!("sha256={}", hmac_hex(sign, body.as_bytes())),
                ),
            ],
        ),
        Forge::Gitea => (
            "/hooks/gitea",
            vec![
                ("X-Gitea-Event", "push".to_string()),
                ("X-Gitea-Delivery", delivery.to_string()),
                ("X-Gitea-Signature", hmac_hex(sign, body.as_bytes())),
            ],
        ),
        Forge::Gitlab => (
            "/hooks/gitlab",
            vec![
                ("X-Gitlab-Event", "Push Hook".to_string()),
                ("X-Gitlab-Event-UUID", delivery.to_string()),
                ("X-Gitlab-Token", sign.to_string()),
            ],
        ),
    };
    post(addr, path, &headers, body)
}

/// A plain HTTP/1.0 POST: (status, JSON body or Null).
pub fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(90)))?;
    let mut req = format!(
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body.as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let text = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    Ok((
        code,
        serde_json::from_str(text).unwrap_or(serde_json::Value::Null),
    ))
}
