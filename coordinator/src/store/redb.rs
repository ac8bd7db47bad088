//! [`RedbStore`]: the standalone coordinator's [`Store`], a redb file and
//! its write-ahead log under `--data-dir`.

use super::{Op, Order, Page, Store, StoreError};
use ::redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, StorageError,
    TableDefinition, TableError, WriteTransaction,
};
use async_trait::async_trait;
use capstan_wal::Wal;
use std::ops::Bound;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The single table holding every key.
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
/// The store's own bookkeeping: [`GENERATION`] and [`LOG_ID`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The write-ahead log's current generation (see [`capstan_wal`]), changed
/// only by durable commits.
const GENERATION: &str = "wal_generation";
/// A random number chosen when the database is made, in every log record:
/// a log left beside a new database is not replayed into it.
const LOG_ID: &str = "wal_id";
/// Size of the write-ahead log file. A commit whose record does not fit in
/// what is left of it is a durable redb commit instead, which starts the
/// log over. 8 MiB holds a few thousand single-run commits between such
/// checkpoints, and replays in well under a second at start-up.
pub(crate) const WAL_CAPACITY: u64 = 8 << 20;

/// redb's page cache. Its default, 1 GiB, filled with the whole file at
/// every open (the integrity check reads every page), so a restarted
/// coordinator's RSS grew with its history; the reads that follow are
/// indexed and small.
const CACHE_BYTES: usize = 16 << 20;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A [`Store`] on a redb database file and its write-ahead log (the file's
/// path plus `.wal`).
///
/// Each [`Store::apply`] is one redb write transaction. It is made durable
/// by a record in the write-ahead log ([`capstan_wal`]), written and
/// fsynced before the transaction commits with [`Durability::None`] (no
/// fsync of its own); when the log is full, the transaction instead
/// commits with [`Durability::Immediate`], which makes everything before it
/// durable in the database too, and the log starts over with a new
/// generation, recorded in the same transaction. Opening the store replays
/// the log's current generation and commits durably.
///
/// Reads run in read transactions and see the last committed batch. redb
/// admits one write transaction at a time, so batches are serialized.
/// Reads run on tokio's blocking pool; writes block the calling thread (see
/// [`write_here`]).
///
/// After a failed write (an I/O error), every later write fails too: the
/// log's end is then unknown. As with any fsync that fails, the failed
/// batch may or may not be there after a restart; the scheduler stops at
/// the first failed write.
///
/// The file is locked while a `RedbStore` on it exists (until it is dropped):
/// a second open, from this or another process, fails.
pub struct RedbStore {
    db: Arc<Database>,
    path: PathBuf,
    /// `None` once a write failed.
    wal: Mutex<Option<Wal>>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

impl RedbStore {
    /// Opens the database at `path`, creating the file if it is missing (its
    /// directory must exist).
    ///
    /// The whole file is checked on open, so a corrupted file or one that is
    /// not a redb database fails with [`StoreError::Open`] rather than being
    /// trusted. A file already open elsewhere fails with an error saying that
    /// only one coordinator may use a data dir.
    ///
    /// This blocks (file I/O and the integrity check); call it at start-up or
    /// from `spawn_blocking`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, WAL_CAPACITY)
    }

    /// The standalone coordinator's store in its data dir: `state.redb`
    /// (and `state.redb.wal`). The coordinator and the offline `token
    /// create` both open it here.
    pub fn open_in(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open(&data_dir.join("state.redb"))
    }

    /// [`RedbStore::open`] with a write-ahead log of `wal_capacity` bytes.
    pub(crate) fn open_with(path: &Path, wal_capacity: u64) -> Result<Self, StoreError> {
        let open_error = |source: BoxError| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        // redb may panic on a file damaged outside redb (debug builds assert
        // what a file it wrote cannot contain); report that as an open error.
        let db = catch_unwind(AssertUnwindSafe(|| {
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .set_check_integrity_on_open(true)
                .create(path)
        }))
        .map_err(|panic| {
            open_error(
                format!(
                    "the file is corrupted or not a redb database (redb panicked: {})",
                    panic_message(&*panic)
                )
                .into(),
            )
        })?
        .map_err(|err| open_error(describe_open_error(err)))?;
        // redb creates the file with the process's umask.
        crate::private::private_file(path).map_err(|e| open_error(e.into()))?;

        let wal_path = PathBuf::from(format!("{}.wal", path.display()));
        let wal = (|| -> Result<Wal, BoxError> {
            // One durable transaction: the tables (created up front so that
            // readers never find them missing), what the log holds of the
            // current generation, and the next generation.
            let txn = db.begin_write()?;
            let (id, generation) = {
                let mut meta = txn.open_table(META)?;
                let existing = meta.get(LOG_ID)?.map(|id| id.value());
                let id = match existing {
                    Some(id) => id,
                    None => {
                        let id = rand::random::<u64>();
                        meta.insert(LOG_ID, id)?;
                        id
                    }
                };
                (id, meta.get(GENERATION)?.map_or(0, |g| g.value()))
            };
            let (mut wal, batches) = Wal::open(&wal_path, wal_capacity, id, generation)
                .map_err(|e| format!("the write-ahead log {}: {e}", wal_path.display()))?;
            // One written by an older version may be wider than 0600.
            crate::private::private_file(&wal_path)
                .map_err(|e| format!("the write-ahead log {}: {e}", wal_path.display()))?;
            if !batches.is_empty() {
                tracing::info!(
                    batches = batches.len(),
                    wal = %wal.path().display(),
                    "replaying the state store's write-ahead log"
                );
            }
            for batch in &batches {
                apply_ops(&txn, batch)?;
            }
            txn.open_table(META)?.insert(GENERATION, generation + 1)?;
            txn.commit()?;
            wal.restart(generation + 1);
            Ok(wal)
        })()
        .map_err(open_error)?;

        Ok(Self {
            db: Arc::new(db),
            path: path.to_path_buf(),
            wal: Mutex::new(Some(wal)),
        })
    }
}

fn describe_open_error(err: DatabaseError) -> BoxError {
    match err {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            "the file is in use by another coordinator; only one coordinator may use a data dir"
                .into()
        }
        DatabaseError::Storage(StorageError::Corrupted(msg)) => {
            format!("the file is corrupted or not a redb database: {msg}").into()
        }
        // How redb reports a file that is not a redb database at all.
        DatabaseError::Storage(StorageError::Io(e))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            format!("the file is corrupted or not a redb database: {e}").into()
        }
        DatabaseError::UpgradeRequired(version) => format!(
            "the file is in an older redb format (version {version}) that this coordinator cannot \
             read"
        )
        .into(),
        other => other.into(),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "unknown panic"
    }
}

