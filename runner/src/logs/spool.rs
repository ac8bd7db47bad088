//! The spool of one attempt's log: the bytes the coordinator has not
//! acknowledged yet, held in memory and spilled to a file only when the
//! coordinator does not take them fast enough; plus, in memory, the step
//! each byte range came from. Writers append; the shipper reads by offset,
//! watches the length grow and releases what the coordinator acknowledged.
//!
//! # Memory first, disk when the coordinator lags
//! Writing every byte to the file (to the page cache, read back by the
//! shipper, dropped with the file) made that copy into fresh page-cache
//! pages the largest single cost of the runner for a big log
//! (docs/decisions.md, "Log spool in memory first"). So:
//!
//! - an append goes to memory while the unacknowledged bytes held there
//!   stay within the spool's budget ([`MEMORY_BUDGET`]);
//! - past the budget it waits for the shipper to release acknowledged
//!   bytes, at most [`ROOM_WAIT`]: a step that writes faster than the
//!   coordinator takes its log is slowed to that pace, as a terminal
//!   slows a program that outruns it;
//! - if no room comes in that time (the coordinator is unreachable, or
//!   stalled), the append, and every one after it until the shipper frees
//!   memory again, goes to the file instead: nothing is lost and the step
//!   is never blocked for longer, however long the coordinator is away
//!   (DESIGN, "Logs": spooled to local disk while the coordinator is
//!   unreachable).
//!
//! Acknowledged bytes are kept in memory while the whole log is at most
//! [`KEEP_WHOLE`] long (a quarter of the budget if that is less), so a coordinator that lost a log it had
//! acknowledged can be sent the whole of a typical log again; past that
//! they are dropped as acknowledgements come. [`Spool::first_held`] says
//! from where the spool can still be read.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::sync::{Notify, watch};

use super::sink::OutputSink;

/// Unacknowledged bytes one attempt holds in memory, at most.
pub const MEMORY_BUDGET: u64 = 64 * 1024 * 1024;
/// What all the attempts of one runner hold in memory together, at most
/// (unless each already has only [`MIN_BUDGET`]): see [`budget_for`].
pub const RUNNER_MEMORY: u64 = 256 * 1024 * 1024;
/// The smallest budget an attempt gets, however many slots the runner has.
pub const MIN_BUDGET: u64 = 4 * 1024 * 1024;

/// The memory budget of each attempt of a runner with `capacity` slots:
/// [`RUNNER_MEMORY`] shared among them, at most [`MEMORY_BUDGET`] and at
/// least [`MIN_BUDGET`] each, so that a 16-slot runner whose steps all
/// flood their logs while the coordinator is slow holds 256 MiB, not 1 GiB.
pub fn budget_for(capacity: u32) -> u64 {
    (RUNNER_MEMORY / u64::from(capacity.max(1))).clamp(MIN_BUDGET, MEMORY_BUDGET)
}
/// How long an append waits for memory before it goes to the file.
pub const ROOM_WAIT: Duration = Duration::from_secs(1);
/// A log at most this long is kept whole in memory until the attempt ends
/// (see the module docs); at most a quarter of a smaller budget.
pub const KEEP_WHOLE: u64 = 4 * 1024 * 1024;
/// Appends smaller than this are copied into one growing buffer instead of
/// being kept as one allocation each (a chatty step writes line by line).
const SMALL: usize = 64 * 1024;
/// The growing buffer is sealed into a run of its own at this size.
const OPEN_MAX: usize = 1024 * 1024;

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
/// File I/O (only for spilled bytes) is plain `std::fs` run on the
/// blocking pool, one hop per append and per read (`tokio::fs` took two or
/// three hops per call).
pub struct Spool {
    path: PathBuf,
    attempt_id: String,
    /// Opened for reading and writing; spilled bytes are written at their
    /// offset in the log (the file is sparse where bytes stayed in memory).
    file: Arc<File>,
    /// The length of the log; held across each append, including its wait
    /// for memory.
    appender: tokio::sync::Mutex<u64>,
    held: Mutex<Held>,
    /// Woken when [`Spool::release`] frees memory.
    room: Notify,
    /// From [`budget_for`]; `keep_whole` is [`KEEP_WHOLE`] or a quarter of
    /// the budget, whichever is less.
    budget: u64,
    keep_whole: u64,
    /// (first offset, step index) of each run of bytes from one step;
    /// changed only under the appender lock.
    segments: Mutex<Vec<(u64, u32)>>,
    state: watch::Sender<SpoolState>,
    /// The highest acknowledged offset taken off `capstan_runner_log_spool_bytes`.
    acked_counted: std::sync::atomic::AtomicU64,
}

