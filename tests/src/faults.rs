//! A fault-injecting TCP proxy on loopback, to put between a runner and a
//! coordinator: it forwards bytes both ways until told to [`Proxy::stall`]
//! (keep every socket open but move no byte, as a partition that sends no
//! RST: the peers see only silence), [`Proxy::resume`] (the held bytes and
//! everything after flow again) or [`Proxy::cut`] (reset every connection,
//! and every new one, as a host that is gone). New connections while
//! stalled are accepted and stalled too. [`Proxy::delay`] holds every chunk
//! for a fixed time each way, order kept (this kernel has no netem; the
//! fleet tests route a runner's traffic through it with a DNAT rule).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

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
    delay: watch::Sender<Duration>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// What every connection of one proxy watches.
#[derive(Clone)]
struct Knobs {
    mode: watch::Receiver<Mode>,
    delay: watch::Receiver<Duration>,
    accepted: Arc<AtomicUsize>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), upstream).await
    }

    /// Listens on a free port of `ip` (e.g. the host's address on a
    /// container network) and forwards to `upstream`.
    pub async fn start_on(ip: IpAddr, upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let addr = listener.local_addr()?;
        let (mode, watching_mode) = watch::channel(Mode::Forward);
        let (delay, watching_delay) = watch::channel(Duration::ZERO);
        let accepted = Arc::new(AtomicUsize::new(0));
        let knobs = Knobs {
            mode: watching_mode,
            delay: watching_delay,
            accepted: accepted.clone(),
        };
        let task = tokio::spawn(accept(listener, upstream, knobs));
        Ok(Self {
            addr,
            mode,
            delay,
            accepted,
            task,
        })
    }

    /// How many connections it has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Holds every chunk `one_way` before passing it on, both ways, order
    /// kept (a round trip gains twice that). Zero: no delay.
    pub fn delay(&self, one_way: Duration) {
        self.delay.send_replace(one_way);
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

async fn accept(listener: TcpListener, upstream: SocketAddr, knobs: Knobs) {
    while let Ok((client, _)) = listener.accept().await {
        knobs.accepted.fetch_add(1, Ordering::Relaxed);
        let knobs = knobs.clone();
        tokio::spawn(async move {
            if *knobs.mode.borrow() == Mode::Cut {
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
            tokio::join!(pump(cr, sw, knobs.clone()), pump(sr, cw, knobs));
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
/// stalled, so the sender's buffers fill as behind a partition), each chunk
/// written once the delay since it was read has passed.
async fn pump(from: OwnedReadHalf, mut to: OwnedWriteHalf, knobs: Knobs) {
    let (chunks, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reading = read_chunks(from, chunks, knobs.mode.clone());
    let mut mode = knobs.mode;
    let writing = async {
        while let Some((read_at, bytes)) = queued.recv().await {
            let due = read_at + *knobs.delay.borrow();
            tokio::time::sleep_until(due).await;
            // Bytes read just as a stall began are held until it ends.
            if !flowing(&mut mode).await || to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reading, writing);
}

/// Reads `from` into `chunks` (stamped with when they were read) while the
/// mode allows; the end of `from` closes `chunks`.
async fn read_chunks(
    mut from: OwnedReadHalf,
    chunks: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !flowing(&mut mode).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        if chunks.send((Instant::now(), buf[..n].to_vec())).is_err() {
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

    #[tokio::test]
    async fn delays_each_way_and_keeps_the_order() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        proxy.delay(Duration::from_millis(150));
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let started = std::time::Instant::now();
        s.write_all(b"first,").await.unwrap();
        s.write_all(b"second").await.unwrap();
        let mut got = vec![0; 12];
        s.read_exact(&mut got).await.unwrap();
        let took = started.elapsed();
        assert_eq!(got, b"first,second");
        assert!(took >= Duration::from_millis(300), "round trip {took:?}");
        proxy.delay(Duration::ZERO);
        let started = std::time::Instant::now();
        assert_eq!(roundtrip(&mut s, b"third").await.unwrap(), b"third");
        assert!(started.elapsed() < Duration::from_millis(300));
    }
}
