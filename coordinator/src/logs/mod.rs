//! Task logs on the coordinator side.
//!
//! A runner streams each attempt's output as chunks, each tagged with the
//! byte offset at which it starts in the attempt's log. After a reconnect it
//! resends from the last offset the coordinator acknowledged, so chunks may
//! arrive twice, overlap what is stored, or (from two streams of the same
//! runner racing) arrive concurrently. A [`LogStore`] turns that into exactly
//! one copy of every byte, in order.
//!
//! Implementations: [`local::LocalLogStore`] (one file per attempt in a
//! directory; standalone default) and [`memory::MemoryLogStore`] (tests). All
//! of them pass the suite in [`conformance`].
//!
//! # Contract
//! - A log is a byte sequence per attempt; it only ever grows by appends.
//!   What is stored is always a prefix of what the runner produced.
//! - [`LogStore::append`] of `data` at `offset`, with the log `len` bytes long:
//!   - `offset > len`: [`LogError::Gap`], nothing is written;
//!   - otherwise the bytes of `data` past `len` (if any) are appended, the
//!     ones before are taken as already stored and skipped (they are not
//!     compared); the new length is returned.
//! - Appends to one attempt are serialized: concurrent appends of the same
//!   ranges store each byte once.
//! - [`LogStore::len`] and [`LogStore::read`] see every append that returned
//!   before they were called. An attempt never written has length 0 and
//!   reads as empty; neither call creates it.
//! - [`LogStore::sync`] makes everything appended so far survive a crash;
//!   an append alone may be lost by a crash (from its end: what survives is
//!   still a prefix).
//! - Attempt ids must be non-empty and made of `[A-Za-z0-9_-]` (at most
//!   [`MAX_ID_LEN`] bytes); any other id is [`LogError::BadId`] for every
//!   call.

// Test code, only this crate's tests use them (unlike the store's, which
// the `testing` feature exports).
#[cfg(test)]
pub(crate) mod conformance;
pub(crate) mod feed;
pub(crate) mod local;
#[cfg(test)]
pub(crate) mod memory;
pub(crate) mod sealed;
pub(crate) mod usage;

use async_trait::async_trait;
use capstan_proto::ids::AttemptId;

/// The longest attempt id a log store accepts (ids are about 36 bytes).
pub(crate) const MAX_ID_LEN: usize = 128;

/// Errors from a log store.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LogError {
    /// Reading or writing the log of `attempt` failed.
    #[error("log of attempt {attempt}: {source}")]
    Io {
        attempt: AttemptId,
        #[source]
        source: std::io::Error,
    },
    /// The data starts at `got`, past the `expected` end of the stored log;
    /// nothing was written. The sender should resend from `expected`.
    #[error(
        "log of attempt {attempt}: data starts at byte {got} but the log holds only {expected} \
         bytes; resend from byte {expected}"
    )]
    Gap {
        attempt: AttemptId,
        expected: u64,
        got: u64,
    },
    /// The attempt id cannot name a log (see the module docs).
    #[error(
        "invalid attempt id {0:?} for a log: it must be 1 to 128 characters of A-Z, a-z, 0-9, \
         '_' and '-'"
    )]
    BadId(String),
    /// The attempt's log was sealed ([`LogStore::seal`]): no byte it does
    /// not already hold is stored.
    #[error(
        "log of attempt {attempt}: the attempt has ended and its log is sealed; nothing more is stored"
    )]
    Sealed { attempt: AttemptId },
    /// The log store itself could not be opened.
    #[error("cannot open the log store at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the coordinator keeps attempt logs; see the module docs for the
