//! [`LocalLogStore`]: attempt logs as files in a local directory.

use super::{LogError, LogStore, check_id, plan_append};
use async_trait::async_trait;
use bytes::Bytes;
use capstan_shared::ids::AttemptId;
use capstan_shared::log_tail::LogTail;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, PoisonError};
use tokio::sync::Mutex;

/// How many attempts keep their state (and open file) cached before idle ones
/// are dropped. Bounds the file descriptors the store holds.
const MAX_CACHED: usize = 256;

/// Bytes of each log kept in memory after they are written (its tail), so
/// followers get recent bytes without reading them back from the file.
const TAIL_PER_LOG: usize = 4 * 1024 * 1024;
/// Bytes kept in all tails together, at most (plus one part): past it, the
/// tails appended to least recently are dropped whole.
const TAIL_BUDGET: usize = 32 * 1024 * 1024;

/// One file per attempt, `<dir>/<attempt id>.log`.
///
/// Appends to one attempt are serialized by a per-attempt async mutex, which
/// also guards the cached length and open file; file I/O runs on tokio's
/// blocking pool. Reads and fsyncs of a log whose file is open take the lock
/// only to copy the length and the file handle: they run beside appends
/// (an fsync of a big log takes a while, and the next stream of the runner
/// is being appended meanwhile). The store assumes it is the only writer of
/// its directory.
///
/// The last bytes appended to each log are also kept in memory, as the
/// buffers they arrived in ([`LogTail`], at most [`TAIL_PER_LOG`] per log and
/// [`TAIL_BUDGET`] in all): a read within them (a follower keeping up) is a
/// slice of those buffers, without a blocking-pool hop, a zeroed buffer or a
/// read back from the page cache. The file is always written first; the tail
/// only holds copies of bytes in it, and is dropped whenever the file may
/// differ from it (a failed write, a delete).
#[derive(Debug)]
pub struct LocalLogStore {
    dir: PathBuf,
    logs: SyncMutex<HashMap<String, Arc<Entry>>>,
    /// Bytes held by all tails.
    tails_held: Arc<AtomicUsize>,
    /// Counts appends, to find the tails appended to least recently.
    appends: AtomicU64,
}

/// One attempt's log: its file state (under an async lock held across file
/// I/O) and its in-memory tail (under a short sync lock, so that readers do
/// not wait for an append's write).
#[derive(Debug)]
struct Entry {
    log: Arc<Mutex<LogFile>>,
    tail: SyncMutex<Tail>,
    /// The store's `tails_held`, kept up to date by [`Entry::with_tail`].
    tails_held: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct Tail {
    bytes: LogTail,
    /// The store's append count at the last push (for trimming).
    used: u64,
}

impl Entry {
    /// Runs `f` on the tail under its lock, accounting for what it holds.
    fn with_tail<T>(&self, f: impl FnOnce(&mut Tail) -> T) -> T {
        let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        let before = tail.bytes.held();
        let result = f(&mut tail);
        let after = tail.bytes.held();
        if after >= before {
            self.tails_held.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.tails_held.fetch_sub(before - after, Ordering::Relaxed);
        }
        result
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let tail = self.tail.get_mut().unwrap_or_else(PoisonError::into_inner);
        self.tails_held
            .fetch_sub(tail.bytes.held(), Ordering::Relaxed);
    }
}

/// The cached state of one attempt's log.
#[derive(Debug, Default)]
struct LogFile {
    /// Opened for reading and appending, once the file exists.
    file: Option<Arc<File>>,
    /// The file's length, once known.
    len: Option<u64>,
}

impl LogFile {
    fn len(&mut self, path: &Path) -> io::Result<u64> {
        if let Some(len) = self.len {
            return Ok(len);
        }
        let len = match std::fs::metadata(path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(context(e, "cannot stat", path)),
        };
        self.len = Some(len);
        Ok(len)
    }

