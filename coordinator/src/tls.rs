//! The coordinator's TLS listeners: connections accepted, handshaken off
//! the accept loop (a client that never finishes its handshake holds only
//! its own task, for at most [`HANDSHAKE_TIMEOUT`]), and handed on as a
//! stream for tonic's `serve_with_incoming` or as an axum `Listener`.
//!
//! A plaintext client on a TLS port is told so in its own protocol instead
//! of getting a TLS alert it cannot read: a gRPC client (the HTTP/2
//! preface) gets a GOAWAY with `INADEQUATE_SECURITY` and a message, an
//! HTTP/1 client a `400` saying to use `https://` (what Go's net/http does).
//!
//! Doors: `server.rs` uses it; it imports `idle` (every connection's
//! bytes go through its bound, the handshake's included).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::idle::Idle;

/// A connection the TLS ports serve.
pub(crate) type Tls = TlsStream<Idle<TcpStream>>;

/// Longest a client may take from connecting to finishing its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const BACKLOG: usize = 128;
/// The first bytes of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// Longest a refused plaintext client is read from after the answer.
const LINGER: Duration = Duration::from_secs(2);
/// What a plaintext client is told.
const USE_TLS: &str = "this coordinator port requires TLS: use an https:// URL";

/// Accepts on `listener` until `token` is cancelled; every connection gets
/// TCP_NODELAY (see `server::nodelay_incoming`) and a TLS handshake.
/// Each connection's bytes go through [`Idle`] with `idle` as its bound.
pub(crate) fn accept(
    listener: TcpListener,
    config: Arc<tokio_rustls::rustls::ServerConfig>,
    token: CancellationToken,
    idle: Duration,
) -> mpsc::Receiver<Tls> {
    let (tx, rx) = mpsc::channel(BACKLOG);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                () = token.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let handshake = handshake(acceptor, stream, idle);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Some(tls)) => {
                        let _ = tx.send(tls).await;
                    }
                    Ok(None) => {}
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// The handshake, or a plaintext client told to use TLS (then `None`).
async fn handshake(acceptor: TlsAcceptor, mut stream: TcpStream, idle: Duration) -> Option<Tls> {
    let mut first = [0u8; H2_PREFACE.len()];
    // A client silent before its first byte is held to the idle bound as
    // one silent after it is (by `Idle`, below).
    let n = tokio::time::timeout(idle, peek_at_least(&stream, &mut first))
        .await
        .ok()??;
    if first[0] != TLS_HANDSHAKE_RECORD {
        let peer = stream.peer_addr().ok();
        tracing::debug!(?peer, "plaintext connection on a TLS port refused");
        let answer = if first[..n].starts_with(H2_PREFACE) {
            h2_goaway(USE_TLS)
        } else {
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{USE_TLS}\n",
                USE_TLS.len() + 1
            )
            .into_bytes()
        };
        let _ = stream.write_all(&answer).await;
        let _ = stream.shutdown().await;
        linger(stream).await;
        return None;
    }
    match acceptor.accept(Idle::new(stream, idle)).await {
        Ok(tls) => Some(tls),
        Err(e) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
    }
}

/// Reads and drops what the client still sends, until it closes (or for
/// [`LINGER`]): closing a socket with unread data sends a reset, which can
/// reach the client before the answer and replace it with "broken pipe".
async fn linger(mut stream: TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Peeks until `buf` is full or the client stops sending (a client that
/// sends fewer bytes first, such as a short HTTP/1 request, is judged on
/// what it sent).
async fn peek_at_least(stream: &TcpStream, buf: &mut [u8]) -> Option<usize> {
    let mut n = 0;
    for _ in 0..8 {
        n = stream.peek(buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if n == buf.len() || buf[0] == TLS_HANDSHAKE_RECORD || !H2_PREFACE.starts_with(&buf[..n]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Some(n)
}

/// An HTTP/2 server's first frames for a connection it will not serve: an
/// empty SETTINGS (the preface), then GOAWAY (last stream 0,
/// INADEQUATE_SECURITY = 0xc) with `message` as its debug data.
fn h2_goaway(message: &str) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    let len = 8 + message.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, 0x7, 0]);
    out.extend_from_slice(&[0, 0, 0, 0]); // stream 0
    out.extend_from_slice(&[0, 0, 0, 0]); // last stream id
    out.extend_from_slice(&[0, 0, 0, 0xc]); // INADEQUATE_SECURITY
    out.extend_from_slice(message.as_bytes());
    out
}

/// The HTTP side port's TLS connections as an axum listener.
pub(crate) struct TlsListener {
    pub(crate) incoming: mpsc::Receiver<Tls>,
    pub(crate) local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = Tls;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.recv().await {
                Some(tls) => {
                    let peer = tls.get_ref().0.get_ref().peer_addr().unwrap_or(self.local);
                    return (tls, peer);
                }
                // The accept loop ended (shutdown): wait for axum's graceful
                // shutdown, which is cancelled by the same token.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
