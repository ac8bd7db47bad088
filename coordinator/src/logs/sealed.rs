//! Sealed logs: an ended attempt's log, compressed at rest as independent
//! zstd frames of [`FRAME`] raw bytes with an index at the end, so a read
//! from any offset decompresses only the frames it covers (a follower or a
//! dashboard page reads a 100 MB log a frame at a time).
//!
//! `<attempt>.logz`: frame 0, frame 1, ..., then the index (for each frame
//! its raw length, stored length and the CRC-32 of its raw bytes, u32
//! little-endian each), then the
//! trailer: the frame count (u32), the raw length (u64), the CRC-32 of the
//! index (u32) and the magic `CLZ1`. A log is sealed into `.logz.tmp`,
//! fsynced and renamed over, so a crash at any point leaves the plain log
//! or the whole sealed one: a torn frame is never read.
//!
//! Pure file functions; `local` decides when (see `LogStore::seal`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Raw bytes per frame: big enough for zstd to find the repetition of log
/// lines, small enough that reading a line costs a frame, not the log.
pub(crate) const FRAME: usize = 256 * 1024;
/// zstd's default level: ~5x on build logs at hundreds of MB/s.
const LEVEL: i32 = 3;
const MAGIC: &[u8; 4] = b"CLZ1";
const TRAILER: u64 = 4 + 8 + 4 + 4;

/// An open sealed log and its index.
#[derive(Debug)]
pub(crate) struct Sealed {
    file: File,
    /// For each frame: where its raw bytes start in the log, where its
    /// stored bytes start in the file, and both lengths.
    frames: Vec<Frame>,
    len: u64,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    raw_at: u64,
    file_at: u64,
    raw_len: u32,
    stored_len: u32,
    crc: u32,
}

/// Bytes of one index entry.
const ENTRY: usize = 12;

/// Bytes in and out of one seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SealStats {
    pub(crate) raw: u64,
    pub(crate) stored: u64,
}

fn damaged(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the sealed log {} is damaged: {why}", path.display()),
    )
}

/// Compresses the first `len` bytes of `plain` into `dest` (through
/// `dest.tmp`, fsynced, renamed, the directory fsynced).
pub(crate) fn seal(plain: &File, len: u64, dest: &Path, mode: u32) -> io::Result<SealStats> {
    let tmp = dest.with_extension("logz.tmp");
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    let mut index = Vec::new();
    let mut buf = vec![0u8; FRAME];
    let (mut at, mut stored) = (0u64, 0u64);
    while at < len {
        let n = FRAME.min((len - at) as usize);
        plain.read_exact_at(&mut buf[..n], at)?;
        let frame = zstd::bulk::compress(&buf[..n], LEVEL)?;
        out.write_all(&frame)?;
        index.extend_from_slice(&(n as u32).to_le_bytes());
        index.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        index.extend_from_slice(&crc32fast::hash(&buf[..n]).to_le_bytes());
        at += n as u64;
        stored += frame.len() as u64;
    }
    let count = (index.len() / ENTRY) as u32;
    let mut trailer = Vec::with_capacity(TRAILER as usize);
    trailer.extend_from_slice(&count.to_le_bytes());
    trailer.extend_from_slice(&len.to_le_bytes());
    trailer.extend_from_slice(&crc32fast::hash(&index).to_le_bytes());
    trailer.extend_from_slice(MAGIC);
    out.write_all(&index)?;
    out.write_all(&trailer)?;
    out.sync_all()?;
    drop(out);
    std::fs::rename(&tmp, dest)?;
    if let Some(dir) = dest.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(SealStats {
        raw: len,
        stored: stored + index.len() as u64 + TRAILER,
    })
}

