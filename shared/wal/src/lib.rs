//! The coordinator's write-ahead log: one preallocated file next to the
//! redb database, holding the batches committed since redb's last durable
//! commit; and [`Op`], the store's unit of change that the batches are made
//! of.
//!
//! A crate of its own (std and crc32fast only) so the fuzz target of the
//! record decoder (`fuzz/`, docs/decisions.md "Fuzzing") builds without the
//! coordinator's dependencies; the coordinator's `store` re-exports [`Op`].
//!
//! Why: a durable redb commit writes several scattered pages (the changed
//! B-tree path, the allocator state, the header) before its fsync; one
//! record appended here and `fdatasync`ed is one or two contiguous pages of
//! a file whose blocks are already allocated, so the fsync carries no
//! metadata: a commit about twice as fast (measured: docs/decisions.md).
//!
//! # Format
//! The file is zero-filled to its capacity when created, so that a record
//! overwrites allocated, written blocks. Records follow each other from
//! offset 0:
//!
//! ```text
//! magic u32 | payload length u32 | log id u64 | generation u64 | sequence u64 | crc32 u32 | payload
//! ```
//!
//! little-endian, the CRC over everything after the magic but itself. The
//! log id is a random number the database keeps from its creation: a log
//! left beside a database that was deleted and made again is not the new
//! one's, even where its generations and sequences would line up. The
//! payload is the batch's ops, each `tag u8` (0 put, 1 delete), `key length
//! u32`, the key, and for a put `value length u32` and the value.
//!
//! # Generations
//! A *generation* is the span between two durable redb commits; the
//! database holds the current one durably (see `RedbStore`). Each
//! generation's records start at offset 0 with sequence 0. Reading stops at
//! the first record that is torn, of another generation (a leftover of an
//! earlier one, further into the file) or out of sequence: everything
//! before it is the current generation's, in commit order. Replaying them
//! onto the database is correct whatever of them it already holds, because
//! each op sets or removes a whole key: replaying a prefix of a sequence
//! that was already applied leaves every key as the last op on it set it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const MAGIC: u32 = u32::from_le_bytes(*b"CWAL");
const HEADER: usize = 4 + 4 + 8 + 8 + 8 + 4;
/// Where the CRC field starts.
const CRC: usize = HEADER - 4;
const PUT: u8 = 0;
const DELETE: u8 = 1;

/// One change in a batch of the store (`Store::apply` in the coordinator).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// The record codec, public for the fuzz targets only.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use super::Op;

    /// See `read_record`: the record at the start of `bytes`, if whole and
    /// of that log, generation and sequence, and its length.
    pub fn read_record(
        bytes: &[u8],
        id: u64,
        generation: u64,
        sequence: u64,
    ) -> Option<(Vec<Op>, usize)> {
        super::read_record(bytes, id, generation, sequence)
    }

    /// See `encode`: the record of `ops`.
    pub fn encode(id: u64, generation: u64, sequence: u64, ops: &[Op]) -> Option<Vec<u8>> {
        super::encode(id, generation, sequence, ops)
    }
}

/// The log file, positioned after the current generation's last record.
#[derive(Debug)]
pub struct Wal {
    file: File,
    path: PathBuf,
    capacity: u64,
    id: u64,
    generation: u64,
    offset: u64,
    sequence: u64,
}