    /// The open file; `None` if it does not exist and `create` is false.
    fn file(&mut self, path: &Path, create: bool) -> io::Result<Option<&Arc<File>>> {
        if self.file.is_none() {
            let mut options = OpenOptions::new();
            options.read(true).append(true);
            let file = match options.open(path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    // We hold the attempt's lock: nobody else creates it.
                    let file = options
                        .create(true)
                        .open(path)
                        .map_err(|e| context(e, "cannot create", path))?;
                    // Make the new directory entry durable along with the
                    // data that a later `sync` flushes.
                    if let Some(dir) = path.parent() {
                        File::open(dir)
                            .and_then(|d| d.sync_all())
                            .map_err(|e| context(e, "cannot fsync the directory of", path))?;
                    }
                    file
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(context(e, "cannot open", path)),
            };
            let len = file
                .metadata()
                .map_err(|e| context(e, "cannot stat", path))?
                .len();
            self.len = Some(len);
            self.file = Some(Arc::new(file));
        }
        Ok(self.file.as_ref())
    }

    /// Forgets what is cached, so the next call looks at the file again.
    fn reset(&mut self) {
        self.file = None;
        self.len = None;
    }
}

fn context(err: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}

impl LocalLogStore {
    /// Opens (creating it if needed) the log directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        let open_error = |source| LogError::Open {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(open_error)?;
        if !std::fs::metadata(dir).map_err(open_error)?.is_dir() {
            return Err(open_error(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            logs: SyncMutex::new(HashMap::new()),
            tails_held: Arc::new(AtomicUsize::new(0)),
            appends: AtomicU64::new(0),
        })
    }

    /// The directory holding the logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding `attempt`'s log (whose id must have passed
    /// [`check_id`]).
    fn path(&self, attempt: &AttemptId) -> PathBuf {
        self.dir.join(format!("{}.log", attempt.as_str()))
    }

    fn entry(&self, attempt: &AttemptId) -> Arc<Entry> {
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = logs.get(attempt.as_str()) {
            return entry.clone();
        }
        if logs.len() >= MAX_CACHED {
            // Entries are cloned only under this lock, so one whose only
            // reference is the map's is idle and stays idle while we hold it.
            logs.retain(|_, entry| Arc::strong_count(entry) > 1);
        }
        logs.entry(attempt.as_str().to_string())
            .or_insert_with(|| {
                Arc::new(Entry {
                    log: Arc::default(),
                    tail: SyncMutex::new(Tail {
                        bytes: LogTail::new(TAIL_PER_LOG),
                        used: 0,
                    }),
                    tails_held: self.tails_held.clone(),
                })
            })
            .clone()
    }

    /// Drops the tails appended to least recently until all of them hold
    /// at most [`TAIL_BUDGET`] bytes.
    fn trim_tails(&self) {
        let logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        let mut by_use: Vec<_> = logs
            .values()
            .map(|e| (e.with_tail(|t| t.used), e))
            .collect();
        by_use.sort_unstable_by_key(|&(used, _)| used);
        for (_, entry) in by_use {
            if self.tails_held.load(Ordering::Relaxed) <= TAIL_BUDGET {
                break;
            }
            entry.with_tail(|t| t.bytes.clear());
        }
    }

    /// Runs `f` on the attempt's log under its lock, on the blocking pool.
    /// `f` gets the attempt's cached state, its entry (for the tail), its
    /// file's path, and a function turning an I/O error into a [`LogError`].
    async fn with_log<T: Send + 'static>(
        &self,
        attempt: &AttemptId,
        f: impl FnOnce(
            &mut LogFile,
            &Entry,
            &Path,
            &dyn Fn(io::Error) -> LogError,
        ) -> Result<T, LogError>
        + Send
        + 'static,
    ) -> Result<T, LogError> {
        check_id(attempt)?;
        let path = self.path(attempt);
        let entry = self.entry(attempt);
        let mut log = entry.log.clone().lock_owned().await;
        let id = attempt.clone();
        // If the caller goes away, the blocking task still finishes, holding
        // the lock until it does.
        let result = tokio::task::spawn_blocking(move || {
            let io_error = |source| LogError::Io {
                attempt: id.clone(),
                source,
            };
            let result = f(&mut log, &entry, &path, &io_error);
            if let Err(LogError::Io { .. }) = result {
                // After a failed write the file may hold part of the data:
                // still a prefix of the log, but the cached length (and the
                // tail's end) are stale.
                log.reset();
                entry.with_tail(|t| t.bytes.clear());
            }
            result
        })
        .await;
        result.unwrap_or_else(|join| {
            Err(LogError::Io {
                attempt: attempt.clone(),
                source: io::Error::other(join),
            })
        })
    }