impl Drop for Spool {
    /// What the coordinator never acknowledged leaves the spool gauge with it.
    fn drop(&mut self) {
        let len = self.state.borrow().len;
        let acked = *self.acked_counted.get_mut();
        crate::metrics::get()
            .spool_bytes
            .dec_by(len.saturating_sub(acked) as i64);
    }
}

/// Where the bytes of the log are.
#[derive(Debug, Default)]
struct Held {
    /// Sealed runs in memory: (first offset, bytes), in order, not
    /// overlapping; spilled runs may sit between them.
    mem: VecDeque<(u64, Bytes)>,
    /// The run small appends are copied into, after every sealed run.
    open: BytesMut,
    /// Where `open` starts in the log.
    open_at: u64,
    /// Bytes in `mem` and `open`.
    mem_bytes: u64,
    /// Runs written to the file: (start, end), in order.
    spilled: Vec<(u64, u64)>,
    /// Appends go to the file until memory is freed (an append waited
    /// [`ROOM_WAIT`] in vain).
    spilling: bool,
    /// The shipper has stopped: nothing will free memory, so appends go
    /// to the file without waiting.
    abandoned: bool,
    /// Everything below this was acknowledged.
    released: u64,
    /// Every byte at or past this can be read; below it some were dropped.
    first_held: u64,
}

impl Held {
    /// Moves `open` into a sealed run. A mostly empty buffer is copied
    /// out and kept for reuse, so that a sealed run never pins much more
    /// memory than it holds (`open` is allocated at [`OPEN_MAX`] once and
    /// never grows past it).
    fn seal(&mut self) {
        if !self.open.is_empty() {
            let at = self.open_at;
            let run = if self.open.len() * 2 < self.open.capacity() {
                let run = Bytes::copy_from_slice(&self.open);
                self.open.clear();
                run
            } else {
                std::mem::take(&mut self.open).freeze()
            };
            self.open_at += run.len() as u64;
            self.mem.push_back((at, run));
        }
    }

    /// Drops acknowledged runs from the front, if the log is longer than
    /// `keep_whole`. Returns whether memory was freed.
    fn drop_acked(&mut self, len: u64, keep_whole: u64) -> bool {
        if len <= keep_whole {
            return false;
        }
        let mut freed = false;
        while let Some((at, run)) = self.mem.front() {
            let end = at + run.len() as u64;
            if end > self.released {
                break;
            }
            self.mem_bytes -= run.len() as u64;
            self.first_held = self.first_held.max(end);
            self.mem.pop_front();
            freed = true;
        }
        if self.mem.is_empty() && !self.open.is_empty() {
            let end = self.open_at + self.open.len() as u64;
            if end <= self.released {
                self.mem_bytes -= self.open.len() as u64;
                self.open.clear();
                self.open_at = end;
                self.first_held = self.first_held.max(end);
                freed = true;
            }
        }
        freed
    }

    /// Up to `max` bytes at `offset` from memory, if it holds that offset.
    fn read_mem(&self, offset: u64, max: usize) -> Option<Bytes> {
        let i = self.mem.partition_point(|(at, _)| *at <= offset);
        if let Some((at, run)) = i.checked_sub(1).and_then(|i| self.mem.get(i)) {
            let skip = usize::try_from(offset - at).unwrap_or(usize::MAX);
            if skip < run.len() {
                let end = run.len().min(skip.saturating_add(max));
                return Some(run.slice(skip..end));
            }
        }
        let skip = usize::try_from(offset.checked_sub(self.open_at)?).ok()?;
        (skip < self.open.len()).then(|| {
            let end = self.open.len().min(skip.saturating_add(max));
            Bytes::copy_from_slice(&self.open[skip..end])
        })
    }

    /// Whether the file holds `offset`, and up to where.
    fn spilled_at(&self, offset: u64) -> Option<u64> {
        let i = self.spilled.partition_point(|&(start, _)| start <= offset);
        let &(_, end) = self.spilled.get(i.checked_sub(1)?)?;
        (offset < end).then_some(end)
    }
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
    /// [`Spool::create_with_budget`] with [`MEMORY_BUDGET`], on the
    /// blocking pool (tests).
    #[cfg(test)]
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

    /// [`Spool::create_with_budget`] with [`MEMORY_BUDGET`] (tests).
    #[cfg(test)]
    pub fn create_now(dir: &Path, attempt_id: &str) -> Result<Arc<Self>, SpoolError> {
        Self::create_with_budget(dir, attempt_id, MEMORY_BUDGET)
    }

