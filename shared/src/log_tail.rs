//! [`LogTail`]: the last bytes appended to a log, kept in memory.
//!
//! Both ends of the log path append to a file (the runner's spool, the
//! coordinator's log) and then read the same bytes back right away to send
//! them on (the shipper, the followers). Reading them back cost a blocking
//! pool hop, a zeroed buffer and a copy out of the page cache per chunk. The
//! tail keeps the buffers that were appended (`Bytes`, shared, not copied),
//! so a read of recent bytes is a slice of them; anything older than the
//! tail is read from the file as before. The file stays the record: the tail
//! only ever holds a copy of bytes already written to it.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;

/// The last appended bytes of one log, as the buffers they were appended in.
///
/// Holds at most `cap` bytes plus the newest part (a part larger than `cap`
/// is kept whole until the next append). It covers `start..end` of the log;
/// a fresh or [`LogTail::clear`]ed tail covers nothing and is not known to
/// end where the log ends, so [`LogTail::read`] answers `None` for every
/// offset until the next [`LogTail::push`].
#[derive(Debug)]
pub struct LogTail {
    /// (offset in the log, bytes) of each part, oldest first, consecutive.
    parts: VecDeque<(u64, Bytes)>,
    /// Where the tail ends; `None` while it is not known (fresh or cleared).
    end: Option<u64>,
    /// Bytes held in `parts`.
    held: usize,
    cap: usize,
}

impl LogTail {
    /// An empty tail holding up to `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            parts: VecDeque::new(),
            end: None,
            held: 0,
            cap,
        }
    }

    /// Bytes held.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Where the tail (and so the log) ends, if known.
    pub fn end(&self) -> Option<u64> {
        self.end
    }

    /// Drops everything: the tail covers nothing until the next push. Call it
    /// whenever the log may have changed without a push (a failed write may
    /// have stored part of its data; the log was deleted).
    pub fn clear(&mut self) {
        self.parts.clear();
        self.end = None;
        self.held = 0;
    }

    /// Records that `data` was appended at `at`, the log's end before the
    /// append. If `at` is not where the tail ended (a fresh or cleared tail),
    /// the tail restarts at `at`. Returns the bytes dropped from the front to
    /// stay within the cap.
    pub fn push(&mut self, at: u64, data: Bytes) -> usize {
        if self.end != Some(at) {
            self.clear();
        }
        self.end = Some(at + data.len() as u64);
        if !data.is_empty() {
            self.held += data.len();
            self.parts.push_back((at, data));
        }
        let mut dropped = 0;
        while self.held > self.cap && self.parts.len() > 1 {
            dropped += self.drop_oldest();
        }
        dropped
    }

    /// Drops the oldest part; returns its length (0 if there was none).
    pub fn drop_oldest(&mut self) -> usize {
        let Some((_, part)) = self.parts.pop_front() else {
            return 0;
        };
        self.held -= part.len();
        part.len()
    }

    /// Up to `max` bytes at `offset`, if the tail can answer: `None` when
    /// `offset` is before the tail (read the file) or the tail's end is not
    /// known. At or past the end it answers an empty `Bytes`.
    ///
    /// With `whole`, the answer is `min(max, end - offset)` bytes, copied
    /// into one buffer if they span parts. Without it, a span that starts
    /// with at least `min(max, MIN_PIECE)` bytes in one part is answered
    /// with those bytes alone, a slice of that part with no copy (a caller
    /// that sends chunks of any size prefers that).
    pub fn read(&self, offset: u64, max: usize, whole: bool) -> Option<Bytes> {
        let end = self.end?;
        if offset >= end || max == 0 {
            return Some(Bytes::new());
        }
        let start = self.parts.front().map_or(end, |&(at, _)| at);
        if offset < start {
            return None;
        }
        let want = usize::try_from(end - offset).unwrap_or(usize::MAX).min(max);
        // The part holding `offset`: the last one starting at or before it.
        let i = self.parts.partition_point(|&(at, _)| at <= offset) - 1;
        let (at, part) = &self.parts[i];
        let skip = (offset - at) as usize;
        let first = part.len() - skip;
        if first >= want || (!whole && first >= want.min(MIN_PIECE)) {
            return Some(part.slice(skip..skip + first.min(want)));
        }
        let mut out = BytesMut::with_capacity(want);
        for (k, (_, part)) in self.parts.range(i..).enumerate() {
            let from = if k == 0 { skip } else { 0 };
            let n = (part.len() - from).min(want - out.len());
            out.extend_from_slice(&part[from..from + n]);
            if out.len() == want {
                break;
            }
        }
        Some(out.freeze())
    }
}

/// Below this, a read without `whole` gathers more parts (with a copy)
/// rather than answering a small piece: many small messages cost more than
/// copying them into one.
pub const MIN_PIECE: usize = 64 * 1024;

