//! A git smart-HTTP server for end-to-end tests: bare repositories under a
//! temporary root, served on `127.0.0.1:<free port>` behind HTTP basic auth by
//! running `git http-backend` as a CGI program per request.
//!
//! What real clients need from it (see TESTBED.md, "Git server"):
//! - HTTP/1.1 responses with `Content-Length`: libgit2 cannot read
//!   read-until-close responses.
//! - Keep-alive: git (curl) and libgit2 send several requests per connection.
//! - `Transfer-Encoding: chunked` request bodies: git streams pushes larger
//!   than `http.postBuffer` (1 MiB) that way. `Content-Encoding: gzip` bodies
//!   are passed through to `http-backend`, which inflates them itself.
//! - `REMOTE_USER` set after authentication: `http-backend` refuses pushes
//!   without it.
//!
//! One thread accepts, one thread serves each connection. Dropping the
//! [`GitServer`] stops accepting, shuts open connections down and deletes the
//! repositories.

//!
//! Layout:
//! - `mod.rs`: [`GitServer`] (start, repositories, URLs, drop) and the
//!   accept loop; [`git`], a test's own git CLI;
//! - `http`: HTTP/1.1 on one connection (framing, auth, keep-alive);
//! - `cgi`: one request through `git http-backend` and back;
//! - `codec`: base64 and percent-encoding.

mod cgi;
mod codec;
mod http;
#[cfg(test)]
mod tests;

use anyhow::{Context, bail};
use codec::{base64, percent_encode};
use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A running git smart-HTTP server; see the module docs.
pub struct GitServer {
    addr: SocketAddr,
    user: String,
    password: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    // Dropped last: the repositories outlive the threads that serve them.
    root: tempfile::TempDir,
}

/// State shared with the server threads.
struct Shared {
    root: PathBuf,
    /// The `Authorization` header value that is accepted.
    expected_auth: String,
    user: String,
    stopping: AtomicBool,
    /// Open connections by id, so drop can shut them down.
    connections: Mutex<HashMap<usize, TcpStream>>,
    /// Connection threads still running.
    active: AtomicUsize,
    stats: Stats,
}

/// Counters for tests of the server itself.
#[derive(Default)]
struct Stats {
    connections: AtomicUsize,
    requests: AtomicUsize,
    chunked_requests: AtomicUsize,
    gzip_requests: AtomicUsize,
    unauthorized: AtomicUsize,
}

impl GitServer {
    /// Start serving an empty root on a free loopback port; requests must
    /// carry basic auth with `user` and `password`.
    pub fn start(user: &str, password: &str) -> anyhow::Result<GitServer> {
        if user.contains(':') {
            bail!("a basic-auth user name cannot contain ':'");
        }
        let root = tempfile::Builder::new().prefix("capstan-git-").tempdir()?;
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the git server")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            root: root.path().to_path_buf(),
            expected_auth: format!("Basic {}", base64(format!("{user}:{password}").as_bytes())),
            user: user.to_owned(),
            stopping: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            stats: Stats::default(),
        });
        let accept = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("git-server-{}", addr.port()))
                .spawn(move || accept_loop(&listener, &shared))
                .context("spawning the git server thread")?
        };
        Ok(GitServer {
            addr,
            user: user.to_owned(),
            password: password.to_owned(),
            shared,
            accept: Some(accept),
            root,
        })
    }

    /// `http://127.0.0.1:PORT/REPO.git`, without credentials.
    pub fn url(&self, repo: &str) -> String {
        format!("http://{}/{}.git", self.addr, repo.trim_end_matches(".git"))
    }

    /// `http://USER:PASSWORD@127.0.0.1:PORT/REPO.git` (user and password
    /// percent-encoded).
    pub fn url_with_auth(&self, repo: &str) -> String {
        format!(
            "http://{}:{}@{}/{}.git",
            percent_encode(&self.user),
            percent_encode(&self.password),
            self.addr,
            repo.trim_end_matches(".git")
        )
    }

    /// Create an empty bare repository `REPO.git` (branch `main`) and return
    /// its path. `repo` may contain `/` for nested names.
    pub fn create_repo(&self, repo: &str) -> anyhow::Result<PathBuf> {
        let name = repo.trim_end_matches(".git");
        if name.is_empty()
            || Path::new(name).is_absolute()
            || name
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            bail!("invalid repository name {repo:?}");
        }
        let path = self.root().join(format!("{name}.git"));
        let out = Command::new("git")
            .args(["init", "--quiet", "--bare", "-b", "main"])
            .arg(&path)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .context("running git init (is git installed?)")?;
        if !out.status.success() {
            bail!(
                "git init --bare {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(path)
    }

    /// The directory holding the bare repositories.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let connections = std::mem::take(&mut *lock(&self.shared.connections));
        for c in connections.values() {
            let _ = c.shutdown(Shutdown::Both);
        }
        // Let running `http-backend`s finish before the root is deleted.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.shared.active.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let id = shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.connections).insert(id, clone);
        }
        shared.active.fetch_add(1, Ordering::SeqCst);
        let shared_for_thread = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("git-server-conn".to_owned())
            .spawn(move || {
                let shared = shared_for_thread;
                if let Err(e) = http::serve_connection(stream, &shared)
                    && !shared.stopping.load(Ordering::SeqCst)
                {
                    eprintln!("git server: connection ended with an error: {e:#}");
                }
                lock(&shared.connections).remove(&id);
                shared.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            eprintln!("git server: cannot spawn a connection thread: {e}");
            lock(&shared.connections).remove(&id);
            shared.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Runs `git ARGS` in `dir` as a test's own git (fixed identity, branch
/// `main`, no user or system config) and returns its trimmed stdout; panics
/// with git's output if it fails.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@example.com"])
        .args(["-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git (scripts/testbed up installs it)");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
