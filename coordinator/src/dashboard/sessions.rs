//! Dashboard sessions in the state store: a browser holds a random session
//! secret; the store holds only its SHA-256, which token it stands for (by
//! that token's hash, never the token) and when it expires. Every replica
//! reads the same records, so a failover keeps people logged in; logging
//! out deletes the record; an expired one is refused and deleted.

use crate::model::hash_secret;
use crate::store::{Op, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const PREFIX: &str = "dashboard-sessions/";
/// Prefix of the secret a browser holds.
const SECRET_PREFIX: &str = "capstan_session_";
/// A session lasts this long from its login, whatever the token allows.
pub(crate) const SESSION_MS: i64 = 12 * 3600 * 1000;

#[derive(Debug, Serialize, Deserialize)]
struct SessionRecord {
    /// `hash_secret` of the API token it was opened with.
    token_hash: String,
    created_at_ms: i64,
    expires_at_ms: i64,
}

pub(crate) struct Sessions {
    store: Arc<dyn Store>,
}

impl Sessions {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Opens a session for `token` (already checked): the secret for the
    /// cookie. Expired sessions of everyone are swept on the way.
    pub(crate) async fn open(&self, token: &str, now_ms: i64) -> Result<String, StoreError> {
        self.sweep(now_ms).await?;
        let secret = crate::tokens::random_secret(SECRET_PREFIX);
        let record = SessionRecord {
            token_hash: hash_secret(token),
            created_at_ms: now_ms,
            expires_at_ms: now_ms + SESSION_MS,
        };
        let value = serde_json::to_vec(&record).expect("a session record serializes");
        let key = format!("{PREFIX}{}", hash_secret(&secret));
        self.store.apply(vec![Op::Put { key, value }]).await?;
        Ok(secret)
    }

    /// The token hash of a live session; `None` for an unknown, expired
    /// (deleted now) or malformed one.
    pub(crate) async fn lookup(
        &self,
        secret: &str,
        now_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        if !secret.starts_with(SECRET_PREFIX) {
            return Ok(None);
        }
        let key = format!("{PREFIX}{}", hash_secret(secret));
        let Some(bytes) = self.store.get(&key).await? else {
            return Ok(None);
        };
        match serde_json::from_slice::<SessionRecord>(&bytes) {
            Ok(r) if r.expires_at_ms > now_ms => Ok(Some(r.token_hash)),
            _ => {
                self.store.apply(vec![Op::Delete { key }]).await?;
                Ok(None)
            }
        }
    }

    /// Logs out: the session's record goes.
    pub(crate) async fn close(&self, secret: &str) -> Result<(), StoreError> {
        let key = format!("{PREFIX}{}", hash_secret(secret));
        self.store.apply(vec![Op::Delete { key }]).await
    }

    /// Deletes every expired session record.
    async fn sweep(&self, now_ms: i64) -> Result<(), StoreError> {
        let expired: Vec<Op> = self
            .store
            .scan_prefix(PREFIX)
            .await?
            .into_iter()
            .filter(|(_, v)| {
                serde_json::from_slice::<SessionRecord>(v)
                    .map_or(true, |r| r.expires_at_ms <= now_ms)
            })
            .map(|(key, _)| Op::Delete { key })
            .collect();
        if expired.is_empty() {
            return Ok(());
        }
        self.store.apply(expired).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn sessions_open_expire_and_close() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let s = Sessions::new(store.clone());
        let secret = s.open("capstan_tok", 1000).await.unwrap();
        assert!(secret.starts_with(SECRET_PREFIX));
        assert_eq!(
            s.lookup(&secret, 2000).await.unwrap(),
            Some(hash_secret("capstan_tok"))
        );
        // Nothing in the store names the secret or the token.
        for (k, v) in store.scan_prefix(PREFIX).await.unwrap() {
            let text = format!("{k}{}", String::from_utf8_lossy(&v));
            assert!(
                !text.contains(&secret) && !text.contains("capstan_tok"),
                "{text}"
            );
        }
        assert_eq!(
            s.lookup(&secret, 1000 + SESSION_MS).await.unwrap(),
            None,
            "expired"
        );
        assert!(
            store.scan_prefix(PREFIX).await.unwrap().is_empty(),
            "and deleted"
        );
        let again = s.open("capstan_tok", 5000).await.unwrap();
        s.close(&again).await.unwrap();
        assert_eq!(s.lookup(&again, 6000).await.unwrap(), None, "closed");
        assert_eq!(
            s.lookup("capstan_tok", 6000).await.unwrap(),
            None,
            "a token is no session"
        );
        // Opening a session sweeps the expired ones.
        let old = s.open("capstan_a", 0).await.unwrap();
        let _new = s.open("capstan_b", SESSION_MS + 1).await.unwrap();
        assert_eq!(store.scan_prefix(PREFIX).await.unwrap().len(), 1);
        assert_eq!(s.lookup(&old, SESSION_MS + 2).await.unwrap(), None);
    }
}
