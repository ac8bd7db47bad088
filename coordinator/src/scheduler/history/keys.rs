//! Where a finished run lives in the store, and what its index entries
//! hold. Every key of a finished run is under `done/`:
//!
//! - `done/runs/<id>`: the record (sealed as `scheduler::stored` stores it);
//! - `done/seq/<seq>`: every finished run, by submission order;
//! - `done/pipeline/<hex>/<seq>`, `done/by/<hex>/<seq>`,
//!   `done/state/<state>/<seq>` (not for `succeeded`),
//!   `done/repo/<sha256>/<seq>` (runs with a repository): the same, by
//!   filter (`ListRuns` walks the most selective one there is);
//! - `done/at/<finished ms>/<seq>`: by the time it finished (retention);
//! - `done/attempts/<attempt>`: its attempts (the orphan-log sweep);
//! - `done/keys/<sha256>`: its idempotency key, if it had one.
//!
//! The index entries (`seq`, `pipeline`, `by`, `state`, `repo`) hold a
//! [`Summary`], so a filter is judged without reading records. Numbers are
//! zero-padded, so key order is numeric order, and names are hex-encoded,
//! so no name can reach into another's range. In the indexes `<seq>` is
//! `u64::MAX - seq`: newest first is ascending key order, the one order
//! etcd pages without reading (and sorting) the whole rest of the range.

use crate::model::{RunRecord, StoredRunState};
use capstan_proto::ids::{AttemptId, RunId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub(crate) const AT: &str = "done/at/";
pub(crate) const ATTEMPTS: &str = "done/attempts/";

/// What a `ListRuns` filter reads of a run, kept in its index entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Summary {
    pub(crate) id: RunId,
    pub(crate) seq: u64,
    pub(crate) state: StoredRunState,
    pub(crate) pipeline: String,
    pub(crate) submitted_by: String,
    /// Redacted: no password is ever in an index.
    pub(crate) repo: String,
    pub(crate) rev: String,
    pub(crate) created_at_ms: i64,
}

impl Summary {
    pub(crate) fn of(run: &RunRecord) -> Self {
        Self {
            id: run.id.clone(),
            seq: run.seq,
            state: run.state,
            pipeline: run.pipeline.clone(),
            submitted_by: run.submitted_by.clone(),
            repo: capstan_proto::redact::redact_url(&run.repo).into_owned(),
            rev: run.rev.clone(),
            created_at_ms: run.created_at_ms,
        }
    }
}

/// An index to walk for a page: its prefix (keys are `<prefix><seq>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Index(pub(crate) String);

impl Index {
    pub(crate) fn all() -> Self {
        Self("done/seq/".into())
    }
    pub(crate) fn pipeline(name: &str) -> Self {
        Self(format!("done/pipeline/{}/", hex::encode(name)))
    }
    pub(crate) fn submitted_by(name: &str) -> Self {
        Self(format!("done/by/{}/", hex::encode(name)))
    }
    pub(crate) fn state(state: StoredRunState) -> Self {
        Self(format!("done/state/{}/", state_name(state)))
    }
    pub(crate) fn repo(redacted: &str) -> Self {
        Self(format!("done/repo/{}/", sha256(redacted)))
    }

    /// The key of the run with `seq` in this index (newer runs first).
    pub(crate) fn key(&self, seq: u64) -> String {
        format!("{}{}", self.0, seq_text(u64::MAX - seq))
    }

    /// The key of inverted seq `inv` (`u64::MAX - seq`).
    pub(crate) fn inv_key(&self, inv: u64) -> String {
        format!("{}{}", self.0, seq_text(inv))
    }

    /// The window of `10^level` inverted seqs holding `inv`: the prefix
    /// its keys share (the index's own at level 20), and its first and
    /// past-the-last inverted seq. etcd counts every key of a range it is
    /// asked for, whatever the limit, so a page reads windows, not the
    /// whole rest of the index.
    pub(crate) fn window(&self, inv: u128, level: u32) -> (String, u128, u128) {
        if level >= 20 {
            return (self.0.clone(), 0, 10u128.pow(20));
        }
        let width = 10u128.pow(level);
        let start = inv / width * width;
        let digits = 20 - level as usize;
        let prefix = format!("{}{:0digits$}", self.0, inv / width);
        (prefix, start, start + width)
    }

