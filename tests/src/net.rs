//! Loopback helpers: a free port, a plain HTTP GET and one over TLS, a
//! gRPC endpoint that is TLS for `https://`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
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
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n{headers}\r\n")?;
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
