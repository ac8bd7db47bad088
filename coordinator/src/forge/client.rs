//! The forge API's one HTTP client: JSON GETs and POSTs over HTTP/1.1, TLS
//! (rustls, the system's CA store) for `https://`, one connection per
//! request (a status is a few per run), each request under a timeout.

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// One request, connect to the end of the answer.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The most of an answer's body read; a longer one is read as empty (a
/// list of pull requests is the longest answer asked for).
const MAX_BODY: usize = 4 * 1024 * 1024;

/// How a request went.
#[derive(Debug)]
pub(crate) enum Answer {
    /// The server answered with this status and this body (empty when
    /// over [`MAX_BODY`]).
    Status(u16, String),
    /// No answer: connect, TLS, or the timeout.
    Failed(String),
}

// ring's provider is deprecated only for lacking post-quantum key exchange;
// ring is the workspace's choice for build time (as in capstan-tls).
#[allow(deprecated)]
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            Arc::new(
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default protocol versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        })
        .clone()
}

/// POSTs `body` (JSON) to `url` with `headers`.
pub(crate) async fn post_json(url: &str, headers: &[(&str, String)], body: String) -> Answer {
    timed(exchange(hyper::Method::POST, url, headers, body)).await
}

/// GETs `url` with `headers`.
pub(crate) async fn get_json(url: &str, headers: &[(&str, String)]) -> Answer {
    timed(exchange(hyper::Method::GET, url, headers, String::new())).await
}

/// The first characters of an answer's body, for a log line.
pub(crate) fn snippet(body: &str) -> String {
    body.chars().take(300).collect()
}

async fn timed(f: impl Future<Output = Result<Answer, String>>) -> Answer {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => Answer::Failed(e),
        Err(_) => Answer::Failed(format!("no answer within {REQUEST_TIMEOUT:?}")),
    }
}

async fn exchange(
    method: hyper::Method,
    url: &str,
    headers: &[(&str, String)],
    body: String,
) -> Result<Answer, String> {
    let u = url::Url::parse(url).map_err(|e| format!("bad URL {url}: {e}"))?;
    let host = u
        .host_str()
        .ok_or_else(|| format!("no host in {url}"))?
        .to_string();
    let port = u.port_or_known_default().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
    let path = match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_string(),
    };
    let authority = match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let req = Request {
        method,
        path,
        authority,
        headers,
        body,
    };
    match u.scheme() {
        "http" => send(tcp, req).await,
        "https" => {
            let name =
                rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                    .map_err(|e| format!("bad TLS name {host}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(tls_config())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}: {e}"))?;
            send(tls, req).await
        }
        other => Err(format!("unsupported scheme {other}: use http or https")),
    }
}

struct Request<'a> {
    method: hyper::Method,
    path: String,
    authority: String,
    headers: &'a [(&'a str, String)],
    body: String,
}

async fn send<S>(io: S, r: Request<'_>) -> Result<Answer, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(r.method)
        .uri(r.path)
        .header(hyper::header::HOST, r.authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "capstan");
    for (k, v) in r.headers {
        req = req.header(*k, v);
    }
    let req = req
        .body(Full::new(Bytes::from(r.body)))
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    Ok(Answer::Status(status, body))
}