/// The smallest string greater than every string starting with `prefix`;
/// `None` when there is none (an empty prefix, or one of only
/// `char::MAX`s). UTF-8 orders strings by their bytes as by their code
/// points, so the next code point after the prefix's last one bounds it.
pub(crate) fn str_prefix_end(prefix: &str) -> Option<String> {
    let mut end = prefix.to_owned();
    while let Some(last) = end.pop() {
        let next = match last {
            // The surrogates are not `char`s.
            '\u{D7FF}' => Some('\u{E000}'),
            c => char::from_u32(u32::from(c) + 1),
        };
        if let Some(next) = next {
            end.push(next);
            return Some(end);
        }
    }
    None
}

/// The key range of `page` (its order aside): the keys starting with
/// `page.prefix`, after (ascending) or before (descending) `page.from`.
/// `None` when the range is empty, or `page.limit` is 0. An ordered map's
/// `range` over these bounds yields exactly the page's keys, in order.
pub(crate) fn page_range(page: &Page<'_>) -> Option<(Bound<String>, Bound<String>)> {
    if page.limit == 0 {
        return None;
    }
    let mut lower = Bound::Included(page.prefix.to_owned());
    let mut upper = str_prefix_end(page.prefix).map_or(Bound::Unbounded, Bound::Excluded);
    if let Some(from) = page.from {
        match page.order {
            Order::Ascending if from >= page.prefix => lower = Bound::Excluded(from.to_owned()),
            Order::Ascending => {}
            Order::Descending => match &upper {
                Bound::Excluded(end) if end.as_str() <= from => {}
                _ => upper = Bound::Excluded(from.to_owned()),
            },
        }
    }
    // Empty unless the upper bound is above the lower one (an ordered
    // map's `range` panics on some empty ranges).
    let (Bound::Included(low) | Bound::Excluded(low)) = &lower else {
        unreachable!("the lower bound is never unbounded")
    };
    match &upper {
        Bound::Excluded(up) if up <= low => None,
        _ => Some((lower, upper)),
    }
}

/// Runs `f` on the blocking pool; a panic or a cancelled task becomes an error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BoxError> + Send + 'static,
) -> Result<T, BoxError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(join) if join.is_panic() => {
            Err(format!("redb panicked: {}", panic_message(&*join.into_panic())).into())
        }
        Err(join) => Err(join.into()),
    }
}