impl Wal {
    /// Opens the log at `path`, creating it zero-filled to `capacity` bytes
    /// if it is missing or shorter, and returns it with the ops of the
    /// records of log `id` and `generation`, in order. The returned log is positioned
    /// after them; call [`Wal::restart`] after a durable commit.
    pub fn open(
        path: &Path,
        capacity: u64,
        id: u64,
        generation: u64,
    ) -> io::Result<(Self, Vec<Vec<Op>>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            // Only the coordinator reads it: it holds every state write.
            .mode(0o600)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        if len < capacity {
            // Write the zeros rather than `fallocate`: a fallocated block is
            // "unwritten", and the first write to it changes the extent
            // tree, which every later `fdatasync` would have to journal.
            let zeros = vec![0u8; (capacity - len) as usize];
            file.write_all_at(&zeros, len)?;
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        let capacity = capacity.max(len);
        let mut bytes = vec![0u8; capacity as usize];
        file.read_exact_at(&mut bytes, 0)?;
        let mut batches = Vec::new();
        let mut offset = 0usize;
        while let Some((ops, len)) =
            read_record(&bytes[offset..], id, generation, batches.len() as u64)
        {
            batches.push(ops);
            offset += len;
        }
        let wal = Self {
            file,
            path: path.to_path_buf(),
            capacity,
            id,
            generation,
            offset: offset as u64,
            sequence: batches.len() as u64,
        };
        Ok((wal, batches))
    }

    /// A log on `file` as it is, at its start (for tests of a store whose
    /// log writes fail: `/dev/full`).
    pub fn on_file(file: File, path: &Path, id: u64, generation: u64) -> Self {
        Self {
            file,
            path: path.to_path_buf(),
            capacity: 1 << 20,
            id,
            generation,
            offset: 0,
            sequence: 0,
        }
    }

    /// The file this log is in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The generation the next record belongs to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// `ops` as the next record, or `None` when it does not fit in what is
    /// left of the file: the caller then commits durably instead.
    pub fn record(&self, ops: &[Op]) -> Option<Vec<u8>> {
        let record = encode(self.id, self.generation, self.sequence, ops)?;
        (self.offset + record.len() as u64 <= self.capacity).then_some(record)
    }

    /// Writes `record` (from [`Wal::record`]) after the last one and waits
    /// until it is on disk. On `Err` the record may or may not be on disk,
    /// and the log must not be appended to again.
    pub fn append(&mut self, record: &[u8]) -> io::Result<()> {
        self.file.write_all_at(record, self.offset)?;
        self.file.sync_data()?;
        self.offset += record.len() as u64;
        self.sequence += 1;
        Ok(())
    }

    /// Starts `generation` at the beginning of the file, once the database
    /// durably holds everything logged so far and `generation` as the
    /// current one. What the file still holds is an earlier generation's.
    pub fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.offset = 0;
        self.sequence = 0;
    }
}

/// The record, or `None` if its payload would not fit its length field.
fn encode(id: u64, generation: u64, sequence: u64, ops: &[Op]) -> Option<Vec<u8>> {
    let size: usize = ops
        .iter()
        .map(|op| match op {
            Op::Put { key, value } => 9 + key.len() + value.len(),
            Op::Delete { key } => 5 + key.len(),
        })
        .sum();
    let len = u32::try_from(size).ok()?;
    let mut out = Vec::with_capacity(HEADER + size);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&sequence.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    for op in ops {
        match op {
            Op::Put { key, value } => {
                out.push(PUT);
                put_bytes(&mut out, key.as_bytes());
                put_bytes(&mut out, value);
            }
            Op::Delete { key } => {
                out.push(DELETE);
                put_bytes(&mut out, key.as_bytes());
            }
        }
    }
    let crc = checksum(&out);
    out[CRC..HEADER].copy_from_slice(&crc.to_le_bytes());
    Some(out)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The CRC of a record: its header after the magic, without the CRC field,
/// then its payload.
fn checksum(record: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&record[4..CRC]);
    hasher.update(&record[HEADER..]);
    hasher.finalize()
}

/// The record at the start of `bytes` if it is whole, of log `id` and
/// `generation`, and number `sequence`: its ops and its length.
fn read_record(bytes: &[u8], id: u64, generation: u64, sequence: u64) -> Option<(Vec<Op>, usize)> {
    let header = bytes.get(..HEADER)?;
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
    if u32_at(0) != MAGIC || u64_at(8) != id || u64_at(16) != generation || u64_at(24) != sequence {
        return None;
    }
    let len = HEADER.checked_add(u32_at(4) as usize)?;
    let record = bytes.get(..len)?;
    if checksum(record) != u32_at(CRC) {
        return None;
    }
    Some((decode(&record[HEADER..])?, len))
}

