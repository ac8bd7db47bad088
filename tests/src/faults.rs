//! A fault-injecting TCP proxy on loopback, to put between a runner and a
//! coordinator: it forwards bytes both ways until told to [`Proxy::stall`]
//! (keep every socket open but move no byte, as a partition that sends no
//! RST: the peers see only silence), [`Proxy::resume`] (the held bytes and
//! everything after flow again) or [`Proxy::cut`] (reset every connection,
//! and every new one, as a host that is gone). New connections while
//! stalled are accepted and stalled too.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Forward,
    Stalled,
    Cut,
}

/// One listening proxy to one upstream address; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, watching) = watch::channel(Mode::Forward);
        let task = tokio::spawn(accept(listener, upstream, watching));
        Ok(Self { addr, mode, task })
    }

    /// `http://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Moves no byte either way from now on; every socket stays open.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stalled);
    }

    /// Forwards again, held bytes first.
    pub fn resume(&self) {
        self.mode.send_replace(Mode::Forward);
    }

    /// Resets every connection, and every new one until [`Proxy::resume`].
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Cut);
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, mode: watch::Receiver<Mode>) {
    while let Ok((client, _)) = listener.accept().await {
        let mode = mode.clone();
        tokio::spawn(async move {
            if *mode.borrow() == Mode::Cut {
                let _ = client.set_zero_linger();
                return;
            }
            let Ok(server) = TcpStream::connect(upstream).await else {
                let _ = client.set_zero_linger();
                return;
            };
            for s in [&client, &server] {
                // Dropped by a cut: a reset, not a clean close.
                let _ = s.set_zero_linger();
                let _ = s.set_nodelay(true);
            }
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pump(cr, sw, mode.clone()), pump(sr, cw, mode));
        });
    }
}

/// Waits until bytes may flow: false on a cut.
async fn flowing(mode: &mut watch::Receiver<Mode>) -> bool {
    loop {
        match *mode.borrow_and_update() {
            Mode::Forward => return true,
            Mode::Cut => return false,
            Mode::Stalled => {}
        }
        if mode.changed().await.is_err() {
            return false;
        }
    }
}

/// Copies `from` to `to` while the mode allows (reading nothing while
/// stalled, so the sender's buffers fill as behind a partition).
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !flowing(&mut mode).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        // Bytes read just as a stall began are held until it ends.
        if !flowing(&mut mode).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, what: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(what).await?;
        let mut got = vec![0; what.len()];
        s.read_exact(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn forwards_stalls_resumes_and_cuts() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"one").await.unwrap(), b"one");

        proxy.stall();
        let stalled =
            tokio::time::timeout(Duration::from_millis(300), roundtrip(&mut s, b"two")).await;
        assert!(stalled.is_err(), "bytes crossed a stalled proxy");
        proxy.resume();
        let mut got = vec![0; 3];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"two", "the held bytes arrive after the resume");

        proxy.cut();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), s.read(&mut byte))
            .await
            .expect("a cut connection must end at once");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
}
