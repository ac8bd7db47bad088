//! [`LocalLogStore`]: attempt logs as files in a local directory: plain
//! `<attempt>.log` while written, `<attempt>.logz` once sealed (`sealed`).

use super::sealed::{SealStats, Sealed};
use super::{LogError, LogStore, check_id, plan_append};
use async_trait::async_trait;
use bytes::Bytes;
use capstan_proto::ids::AttemptId;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use tokio::sync::Mutex;

/// How many attempts keep their state (and open file) cached before idle ones
/// are dropped. Bounds the file descriptors the store holds.
const MAX_CACHED: usize = 256;

/// One file per attempt, `<dir>/<attempt id>.log`.
///
/// Appends to one attempt are serialized by a per-attempt async mutex, which
/// also guards the cached length and open file; file I/O runs on tokio's
/// blocking pool. Reads and fsyncs of a log whose file is open take the lock
/// only to copy the length and the file handle: they run beside appends
/// (an fsync of a big log takes a while, and the next stream of the runner
/// is being appended meanwhile). The store expects to be the only writer
/// of its directory but for a moment after a failover, when a deposed
/// leader may finish an append: each append reads the file's length first.
#[derive(Debug)]
pub(crate) struct LocalLogStore {
    dir: PathBuf,
    logs: SyncMutex<HashMap<String, Arc<Mutex<LogFile>>>>,
}

/// The cached state of one attempt's log.
#[derive(Debug, Default)]
struct LogFile {
    /// Opened for reading and appending, once the file exists.
    file: Option<Arc<File>>,
    /// The file's length, once known.
    len: Option<u64>,
    /// How far [`drop_behind`] has dropped the page cache: the next sync
    /// advises only from here, not from 0 again.
    dropped: Arc<AtomicU64>,
    /// The sealed log, once looked for (`None` inside: there is none).
    sealed: Option<Option<Arc<Sealed>>>,
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
            options
                .read(true)
                .append(true)
                .mode(crate::private::FILE_MODE);
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

    /// The sealed log of `path` (the plain log's path), if there is one.
    fn sealed(&mut self, path: &Path) -> io::Result<Option<Arc<Sealed>>> {
        if self.sealed.is_none() {
            let found = Sealed::open(&sealed_path(path))
                .map_err(|e| context(e, "cannot open", &sealed_path(path)))?;
            self.sealed = Some(found.map(Arc::new));
        }
        Ok(self.sealed.clone().flatten())
    }

    /// Forgets what is cached, so the next call looks at the file again.
    fn reset(&mut self) {
        self.file = None;
        self.len = None;
        self.sealed = None;
        // The file may be another one next time (deleted and made again).
        self.dropped = Arc::default();
    }
}

/// `<attempt>.logz` beside `<attempt>.log`.
fn sealed_path(plain: &Path) -> PathBuf {
    plain.with_extension("logz")
}

fn context(err: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}

/// What [`LocalLogStore::cached`] copies out of a [`LogFile`].
struct Cached {
    file: Arc<File>,
    len: u64,
    dropped: Arc<AtomicU64>,
}