fn decode(mut payload: &[u8]) -> Option<Vec<Op>> {
    fn take<'a>(payload: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = payload.split_at_checked(n)?;
        *payload = rest;
        Some(head)
    }
    fn take_bytes<'a>(payload: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(take(payload, 4)?.try_into().ok()?);
        take(payload, len as usize)
    }
    let mut ops = Vec::new();
    while let Some(tag) = take(&mut payload, 1) {
        let key = String::from_utf8(take_bytes(&mut payload)?.to_vec()).ok()?;
        ops.push(match tag[0] {
            PUT => Op::Put {
                key,
                value: take_bytes(&mut payload)?.to_vec(),
            },
            DELETE => Op::Delete { key },
            _ => return None,
        });
    }
    Some(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Op {
        Op::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
        }
    }

    fn delete(key: &str) -> Op {
        Op::Delete { key: key.into() }
    }

    fn batches() -> Vec<Vec<Op>> {
        vec![
            vec![put("runs/1", "one"), put("runners/a", "")],
            vec![delete("runs/1")],
            vec![put("runs/2", &"x".repeat(5000)), delete("runs/3")],
        ]
    }

    const ID: u64 = 0x5eed;

    fn reopen(path: &Path, generation: u64) -> (Wal, Vec<Vec<Op>>) {
        Wal::open(path, 64 * 1024, ID, generation).unwrap()
    }

    #[test]
    fn records_come_back_in_order_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, found) = reopen(&path, 7);
        assert!(found.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * 1024);
        for batch in batches() {
            let record = wal.record(&batch).unwrap();
            wal.append(&record).unwrap();
        }
        drop(wal);
        let (wal, found) = reopen(&path, 7);
        assert_eq!(found, batches());
        // The next record goes after them, as number 3.
        assert_eq!(wal.sequence, 3);
        assert_eq!(wal.offset as usize, {
            let b = batches();
            b.iter()
                .map(|ops| encode(ID, 7, 0, ops).unwrap().len())
                .sum::<usize>()
        });
    }

    #[test]
    fn reading_stops_at_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = reopen(&path, 1);
        let mut ends = Vec::new();
        for batch in batches() {
            let record = wal.record(&batch).unwrap();
            wal.append(&record).unwrap();
            ends.push(wal.offset);
        }
        drop(wal);
        // Damage the last record's payload, as a write cut short would.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"\0\0\0", ends[2] - 10).unwrap();
        let (wal, found) = reopen(&path, 1);
        assert_eq!(found, batches()[..2]);
        assert_eq!(wal.offset, ends[1]);
    }

    #[test]
    fn an_earlier_generation_is_not_read_past_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = reopen(&path, 1);
        for batch in batches() {
            let record = wal.record(&batch).unwrap();
            wal.append(&record).unwrap();
        }
        // Generation 2 overwrites the start of the file with one record;
        // generation 1's later records are still there behind it.
        wal.restart(2);
        let record = wal.record(&[delete("runs/2")]).unwrap();
        wal.append(&record).unwrap();
        drop(wal);
        let (_, found) = reopen(&path, 2);
        assert_eq!(found, vec![vec![delete("runs/2")]]);
        // Generation 1 is gone: its first record was overwritten.
        let (_, found) = reopen(&path, 1);
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn a_record_that_does_not_fit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path, 8 * 1024, ID, 1).unwrap();
        let big = vec![put("k", &"v".repeat(5000))];
        let record = wal.record(&big).unwrap();
        wal.append(&record).unwrap();
        assert!(wal.record(&big).is_none());
        assert!(wal.record(&[delete("k")]).is_some());
        wal.restart(2);
        assert!(wal.record(&big).is_some());
    }

    #[test]
    fn garbage_is_no_record() {
        for bytes in [
            vec![0u8; 100],
            vec![0xff; 100],
            b"CWAL\xff\xff\xff\xff".repeat(10),
        ] {
            assert!(read_record(&bytes, 0, 0, 0).is_none(), "{bytes:?}");
        }
        // A whole record with a wrong tag in its payload.
        let mut record = encode(0, 0, 0, &[delete("k")]).unwrap();
        record[HEADER] = 9;
        let crc = checksum(&record);
        record[CRC..HEADER].copy_from_slice(&crc.to_le_bytes());
        assert!(read_record(&record, 0, 0, 0).is_none());
        // A good record of another log.
        let record = encode(1, 0, 0, &[delete("k")]).unwrap();
        assert!(read_record(&record, 1, 0, 0).is_some());
        assert!(read_record(&record, 2, 0, 0).is_none());
    }
}
