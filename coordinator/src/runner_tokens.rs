//! Single-use runner registration tokens, for ephemeral runners (GitHub's
//! JIT runner configuration): `capstan runner-token create --ephemeral
//! --labels ... --ttl 10m` makes one; exactly one `Register` accepts it, and
//! the runner it registers is ephemeral with exactly the token's labels.
//!
//! A token is `capstan_reg_` and 43 base64url characters (256 random bits);
//! the store keeps only its SHA-256, in the same store as the state (so a
//! token made on one leader is accepted by the next):
//!
//! - `runner-tokens/<sha256 hex>`: a [`RunnerTokenRecord`] (JSON), marked
//!   used (by which runner, when) once a registration took it.
//!
//! Used and expired records are kept until [`RunnerTokens::sweep`] deletes
//! them a day after they stopped working, so that a second use is told why
//! it is refused instead of "unknown".
//!
//! Doors: imports `store`, `model` (`hash_secret`) and `tokens` (`random_secret`); the runner API's
//! `Register` and the token API use it.

use crate::model::hash_secret;
use crate::store::{Op, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How every runner token starts (inside the API tokens' `capstan_`, so
/// secret scanners that know one know both).
pub const RUNNER_TOKEN_PREFIX: &str = "capstan_reg_";
const RECORDS: &str = "runner-tokens/";
/// The longest a token may wait for its runner.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a used or expired record is kept to explain a refusal.
const KEEP_AFTER: i64 = 24 * 3600 * 1000;

/// One token as stored, without its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerTokenRecord {
    pub labels: BTreeMap<String, String>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// The runner name that registered with it; empty while unused.
    #[serde(default)]
    pub used_by: String,
    #[serde(default)]
    pub used_at_ms: i64,
}

/// Why a runner token is refused or could not be made; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RunnerTokenError {
    #[error(
        "unknown runner registration token: make one with `capstan runner-token create --ephemeral`"
    )]
    Unknown,
    #[error(
        "this single-use registration token was already used by runner `{by}`: make a new one \
         with `capstan runner-token create --ephemeral` for each ephemeral runner"
    )]
    Used { by: String },
    #[error(
        "this registration token expired: make a new one with `capstan runner-token create --ephemeral`"
    )]
    Expired,
    #[error(
        "only single-use tokens for ephemeral runners exist: pass --ephemeral (the fleet's shared token is the coordinator's --registration-token)"
    )]
    NotEphemeral,
    #[error("--ttl must be between 1 s and 7 days")]
    BadTtl,
    #[error("bad label `{0}`: keys must be non-empty and neither may contain `,` or `=`")]
    BadLabel(String),
    #[error("the runner token record at {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The runner tokens in a store.
pub struct RunnerTokens {
    store: Arc<dyn Store>,
    /// Serializes a token's check and its marking as used on this process:
    /// the store has no compare-and-set, and two registrations with one
    /// token must not both pass. Only the leader registers runners, and its
    /// writes are fenced, so one process-wide lock is enough.
    uses: tokio::sync::Mutex<()>,
}

/// A claim on an unused token, held while the registration it allows runs;
/// [`RunnerTokens::mark_used`] ends it. Dropping it unused leaves the token
/// unused (a registration that failed does not burn it).
pub struct Claim<'a> {
    _guard: tokio::sync::MutexGuard<'a, ()>,
    key: String,
    record: RunnerTokenRecord,
}

impl Claim<'_> {
    /// The labels the runner registers with.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.record.labels
    }
}

