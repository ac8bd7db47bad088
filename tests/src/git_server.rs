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

use anyhow::{Context, bail};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest request line or header line accepted.
const MAX_LINE: usize = 16 * 1024;
/// Most header lines accepted in one request.
const MAX_HEADERS: usize = 100;
/// Largest request body accepted (pushes in tests are far smaller).
const MAX_BODY: usize = 512 * 1024 * 1024;
/// An idle keep-alive connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

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
                if let Err(e) = serve_connection(stream, &shared)
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

/// One parsed request, body included.
struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Serve requests on one connection until the client closes it.
fn serve_connection(stream: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(head) = read_head(&mut reader)? else {
            return Ok(());
        };
        let (method, target, version, headers) = head;
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let connection = header("connection").unwrap_or("").to_ascii_lowercase();
        let keep_alive = if version == "HTTP/1.0" {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        };
        let chunked = header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        let content_length = match header("content-length") {
            Some(v) => Some(
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("bad Content-Length {v:?}"))?,
            ),
            None => None,
        };

        if !authorized(header("authorization"), &shared.expected_auth) {
            shared.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            // Don't read a body the client may still be waiting to send
            // (`Expect: 100-continue`); close instead.
            let has_body = chunked || content_length.is_some_and(|n| n > 0);
            let keep = keep_alive && !has_body;
            let body = b"authentication required\n";
            write_response(
                &mut writer,
                "401 Unauthorized",
                &[
                    (
                        "WWW-Authenticate".to_owned(),
                        "Basic realm=\"capstan\"".to_owned(),
                    ),
                    ("Content-Type".to_owned(), "text/plain".to_owned()),
                ],
                body,
                keep,
            )?;
            if !keep {
                return Ok(());
            }
            continue;
        }

        if header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            writer.flush()?;
        }
        let body = if chunked {
            shared
                .stats
                .chunked_requests
                .fetch_add(1, Ordering::Relaxed);
            read_chunked(&mut reader)?
        } else if let Some(n) = content_length {
            if n > MAX_BODY {
                bail!("request body of {n} bytes is over the limit");
            }
            let mut body = vec![0; n];
            reader
                .read_exact(&mut body)
                .context("reading the request body")?;
            body
        } else {
            Vec::new()
        };

        if header("content-encoding").is_some_and(|e| e.eq_ignore_ascii_case("gzip")) {
            shared.stats.gzip_requests.fetch_add(1, Ordering::Relaxed);
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_owned(), q.to_owned()),
            None => (target.clone(), String::new()),
        };
        let request = Request {
            method,
            path: percent_decode(&path),
            query,
            headers,
            body,
            keep_alive,
        };
        let (status, headers, body) = match run_backend(&request, shared, peer) {
            Ok(response) => response,
            Err(e) => {
                eprintln!("git server: {} {}: {e:#}", request.method, request.path);
                (
                    "500 Internal Server Error".to_owned(),
                    vec![("Content-Type".to_owned(), "text/plain".to_owned())],
                    format!("{e:#}\n").into_bytes(),
                )
            }
        };
        write_response(&mut writer, &status, &headers, &body, request.keep_alive)?;
        if !request.keep_alive {
            return Ok(());
        }
    }
}

type Head = (String, String, String, Vec<(String, String)>);

/// Read a request line and headers; `None` when the client closed cleanly
/// between requests.
fn read_head(reader: &mut impl BufRead) -> anyhow::Result<Option<Head>> {
    let mut line = String::new();
    // Tolerate stray empty lines between requests (RFC 9112 2.2).
    loop {
        line.clear();
        match read_line(reader, &mut line) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        if !line.trim_end().is_empty() {
            break;
        }
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        bail!("malformed request line {line:?}");
    };
    let (method, target, version) = (method.to_owned(), target.to_owned(), version.to_owned());
    let mut headers = Vec::new();
    loop {
        line.clear();
        if read_line(reader, &mut line)? == 0 {
            bail!("connection closed inside the request headers");
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            bail!("more than {MAX_HEADERS} request headers");
        }
        let Some((name, value)) = l.split_once(':') else {
            bail!("malformed header line {l:?}");
        };
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    Ok(Some((method, target, version, headers)))
}

/// Read one line (up to and including `\n`) of at most [`MAX_LINE`] bytes.
fn read_line(reader: &mut impl BufRead, line: &mut String) -> std::io::Result<usize> {
    let mut bytes = Vec::new();
    let n = reader.take(MAX_LINE as u64).read_until(b'\n', &mut bytes)?;
    if n == MAX_LINE && !bytes.ends_with(b"\n") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "request line too long",
        ));
    }
    line.push_str(&String::from_utf8_lossy(&bytes));
    Ok(n)
}