/// contract.
#[async_trait]
pub(crate) trait LogStore: Send + Sync + 'static {
    /// Append `data`, which starts at byte `offset` of the attempt's log.
    /// Bytes the store already holds are skipped (exactly-once under resends:
    /// offset < len writes only the part past len); offset > len is
    /// [`LogError::Gap`] and writes nothing. Returns the log's new length.
    /// Creates the log on first write.
    async fn append(&self, attempt: &AttemptId, offset: u64, data: &[u8]) -> Result<u64, LogError>;
    /// [`LogStore::append`] of the concatenation of `parts` (which start at
    /// `offset` and follow each other), as one call: a runner's stream
    /// arrives in chunks, and one store call per chunk was most of the
    /// cost of a big log. A gap in the middle cannot happen (the parts are
    /// consecutive); a failed call may have stored a prefix of them.
    async fn append_parts(
        &self,
        attempt: &AttemptId,
        offset: u64,
        parts: Vec<bytes::Bytes>,
    ) -> Result<u64, LogError> {
        let mut at = offset;
        let mut len = self.append(attempt, offset, &[]).await?;
        for part in parts {
            len = self.append(attempt, at, &part).await?;
            at += part.len() as u64;
        }
        Ok(len)
    }
    /// Current length (0 for a log never written).
    async fn len(&self, attempt: &AttemptId) -> Result<u64, LogError>;
    /// Up to `max` bytes starting at `offset` (empty at or past the end).
    async fn read(
        &self,
        attempt: &AttemptId,
        offset: u64,
        max: usize,
    ) -> Result<bytes::Bytes, LogError>;
    /// Make everything appended so far durable (fsync).
    async fn sync(&self, attempt: &AttemptId) -> Result<(), LogError>;
    /// Removes the attempt's log (retention). Deleting a log that does not
    /// exist is not an error; afterwards the log reads as never written.
    async fn delete(&self, attempt: &AttemptId) -> Result<(), LogError>;
    /// Every attempt that has a log (in no particular order), for the sweep
    /// of orphan logs (see `Scheduler::sweep_orphan_logs`).
    async fn list(&self) -> Result<Vec<AttemptId>, LogError>;
    /// Stores an ended attempt's log compactly (`local`: zstd frames, see
    /// `sealed`). Afterwards `len` and `read` answer exactly as before; an
    /// append of bytes the log does not hold is [`LogError::Sealed`] (a
    /// resend of ones it holds still succeeds); `delete` removes it. `None`:
    /// nothing was sealed (no log, sealed already, or a store that keeps
    /// logs as they are). Called once the run has ended, when no runner
    /// may append any more.
    async fn seal(&self, attempt: &AttemptId) -> Result<Option<sealed::SealStats>, LogError> {
        let _ = attempt;
        Ok(None)
    }
}

/// Checks that `attempt` may name a log: `Err(BadId)` otherwise.
pub(crate) fn check_id(attempt: &AttemptId) -> Result<(), LogError> {
    let id = attempt.as_str();
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LogError::BadId(id.to_string()))
    }
}

/// What an append at `offset` of `data_len` bytes does to a log `len` long:
/// `Ok(skip)` writes `data[skip..]` (empty when everything is already stored),
/// or `Err(Gap)`.
pub(crate) fn plan_append(
    attempt: &AttemptId,
    len: u64,
    offset: u64,
    data_len: usize,
) -> Result<usize, LogError> {
    if offset > len {
        return Err(LogError::Gap {
            attempt: attempt.clone(),
            expected: len,
            got: offset,
        });
    }
    // `len - offset` may exceed usize only on 32-bit targets, where it is
    // larger than any slice anyway.
    let already = usize::try_from(len - offset).unwrap_or(usize::MAX);
    Ok(already.min(data_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["att-0192f3a4b5c6", "a", "A_b-9", &"x".repeat(MAX_ID_LEN)] {
            check_id(&AttemptId::from_string(good)).unwrap();
        }
        for bad in [
            "",
            "att/x",
            "..",
            "att.log",
            "a b",
            "att\0",
            "é",
            "a\\b",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(
                matches!(check_id(&AttemptId::from_string(bad)), Err(LogError::BadId(id)) if id == bad),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn plans() {
        let a = AttemptId::from_string("att-x");
        assert_eq!(plan_append(&a, 0, 0, 5).unwrap(), 0);
        assert_eq!(plan_append(&a, 10, 4, 5).unwrap(), 5);
        assert_eq!(plan_append(&a, 10, 7, 5).unwrap(), 3);
        assert_eq!(plan_append(&a, 10, 10, 5).unwrap(), 0);
        assert!(matches!(
            plan_append(&a, 10, 11, 5),
            Err(LogError::Gap {
                expected: 10,
                got: 11,
                ..
            })
        ));
    }
}
