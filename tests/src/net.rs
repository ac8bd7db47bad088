//! Loopback helpers: a free port, a plain HTTP GET and one over TLS, a
//! gRPC endpoint that is TLS for `https://`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

/// Test ports come from below the kernel's ephemeral range (32768-60999
/// here), so no outgoing connection and no server bound to port 0 can take
/// one between the pick and the bind of the process it is for.
const PORTS: std::ops::Range<u16> = 20000..32000;

/// The lock file of every port this test process holds: a held `flock`
/// keeps other test processes (nextest runs one per test) off the port
/// until this one exits, across restarts of the process that serves it;
/// the kernel drops the lock when the holder dies, so nothing goes stale.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// A loopback port no other test process holds, free when picked, and
/// kept for this process's lifetime (a replica restarted on it finds it
/// still free).
pub fn free_port() -> u16 {
    let dir = std::env::temp_dir().join("capstan-test-ports");
    std::fs::create_dir_all(&dir).expect("create the test port lock dir");
    for _ in 0..10_000 {
        let port = rand::random_range(PORTS);
        let file = File::create(dir.join(port.to_string())).expect("create a port lock file");
        if file.try_lock().is_err() {
            continue; // another test holds it (or this one already does)
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            HELD.lock().expect("port list").push(file);
            return port;
        }
    }
    panic!("no free loopback port in {PORTS:?} after 10000 tries");
}

/// A free loopback address ([`free_port`] on 127.0.0.1).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A plain HTTP/1.0 GET on `addr`: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_get_full(addr, path, "").map(|(code, _, body)| (code, body))
}

/// [`http_get`] with extra request headers (`Authorization`, ...).
pub fn http_get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    http_get_full(addr, path, &extra).map(|(code, _, body)| (code, body))
}

/// A plain HTTP/1.0 GET on `addr` with `headers` (each line ending in
/// `\r\n`): (status, response headers, body).
pub fn http_get_full(
    addr: SocketAddr,
    path: &str,
    headers: &str,
) -> anyhow::Result<(u16, String, String)> {
    http_request(addr, "GET", path, headers, "")
}

/// A plain HTTP/1.0 request on `addr` with `headers` (each line ending in
/// `\r\n`) and `body` (a form: its content type is the caller's header):
/// (status, response headers, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> anyhow::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let length = if method == "GET" {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n{headers}{length}\r\n{body}"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    Ok((code, head.to_string(), body.to_string()))
}

/// What [`https_get`] got.
#[derive(Debug)]
pub struct HttpsAnswer {
    pub status: u16,
    pub body: String,
    /// The CN (else first DNS SAN) of the certificate the server showed.
    pub server_identity: Option<String>,
}

/// An HTTP/1.0 GET over TLS on `addr` (a loopback address, checked
/// against the certificate's IP SAN), trusting only the CA in `ca`.
pub fn https_get(
    addr: SocketAddr,
    path: &str,
    ca: &std::path::Path,
) -> anyhow::Result<HttpsAnswer> {
    use rustls::pki_types::ServerName;
    let mut roots = rustls::RootCertStore::empty();
    for cert in capstan_tls::pem::certs("--ca-cert", ca)? {
        roots.add(cert)?;
    }
    #[allow(deprecated)] // ring, as everywhere (capstan-tls)
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(tls, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut resp = String::new();
    // A server that closes without close_notify ends the read with an
    // error after the whole answer: keep what arrived.
    if let Err(e) = tls.read_to_string(&mut resp)
        && resp.is_empty()
    {
        return Err(e.into());
    }
    let server_identity = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| capstan_tls::identity(c.as_ref()));
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok(HttpsAnswer {
        status,
        body,
        server_identity,
    })
}

/// A gRPC endpoint for `url`: over TLS with `tls` for `https://` (as the
/// CLI and the runner do: never plaintext), plaintext for `http://`.
pub fn endpoint(
    url: &str,
    tls: &capstan_tls::ClientTls,
) -> anyhow::Result<tonic::transport::Endpoint> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?;
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    Ok(endpoint.tls_config(tls.tonic_config()?)?)
}
