//! [`RedbStore`]: the standalone coordinator's [`Store`], one redb file under
//! `--data-dir`.

use super::{Op, Store, StoreError};
use ::redb::{
    Database, DatabaseError, Durability, ReadableDatabase, StorageError, TableDefinition,
    TableError,
};
use async_trait::async_trait;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The single table holding every key.
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A [`Store`] on a redb database file.
///
/// Each [`Store::apply`] is one write transaction committed with
/// [`Durability::Immediate`] (fsynced before it returns); reads run in read
/// transactions and see the last committed batch. redb admits one write
/// transaction at a time, so batches are serialized. Reads run on tokio's
/// blocking pool; writes block the calling thread (see [`write_here`]).
///
/// The file is locked while a `RedbStore` on it exists (until it is dropped):
/// a second open, from this or another process, fails.
pub struct RedbStore {
    db: Arc<Database>,
    path: PathBuf,
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
        let open_error = |source: BoxError| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        // redb may panic on a file damaged outside redb (debug builds assert
        // what a file it wrote cannot contain); report that as an open error.
        let db = catch_unwind(AssertUnwindSafe(|| {
            Database::builder()
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

        // Create the table up front so readers never find it missing.
        let txn = db.begin_write().map_err(|e| open_error(e.into()))?;
        txn.open_table(STATE).map_err(|e| open_error(e.into()))?;
        txn.commit().map_err(|e| open_error(e.into()))?;

        Ok(Self {
            db: Arc::new(db),
            path: path.to_path_buf(),
        })
    }

    /// The file this store was opened on.
    pub fn path(&self) -> &Path {
        &self.path
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
/// pickup path. Each way of moving the write off the worker cost a
/// cross-thread wake-up, 0.1-0.3 ms each on an idle 2-vCPU VM whose idle
/// vCPUs halt: `spawn_blocking` one there and one back; `block_in_place`
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

    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let db = self.db.clone();
        let prefix = prefix.to_owned();
        blocking(move || {
            let txn = db.begin_read()?;
            let table = match txn.open_table(STATE) {
                Ok(table) => table,
                Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            // redb orders `&str` keys by their bytes, as the contract requires.
            for entry in table.range(prefix.as_str()..)? {
                let (key, value) = entry?;
                let key = key.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                out.push((key.to_owned(), value.value().to_vec()));
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
        let db = &self.db;
        write_here(|| {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                let mut table = txn.open_table(STATE)?;
                for op in &batch {
                    match op {
                        Op::Put { key, value } => {
                            table.insert(key.as_str(), value.as_slice())?;
                        }
                        Op::Delete { key } => {
                            table.remove(key.as_str())?;
                        }
                    }
                }
            }
            // An early return above drops `txn`, which aborts it: nothing of
            // the batch is applied.
            txn.commit()?;
            Ok(())
        })
        .map_err(StoreError::Write)
    }
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

    #[tokio::test]
    async fn missing_directory_is_an_open_error() {
        let (dir, _) = temp_db();
        let err = RedbStore::open(&dir.path().join("nope/state.redb")).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    }
}
