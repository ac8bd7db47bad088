//! Reaping silent connections: every connection the coordinator accepts
//! (both ports, plaintext or under TLS) is wrapped in [`Idle`], which
//! fails the connection's next read once the peer has sent nothing for
//! the bound (`--idle-timeout`), so hyper closes it.
//!
//! What it catches is a peer that connects and then says nothing: a raw
//! socket, a half-sent HTTP/2 preface or TLS hello, an HTTP/1 keep-alive
//! connection left open, a client that vanished. A live HTTP/2 client is
//! never silent that long: the server pings it at a third of the bound
//! (`server.rs`), and its PING ACK is bytes read. hyper has no such bound
//! of its own for HTTP/2 (its keepalive starts only after the handshake),
//! and a bound per connection is the lever that needs no stream
//! bookkeeping.
//!
//! Doors: `server.rs` and `tls.rs` use it; it imports nothing of the crate.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Default `--idle-timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// `io` whose reads fail with `TimedOut` once the peer has sent nothing
/// for `bound` (counted from the wrap, then from the last byte read).
pub struct Idle<T> {
    io: T,
    bound: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<T> Idle<T> {
    pub fn new(io: T, bound: Duration) -> Self {
        Self {
            io,
            bound,
            deadline: Box::pin(tokio::time::sleep(bound)),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Idle<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + this.bound;
                    this.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer sent nothing for {} s", this.bound.as_secs_f64()),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Idle<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// tonic reads a connection's peer address (and, through TLS, its
/// certificates) from this.
impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Idle<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The plaintext HTTP side port's connections, each wrapped in [`Idle`].
pub(crate) struct IdleListener {
    pub(crate) listener: tokio::net::TcpListener,
    pub(crate) bound: Duration,
}

impl axum::serve::Listener for IdleListener {
    type Io = Idle<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        (Idle::new(io, self.bound), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_silent_peer_fails_the_read_and_bytes_push_the_bound_back() {
        let bound = Duration::from_millis(300);
        let (mut client, server) = tokio::io::duplex(64);
        let mut idle = Idle::new(server, bound);
        let mut buf = [0u8; 8];
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(idle.read(&mut buf).await.unwrap(), 1);
        // Past the first bound when it fails: the byte renewed it.
        let started = Instant::now();
        let err = idle.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), "the peer sent nothing for 0.3 s");
        assert!(
            started.elapsed() >= Duration::from_millis(290),
            "{:?}",
            started.elapsed()
        );
    }
}