impl RunnerTokens {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            uses: tokio::sync::Mutex::new(()),
        }
    }

    /// Is `token` meant for this registry (rather than the shared token)?
    pub fn is_runner_token(token: &str) -> bool {
        token.starts_with(RUNNER_TOKEN_PREFIX)
    }

    /// Makes a token; returns it (the only time it exists outside the
    /// caller) and its record.
    pub async fn create(
        &self,
        labels: BTreeMap<String, String>,
        ttl: Duration,
        ephemeral: bool,
        now_ms: i64,
    ) -> Result<(String, RunnerTokenRecord), RunnerTokenError> {
        if !ephemeral {
            return Err(RunnerTokenError::NotEphemeral);
        }
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(RunnerTokenError::BadTtl);
        }
        if let Some((k, v)) = labels
            .iter()
            .find(|(k, v)| k.is_empty() || format!("{k}{v}").contains([',', '=']))
        {
            return Err(RunnerTokenError::BadLabel(format!("{k}={v}")));
        }
        let token = crate::tokens::random_secret(RUNNER_TOKEN_PREFIX);
        let record = RunnerTokenRecord {
            labels,
            created_at_ms: now_ms,
            expires_at_ms: now_ms + ttl.as_millis() as i64,
            used_by: String::new(),
            used_at_ms: 0,
        };
        self.store
            .apply(vec![Op::Put {
                key: format!("{RECORDS}{}", hash_secret(&token)),
                value: serde_json::to_vec(&record).expect("a runner token record serializes"),
            }])
            .await?;
        Ok((token, record))
    }

    /// Claims an unused, unexpired token for one registration.
    pub async fn claim(&self, token: &str, now_ms: i64) -> Result<Claim<'_>, RunnerTokenError> {
        let guard = self.uses.lock().await;
        let key = format!("{RECORDS}{}", hash_secret(token));
        let Some(bytes) = self.store.get(&key).await? else {
            return Err(RunnerTokenError::Unknown);
        };
        let record: RunnerTokenRecord =
            serde_json::from_slice(&bytes).map_err(|source| RunnerTokenError::Corrupt {
                key: key.clone(),
                source,
            })?;
        if !record.used_by.is_empty() {
            return Err(RunnerTokenError::Used { by: record.used_by });
        }
        if now_ms >= record.expires_at_ms {
            return Err(RunnerTokenError::Expired);
        }
        Ok(Claim {
            _guard: guard,
            key,
            record,
        })
    }

    /// Marks a claimed token used by runner `name`: no later claim passes.
    pub async fn mark_used(
        &self,
        mut claim: Claim<'_>,
        name: &str,
        now_ms: i64,
    ) -> Result<(), RunnerTokenError> {
        claim.record.used_by = name.to_string();
        claim.record.used_at_ms = now_ms;
        self.store
            .apply(vec![Op::Put {
                key: claim.key.clone(),
                value: serde_json::to_vec(&claim.record).expect("a runner token record serializes"),
            }])
            .await?;
        Ok(())
    }

    /// The labels of the tokens still waiting for their runner: label sets
    /// a runner is about to have (the demand signal counts them matchable).
    pub async fn live_labels(
        &self,
        now_ms: i64,
    ) -> Result<Vec<BTreeMap<String, String>>, RunnerTokenError> {
        let mut out = Vec::new();
        for (_, value) in self.store.scan_prefix(RECORDS).await? {
            if let Ok(r) = serde_json::from_slice::<RunnerTokenRecord>(&value)
                && r.used_by.is_empty()
                && now_ms < r.expires_at_ms
                && !out.contains(&r.labels)
            {
                out.push(r.labels);
            }
        }
        Ok(out)
    }

    /// Deletes the records that stopped working (used or expired) more than
    /// a day before `now_ms`; returns how many.
    pub async fn sweep(&self, now_ms: i64) -> Result<usize, RunnerTokenError> {
        let _guard = self.uses.lock().await;
        let mut deletes = Vec::new();
        for (key, value) in self.store.scan_prefix(RECORDS).await? {
            let Ok(record) = serde_json::from_slice::<RunnerTokenRecord>(&value) else {
                continue;
            };
            let ended = if record.used_at_ms > 0 {
                record.used_at_ms
            } else {
                record.expires_at_ms
            };
            if now_ms - ended > KEEP_AFTER {
                deletes.push(Op::Delete { key });
            }
        }
        let n = deletes.len();
        if n > 0 {
            self.store.apply(deletes).await?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn tokens() -> RunnerTokens {
        RunnerTokens::new(Arc::new(MemoryStore::default()))
    }

    fn labels() -> BTreeMap<String, String> {
        [("pool".to_string(), "k8s".to_string())].into()
    }

    const TTL: Duration = Duration::from_secs(600);

    #[tokio::test]
    async fn a_token_is_claimed_once_and_refused_after() {
        let t = tokens();
        let (token, record) = t.create(labels(), TTL, true, 1_000).await.unwrap();
        assert!(RunnerTokens::is_runner_token(&token));
        assert_eq!(record.expires_at_ms, 601_000);
        let claim = t.claim(&token, 2_000).await.unwrap();
        assert_eq!(claim.labels(), &labels());
        t.mark_used(claim, "eph-1", 2_000).await.unwrap();
        let e = t.claim(&token, 3_000).await.err().unwrap();
        assert!(
            matches!(&e, RunnerTokenError::Used { by } if by == "eph-1"),
            "{e}"
        );
        assert!(
            e.to_string().contains("runner-token create --ephemeral"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_dropped_claim_leaves_the_token_unused() {
        let t = tokens();
        let (token, _) = t.create(labels(), TTL, true, 0).await.unwrap();
        drop(t.claim(&token, 1).await.unwrap());
        assert!(t.claim(&token, 2).await.is_ok());
    }

    #[tokio::test]
    async fn expired_unknown_and_bad_requests_are_refused() {
        let t = tokens();
        let (token, _) = t.create(labels(), TTL, true, 0).await.unwrap();
        assert!(matches!(
            t.claim(&token, 600_000).await.err().unwrap(),
            RunnerTokenError::Expired
        ));
        assert!(matches!(
            t.claim("capstan_reg_nope", 0).await.err().unwrap(),
            RunnerTokenError::Unknown
        ));
        assert!(matches!(
            t.create(labels(), TTL, false, 0).await.err().unwrap(),
            RunnerTokenError::NotEphemeral
        ));
        assert!(matches!(
            t.create(labels(), Duration::ZERO, true, 0)
                .await
                .err()
                .unwrap(),
            RunnerTokenError::BadTtl
        ));
        assert!(matches!(
            t.create(labels(), MAX_TTL * 2, true, 0)
                .await
                .err()
                .unwrap(),
            RunnerTokenError::BadTtl
        ));
        let bad = [("a=b".to_string(), "c".to_string())].into();
        assert!(matches!(
            t.create(bad, TTL, true, 0).await.err().unwrap(),
            RunnerTokenError::BadLabel(_)
        ));
    }

    #[tokio::test]
    async fn sweep_deletes_only_records_a_day_past_their_end() {
        let t = tokens();
        let (used, _) = t.create(labels(), TTL, true, 0).await.unwrap();
        let claim = t.claim(&used, 10).await.unwrap();
        t.mark_used(claim, "eph", 10).await.unwrap();
        let (_live, _) = t.create(labels(), MAX_TTL, true, 0).await.unwrap();
        let (_expired, _) = t.create(labels(), TTL, true, 0).await.unwrap();
        assert_eq!(t.live_labels(20).await.unwrap(), vec![labels()]);
        assert!(
            t.live_labels(MAX_TTL.as_millis() as i64)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(t.sweep(KEEP_AFTER).await.unwrap(), 0);
        // The used one ended at 10 ms, the expired one at 600 s.
        assert_eq!(t.sweep(KEEP_AFTER + 11).await.unwrap(), 1);
        assert_eq!(t.sweep(KEEP_AFTER + 600_001).await.unwrap(), 1);
        assert_eq!(t.sweep(i64::MAX / 2).await.unwrap(), 1);
    }
}