    /// Creates (truncating) `<dir>/<attempt_id>.log`, holding up to
    /// `budget` bytes in memory (see [`budget_for`]), on the calling
    /// thread: one `open` (plus a `mkdir` if the directory is gone). An
    /// attempt's start calls this inline: a trip to the blocking pool and
    /// back cost more than the open itself, and pickup waits for it. The
    /// file is made even though most logs never reach it, so that a spool
    /// that cannot spill fails here, at the start, and not when the
    /// coordinator goes away.
    pub fn create_with_budget(
        dir: &Path,
        attempt_id: &str,
        budget: u64,
    ) -> Result<Arc<Self>, SpoolError> {
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
            held: Mutex::new(Held::default()),
            room: Notify::new(),
            budget,
            keep_whole: KEEP_WHOLE.min(budget / 4),
            segments: Mutex::new(Vec::new()),
            state: watch::Sender::new(SpoolState::default()),
            path,
            acked_counted: Default::default(),
        }))
    }

    pub fn attempt_id(&self) -> &str {
        &self.attempt_id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The most unacknowledged bytes this spool holds in memory.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends bytes produced by step `step`. Returns once they are held
    /// (in memory, or written to the OS, not fsynced) and visible to
    /// readers; may first wait up to [`ROOM_WAIT`] for memory (see the
    /// module docs).
    pub async fn append(&self, step: u32, data: &[u8]) -> Result<(), SpoolError> {
        if data.is_empty() {
            return Ok(());
        }
        self.append_owned(step, data.to_vec()).await
    }

    /// [`Spool::append`] of a buffer the caller gives up (no copy, unless
    /// it is small or mostly spare capacity).
    pub async fn append_owned(&self, step: u32, mut data: Vec<u8>) -> Result<(), SpoolError> {
        if data.is_empty() {
            return Ok(());
        }
        let mut len = self.appender.lock().await;
        let at = *len;
        let n = data.len() as u64;
        if self.make_room(at, n).await {
            let mut held = self.held();
            if data.len() < SMALL {
                if held.open.len() + data.len() > OPEN_MAX {
                    held.seal();
                }
                if held.open.capacity() == 0 {
                    held.open.reserve(OPEN_MAX);
                }
                held.open.extend_from_slice(&data);
            } else {
                held.seal();
                if data.capacity() - data.len() > SMALL {
                    data.shrink_to_fit();
                }
                held.mem.push_back((at, Bytes::from(data)));
                held.open_at = at + n;
            }
            held.mem_bytes += n;
        } else {
            let file = Arc::clone(&self.file);
            // Positioned writes: a failed write leaves the next one where
            // the log really ends, and readers never see a partial append
            // (they read below `state.len` only).
            blocking(move || file.write_all_at(&data, at))
                .await
                .map_err(|source| SpoolError {
                    path: self.path.clone(),
                    source,
                })?;
            let mut held = self.held();
            held.seal();
            held.open_at = at + n;
            match held.spilled.last_mut() {
                Some((_, end)) if *end == at => *end = at + n,
                _ => held.spilled.push((at, at + n)),
            }
        }
        {
            let mut segments = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
            if segments.last().is_none_or(|&(_, s)| s != step) {
                segments.push((at, step));
            }
        }
        *len += n;
        let new_len = *len;
        self.state.send_modify(|s| s.len = new_len);
        crate::metrics::get().spool_bytes.inc_by(n as i64);
        Ok(())
    }

    /// Whether `n` more bytes may go to memory, after waiting up to
    /// [`ROOM_WAIT`] for the shipper to free some; `false`: spill them.
    async fn make_room(&self, len: u64, n: u64) -> bool {
        let fits = |held: &mut Held| {
            // This append may take the log past `keep_whole`: what was kept
            // only for that may go now.
            held.drop_acked(len + n, self.keep_whole);
            held.mem_bytes == 0 || held.mem_bytes + n <= self.budget
        };
        let deadline = tokio::time::Instant::now() + ROOM_WAIT;
        loop {
            // Registered before the check: a release between the check
            // and the wait still wakes us.
            let freed = self.room.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut held = self.held();
                if fits(&mut held) {
                    held.spilling = false;
                    return true;
                }
                if held.spilling || held.abandoned {
                    return false;
                }
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                let mut held = self.held();
                if fits(&mut held) {
                    return true;
                }
                held.spilling = true;
                tracing::debug!(
                    attempt = %self.attempt_id,
                    "the coordinator is not taking the log; spooling it to disk"
                );
                return false;
            }
        }
    }

    /// The coordinator acknowledged every byte below `acked`: memory
    /// holding them may be freed (see [`KEEP_WHOLE`]). The shipper calls
    /// it with every new `acked`, so nothing at or past where it resends
    /// from is ever dropped.
    pub fn release(&self, acked: u64) {
        let len = self.state().len;
        let before = self
            .acked_counted
            .fetch_max(acked, std::sync::atomic::Ordering::AcqRel);
        if acked > before {
            crate::metrics::get()
                .spool_bytes
                .dec_by((acked - before) as i64);
        }
        let freed = {
            let mut held = self.held();
            held.released = held.released.max(acked);
            held.drop_acked(len, self.keep_whole)
        };
        if freed {
            self.room.notify_waiters();
        }
    }

    /// The coordinator will be sent the log again from byte 0 (it lost
    /// bytes it had acknowledged): nothing is released again until new
    /// acknowledgements come.
    pub fn rewind(&self) {
        self.held().released = 0;
    }

    /// The shipper has stopped for good while appends may still come:
    /// they go to the file without waiting for memory nobody will free.
    pub fn abandon(&self) {
        self.held().abandoned = true;
        self.room.notify_waiters();
    }

    /// Every byte at or past this offset can be read; some below it were
    /// released and dropped (0: the whole log can be read).
    pub fn first_held(&self) -> u64 {
        self.held().first_held
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

    /// Reads up to `max` bytes at `offset`: fewer at the end of the log and
    /// where the bytes held in memory and in the file meet. Bytes in memory
    /// come as a slice of what was appended, without a copy. An offset
    /// below [`Spool::first_held`] that was dropped is an error of kind
    /// `NotFound`.
    pub async fn read_at(&self, offset: u64, max: usize) -> Result<Bytes, SpoolError> {
        let available = self.state().len.saturating_sub(offset);
        let n = usize::try_from(available).unwrap_or(usize::MAX).min(max);
        if n == 0 {
            return Ok(Bytes::new());
        }
        let end = {
            let held = self.held();
            if let Some(bytes) = held.read_mem(offset, n) {
                return Ok(bytes);
            }
            held.spilled_at(offset)
        };
        let Some(end) = end else {
            return Err(SpoolError {
                path: self.path.clone(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "byte {offset} of the log was acknowledged by the coordinator and is no \
                         longer held"
                    ),
                ),
            });
        };
        let n = usize::try_from(end - offset).unwrap_or(usize::MAX).min(n);
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
        // Held in memory: the file was made but never written.
        assert_eq!(file_len(&spool), 0);
        spool.remove().await;
        assert!(!dir.path().join("att-1.log").exists());
    }

    fn file_len(spool: &Spool) -> u64 {
        std::fs::metadata(spool.path()).unwrap().len()
    }

    fn data(seed: u8, n: usize) -> Vec<u8> {
        (0..n).map(|i| seed.wrapping_add((i % 251) as u8)).collect()
    }

    /// Appends `data(seed, size)` for each seed, as step `step`; returns
    /// all of it.
    async fn append_each(
        spool: &Spool,
        step: u32,
        seeds: std::ops::Range<u8>,
        size: usize,
    ) -> Vec<u8> {
        let mut produced = Vec::new();
        for seed in seeds {
            let d = data(seed, size);
            spool.append(step, &d).await.unwrap();
            produced.extend_from_slice(&d);
        }
        produced
    }

    async fn read_all(spool: &Spool, from: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = from;
        loop {
            let chunk = spool.read_at(at, 7000).await.unwrap();
            if chunk.is_empty() {
                return out;
            }
            at += chunk.len() as u64;
            out.extend_from_slice(&chunk);
        }
    }

    /// Past its budget, with nothing acknowledged, an append waits
    /// [`ROOM_WAIT`] and then goes to the file; so do the appends after it,
    /// without waiting, until an acknowledgement frees memory. Every byte
    /// reads back in order whichever side holds it.
    #[tokio::test]
    async fn spills_to_the_file_when_nothing_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::create_with_budget(dir.path(), "att-spill", 100_000).unwrap();
        // 90 KB of small appends (the open buffer) and one big one.
        let mut produced = append_each(&spool, 0, 0..9, 10_000).await;
        assert_eq!(file_len(&spool), 0);
        let started = std::time::Instant::now();
        let big = data(50, 80_000);
        spool.append(1, &big).await.unwrap();
        produced.extend_from_slice(&big);
        assert!(
            started.elapsed() >= ROOM_WAIT,
            "spilled after {:?} without waiting for room",
            started.elapsed()
        );
        // Written at its offset in the log; the file is sparse before it.
        assert_eq!(file_len(&spool), 170_000);
        let started = std::time::Instant::now();
        produced.extend(append_each(&spool, 2, 100..105, 30_000).await);
        assert!(
            started.elapsed() < ROOM_WAIT,
            "appends after a spill waited for room again ({:?})",
            started.elapsed()
        );
        assert_eq!(file_len(&spool), 320_000);
        assert_eq!(read_all(&spool, 0).await, produced);
        assert_eq!(spool.step_at(90_000), (1, Some(170_000)));

        // An acknowledgement frees the memory: appends go there again.
        spool.release(90_000);
        let d = data(200, 20_000);
        spool.append(3, &d).await.unwrap();
        produced.extend_from_slice(&d);
        assert_eq!(
            file_len(&spool),
            320_000,
            "appended to the file after a release"
        );
        assert_eq!(read_all(&spool, 90_000).await, produced[90_000..]);
        // The log is past a quarter of the budget: what was acknowledged
        // from memory is gone, and says so.
        assert_eq!(spool.first_held(), 90_000);
        let err = spool.read_at(5, 10).await.unwrap_err();
        assert!(err.source.to_string().contains("no longer held"), "{err:#}");
    }

    #[test]
    fn runner_memory_is_shared_among_its_slots() {
        assert_eq!(budget_for(0), MEMORY_BUDGET);
        assert_eq!(budget_for(1), MEMORY_BUDGET);
        assert_eq!(budget_for(4), MEMORY_BUDGET);
        assert_eq!(budget_for(16), 16 << 20);
        assert_eq!(budget_for(64), MIN_BUDGET);
        assert_eq!(budget_for(1000), MIN_BUDGET);
        for capacity in 1..=64 {
            assert!(budget_for(capacity) * u64::from(capacity) <= RUNNER_MEMORY);
        }
    }

    /// Once the shipper has stopped, nothing frees memory: an append past
    /// the budget goes to the file at once instead of waiting for room.
    #[tokio::test]
    async fn an_abandoned_spool_spills_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::create_with_budget(dir.path(), "att-abandoned", 100_000).unwrap();
        let first = data(1, 90_000);
        spool.append(0, &first).await.unwrap();
        spool.abandon();
        let started = std::time::Instant::now();
        let second = data(2, 50_000);
        spool.append(0, &second).await.unwrap();
        assert!(
            started.elapsed() < ROOM_WAIT,
            "waited {:?}",
            started.elapsed()
        );
        assert_eq!(file_len(&spool), 140_000, "not spilled");
        let mut produced = first;
        produced.extend_from_slice(&second);
        assert_eq!(read_all(&spool, 0).await, produced);
    }

    /// An append waiting for room goes to memory as soon as an
    /// acknowledgement frees enough, without waiting out [`ROOM_WAIT`].
    #[tokio::test]
    async fn a_release_wakes_an_append_waiting_for_room() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::create_with_budget(dir.path(), "att-wake", 100_000).unwrap();
        spool.append(0, &data(1, 70_000)).await.unwrap();
        let waiting = {
            let spool = Arc::clone(&spool);
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                spool.append(0, &data(2, 70_000)).await.unwrap();
                started.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "appended past the budget at once");
        spool.release(70_000);
        let waited = waiting.await.unwrap();
        assert!(waited < ROOM_WAIT, "waited {waited:?}");
        assert_eq!(file_len(&spool), 0, "spilled although room was made");
        assert_eq!(read_all(&spool, 70_000).await, data(2, 70_000));
    }

    /// A log no longer than a quarter of the budget stays whole after it
    /// was acknowledged, so it can be sent again from byte 0.
    #[tokio::test]
    async fn keeps_a_short_log_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::create_with_budget(dir.path(), "att-short", 400_000).unwrap();
        let produced = append_each(&spool, 0, 0..10, 10_000).await;
        spool.release(100_000);
        assert_eq!(spool.first_held(), 0);
        assert_eq!(read_all(&spool, 0).await, produced);
        // Once it grows past that, the acknowledged part is dropped.
        let d = data(77, 100_000);
        spool.append(0, &d).await.unwrap();
        spool.release(150_000);
        assert_eq!(spool.first_held(), 100_000);
        assert_eq!(read_all(&spool, 100_000).await, d);
    }
}
