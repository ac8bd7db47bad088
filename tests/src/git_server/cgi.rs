//! One request through `git http-backend` as a CGI program: the request's
//! variables and body in, its CGI headers and body out as a response.

use super::Shared;
use anyhow::{Context, bail};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};

/// One parsed request, body included: what `http-backend` gets.
pub(super) struct Request {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) query: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub(super) type Response = (String, Vec<(String, String)>, Vec<u8>);

/// Run `git http-backend` for one request and turn its CGI output into a
/// status, headers and body.
pub(super) fn run_backend(
    request: &Request,
    shared: &Shared,
    peer: SocketAddr,
) -> anyhow::Result<Response> {
    if request.path.split('/').any(|c| c == "..") {
        return Ok((
            "400 Bad Request".to_owned(),
            Vec::new(),
            b"bad path\n".to_vec(),
        ));
    }
    let output = run_cgi(backend_command(request, shared, peer), &request.body)?;
    if !output.stderr.is_empty() {
        eprintln!(
            "git http-backend ({} {}): {}",
            request.method,
            request.path,
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    parse_cgi(&output)
}

/// `git http-backend` with the CGI variables of `request`.
fn backend_command(request: &Request, shared: &Shared, peer: SocketAddr) -> Command {
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
    cmd
}

/// Runs the CGI program with `body` on its stdin and collects its output.
fn run_cgi(mut cmd: Command, body: &[u8]) -> anyhow::Result<Output> {
    let mut child = cmd.spawn().context("starting git http-backend")?;
    let mut stdin = child.stdin.take().context("http-backend stdin")?;
    let (output, write_result) = std::thread::scope(|s| {
        // Feed stdin while stdout drains, so neither pipe fills up and blocks.
        let writer = s.spawn(move || {
            let r = stdin.write_all(body);
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
    Ok(output)
}

/// The CGI headers (`Status:` and the rest, less the framing ones the
/// server sets itself) and body of `http-backend`'s output.
fn parse_cgi(output: &Output) -> anyhow::Result<Response> {
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
