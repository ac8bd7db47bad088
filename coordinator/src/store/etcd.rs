//! [`Store`] on etcd, for coordinator replicas (high availability).
//!
//! Every key lives under a configurable prefix. Once this replica leads, the
//! store carries a [`Fence`]: every write is a transaction guarded by the
//! leader key's create revision (the leader epoch), the way etcd's own
//! `Proclaim` and `Resign` are. When leadership passes to another replica,
//! that key is gone, the comparison fails and the write is refused with
//! [`StoreError::Fenced`] without touching anything: a deposed leader cannot
//! write, even one that was paused and does not know yet.
//!
//! etcd limits a transaction to `--max-txn-ops` operations (128 by default)
//! and a request to about 1.5 MiB. A larger batch is split into fenced
//! transactions of at most [`MAX_OPS`] operations and [`MAX_BYTES`] bytes;
//! atomicity then holds per part. The scheduler's records are independent
//! documents, so a crash between parts leaves each record whole.

use super::{Op, Order, Page, Store, StoreError};
use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Most operations in one transaction.
pub(crate) const MAX_OPS: usize = 100;
/// Most key and value bytes in one transaction.
pub(crate) const MAX_BYTES: usize = 1024 * 1024;
/// Keys per page of a prefix scan.
const SCAN_PAGE: i64 = 200;

/// The first key after every key starting with `prefix` (etcd's range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // the whole key space
}

/// How long one operation keeps retrying across endpoints.
const RETRY_BUDGET: Duration = Duration::from_secs(4);
/// Longest one try may take. A member without a raft leader holds a request
/// until its own timeout (about 7 s); giving up on a try sooner lets the
/// next one go to a member that has one again.
const TRY_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between tries.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Shortest time one try is given.
const MIN_TRY: Duration = Duration::from_millis(200);

/// Writes are allowed while the key `key` still has create revision `revision`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub revision: i64,
}

#[derive(Clone)]
pub struct EtcdStore {
    pool: EtcdPool,
    prefix: String,
    fence: Arc<RwLock<Option<Fence>>>,
}

fn read_err(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Read(Box::new(e))
}

fn write_err(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Write(Box::new(e))
}

/// One etcd client per endpoint, used one at a time, moving to the next on a
/// transport failure.
///
/// etcd-client's own multi-endpoint channel balances with power-of-two
/// choices, and a dead member fails fast, looks least loaded and keeps being
/// picked: every call failed while one member of three was down. Failing
/// over by hand keeps a coordinator working as long as etcd has quorum.
#[derive(Clone)]
pub struct EtcdPool {
    clients: Arc<Vec<(String, Client)>>,
    current: Arc<AtomicUsize>,
    observer: Arc<std::sync::OnceLock<EtcdObserver>>,
}

/// Where [`EtcdPool::call`] records each try: its latency, and its failure
/// by kind (`unavailable`: the member's connection failed or it had no
/// raft leader; `timeout`: no answer within a try's time; `error`: etcd
/// refused the request).
#[derive(Clone)]
pub(crate) struct EtcdObserver {
    pub(crate) errors: prometheus_client::metrics::family::Family<
        [(&'static str, &'static str); 1],
        prometheus_client::metrics::counter::Counter,
    >,
    pub(crate) seconds: prometheus_client::metrics::histogram::Histogram,
}

/// Is this a failure of the connection to one member (worth trying another)?
pub(crate) fn is_transport(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) | E::LeaseKeepAliveError(_) => true,
        E::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
        ),
        _ => false,
    }
}

impl EtcdPool {
    /// Records every later call's tries in `observer` (the first call wins).
    pub(crate) fn observe(&self, observer: EtcdObserver) {
        let _ = self.observer.set(observer);
    }

    fn tried(&self, started: tokio::time::Instant, failure: Option<&'static str>) {
        if let Some(o) = self.observer.get() {
            o.seconds.observe(started.elapsed().as_secs_f64());
            if let Some(kind) = failure {
                o.errors.get_or_create(&[("kind", kind)]).inc();
            }
        }
    }