impl Sealed {
    /// Opens the sealed log at `path`; `None` if there is none.
    pub(crate) fn open(path: &Path) -> io::Result<Option<Sealed>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let size = file.metadata()?.len();
        if size < TRAILER {
            return Err(damaged(path, "shorter than its trailer"));
        }
        let mut trailer = [0u8; TRAILER as usize];
        file.read_exact_at(&mut trailer, size - TRAILER)?;
        if &trailer[16..20] != MAGIC {
            return Err(damaged(path, "no trailer"));
        }
        let word =
            |at: usize| u32::from_le_bytes(trailer[at..at + 4].try_into().unwrap_or_default());
        let count = u64::from(word(0));
        let len = u64::from_le_bytes(trailer[4..12].try_into().unwrap_or_default());
        let index_len = count * ENTRY as u64;
        if index_len + TRAILER > size {
            return Err(damaged(path, "its index is longer than the file"));
        }
        let mut index = vec![0u8; index_len as usize];
        file.read_exact_at(&mut index, size - TRAILER - index_len)?;
        if crc32fast::hash(&index) != word(12) {
            return Err(damaged(path, "its index fails its checksum"));
        }
        let mut frames = Vec::with_capacity(count as usize);
        let (mut raw_at, mut file_at) = (0u64, 0u64);
        for entry in index.chunks_exact(ENTRY) {
            let field =
                |at: usize| u32::from_le_bytes(entry[at..at + 4].try_into().unwrap_or_default());
            let (raw_len, stored_len) = (field(0), field(4));
            frames.push(Frame {
                raw_at,
                file_at,
                raw_len,
                stored_len,
                crc: field(8),
            });
            raw_at += u64::from(raw_len);
            file_at += u64::from(stored_len);
        }
        if raw_at != len || file_at + index_len + TRAILER != size {
            return Err(damaged(path, "its index does not add up"));
        }
        Ok(Some(Sealed { file, frames, len }))
    }

    /// The raw length of the log.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Up to `max` raw bytes from `offset` (empty at or past the end).
    pub(crate) fn read(&self, offset: u64, max: usize, path: &Path) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        if offset >= self.len || max == 0 {
            return Ok(out);
        }
        let mut i = self.frames.partition_point(|f| f.raw_at <= offset) - 1;
        let mut at = offset;
        while out.len() < max && i < self.frames.len() {
            let f = self.frames[i];
            let mut stored = vec![0u8; f.stored_len as usize];
            self.file.read_exact_at(&mut stored, f.file_at)?;
            let raw = zstd::bulk::decompress(&stored, f.raw_len as usize)
                .map_err(|e| damaged(path, &format!("frame {i}: {e}")))?;
            if raw.len() != f.raw_len as usize || crc32fast::hash(&raw) != f.crc {
                return Err(damaged(path, &format!("frame {i} fails its checksum")));
            }
            let from = (at - f.raw_at) as usize;
            let take = (raw.len() - from).min(max - out.len());
            out.extend_from_slice(&raw[from..from + take]);
            at += take as u64;
            i += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(lines: usize) -> Vec<u8> {
        (1..=lines)
            .flat_map(|i| format!("{i:08} a line of a build log\n").into_bytes())
            .collect()
    }

    fn sealed_copy(data: &[u8], dir: &Path) -> (Sealed, SealStats, std::path::PathBuf) {
        let plain = dir.join("a.log");
        std::fs::write(&plain, data).unwrap();
        let dest = dir.join("a.logz");
        let stats = seal(
            &File::open(&plain).unwrap(),
            data.len() as u64,
            &dest,
            0o600,
        )
        .unwrap();
        (Sealed::open(&dest).unwrap().unwrap(), stats, dest)
    }

    #[test]
    fn reads_from_any_offset_are_byte_exact() {
        let dir = tempfile::tempdir().unwrap();
        let data = numbered(40_000); // ~1.2 MB: several frames
        let (log, stats, dest) = sealed_copy(&data, dir.path());
        assert_eq!(log.len(), data.len() as u64);
        assert!(stats.stored * 4 < stats.raw, "{stats:?}");
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), stats.stored);
        for offset in [0, 1, FRAME - 1, FRAME, FRAME + 7, data.len() - 3] {
            for max in [1, 100, FRAME, 3 * FRAME] {
                let got = log.read(offset as u64, max, &dest).unwrap();
                let end = (offset + max).min(data.len());
                assert_eq!(got, &data[offset..end], "offset {offset} max {max}");
            }
        }
        assert!(log.read(data.len() as u64, 10, &dest).unwrap().is_empty());
        assert!(!dir.path().join("a.logz.tmp").exists());
    }

    #[test]
    fn an_empty_log_seals_too() {
        let dir = tempfile::tempdir().unwrap();
        let (log, stats, dest) = sealed_copy(b"", dir.path());
        assert_eq!((log.len(), stats.raw), (0, 0));
        assert!(log.read(0, 10, &dest).unwrap().is_empty());
    }

    #[test]
    fn damage_is_reported_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let data = numbered(20_000);
        let (_, _, dest) = sealed_copy(&data, dir.path());
        let bytes = std::fs::read(&dest).unwrap();
        // Cut short (a copy that stopped midway).
        std::fs::write(&dest, &bytes[..bytes.len() / 2]).unwrap();
        let err = Sealed::open(&dest).unwrap_err();
        assert!(err.to_string().contains("is damaged"), "{err}");
        // A frame's bytes flipped: the index is fine, the frame is not.
        let mut flipped = bytes.clone();
        for b in &mut flipped[10..40] {
            *b ^= 0x5a;
        }
        std::fs::write(&dest, &flipped).unwrap();
        let log = Sealed::open(&dest).unwrap().unwrap();
        let err = log.read(0, 100, &dest).unwrap_err();
        assert!(err.to_string().contains("frame 0"), "{err}");
        // No file: nothing sealed.
        assert!(
            Sealed::open(&dir.path().join("none.logz"))
                .unwrap()
                .is_none()
        );
    }
}