    /// The open file and length of the attempt's log, if both are cached
    /// (no I/O; the lock is held only to copy them). Everything appended
    /// before this call is in that file, up to that length.
    async fn cached(&self, attempt: &AttemptId) -> Result<Option<(Arc<File>, u64)>, LogError> {
        check_id(attempt)?;
        let entry = self.entry(attempt);
        let log = entry.log.lock().await;
        Ok(log.file.clone().zip(log.len))
    }

    /// Runs `f` on the blocking pool, without the attempt's lock.
    async fn unlocked<T: Send + 'static>(
        &self,
        attempt: &AttemptId,
        what: &str,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, LogError> {
        let path = self.path(attempt);
        tokio::task::spawn_blocking(f)
            .await
            .unwrap_or_else(|join| Err(io::Error::other(join)))
            .map_err(|e| LogError::Io {
                attempt: attempt.clone(),
                source: context(e, what, &path),
            })
    }

    /// [`LogStore::read`] (`whole`) or [`LogStore::read_chunk`]: from the
    /// tail if it holds `offset`, else from the file.
    async fn read_from(
        &self,
        attempt: &AttemptId,
        offset: u64,
        max: usize,
        whole: bool,
    ) -> Result<Bytes, LogError> {
        check_id(attempt)?;
        let from_tail = self
            .entry(attempt)
            .with_tail(|t| t.bytes.read(offset, max, whole));
        if let Some(data) = from_tail {
            return Ok(data);
        }
        if let Some((file, len)) = self.cached(attempt).await? {
            if offset >= len || max == 0 {
                return Ok(Bytes::new());
            }
            return self
                .unlocked(attempt, "cannot read", move || {
                    read_range(&file, len, offset, max)
                })
                .await;
        }
        self.with_log(attempt, move |log, _, path, io_error| {
            let len = log.len(path).map_err(io_error)?;
            if offset >= len || max == 0 {
                return Ok(Bytes::new());
            }
            let Some(file) = log.file(path, false).map_err(io_error)? else {
                return Err(io_error(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} disappeared", path.display()),
                )));
            };
            read_range(file, len, offset, max)
                .map_err(|e| io_error(context(e, "cannot read", path)))
        })
        .await
    }
}

/// Reads `min(max, len - offset)` bytes at `offset` of `file`.
fn read_range(file: &File, len: u64, offset: u64, max: usize) -> io::Result<Bytes> {
    if offset >= len || max == 0 {
        return Ok(Bytes::new());
    }
    let n = usize::try_from(len - offset).unwrap_or(usize::MAX).min(max);
    let mut buf = vec![0; n];
    file.read_exact_at(&mut buf, offset)?;
    Ok(Bytes::from(buf))
}

#[async_trait]
impl LogStore for LocalLogStore {
    async fn append(&self, attempt: &AttemptId, offset: u64, data: &[u8]) -> Result<u64, LogError> {
        self.append_parts(attempt, offset, vec![Bytes::copy_from_slice(data)])
            .await
    }