    /// The client in use now, with its index.
    pub fn client(&self) -> (usize, Client) {
        let i = self.current.load(Ordering::Acquire) % self.clients.len();
        (i, self.clients[i].1.clone())
    }

    /// The endpoint of client `i`, for log lines.
    pub(crate) fn endpoint(&self, i: usize) -> &str {
        &self.clients[i % self.clients.len()].0
    }

    /// Client `i` failed: move to the next one (unless someone already did).
    pub(crate) fn failed(&self, i: usize) {
        let next = (i + 1) % self.clients.len();
        if self
            .current
            .compare_exchange(i, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::info!(from = %self.clients[i].0, to = %self.clients[next].0, "etcd: switching endpoint");
        }
    }

    /// Runs `call` on the current client, failing over to the next endpoint
    /// on transport errors and on etcd's own "no leader" answers, each try
    /// under `TRY_TIMEOUT`, for up to `RETRY_BUDGET` in all: long enough to
    /// ride out an etcd leader election (about 1 s), short of a lease TTL.
    pub(crate) async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, etcd_client::Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + RETRY_BUDGET;
        loop {
            let (i, client) = self.client();
            let started = tokio::time::Instant::now();
            let left = deadline.saturating_duration_since(started);
            let err = match tokio::time::timeout(TRY_TIMEOUT.min(left.max(MIN_TRY)), call(client))
                .await
            {
                Ok(Ok(v)) => {
                    self.tried(started, None);
                    return Ok(v);
                }
                Ok(Err(e)) if is_transport(&e) => {
                    self.tried(started, Some("unavailable"));
                    e
                }
                Ok(Err(e)) => {
                    self.tried(started, Some("error"));
                    return Err(e);
                }
                Err(_) => {
                    self.tried(started, Some("timeout"));
                    etcd_client::Error::IoError(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("etcd did not answer within {TRY_TIMEOUT:?}"),
                    ))
                }
            };
            self.failed(i);
            if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                return Err(err);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// Connects to etcd and makes one call, so an unreachable cluster is an error
/// here rather than on the first write.
pub async fn connect(endpoints: &[String]) -> Result<EtcdPool, StoreError> {
    let open = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
        path: endpoints.join(","),
        source,
    };
    let mut clients = Vec::new();
    for ep in endpoints {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            // etcd refuses HTTP/2 pings more often than every 5 s.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = Client::connect([ep.as_str()], Some(opts))
            .await
            .map_err(|e| open(Box::new(e)))?;
        clients.push((ep.clone(), client));
    }
    if clients.is_empty() {
        return Err(open("no etcd endpoints given".into()));
    }
    let pool = EtcdPool {
        clients: Arc::new(clients),
        current: Arc::new(AtomicUsize::new(0)),
        observer: Arc::default(),
    };
    pool.call(|mut c| async move { c.status().await })
        .await
        .map_err(|e| open(Box::new(e)))?;
    Ok(pool)
}

impl EtcdStore {
    /// A store on `pool` keeping every key under `prefix` (e.g. `/capstan/`).
    pub fn new(pool: EtcdPool, prefix: &str) -> Self {
        Self {
            pool,
            prefix: prefix.to_string(),
            fence: Arc::new(RwLock::new(None)),
        }
    }

