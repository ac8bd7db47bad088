//! The on-disk spool of one attempt's log: an append-only file plus, in
//! memory, the step each byte range came from. Writers append; the shipper
//! reads by offset and watches the length grow.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use crate::executor::OutputSink;

/// Length of the log so far and whether more can come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolState {
    /// Bytes stored so far.
    pub len: u64,
    /// No more bytes will be appended.
    pub closed: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("log spool {path}")]
pub struct SpoolError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// One attempt's log spool. Appends are serialized; reads may run
/// concurrently with appends and see only complete appends.
///
/// File I/O is plain `std::fs` run on the blocking pool, one hop per append
/// and per read (`tokio::fs` took two or three hops per call, which at 8 to
/// 64 KiB per call was most of the runner's CPU on a big log).
pub struct Spool {
    path: PathBuf,
    attempt_id: String,
    /// Opened for reading and writing; appends write at the end under
    /// `appender`, reads use positioned reads and need no lock.
    file: Arc<File>,
    /// The length of the file; held across each append's write.
    appender: tokio::sync::Mutex<u64>,
    /// (first offset, step index) of each run of bytes from one step;
    /// changed only under the appender lock.
    segments: Mutex<Vec<(u64, u32)>>,
    state: watch::Sender<SpoolState>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.path)
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

/// Runs blocking file I/O on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|join| Err(io::Error::other(join)))
}

impl Spool {
    /// Creates (truncating) `<dir>/<attempt_id>.log` on the blocking pool.
    pub async fn create(dir: &Path, attempt_id: &str) -> Result<Arc<Self>, SpoolError> {
        let (d, id) = (dir.to_owned(), attempt_id.to_owned());
        tokio::task::spawn_blocking(move || Self::create_now(&d, &id))
            .await
            .unwrap_or_else(|join| {
                Err(SpoolError {
                    path: dir.join(format!("{attempt_id}.log")),
                    source: io::Error::other(join),
                })
            })
    }

    /// [`Spool::create`] on the calling thread: one `open` (plus a `mkdir`
    /// if the directory is gone). An attempt's start calls this inline: a
    /// trip to the blocking pool and back cost more than the open itself,
    /// and pickup waits for it.
    pub fn create_now(dir: &Path, attempt_id: &str) -> Result<Arc<Self>, SpoolError> {
        let path = dir.join(format!("{attempt_id}.log"));
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
        };
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).and_then(|()| open())
            }
            other => other,
        }
        .map_err(|source| SpoolError {
            path: path.clone(),
            source,
        })?;
        Ok(Arc::new(Self {
            attempt_id: attempt_id.to_owned(),
            file: Arc::new(file),
            appender: tokio::sync::Mutex::new(0),
            segments: Mutex::new(Vec::new()),
            state: watch::Sender::new(SpoolState::default()),
            path,
        }))
    }

    pub fn attempt_id(&self) -> &str {
        &self.attempt_id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends bytes produced by step `step`. Returns once they are in the
    /// file (written to the OS, not fsynced) and visible to readers.
    pub async fn append(&self, step: u32, data: &[u8]) -> Result<(), SpoolError> {
        if data.is_empty() {
            return Ok(());
        }
        self.append_owned(step, data.to_vec()).await
    }

    /// [`Spool::append`] of a buffer the caller gives up (no copy).
    pub async fn append_owned(&self, step: u32, data: Vec<u8>) -> Result<(), SpoolError> {
        if data.is_empty() {
            return Ok(());
        }
        let mut len = self.appender.lock().await;
        let file = Arc::clone(&self.file);
        let n = data.len() as u64;
        let at = *len;
        // Positioned writes: a failed write leaves the next one where the
        // log really ends, and readers never see a partial append (they read
        // below `state.len` only).
        let written = blocking(move || file.write_all_at(&data, at)).await;
        written.map_err(|source| SpoolError {
            path: self.path.clone(),
            source,
        })?;
        {
            let mut segments = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
            if segments.last().is_none_or(|&(_, s)| s != step) {
                segments.push((at, step));
            }
        }
        *len += n;
        let new_len = *len;
        self.state.send_modify(|s| s.len = new_len);
        Ok(())
    }

    /// No more bytes will be appended; the shipper finishes once all are acked.
    pub fn close(&self) {
        self.state.send_modify(|s| s.closed = true);
    }

    pub fn state(&self) -> SpoolState {
        *self.state.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<SpoolState> {
        self.state.subscribe()
    }

    /// The step that produced the byte at `offset`, and where that step's
    /// run of bytes ends (`None`: it is the last run so far).
    pub fn step_at(&self, offset: u64) -> (u32, Option<u64>) {
        let segments = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        let i = segments.partition_point(|&(start, _)| start <= offset);
        let step = i
            .checked_sub(1)
            .and_then(|i| segments.get(i))
            .map_or(0, |&(_, s)| s);
        (step, segments.get(i).map(|&(start, _)| start))
    }

    /// Reads up to `max` bytes at `offset` (fewer at the end of the log).
    pub async fn read_at(&self, offset: u64, max: usize) -> Result<Bytes, SpoolError> {
        let available = self.state().len.saturating_sub(offset);
        let n = usize::try_from(available).unwrap_or(usize::MAX).min(max);
        if n == 0 {
            return Ok(Bytes::new());
        }
        let file = Arc::clone(&self.file);
        blocking(move || {
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(|source| SpoolError {
            path: self.path.clone(),
            source,
        })
    }

    /// A sink that appends as step `step`.
    pub fn writer(self: &Arc<Self>, step: u32) -> SpoolWriter {
        SpoolWriter {
            spool: Arc::clone(self),
            step,
        }
    }

    /// Deletes the spool file (a missing file is fine).
    pub async fn remove(&self) {
        if let Err(e) = tokio::fs::remove_file(&self.path).await
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove log spool");
        }
    }
}

/// [`OutputSink`] for one step of a spool.
#[derive(Clone, Debug)]
pub struct SpoolWriter {
    spool: Arc<Spool>,
    step: u32,
}

#[async_trait]
impl OutputSink for SpoolWriter {
    async fn write(&self, data: &[u8]) -> io::Result<()> {
        self.spool
            .append(self.step, data)
            .await
            .map_err(|e| io::Error::new(e.source.kind(), e))
    }

    async fn write_owned(&self, data: Vec<u8>) -> io::Result<()> {
        self.spool
            .append_owned(self.step, data)
            .await
            .map_err(|e| io::Error::new(e.source.kind(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_reads_and_tracks_steps() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::create(dir.path(), "att-1").await.unwrap();
        spool.append(0, b"hello ").await.unwrap();
        spool.writer(0).write(b"world\n").await.unwrap();
        spool.append(2, b"second").await.unwrap();
        assert_eq!(
            spool.state(),
            SpoolState {
                len: 18,
                closed: false
            }
        );
        assert_eq!(&spool.read_at(0, 5).await.unwrap()[..], b"hello");
        assert_eq!(&spool.read_at(6, 100).await.unwrap()[..], b"world\nsecond");
        assert_eq!(spool.step_at(0), (0, Some(12)));
        assert_eq!(spool.step_at(11), (0, Some(12)));
        assert_eq!(spool.step_at(12), (2, None));
        spool.close();
        assert!(spool.state().closed);
        assert_eq!(
            std::fs::read(dir.path().join("att-1.log")).unwrap(),
            b"hello world\nsecond"
        );
        spool.remove().await;
        assert!(!dir.path().join("att-1.log").exists());
    }
}