    async fn append_parts(
        &self,
        attempt: &AttemptId,
        offset: u64,
        parts: Vec<Bytes>,
    ) -> Result<u64, LogError> {
        let id = attempt.clone();
        let used = self.appends.fetch_add(1, Ordering::Relaxed);
        let len = self
            .with_log(attempt, move |log, entry, path, io_error| {
                let mut len = log.len(path).map_err(io_error)?;
                let total = parts.iter().map(Bytes::len).sum();
                let mut skip = plan_append(&id, len, offset, total)?;
                if skip == total {
                    return Ok(len);
                }
                let file = log
                    .file(path, true)
                    .map_err(io_error)?
                    .ok_or_else(|| io_error(io::ErrorKind::NotFound.into()))?;
                let mut file: &File = file;
                for part in &parts {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    file.write_all(&part[skip..])
                        .map_err(|e| io_error(context(e, "cannot write", path)))?;
                    let at = len;
                    len += (part.len() - skip) as u64;
                    // Visible to readers once written (still under the log's
                    // lock, so tail pushes happen in log order).
                    entry.with_tail(|t| {
                        t.bytes.push(at, part.slice(skip..));
                        t.used = used;
                    });
                    skip = 0;
                }
                log.len = Some(len);
                Ok(len)
            })
            .await?;
        if self.tails_held.load(Ordering::Relaxed) > TAIL_BUDGET {
            self.trim_tails();
        }
        Ok(len)
    }