    /// Guards every later write with `fence` (None: unguarded, for tests and
    /// tools; a coordinator always sets one before it writes).
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.write().expect("fence lock") = fence;
    }

    fn key(&self, k: &str) -> Vec<u8> {
        format!("{}{k}", self.prefix).into_bytes()
    }

    async fn txn(&self, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        let fence = self.fence.read().expect("fence lock").clone();
        let mut txn = Txn::new();
        if let Some(f) = &fence {
            txn = txn.when([Compare::create_revision(
                f.key.clone(),
                CompareOp::Equal,
                f.revision,
            )]);
        }
        let txn = txn.and_then(ops);
        // A retried fenced transaction is safe: the comparison still holds
        // only for the same leader, and the puts are idempotent.
        let resp = self
            .pool
            .call(|c| {
                let txn = txn.clone();
                async move { c.kv_client().txn(txn).await }
            })
            .await
            .map_err(write_err)?;
        if fence.is_some() && !resp.succeeded() {
            return Err(StoreError::Fenced);
        }
        Ok(())
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let k = self.key(key);
        let resp = self
            .pool
            .call(|c| {
                let k = k.clone();
                async move { c.kv_client().get(k, None).await }
            })
            .await
            .map_err(read_err)?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn scan_page(&self, page: Page<'_>) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        // etcd reads a limit of 0 as no limit.
        if page.limit == 0 {
            return Ok(Vec::new());
        }
        // The range still to read, [lower, upper) (`None`: to the end of the
        // key space), narrowed page by page from the end already read; all
        // pages at the first one's revision. Paged, since one reply for
        // every run (a new leader's `scan_prefix` of the live runs) would
        // pass etcd-client's 4 MiB reply limit after a few thousand runs.
        let mut lower = self.key(page.prefix);
        let end = prefix_end(&lower);
        let mut upper = (end != [0]).then_some(end);
        match (page.order, page.from) {
            (Order::Ascending, Some(from)) => {
                // The first key after `from`.
                let mut next = self.key(from);
                next.push(0);
                lower = lower.max(next);
            }
            (Order::Descending, Some(from)) => {
                let from = self.key(from);
                upper = Some(upper.map_or(from.clone(), |end| end.min(from)));
            }
            (_, None) => {}
        }
        let sort = match page.order {
            Order::Ascending => etcd_client::SortOrder::Ascend,
            Order::Descending => etcd_client::SortOrder::Descend,
        };
        let strip = self.prefix.len();
        let mut out = Vec::new();
        let mut revision = 0;
        loop {
            if upper.as_ref().is_some_and(|upper| *upper <= lower) {
                return Ok(out);
            }
            let want = (page.limit - out.len()).min(SCAN_PAGE as usize) as i64;
            let (k, e) = (lower.clone(), upper.clone().unwrap_or_else(|| vec![0]));
            let resp = self
                .pool
                .call(|c| {
                    let (k, e) = (k.clone(), e.clone());
                    let opts = GetOptions::new()
                        .with_range(e)
                        .with_limit(want)
                        .with_revision(revision)
                        .with_sort(etcd_client::SortTarget::Key, sort);
                    async move { c.kv_client().get(k, Some(opts)).await }
                })
                .await
                .map_err(read_err)?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                out.push((
                    String::from_utf8_lossy(&kv.key()[strip..]).into_owned(),
                    kv.value().to_vec(),
                ));
            }
            match resp.kvs().last() {
                Some(last) if resp.more() && out.len() < page.limit => match page.order {
                    Order::Ascending => {
                        lower = last.key().to_vec();
                        lower.push(0);
                    }
                    Order::Descending => upper = Some(last.key().to_vec()),
                },
                _ => return Ok(out),
            }
        }
    }

    async fn apply(&self, batch: Vec<Op>) -> Result<(), StoreError> {
        // etcd refuses a transaction naming a key twice; only the last op on
        // each key matters, and ops on different keys commute.
        let key_of = |op: &Op| match op {
            Op::Put { key, .. } | Op::Delete { key } => key.clone(),
        };
        let last: std::collections::HashMap<String, usize> = batch
            .iter()
            .enumerate()
            .map(|(i, op)| (key_of(op), i))
            .collect();
        let batch: Vec<Op> = batch
            .into_iter()
            .enumerate()
            .filter(|(i, op)| last[&key_of(op)] == *i)
            .map(|(_, op)| op)
            .collect();
        let mut part = Vec::new();
        let mut bytes = 0;
        for op in batch {
            let (txn_op, size) = match op {
                Op::Put { key, value } => {
                    let size = key.len() + value.len();
                    (TxnOp::put(self.key(&key), value, None), size)
                }
                Op::Delete { key } => (TxnOp::delete(self.key(&key), None), key.len()),
            };
            if !part.is_empty() && (part.len() >= MAX_OPS || bytes + size > MAX_BYTES) {
                self.txn(std::mem::take(&mut part)).await?;
                bytes = 0;
            }
            part.push(txn_op);
            bytes += size;
        }
        if !part.is_empty() {
            self.txn(part).await?;
        }
        Ok(())
    }
}
