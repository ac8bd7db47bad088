//! The coordinator's durable state: a small ordered key-value store.
//!
//! The scheduler keeps its working state in memory and writes every change
//! through a [`Store`] before it tells anyone about it (a runner, a client).
//! On start it loads everything back with [`Store::scan_prefix`].
//!
//! Implementations: [`memory::MemoryStore`] (tests), [`redb::RedbStore`]
//! (standalone default: a redb file and its write-ahead log under
//! `--data-dir`); an etcd store comes with high availability. All of them
//! pass the suite in [`conformance`].
//!
//! # Contract
//! - Keys are UTF-8 strings; values are opaque bytes.
//! - [`Store::apply`] is atomic and durable: when it returns `Ok`, every op of
//!   the batch is visible to every later read and survives a crash of the
//!   process; when it returns `Err`, none is.
//! - Ops in one batch apply in order (a put then a delete of the same key
//!   leaves it absent).
//! - [`Store::scan_prefix`] returns every key starting with the prefix, sorted
//!   by key bytes, with its value.
//! - [`Store::scan_page`] returns at most `page.limit` of those keys, in
//!   `page.order`, strictly beyond `page.from` when it is given (after it
//!   ascending, before it descending), whatever `from` is (it need not be
//!   a key present, nor start with the prefix).
//! - Calls may be made concurrently from several tasks; each call is
//!   linearizable with respect to the others.

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
pub mod etcd;
#[cfg(any(test, feature = "testing"))]
pub mod memory;
pub mod redb;

use async_trait::async_trait;

/// One change in a [`Store::apply`] batch (defined beside its durable
/// encoding, the write-ahead log's records).
pub use capstan_wal::Op;

/// Errors from a store. Each says which operation failed and why.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state store at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("state store read failed: {0}")]
    Read(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("state store write failed: {0}")]
    Write(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The write was refused because this coordinator is no longer the leader
    /// (etcd store: the fencing comparison failed).
    #[error("state store write refused: this coordinator is no longer the leader")]
    Fenced,
}

/// Which way [`Store::scan_page`] walks the keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Ascending,
    Descending,
}

/// One page of a prefix scan: what [`Store::scan_page`] returns.
#[derive(Clone, Copy, Debug)]
pub struct Page<'a> {
    pub prefix: &'a str,
    /// Exclusive: ascending, only keys after it; descending, only keys
    /// before it. `None`: from the first (ascending) or last (descending)
    /// key of the prefix.
    pub from: Option<&'a str>,
    pub limit: usize,
    pub order: Order,
}

/// An ordered key-value store; see the module docs for the contract.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The value at `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every `(key, value)` whose key starts with `prefix`, sorted by key:
    /// [`Store::scan_page`] without a limit.
    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.scan_page(Page {
            prefix,
            from: None,
            limit: usize::MAX,
            order: Order::Ascending,
        })
        .await
    }
    /// At most `page.limit` `(key, value)`s whose key starts with
    /// `page.prefix`, in `page.order`, strictly beyond `page.from`: the
    /// paged queries over an index (`ListRuns`, retention).
    async fn scan_page(&self, page: Page<'_>) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Applies every op of `batch` atomically and durably.
    async fn apply(&self, batch: Vec<Op>) -> Result<(), StoreError>;
}
