//! HTTP/1.1 on one connection of the git server: request heads, the body
//! framings git uses (`Content-Length`, `chunked`, `Expect: 100-continue`),
//! basic auth, keep-alive, and responses that always carry
//! `Content-Length` (libgit2 cannot read read-until-close responses).

use super::Shared;
use super::cgi::{Request, Response, run_backend};
use super::codec::percent_decode;
use anyhow::{Context, bail};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Longest request line or header line accepted.
const MAX_LINE: usize = 16 * 1024;
/// Most header lines accepted in one request.
const MAX_HEADERS: usize = 100;
/// Largest request body accepted (pushes in tests are far smaller).
const MAX_BODY: usize = 512 * 1024 * 1024;
/// An idle keep-alive connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How a request's body is framed, and whether the connection stays open.
struct Framing {
    keep_alive: bool,
    chunked: bool,
    content_length: Option<usize>,
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn framing(version: &str, headers: &[(String, String)]) -> anyhow::Result<Framing> {
    let connection = header(headers, "connection")
        .unwrap_or("")
        .to_ascii_lowercase();
    let keep_alive = if version == "HTTP/1.0" {
        connection.contains("keep-alive")
    } else {
        !connection.contains("close")
    };
    let chunked = header(headers, "transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    let content_length = match header(headers, "content-length") {
        Some(v) => Some(
            v.trim()
                .parse::<usize>()
                .with_context(|| format!("bad Content-Length {v:?}"))?,
        ),
        None => None,
    };
    Ok(Framing {
        keep_alive,
        chunked,
        content_length,
    })
}

/// Serve requests on one connection until the client closes it.
pub(super) fn serve_connection(stream: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some((method, target, version, headers)) = read_head(&mut reader)? else {
            return Ok(());
        };
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        let framing = framing(&version, &headers)?;
        if !authorized(header(&headers, "authorization"), &shared.expected_auth) {
            if !refuse(&mut writer, shared, &framing)? {
                return Ok(());
            }
            continue;
        }
        let request = read_request(
            &mut reader,
            &mut writer,
            shared,
            (method, &target, headers),
            &framing,
        )?;
        let (status, headers, body) = respond(&request, shared, peer);
        write_response(&mut writer, &status, &headers, &body, framing.keep_alive)?;
        if !framing.keep_alive {
            return Ok(());
        }
    }
}

/// Answers 401; true if the connection stays open. A body the client may
/// still be waiting to send (`Expect: 100-continue`) is not read: the
/// connection closes instead.
fn refuse(writer: &mut impl Write, shared: &Shared, framing: &Framing) -> std::io::Result<bool> {
    shared.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
    let has_body = framing.chunked || framing.content_length.is_some_and(|n| n > 0);
    let keep = framing.keep_alive && !has_body;
    let body = b"authentication required\n";
    write_response(
        writer,
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
    Ok(keep)
}

/// Reads an authorized request's body (after `100 Continue` if asked for).
fn read_request(
    reader: &mut impl BufRead,
    writer: &mut impl Write,
    shared: &Shared,
    (method, target, headers): (String, &str, Vec<(String, String)>),
    framing: &Framing,
) -> anyhow::Result<Request> {
    if header(&headers, "expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        writer.flush()?;
    }
    let body = if framing.chunked {
        shared
            .stats
            .chunked_requests
            .fetch_add(1, Ordering::Relaxed);
        read_chunked(reader)?
    } else if let Some(n) = framing.content_length {
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
    if header(&headers, "content-encoding").is_some_and(|e| e.eq_ignore_ascii_case("gzip")) {
        shared.stats.gzip_requests.fetch_add(1, Ordering::Relaxed);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Request {
        method,
        path: percent_decode(path),
        query: query.to_owned(),
        headers,
        body,
    })
}

/// `http-backend`'s answer, or a 500 that says what failed.
fn respond(request: &Request, shared: &Shared, peer: SocketAddr) -> Response {
    match run_backend(request, shared, peer) {
        Ok(response) => response,
        Err(e) => {
            eprintln!("git server: {} {}: {e:#}", request.method, request.path);
            (
                "500 Internal Server Error".to_owned(),
                vec![("Content-Type".to_owned(), "text/plain".to_owned())],
                format!("{e:#}\n").into_bytes(),
            )
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