/// Runs a write transaction `f` on the calling thread, blocking it for the
/// write and its fsync; a panic becomes an error.
///
/// The scheduler's commit is the caller that matters, and it is on the
/// pickup path. Each way of moving the write off the worker cost
/// cross-thread wake-ups (each a real share of a commit where idle vCPUs
/// halt; docs/decisions.md): `spawn_blocking` one there and one back; `block_in_place`
/// one to hand the worker's core to a new thread, and one after the fsync,
/// because the tasks the confirms wake then ran on that other thread. Run
/// here, the runner streams that carry the confirms run on this thread as
/// soon as the scheduler's loop yields after the commit. The price: this
/// worker runs nothing else during the fsync. The commit yields before the
/// write, so the worker's own queue is empty by then (`Scheduler::commit`);
/// what other threads wake meanwhile goes to the other workers.
fn write_here<T>(f: impl FnOnce() -> Result<T, BoxError>) -> Result<T, BoxError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => Err(format!("redb panicked: {}", panic_message(&*panic)).into()),
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db.clone();
        let key = key.to_owned();
        blocking(move || {
            let txn = db.begin_read()?;
            let table = match txn.open_table(STATE) {
                Ok(table) => table,
                Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            Ok(table.get(key.as_str())?.map(|value| value.value().to_vec()))
        })
        .await
        .map_err(StoreError::Read)
    }

    async fn scan_page(&self, page: Page<'_>) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let Some((lower, upper)) = page_range(&page) else {
            return Ok(Vec::new());
        };
        let (limit, order) = (page.limit, page.order);
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read()?;
            let table = match txn.open_table(STATE) {
                Ok(table) => table,
                Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            // redb orders `&str` keys by their bytes, as the contract requires.
            let range = table.range::<&str>((
                lower.as_ref().map(String::as_str),
                upper.as_ref().map(String::as_str),
            ))?;
            let entries: Box<dyn Iterator<Item = _> + '_> = match order {
                Order::Ascending => Box::new(range),
                Order::Descending => Box::new(range.rev()),
            };
            let mut out = Vec::with_capacity(limit.min(1024));
            for entry in entries.take(limit) {
                let (key, value) = entry?;
                out.push((key.value().to_owned(), value.value().to_vec()));
            }
            Ok(out)
        })
        .await
        .map_err(StoreError::Read)
    }

    async fn apply(&self, batch: Vec<Op>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        let Some(log) = wal.as_mut() else {
            return Err(StoreError::Write(
                "an earlier write to the state store failed; restart the coordinator".into(),
            ));
        };
        let result = write_here(|| {
            let mut txn = self.db.begin_write()?;
            // An early return drops `txn`, which aborts it: nothing of the
            // batch is applied.
            apply_ops(&txn, &batch)?;
            match log.record(&batch) {
                Some(record) => {
                    log.append(&record).map_err(|e| {
                        format!("the write-ahead log {}: {e}", log.path().display())
                    })?;
                    txn.set_durability(Durability::None)?;
                    txn.commit()?;
                }
                None => {
                    let next = log.generation() + 1;
                    txn.open_table(META)?.insert(GENERATION, next)?;
                    txn.set_durability(Durability::Immediate)?;
                    txn.commit()?;
                    log.restart(next);
                }
            }
            Ok(())
        });
        if result.is_err() {
            *wal = None;
        }
        result.map_err(StoreError::Write)
    }
}