/// Decode a `Transfer-Encoding: chunked` body (trailers are read and dropped).
fn read_chunked(reader: &mut impl BufRead) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if read_line(reader, &mut line)? == 0 {
            bail!("connection closed inside a chunked body");
        }
        let size = line.trim_end().split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16)
            .with_context(|| format!("bad chunk size line {line:?}"))?;
        if size == 0 {
            break;
        }
        if body.len() + size > MAX_BODY {
            bail!("chunked request body over the limit");
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader
            .read_exact(&mut body[start..])
            .context("reading a chunk")?;
        line.clear();
        read_line(reader, &mut line)?;
        if !line.trim_end().is_empty() {
            bail!("missing CRLF after a chunk");
        }
    }
    loop {
        line.clear();
        if read_line(reader, &mut line)? == 0 || line.trim_end().is_empty() {
            return Ok(body);
        }
    }
}

fn authorized(header: Option<&str>, expected: &str) -> bool {
    let Some(value) = header else { return false };
    let value = value.trim();
    // The scheme is case-insensitive; the credentials are not.
    match (value.split_once(' '), expected.split_once(' ')) {
        (Some((scheme, creds)), Some((_, want))) => {
            scheme.eq_ignore_ascii_case("basic") && creds.trim() == want
        }
        _ => false,
    }
}

type Response = (String, Vec<(String, String)>, Vec<u8>);

/// Run `git http-backend` for one request and turn its CGI output into a
/// status, headers and body.
fn run_backend(request: &Request, shared: &Shared, peer: SocketAddr) -> anyhow::Result<Response> {
    if request.path.split('/').any(|c| c == "..") {
        return Ok((
            "400 Bad Request".to_owned(),
            Vec::new(),
            b"bad path\n".to_vec(),
        ));
    }
    let mut cmd = Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // No system or user config from the machine running the tests.
        .env("HOME", &shared.root)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", &shared.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", &request.method)
        .env("PATH_INFO", &request.path)
        .env("QUERY_STRING", &request.query)
        .env("CONTENT_LENGTH", request.body.len().to_string())
        .env("REMOTE_USER", &shared.user)
        .env("REMOTE_ADDR", peer.ip().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(v) = request.header("content-type") {
        cmd.env("CONTENT_TYPE", v);
    }
    // http-backend inflates gzip bodies itself and switches to protocol v2
    // from the Git-Protocol header.
    for (header, var) in [
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "HTTP_GIT_PROTOCOL"),
    ] {
        if let Some(v) = request.header(header) {
            cmd.env(var, v);
        }
    }
    let mut child = cmd.spawn().context("starting git http-backend")?;
    let mut stdin = child.stdin.take().context("http-backend stdin")?;
    let (output, write_result) = std::thread::scope(|s| {
        // Feed stdin while stdout drains, so neither pipe fills up and blocks.
        let writer = s.spawn(move || {
            let r = stdin.write_all(&request.body);
            drop(stdin);
            r
        });
        let output = child.wait_with_output();
        (output, writer.join())
    });
    let output = output.context("waiting for git http-backend")?;
    if let Ok(Err(e)) = write_result
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(e).context("writing the request body to git http-backend");
    }
    if !output.stderr.is_empty() {
        eprintln!(
            "git http-backend ({} {}): {}",
            request.method,
            request.path,
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    let Some((head, body)) = split_cgi(&output.stdout) else {
        bail!(
            "git http-backend exited with {} and no CGI headers",
            output.status
        );
    };
    let mut status = "200 OK".to_owned();
    let mut headers = Vec::new();
    for line in String::from_utf8_lossy(head).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("status") {
            value.clone_into(&mut status);
        } else if !name.eq_ignore_ascii_case("content-length")
            && !name.eq_ignore_ascii_case("transfer-encoding")
            && !name.eq_ignore_ascii_case("connection")
        {
            headers.push((name.to_owned(), value.to_owned()));
        }
    }
    Ok((status, headers, body.to_vec()))
}

/// Split CGI output at the blank line ending the headers.
fn split_cgi(out: &[u8]) -> Option<(&[u8], &[u8])> {
    let crlf = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    let lf = out.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let (at, len) = match (crlf, lf) {
        (Some(a), Some(b)) => {
            if a.0 <= b.0 {
                a
            } else {
                b
            }
        }
        (a, b) => a.or(b)?,
    };
    Some((&out[..at], &out[at + len..]))
}

fn write_response(
    w: &mut impl Write,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
    keep_alive: bool,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    head.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Output;

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
        git.ok(&up, &["commit", "--quiet", "--allow-empty", "-m", "base"]);
        git.ok(&up, &["push", "--quiet", "origin", "HEAD:refs/heads/main"]);
        git.ok(work.path(), &["clone", "--quiet", &url, "down"]);
        let down = work.path().join("down");
        // Many local commits the server lacks: the fetch negotiation sends
        // enough `have` lines that git gzips the request body.
        for i in 0..200 {
            git.ok(
                &down,
                &[
                    "commit",
                    "--quiet",
                    "--allow-empty",
                    "-m",
                    &format!("local {i}"),
                ],
            );
        }
        git.ok(&up, &["commit", "--quiet", "--allow-empty", "-m", "remote"]);
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
}