/// `Bytes` of a buffer to keep in a tail: the buffer itself, or a copy of
/// its bytes when it holds much more memory than bytes (a reader's 1 MiB
/// buffer that got a few bytes would hold its whole capacity in the tail).
pub fn shrink_to_bytes(data: Vec<u8>) -> Bytes {
    if data.capacity() / 2 > data.len() {
        Bytes::copy_from_slice(&data)
    } else {
        Bytes::from(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(parts: &[&[u8]], cap: usize) -> LogTail {
        let mut tail = LogTail::new(cap);
        let mut at = 100;
        for p in parts {
            tail.push(at, Bytes::copy_from_slice(p));
            at += p.len() as u64;
        }
        tail
    }

    #[test]
    fn reads_within_across_and_outside() {
        let tail = tail_of(&[b"abc", b"defg", b"hi"], 100);
        assert_eq!(tail.end(), Some(109));
        assert_eq!(tail.held(), 9);
        let read = |o, m, w| tail.read(o, m, w).map(|b| b.to_vec());
        assert_eq!(read(100, 100, true).unwrap(), b"abcdefghi");
        assert_eq!(read(101, 5, true).unwrap(), b"bcdef");
        assert_eq!(read(103, 4, true).unwrap(), b"defg");
        assert_eq!(read(104, 2, false).unwrap(), b"ef");
        assert_eq!(read(108, 10, true).unwrap(), b"i");
        assert_eq!(read(109, 10, true).unwrap(), b"");
        assert_eq!(read(500, 10, true).unwrap(), b"");
        assert_eq!(read(101, 0, true).unwrap(), b"");
        // Small pieces are gathered even without `whole`.
        assert_eq!(read(101, 100, false).unwrap(), b"bcdefghi");
        // Before the tail: the file must answer.
        assert_eq!(read(99, 10, true), None);
        assert_eq!(read(0, 10, false), None);
    }

    #[test]
    fn a_big_first_piece_is_a_slice_without_whole() {
        let big = vec![7u8; MIN_PIECE + 10];
        let mut tail = LogTail::new(usize::MAX);
        tail.push(0, Bytes::from(big.clone()));
        tail.push(big.len() as u64, Bytes::from_static(b"next"));
        let piece = tail.read(5, usize::MAX, false).unwrap();
        assert_eq!(piece.len(), big.len() - 5);
        let whole = tail.read(5, usize::MAX, true).unwrap();
        assert_eq!(whole.len(), big.len() - 5 + 4);
        assert_eq!(&whole[whole.len() - 4..], b"next");
    }

    #[test]
    fn keeps_within_the_cap_from_the_front() {
        let mut tail = LogTail::new(5);
        assert_eq!(tail.push(0, Bytes::from_static(b"abc")), 0);
        assert_eq!(tail.push(3, Bytes::from_static(b"de")), 0);
        assert_eq!(tail.push(5, Bytes::from_static(b"f")), 3);
        assert_eq!(tail.held(), 3);
        assert_eq!(tail.read(2, 10, true), None);
        assert_eq!(tail.read(3, 10, true).unwrap(), &b"def"[..]);
        // One part larger than the cap stays until the next push.
        assert_eq!(tail.push(6, Bytes::from_static(b"0123456789")), 3);
        assert_eq!(tail.read(6, 100, true).unwrap(), &b"0123456789"[..]);
    }

    #[test]
    fn unknown_end_answers_nothing_and_a_jump_restarts() {
        let mut tail = LogTail::new(100);
        assert_eq!(tail.read(0, 10, true), None);
        tail.push(10, Bytes::from_static(b"xy"));
        assert_eq!(tail.read(10, 10, true).unwrap(), &b"xy"[..]);
        assert_eq!(tail.read(9, 10, true), None);
        tail.clear();
        assert_eq!(tail.read(10, 10, true), None);
        assert_eq!(tail.read(12, 10, true), None);
        tail.push(12, Bytes::from_static(b"z"));
        // Not consecutive with what it held: starts over at 20.
        tail.push(20, Bytes::from_static(b"w"));
        assert_eq!(tail.held(), 1);
        assert_eq!(tail.read(12, 10, true), None);
        assert_eq!(tail.read(20, 10, true).unwrap(), &b"w"[..]);
        // An empty push only moves the known end.
        tail.push(21, Bytes::new());
        assert_eq!(tail.end(), Some(21));
    }

    #[test]
    fn shrinks_mostly_empty_buffers() {
        let mut v = Vec::with_capacity(1024);
        v.extend_from_slice(b"abc");
        assert_eq!(shrink_to_bytes(v), &b"abc"[..]);
        let full = vec![1u8; 1000];
        assert_eq!(shrink_to_bytes(full).len(), 1000);
    }
}