impl LocalLogStore {
    /// Opens (creating it if needed) the log directory `dir`.
    pub(crate) fn open(dir: &Path) -> Result<Self, LogError> {
        let open_error = |source| LogError::Open {
            path: dir.display().to_string(),
            source,
        };
        crate::private::private_dir(dir).map_err(open_error)?;
        if !std::fs::metadata(dir).map_err(open_error)?.is_dir() {
            return Err(open_error(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            logs: SyncMutex::new(HashMap::new()),
        })
    }

    /// The file holding `attempt`'s log (whose id must have passed
    /// [`check_id`]).
    fn path(&self, attempt: &AttemptId) -> PathBuf {
        self.dir.join(format!("{}.log", attempt.as_str()))
    }

    fn entry(&self, attempt: &AttemptId) -> Arc<Mutex<LogFile>> {
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
            .or_default()
            .clone()
    }

    /// Runs `f` on the attempt's log under its lock, on the blocking pool.
    /// `f` gets the attempt's cached state, its file's path, and a function
    /// turning an I/O error into a [`LogError`].
    async fn with_log<T: Send + 'static>(
        &self,
        attempt: &AttemptId,
        f: impl FnOnce(&mut LogFile, &Path, &dyn Fn(io::Error) -> LogError) -> Result<T, LogError>
        + Send
        + 'static,
    ) -> Result<T, LogError> {
        check_id(attempt)?;
        let path = self.path(attempt);
        let mut log = self.entry(attempt).lock_owned().await;
        let id = attempt.clone();
        // If the caller goes away, the blocking task still finishes, holding
        // the lock until it does.
        let result = tokio::task::spawn_blocking(move || {
            let io_error = |source| LogError::Io {
                attempt: id.clone(),
                source,
            };
            let result = f(&mut log, &path, &io_error);
            if let Err(LogError::Io { .. }) = result {
                // After a failed write the file may hold part of the data:
                // still a prefix of the log, but the cached length is stale.
                log.reset();
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
    async fn cached(&self, attempt: &AttemptId) -> Result<Option<Cached>, LogError> {
        check_id(attempt)?;
        let entry = self.entry(attempt);
        let log = entry.lock().await;
        Ok(log.file.clone().zip(log.len).map(|(file, len)| Cached {
            file,
            len,
            dropped: Arc::clone(&log.dropped),
        }))
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
}

/// Bytes at the end of a log whose page cache [`drop_behind`] leaves alone:
/// what a live follower that lags a little still reads from memory.
pub(crate) const KEEP_CACHED: u64 = 64 * 1024 * 1024;

/// Where [`drop_behind`]'s ranges end: a multiple of 2 MiB, the largest
/// page-cache folio here (x86-64, and arm64 with 4 KiB pages). A folio is
/// aligned to its size in the file, so no folio straddles such a boundary.
const DROP_GRANULE: u64 = 2 * 1024 * 1024;

/// Drops the page cache of a log's first `synced - KEEP_CACHED` bytes,
/// which the `fsync` just made clean.
///
/// A log is written once, read live from its end, and rarely read again;
/// left alone, a big log fills the page cache with pages nobody reads and
/// crowds out what the machine's other work caches. Dropping them also lets
/// the next writes reuse those pages, instead of pages the kernel has to
/// take from elsewhere, which on a VM that hands freed memory to its host
/// roughly halved the coordinator's CPU per GB of log (docs/decisions.md).
/// Advice only: a failure
/// changes nothing but the cache, so it is ignored.
///
/// `dropped` is where the last call stopped: each call advises only the
/// range past it. Advising from 0 every time cost O(length) per sync, so
/// O(length^2 / stream) over a log.
///
/// Ranges end on a [`DROP_GRANULE`] boundary: the kernel keeps a page (a
/// folio, up to 2 MiB with large folios) that the range covers only in
/// part, and the next call, which starts where this one stopped, would then
/// never drop it.
fn drop_behind(file: &File, synced: u64, dropped: &AtomicU64) {
    let end = synced.saturating_sub(KEEP_CACHED) / DROP_GRANULE * DROP_GRANULE;
    let start = dropped.load(Ordering::Relaxed);
    if end <= start {
        return;
    }
    if let (Ok(offset), Ok(len)) = (i64::try_from(start), i64::try_from(end - start)) {
        let _ = nix::fcntl::posix_fadvise(
            file,
            offset,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
    dropped.fetch_max(end, Ordering::Relaxed);
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
        self.with_log(attempt, move |log, path, io_error| {
            let total: usize = parts.iter().map(Bytes::len).sum();
            if let Some(sealed) = log.sealed(path).map_err(io_error)? {
                // A resend of what it holds is answered as before the seal.
                if offset + total as u64 <= sealed.len() {
                    return Ok(sealed.len());
                }
                return Err(LogError::Sealed { attempt: id });
            }
            if total == 0 {
                let len = log.len(path).map_err(io_error)?;
                plan_append(&id, len, offset, 0)?;
                return Ok(len);
            }
            // The file's length, not the cached one: with a log dir shared
            // by replicas, a deposed leader may still finish an append the
            // new leader's data already covers. Read afresh, the overlap is
            // skipped instead of written twice.
            let mut len = match log.file(path, false).map_err(io_error)? {
                Some(f) => f
                    .metadata()
                    .map_err(|e| io_error(context(e, "cannot stat", path)))?
                    .len(),
                None => 0,
            };
            let mut skip = plan_append(&id, len, offset, total)?;
            if skip == total {
                log.len = Some(len);
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
                len += (part.len() - skip) as u64;
                skip = 0;
            }
            log.len = Some(len);
            Ok(len)
        })
        .await
    }

    async fn delete(&self, attempt: &AttemptId) -> Result<(), LogError> {
        self.with_log(attempt, |log, path, io_error| {
            // Drop the open file and the cached length with the file.
            log.reset();
            let sealed = sealed_path(path);
            for p in [
                path.to_path_buf(),
                sealed.with_extension("logz.tmp"),
                sealed,
            ] {
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(context(e, "cannot delete", &p))),
                }
            }
            Ok(())
        })
        .await?;
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(attempt.as_str());
        Ok(())
    }

    async fn list(&self) -> Result<Vec<AttemptId>, LogError> {
        let dir = self.dir.clone();
        let listed = tokio::task::spawn_blocking(move || -> io::Result<Vec<AttemptId>> {
            let mut out = std::collections::BTreeSet::new();
            for entry in std::fs::read_dir(&dir)? {
                let name = entry?.file_name();
                // Only `<attempt id>.log` and `.logz`: anything else in the
                // directory (an operator's file, a temporary) is not a log.
                let id = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".log").or_else(|| n.strip_suffix(".logz")));
                if let Some(id) = id {
                    let id = AttemptId::from_string(id.to_owned());
                    if check_id(&id).is_ok() {
                        out.insert(id);
                    }
                }
            }
            Ok(out.into_iter().collect())
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))
        .and_then(|r| r);
        listed.map_err(|source| LogError::Open {
            path: self.dir.display().to_string(),
            source,
        })
    }

    async fn len(&self, attempt: &AttemptId) -> Result<u64, LogError> {
        self.with_log(attempt, |log, path, io_error| {
            if let Some(sealed) = log.sealed(path).map_err(io_error)? {
                return Ok(sealed.len());
            }
            log.len(path).map_err(io_error)
        })
        .await
    }

    async fn read(&self, attempt: &AttemptId, offset: u64, max: usize) -> Result<Bytes, LogError> {
        if let Some(Cached { file, len, .. }) = self.cached(attempt).await? {
            if offset >= len || max == 0 {
                return Ok(Bytes::new());
            }
            return self
                .unlocked(attempt, "cannot read", move || {
                    read_range(&file, len, offset, max)
                })
                .await;
        }
        self.with_log(attempt, move |log, path, io_error| {
            if let Some(sealed) = log.sealed(path).map_err(io_error)? {
                let zpath = sealed_path(path);
                return sealed
                    .read(offset, max, &zpath)
                    .map(Bytes::from)
                    .map_err(|e| io_error(context(e, "cannot read", &zpath)));
            }
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

    async fn sync(&self, attempt: &AttemptId) -> Result<(), LogError> {
        // `len`: appended before this call, so the fsync covers it (0 when
        // not cached: the next sync drops what this one leaves).
        let (file, len, dropped) = match self.cached(attempt).await? {
            Some(c) => (Some(c.file), c.len, Some(c.dropped)),
            // A file closed since it was written is reopened: fsync flushes
            // the file, whichever descriptor asks.
            None => {
                let file = self
                    .with_log(attempt, |log, path, io_error| {
                        Ok(log.file(path, false).map_err(io_error)?.cloned())
                    })
                    .await?;
                (file, 0, None)
            }
        };
        match file {
            // Outside the lock: appends go on while the disk catches up.
            Some(file) => {
                self.unlocked(attempt, "cannot fsync", move || {
                    file.sync_data()?;
                    if let Some(dropped) = dropped {
                        drop_behind(&file, len, &dropped);
                    }
                    Ok(())
                })
                .await
            }
            None => Ok(()),
        }
    }

    async fn seal(&self, attempt: &AttemptId) -> Result<Option<SealStats>, LogError> {
        self.with_log(attempt, |log, path, io_error| {
            if log.sealed(path).map_err(io_error)?.is_some() {
                return Ok(None);
            }
            let Some(file) = log.file(path, false).map_err(io_error)?.cloned() else {
                return Ok(None);
            };
            let len = file
                .metadata()
                .map_err(|e| io_error(context(e, "cannot stat", path)))?
                .len();
            let zpath = sealed_path(path);
            let stats = super::sealed::seal(&file, len, &zpath, crate::private::FILE_MODE)
                .map_err(|e| io_error(context(e, "cannot seal", path)))?;
            let sealed =
                Sealed::open(&zpath).map_err(|e| io_error(context(e, "cannot open", &zpath)))?;
            // The sealed copy is durable (fsynced, renamed): the plain one goes.
            log.reset();
            log.sealed = Some(sealed.map(Arc::new));
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(context(e, "cannot delete", path))),
            }
            Ok(Some(stats))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::conformance;

    /// Bytes of `path` in the page cache, by util-linux's `fincore`.
    fn cached_bytes(path: &Path) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
            .arg(path)
            .output()
            .expect("run fincore (util-linux)");
        assert!(out.status.success(), "fincore: {out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// A deposed leader's store (its cached length stale) finishing an
    /// append the new leader's store already covers writes nothing twice.
    #[tokio::test]
    async fn a_second_writer_of_the_dir_does_not_duplicate_an_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (
            LocalLogStore::open(dir.path()).unwrap(),
            LocalLogStore::open(dir.path()).unwrap(),
        );
        let a = AttemptId::from_string("att-overlap");
        let part = |s: &str| vec![Bytes::from(s.to_owned())];
        assert_eq!(
            old.append_parts(&a, 0, part("0123456789")).await.unwrap(),
            10
        );
        // The runner resends from 0 to the new leader, and goes on.
        assert_eq!(
            new.append_parts(&a, 0, part("0123456789abcdefghij"))
                .await
                .unwrap(),
            20
        );
        // The old leader's last chunk, at the offset it expected.
        assert_eq!(
            old.append_parts(&a, 10, part("abcdefghij")).await.unwrap(),
            20
        );
        assert_eq!(
            &new.read(&a, 0, 100).await.unwrap()[..],
            b"0123456789abcdefghij"
        );
    }

    /// After an fsync, a log's pages leave the page cache except for its
    /// last [`KEEP_CACHED`] bytes; it still reads back whole.
    #[tokio::test]
    async fn sync_drops_the_cache_of_all_but_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalLogStore::open(dir.path()).unwrap();
        let attempt = AttemptId::from_string("att-cache");
        let mib = 1 << 20;
        let len = KEEP_CACHED as usize + 8 * mib;
        let parts: Vec<Bytes> = (0..len / mib)
            .map(|i| Bytes::from(vec![b'a' + (i % 26) as u8; mib]))
            .collect();
        store.append_parts(&attempt, 0, parts).await.unwrap();
        let path = store.path(&attempt);
        assert_eq!(
            cached_bytes(&path),
            len as u64,
            "the log was not all cached after the write, so the test cannot tell (on tmpfs, \
             where fadvise does nothing, set TMPDIR to a disk file system)"
        );
        store.sync(&attempt).await.unwrap();
        assert_eq!(
            cached_bytes(&path),
            KEEP_CACHED,
            "what the fsync left cached"
        );
        let start = store.read(&attempt, 0, 3).await.unwrap();
        assert_eq!(&start[..], b"aaa");
        let end = store.read(&attempt, len as u64 - 2, 10).await.unwrap();
        assert_eq!(&end[..], &[b'a' + ((len / mib - 1) % 26) as u8; 2]);
    }

    /// Each sync advises only past where the last one stopped; together
    /// they still leave cached only the end of the log: from the last
    /// [`KEEP_CACHED`] bytes' start, rounded down to a [`DROP_GRANULE`],
    /// whole pages. Appends of odd sizes, so no sync stops on a page
    /// boundary.
    #[tokio::test]
    async fn successive_syncs_keep_only_the_end_cached() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalLogStore::open(dir.path()).unwrap();
        let attempt = AttemptId::from_string("att-cache-2");
        let path = store.path(&attempt);
        let page: u64 = String::from_utf8(
            std::process::Command::new("getconf")
                .arg("PAGESIZE")
                .output()
                .expect("run getconf")
                .stdout,
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
        let part = (1 << 20) + 4097;
        let mut len = 0u64;
        for (i, parts) in [KEEP_CACHED as usize >> 20, 5, 2, 3]
            .into_iter()
            .enumerate()
        {
            let parts: Vec<Bytes> = (0..parts)
                .map(|_| Bytes::from(vec![b'a' + i as u8; part]))
                .collect();
            len = store.append_parts(&attempt, len, parts).await.unwrap();
            store.sync(&attempt).await.unwrap();
            let dropped = len.saturating_sub(KEEP_CACHED) / DROP_GRANULE * DROP_GRANULE;
            assert_eq!(
                cached_bytes(&path),
                len.div_ceil(page) * page - dropped,
                "cached after sync {} of a {len}-byte log (on tmpfs, where fadvise does \
                 nothing, set TMPDIR to a disk file system)",
                i + 1
            );
        }
        let start = store.read(&attempt, 0, 3).await.unwrap();
        assert_eq!(&start[..], b"aaa");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn local_log_store_passes_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalLogStore::open(&dir.path().join("logs")).unwrap();
        conformance::run_all(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn a_sealed_log_reads_the_same_and_takes_no_new_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalLogStore::open(dir.path()).unwrap();
        let a = AttemptId::from_string("att-seal".to_string());
        let data: Vec<u8> = (1..=60_000)
            .flat_map(|i| format!("{i:08} compiling crate number {i}\n").into_bytes())
            .collect();
        for (i, chunk) in data.chunks(100_003).enumerate() {
            store.append(&a, (i * 100_003) as u64, chunk).await.unwrap();
        }
        store.sync(&a).await.unwrap();
        let stats = store.seal(&a).await.unwrap().expect("sealed");
        assert_eq!(stats.raw, data.len() as u64);
        assert!(stats.stored * 4 < stats.raw, "at most a quarter: {stats:?}");
        assert!(
            !dir.path().join("att-seal.log").exists(),
            "the plain log is gone"
        );
        assert!(dir.path().join("att-seal.logz").exists());
        assert_eq!(store.seal(&a).await.unwrap(), None, "sealed once");
        // A fresh store (a restart, the next leader) reads it the same.
        for store in [store, LocalLogStore::open(dir.path()).unwrap()] {
            assert_eq!(store.len(&a).await.unwrap(), data.len() as u64);
            for offset in [0usize, 5, 262_143, 262_144, 700_001, data.len() - 1] {
                let got = store.read(&a, offset as u64, 300_000).await.unwrap();
                let end = (offset + 300_000).min(data.len());
                assert_eq!(&got[..], &data[offset..end], "offset {offset}");
            }
            // A resend of held bytes is answered as before; new bytes are refused.
            assert_eq!(store.append(&a, 10, b"x").await.unwrap(), data.len() as u64);
            let err = store
                .append(&a, data.len() as u64, b"more")
                .await
                .unwrap_err();
            assert!(matches!(err, LogError::Sealed { .. }), "{err}");
            assert_eq!(store.list().await.unwrap(), vec![a.clone()]);
        }
        let store = LocalLogStore::open(dir.path()).unwrap();
        store.delete(&a).await.unwrap();
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing left"
        );
        assert_eq!(store.len(&a).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_crash_while_sealing_leaves_the_plain_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalLogStore::open(dir.path()).unwrap();
        let a = AttemptId::from_string("att-torn".to_string());
        store.append(&a, 0, b"line one\nline two\n").await.unwrap();
        // What a kill -9 mid-seal leaves: a partial temporary beside the log.
        std::fs::write(dir.path().join("att-torn.logz.tmp"), b"\x28\xb5\x2f").unwrap();
        let store = LocalLogStore::open(dir.path()).unwrap();
        assert_eq!(
            &store.read(&a, 5, 100).await.unwrap()[..],
            b"one\nline two\n"
        );
        assert_eq!(store.list().await.unwrap(), vec![a.clone()]);
        store
            .seal(&a)
            .await
            .unwrap()
            .expect("sealed over the torn temporary");
        assert_eq!(
            &store.read(&a, 0, 100).await.unwrap()[..],
            b"line one\nline two\n"
        );
        assert!(!dir.path().join("att-torn.logz.tmp").exists());
        store.delete(&a).await.unwrap();
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing left"
        );
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

    #[test]
    fn open_refuses_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = LocalLogStore::open(&file).unwrap_err();
        assert!(matches!(err, LogError::Open { .. }), "{err:?}");
    }
}
