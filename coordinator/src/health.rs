//! `capstan-coordinator health`: asks this coordinator's own HTTP port for
//! `/healthz`, over TLS when it serves TLS, and fails unless it answers
//! 200. The images' health check: busybox's `wget` speaks no TLS that
//! rustls accepts, and a plaintext probe of a TLS port only ever gets the
//! "use https://" answer, so the check could not tell a live coordinator
//! from a broken one (as `traefik healthcheck` does for Traefik).

use crate::config::HealthTarget;
use anyhow::{Context as _, bail};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The whole check, connect to answer.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Prints `ok` and returns when `/healthz` answered 200; an error that
/// says what answered (or did not) otherwise.
pub async fn run(target: HealthTarget) -> anyhow::Result<()> {
    let scheme = if target.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{}/healthz", target.addr);
    let status = tokio::time::timeout(TIMEOUT, get(&target))
        .await
        .with_context(|| format!("{url} did not answer within {TIMEOUT:?}"))?
        .with_context(|| format!("GET {url}"))?;
    if status != hyper::StatusCode::OK {
        bail!("GET {url} answered {status}");
    }
    println!("ok");
    Ok(())
}

async fn get(target: &HealthTarget) -> anyhow::Result<hyper::StatusCode> {
    let tcp = TcpStream::connect(target.addr).await?;
    match &target.tls_cert {
        None => request(tcp, target).await,
        Some(cert) => {
            let config = capstan_tls::pinned_client_config("--tls-cert", cert)?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            // Any name: the pinned verifier ignores it.
            let name = rustls_name(target);
            let tls = connector.connect(name, tcp).await?;
            request(tls, target).await
        }
    }
}

fn rustls_name(target: &HealthTarget) -> tokio_rustls::rustls::pki_types::ServerName<'static> {
    tokio_rustls::rustls::pki_types::ServerName::IpAddress(target.addr.ip().into())
}

async fn request<S>(io: S, target: &HealthTarget) -> anyhow::Result<hyper::StatusCode>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/healthz")
        .header(hyper::header::HOST, target.addr.to_string())
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(req).await?.status())
}