/// Applies `ops` to the state table in `txn`, in order.
fn apply_ops(txn: &WriteTransaction, ops: &[Op]) -> Result<(), BoxError> {
    let mut table = txn.open_table(STATE)?;
    for op in ops {
        match op {
            Op::Put { key, value } => {
                table.insert(key.as_str(), value.as_slice())?;
            }
            Op::Delete { key } => {
                table.remove(key.as_str())?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    fn temp_db() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        (dir, path)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redb_store_passes_conformance() {
        let (_dir, path) = temp_db();
        let store = RedbStore::open(&path).unwrap();
        conformance::run_all(Arc::new(store)).await;
    }

    #[test]
    fn str_prefix_end_is_the_next_code_point_after_the_prefix() {
        assert_eq!(str_prefix_end("runs/").as_deref(), Some("runs0"));
        assert_eq!(str_prefix_end("runs/é").as_deref(), Some("runs/ê"));
        assert_eq!(str_prefix_end("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        assert_eq!(str_prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(str_prefix_end("\u{10FFFF}\u{10FFFF}"), None);
        assert_eq!(str_prefix_end(""), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_survives_close_and_reopen() {
        let (_dir, path) = temp_db();
        {
            let store = RedbStore::open(&path).unwrap();
            store
                .apply(vec![
                    Op::Put {
                        key: "runs/1".into(),
                        value: b"one".to_vec(),
                    },
                    Op::Put {
                        key: "runs/2".into(),
                        value: b"two".to_vec(),
                    },
                ])
                .await
                .unwrap();
            store
                .apply(vec![Op::Delete {
                    key: "runs/1".into(),
                }])
                .await
                .unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.get("runs/1").await.unwrap(), None);
        assert_eq!(store.get("runs/2").await.unwrap(), Some(b"two".to_vec()));
        assert_eq!(
            store.scan_prefix("runs/").await.unwrap(),
            vec![("runs/2".to_string(), b"two".to_vec())]
        );
    }

    #[tokio::test]
    async fn second_open_of_a_file_in_use_fails_clearly() {
        let (_dir, path) = temp_db();
        let first = RedbStore::open(&path).unwrap();
        let err = RedbStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("in use by another coordinator")
                && msg.contains("only one coordinator may use a data dir")
                && msg.contains(&path.display().to_string()),
            "{msg}"
        );
        // Once the first is gone the file opens again.
        drop(first);
        RedbStore::open(&path).unwrap();
    }

    #[tokio::test]
    async fn garbage_file_is_an_open_error() {
        let (_dir, path) = temp_db();
        let garbage: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 + 3) as u8).collect();
        std::fs::write(&path, garbage).unwrap();
        let err = RedbStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("state.redb") && msg.contains("corrupted or not a redb database"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn damaged_database_is_an_open_error_not_a_panic() {
        let (_dir, path) = temp_db();
        {
            let store = RedbStore::open(&path).unwrap();
            let batch = (0..200)
                .map(|i| Op::Put {
                    key: format!("k/{i:04}"),
                    value: vec![i as u8; 500],
                })
                .collect();
            store.apply(batch).await.unwrap();
        }
        // Keep redb's header (magic number and all), overwrite the pages.
        let mut bytes = std::fs::read(&path).unwrap();
        for (i, b) in bytes.iter_mut().enumerate().skip(4096) {
            *b = (i % 251) as u8;
        }
        std::fs::write(&path, bytes).unwrap();
        match RedbStore::open(&path) {
            Err(StoreError::Open { .. }) => {}
            // A repair that recovers a consistent state is acceptable too.
            Ok(store) => {
                let _ = store.scan_prefix("").await;
            }
            Err(other) => panic!("unexpected error: {other:?}"),
        }
    }

    /// The batches a child process applies in
    /// [`applied_batches_survive_a_kill_9`]: batch `i` sets `counter` to `i`,
    /// moves the one `k/` key from `i - 1` to `i`, and fills a log of 4 KiB
    /// in about 25 batches, so the log is checkpointed several times and the
    /// last batches are only in the log when the child is killed.
    fn child_batch(i: u32) -> Vec<Op> {
        vec![
            Op::Put {
                key: "counter".into(),
                value: i.to_string().into_bytes(),
            },
            Op::Delete {
                key: format!("k/{:04}", i.wrapping_sub(1)),
            },
            Op::Put {
                key: format!("k/{i:04}"),
                value: vec![b'v'; 100],
            },
        ]
    }

    const CHILD_ENV: &str = "CAPSTAN_TEST_WAL_CHILD";
    const CHILD_BATCHES: u32 = 200;

    #[test]
    fn applied_batches_survive_a_kill_9() {
        if let Some(path) = std::env::var_os(CHILD_ENV) {
            // The child: apply, say so, and wait to be killed.
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async {
                let store = RedbStore::open_with(Path::new(&path), 4096).unwrap();
                for i in 0..CHILD_BATCHES {
                    store.apply(child_batch(i)).await.unwrap();
                    println!("applied {i}");
                }
                std::future::pending::<()>().await;
            });
            return;
        }
        use std::io::BufRead;
        let (_dir, path) = temp_db();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::redb::tests::applied_batches_survive_a_kill_9",
                "--nocapture",
            ])
            .env(CHILD_ENV, &path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let last = format!("applied {}", CHILD_BATCHES - 1);
        let seen = stdout
            .lines()
            .map_while(Result::ok)
            .any(|line| line == last);
        child.kill().unwrap(); // SIGKILL: nothing is flushed or closed
        child.wait().unwrap();
        assert!(seen, "the child did not apply every batch");

        let store = RedbStore::open_with(&path, 4096).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let last = CHILD_BATCHES - 1;
            assert_eq!(
                store.get("counter").await.unwrap(),
                Some(last.to_string().into_bytes())
            );
            // Nothing of an earlier generation came back: each batch
            // deleted the key before it.
            assert_eq!(
                store.scan_prefix("k/").await.unwrap(),
                vec![(format!("k/{last:04}"), vec![b'v'; 100])]
            );
        });
    }

    #[tokio::test]
    async fn a_reopened_store_goes_on_after_what_it_replayed() {
        let (_dir, path) = temp_db();
        {
            let store = RedbStore::open_with(&path, 4096).unwrap();
            for i in 0..60 {
                store.apply(child_batch(i)).await.unwrap();
            }
        }
        // Reopened twice, applying more each time: the replay of one open
        // does not come back at the next.
        for round in 1..=2u32 {
            let store = RedbStore::open_with(&path, 4096).unwrap();
            let first = 60 * round;
            store
                .apply(vec![Op::Delete {
                    key: format!("k/{:04}", first - 1),
                }])
                .await
                .unwrap();
            for i in first..first + 60 {
                store.apply(child_batch(i)).await.unwrap();
            }
            assert_eq!(
                store.scan_prefix("k/").await.unwrap(),
                vec![(format!("k/{:04}", first + 59), vec![b'v'; 100])]
            );
        }
    }

    #[tokio::test]
    async fn a_batch_bigger_than_the_log_is_committed_durably() {
        let (_dir, path) = temp_db();
        let store = RedbStore::open_with(&path, 4096).unwrap();
        let big = vec![Op::Put {
            key: "big".into(),
            value: vec![7; 10_000],
        }];
        store.apply(big).await.unwrap();
        store.apply(child_batch(0)).await.unwrap();
        drop(store);
        let store = RedbStore::open_with(&path, 4096).unwrap();
        assert_eq!(store.get("big").await.unwrap(), Some(vec![7; 10_000]));
        assert_eq!(store.get("counter").await.unwrap(), Some(b"0".to_vec()));
    }

    #[tokio::test]
    async fn a_new_database_beside_an_old_log_replays_none_of_it() {
        let (_dir, path) = temp_db();
        {
            let old = RedbStore::open_with(&path, 64 * 1024).unwrap();
            for i in 0..5 {
                old.apply(child_batch(i)).await.unwrap();
            }
        }
        std::fs::remove_file(&path).unwrap();
        // The new database's first records are the same size as the old
        // ones, so the old log's third record starts right after them,
        // with the generation and sequence that would come next.
        {
            let new = RedbStore::open_with(&path, 64 * 1024).unwrap();
            for i in 0..2 {
                new.apply(child_batch(i)).await.unwrap();
            }
        }
        let store = RedbStore::open_with(&path, 64 * 1024).unwrap();
        assert_eq!(store.get("counter").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(
            store.scan_prefix("k/").await.unwrap(),
            vec![("k/0001".to_string(), vec![b'v'; 100])]
        );
    }

    #[tokio::test]
    async fn after_a_failed_log_write_nothing_of_the_batch_is_applied_and_every_write_fails() {
        let (_dir, path) = temp_db();
        let store = RedbStore::open(&path).unwrap();
        store.apply(child_batch(0)).await.unwrap();
        // Swap the log for one on /dev/full: every write fails with ENOSPC.
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        *store.wal.lock().unwrap() = Some(Wal::on_file(full, Path::new("/dev/full"), 0, 0));
        let err = store.apply(child_batch(1)).await.unwrap_err();
        assert!(matches!(err, StoreError::Write(_)), "{err:?}");
        assert!(err.to_string().contains("/dev/full"), "{err}");
        // The batch's transaction was aborted: what was there stays.
        assert_eq!(store.get("counter").await.unwrap(), Some(b"0".to_vec()));
        assert_eq!(store.get("k/0001").await.unwrap(), None);
        // And the store takes no more writes, whatever they are.
        let err = store.apply(child_batch(2)).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("an earlier write to the state store failed"),
            "{err}"
        );
        assert_eq!(store.get("counter").await.unwrap(), Some(b"0".to_vec()));
    }

    #[tokio::test]
    async fn an_unreadable_write_ahead_log_is_an_open_error() {
        let (dir, path) = temp_db();
        // A directory where the log file should be.
        std::fs::create_dir(dir.path().join("state.redb.wal")).unwrap();
        let err = RedbStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("state.redb.wal"), "{err}");
    }

    #[tokio::test]
    async fn missing_directory_is_an_open_error() {
        let (dir, _) = temp_db();
        let err = RedbStore::open(&dir.path().join("nope/state.redb")).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    }
}