    async fn delete(&self, attempt: &AttemptId) -> Result<(), LogError> {
        self.with_log(attempt, |log, entry, path, io_error| {
            // Drop the open file, the cached length and the tail with the
            // file.
            log.reset();
            entry.with_tail(|t| t.bytes.clear());
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_error(context(e, "cannot delete", path))),
            }
        })
        .await?;
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(attempt.as_str());
        Ok(())
    }

    async fn len(&self, attempt: &AttemptId) -> Result<u64, LogError> {
        check_id(attempt)?;
        if let Some(end) = self.entry(attempt).with_tail(|t| t.bytes.end()) {
            return Ok(end);
        }
        self.with_log(attempt, |log, _, path, io_error| {
            log.len(path).map_err(io_error)
        })
        .await
    }

    async fn read(&self, attempt: &AttemptId, offset: u64, max: usize) -> Result<Bytes, LogError> {
        self.read_from(attempt, offset, max, true).await
    }

    async fn read_chunk(
        &self,
        attempt: &AttemptId,
        offset: u64,
        max: usize,
    ) -> Result<Bytes, LogError> {
        self.read_from(attempt, offset, max, false).await
    }

    async fn sync(&self, attempt: &AttemptId) -> Result<(), LogError> {
        let file = match self.cached(attempt).await? {
            Some((file, _)) => Some(file),
            // A file closed since it was written is reopened: fsync flushes
            // the file, whichever descriptor asks.
            None => {
                self.with_log(attempt, |log, _, path, io_error| {
                    Ok(log.file(path, false).map_err(io_error)?.cloned())
                })
                .await?
            }
        };
        match file {
            // Outside the lock: appends go on while the disk catches up.
            Some(file) => {
                self.unlocked(attempt, "cannot fsync", move || file.sync_data())
                    .await
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::conformance;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn local_log_store_passes_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalLogStore::open(&dir.path().join("logs")).unwrap();
        conformance::run_all(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn one_file_per_attempt_created_on_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalLogStore::open(dir.path()).unwrap();
        let a = AttemptId::generate();
        store.len(&a).await.unwrap();
        store.read(&a, 0, 10).await.unwrap();
        store.sync(&a).await.unwrap();
        store.append(&a, 0, b"").await.unwrap();
        assert!(store.append(&a, 1, b"x").await.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        store.append(&a, 0, b"data").await.unwrap();
        let file = dir.path().join(format!("{a}.log"));
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn logs_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = AttemptId::generate();
        {
            let store = LocalLogStore::open(dir.path()).unwrap();
            store.append(&a, 0, b"before ").await.unwrap();
            store.sync(&a).await.unwrap();
        }
        let store = LocalLogStore::open(dir.path()).unwrap();
        assert_eq!(store.len(&a).await.unwrap(), 7);
        // The resend logic works from the length found on disk.
        assert_eq!(store.append(&a, 0, b"before and").await.unwrap(), 10);
        assert!(matches!(
            store.append(&a, 11, b"x").await,
            Err(LogError::Gap {
                expected: 10,
                got: 11,
                ..
            })
        ));
        assert_eq!(&store.read(&a, 0, 100).await.unwrap()[..], b"before and");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn more_attempts_than_the_cache_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalLogStore::open(dir.path()).unwrap());
        let attempts: Vec<_> = (0..MAX_CACHED * 2 + 7)
            .map(|_| AttemptId::generate())
            .collect();
        for round in 0..3u8 {
            for a in &attempts {
                let offset = u64::from(round) * 2;
                // Each chunk sent twice: the second is skipped.
                for _ in 0..2 {
                    let len = store.append(a, offset, &[round, round]).await.unwrap();
                    assert_eq!(len, offset + 2);
                }
            }
        }
        assert!(store.logs.lock().unwrap().len() <= MAX_CACHED + 1);
        for a in &attempts {
            store.sync(a).await.unwrap();
            assert_eq!(
                &store.read(a, 0, 100).await.unwrap()[..],
                [0, 0, 1, 1, 2, 2]
            );
        }
    }

    /// Followers keeping up read from the tail: the answers are slices of
    /// the appended buffers (same memory), and the file still has it all.
    #[tokio::test]
    async fn recent_bytes_come_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalLogStore::open(dir.path()).unwrap();
        let a = AttemptId::generate();
        let first = Bytes::from(vec![1u8; 300_000]);
        let second = Bytes::from(vec![2u8; 300_000]);
        store
            .append_parts(&a, 0, vec![first.clone(), second.clone()])
            .await
            .unwrap();
        let piece = store.read_chunk(&a, 0, 1 << 20).await.unwrap();
        assert_eq!(piece.as_ptr(), first.as_ptr(), "a slice of the first part");
        assert_eq!(piece.len(), first.len());
        let piece = store.read_chunk(&a, 400_000, 1 << 20).await.unwrap();
        assert_eq!(piece.as_ptr(), second[100_000..].as_ptr());
        // `read` answers everything asked, across parts.
        assert_eq!(store.read(&a, 0, usize::MAX).await.unwrap().len(), 600_000);
        assert_eq!(store.len(&a).await.unwrap(), 600_000);
        let on_disk = std::fs::read(dir.path().join(format!("{a}.log"))).unwrap();
        assert!(
            on_disk[..300_000].iter().all(|&b| b == 1)
                && on_disk[300_000..].iter().all(|&b| b == 2)
        );
        // Deleting drops the tail with the file.
        store.delete(&a).await.unwrap();
        assert!(store.read(&a, 0, 10).await.unwrap().is_empty());
        assert_eq!(store.tails_held.load(Ordering::Relaxed), 0);
    }

    /// Each tail keeps at most TAIL_PER_LOG (plus one part), all of them at
    /// most TAIL_BUDGET (plus one part); what fell out of the tails is read
    /// from the files.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tails_stay_within_their_budget() {
        const PART: usize = 1024 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let store = LocalLogStore::open(dir.path()).unwrap();
        let logs = TAIL_BUDGET / TAIL_PER_LOG * 2;
        let attempts: Vec<_> = (0..logs).map(|_| AttemptId::generate()).collect();
        for round in 0..6u8 {
            for (i, a) in attempts.iter().enumerate() {
                let offset = u64::from(round) * PART as u64;
                let data = Bytes::from(vec![round ^ i as u8; PART]);
                store.append_parts(a, offset, vec![data]).await.unwrap();
                let held = store.tails_held.load(Ordering::Relaxed);
                assert!(held <= TAIL_BUDGET + PART, "{held} bytes held");
            }
        }
        for (i, a) in attempts.iter().enumerate() {
            let all = store.read(a, 0, usize::MAX).await.unwrap();
            assert_eq!(all.len(), 6 * PART);
            for (round, chunk) in all.chunks(PART).enumerate() {
                assert!(chunk.iter().all(|&b| b == round as u8 ^ i as u8));
            }
            let entry = store.entry(a);
            assert!(entry.with_tail(|t| t.bytes.held()) <= TAIL_PER_LOG);
        }
        // Dropping the cached entries gives their bytes back.
        for a in &attempts {
            store.delete(a).await.unwrap();
        }
        assert_eq!(store.tails_held.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn open_refuses_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = LocalLogStore::open(&file).unwrap_err();
        assert!(matches!(err, LogError::Open { .. }), "{err:?}");
    }
}