    /// The inverted seq of one of this index's keys.
    pub(crate) fn inv_of(&self, key: &str) -> Option<u64> {
        key.strip_prefix(self.0.as_str())?.parse().ok()
    }

    /// The `seq` of one of this index's keys.
    pub(crate) fn seq_of(&self, key: &str) -> Option<u64> {
        let inverted: u64 = key.strip_prefix(self.0.as_str())?.parse().ok()?;
        Some(u64::MAX - inverted)
    }

    /// Every index a finished run is in. Each entry is a store write at
    /// the run's end (the drain benchmark's cost), so an index is kept only
    /// where walking `all` would be slow: none for the succeeded (most runs:
    /// a filter on them matches most of `all`), none for a run without a
    /// repository.
    pub(crate) fn of(s: &Summary) -> Vec<Self> {
        let mut of = vec![
            Self::all(),
            Self::pipeline(&s.pipeline),
            Self::submitted_by(&s.submitted_by),
        ];
        if s.state != StoredRunState::Succeeded {
            of.push(Self::state(s.state));
        }
        if !s.repo.is_empty() {
            of.push(Self::repo(&s.repo));
        }
        of
    }
}

pub(crate) fn record(id: &RunId) -> String {
    format!("done/runs/{id}")
}

pub(crate) fn finished_at(ms: i64, seq: u64) -> String {
    format!("{AT}{:015}/{}", ms.max(0), seq_text(seq))
}

/// The finish time in a [`finished_at`] key.
pub(crate) fn finished_at_ms(key: &str) -> Option<i64> {
    key.strip_prefix(AT)?.split('/').next()?.parse().ok()
}

/// The seq in a [`finished_at`] key.
pub(crate) fn finished_at_seq(key: &str) -> Option<u64> {
    key.strip_prefix(AT)?.split('/').nth(1)?.parse().ok()
}

pub(crate) fn attempt(id: &AttemptId) -> String {
    format!("{ATTEMPTS}{id}")
}

pub(crate) fn idempotency(key: &str) -> String {
    format!("done/keys/{}", sha256(key))
}

fn seq_text(seq: u64) -> String {
    format!("{seq:020}")
}

fn sha256(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn state_name(s: StoredRunState) -> &'static str {
    match s {
        StoredRunState::Queued => "queued",
        StoredRunState::Running => "running",
        StoredRunState::Succeeded => "succeeded",
        StoredRunState::Failed => "failed",
        StoredRunState::Cancelled => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_numerically_and_names_stay_in_their_range() {
        let all = Index::all();
        assert!(all.key(10) < all.key(9), "newest first");
        assert!(all.key(u64::MAX) < all.key(10));
        assert_eq!(all.seq_of(&all.key(12_345)), Some(12_345));
        assert_eq!(all.seq_of(&all.key(0)), Some(0));
        // A window's prefix holds exactly its keys.
        let (prefix, start, end) = all.window(123_456, 3);
        assert_eq!((start, end), (123_000, 124_000));
        assert!(all.inv_key(123_000).starts_with(&prefix));
        assert!(all.inv_key(123_999).starts_with(&prefix));
        assert!(!all.inv_key(124_000).starts_with(&prefix));
        assert!(!all.inv_key(122_999).starts_with(&prefix));
        assert_eq!(all.window(5, 20).0, all.0);
        assert_eq!(all.inv_of(&all.inv_key(77)), Some(77));
        assert!(finished_at(999, 5) < finished_at(1000, 1));
        assert_eq!(finished_at_ms(&finished_at(1234, 7)), Some(1234));
        assert_eq!(finished_at_seq(&finished_at(1234, 7)), Some(7));
        // `a` is a prefix of `a/b` as text, not as an index.
        let (a, ab) = (Index::pipeline("a"), Index::pipeline("a/b"));
        assert!(!ab.key(1).starts_with(&a.0), "{} under {}", ab.key(1), a.0);
        assert_ne!(idempotency("k1"), idempotency("k2"));
    }
}
