//! API tokens: making one, finding the one a call presents, listing and
//! revoking them, all against the coordinator's [`Store`] (so on etcd every
//! replica sees a new token or a revocation at its next call).
//!
//! A token is `capstan_` and 43 base64url characters (256 random bits). It
//! is shown once, when made; the store keeps only its SHA-256:
//!
//! - `tokens/<sha256 hex>`: a [`TokenRecord`] (JSON), kept after a
//!   revocation (marked revoked) so that a revoked token is told so;
//! - `token-names/<name>`: the hash of the live token of that name, for
//!   `revoke NAME` and for refusing a second token of a name.
//!
//! A presented token is found with one `get` by its hash: the secret is
//! never compared byte by byte with anything, so there is no timing oracle
//! on it (SHA-256 of 256 random bits needs no salt or slow hash).
//!
//! Doors: imports `store` and `model` (`hash_secret`, `now_ms`); the API
//! layer (`api::auth`, `api::tokens`) and the offline `token create` use it.

use crate::model::hash_secret;
use crate::store::{Op, Store, StoreError};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// How every token starts: recognizable in a leaked log or a secret scanner.
pub const TOKEN_PREFIX: &str = "capstan_";
const RECORDS: &str = "tokens/";
const NAMES: &str = "token-names/";
/// Longest token name.
const MAX_NAME: usize = 64;

/// What a token may do. Each scope includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Status, runs, logs, runners, cluster.
    Read,
    /// Read, submit runs, cancel the runs it submitted.
    Submit,
    /// Everything: cancel any run, drain and resume runners, tokens.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Submit => "submit",
            Scope::Admin => "admin",
        }
    }

    /// `read`, `submit` or `admin`.
    pub fn parse(text: &str) -> Result<Scope, TokenError> {
        match text.trim() {
            "read" => Ok(Scope::Read),
            "submit" => Ok(Scope::Submit),
            "admin" => Ok(Scope::Admin),
            other => Err(TokenError::BadScope(other.to_string())),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One token as stored, without its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub scope: Scope,
    pub created_at_ms: i64,
    /// 0: never expires.
    pub expires_at_ms: i64,
    /// 0: live.
    #[serde(default)]
    pub revoked_at_ms: i64,
}

impl TokenRecord {
    pub(crate) fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms != 0 && now_ms >= self.expires_at_ms
    }
}

/// A token operation that failed; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("bad token name `{0}`: use 1 to {MAX_NAME} of the characters a-z A-Z 0-9 . _ -")]
    BadName(String),
    #[error("bad scope `{0}`: use read, submit or admin")]
    BadScope(String),
    #[error("a token named `{0}` already exists: revoke it first or pick another name")]
    Exists(String),
    #[error("no token named `{0}` (see `capstan token list`)")]
    Unknown(String),
    #[error("the token record at {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The tokens in a store.
pub struct Tokens {
    store: Arc<dyn Store>,
    /// Serializes create and revoke on this process: the store has no
    /// compare-and-set, and two creates of one name must not both pass the
    /// check. (API writes happen on the leader only; see docs/decisions.md
    /// for the offline create.)
    writes: tokio::sync::Mutex<()>,
}

/// A fresh token: the prefix and 256 random bits, base64url.
pub fn generate() -> String {
    random_secret(TOKEN_PREFIX)
}

/// `prefix` and 256 random bits, base64url: every secret the coordinator
/// hands out this way (API and runner registration tokens).
pub(crate) fn random_secret(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn check_name(name: &str) -> Result<(), TokenError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(TokenError::BadName(name.to_string()))
    }
}

impl Tokens {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            writes: tokio::sync::Mutex::new(()),
        }
    }

    /// Makes a token; returns it (the only time it exists outside the
    /// caller) and its record.
    pub async fn create(
        &self,
        name: &str,
        scope: Scope,
        expires_in: Option<Duration>,
        now_ms: i64,
    ) -> Result<(String, TokenRecord), TokenError> {
        let token = generate();
        let record = self
            .store_token(&token, name, scope, expires_in, now_ms)
            .await?;
        Ok((token, record))
    }

    /// Stores a token made by the caller (`capstan dev`'s, which its own
    /// client already holds), never expiring.
    pub(crate) async fn install(
        &self,
        token: &str,
        name: &str,
        scope: Scope,
        now_ms: i64,
    ) -> Result<TokenRecord, TokenError> {
        self.store_token(token, name, scope, None, now_ms).await
    }

    async fn store_token(
        &self,
        token: &str,
        name: &str,
        scope: Scope,
        expires_in: Option<Duration>,
        now_ms: i64,
    ) -> Result<TokenRecord, TokenError> {
        check_name(name)?;
        let _guard = self.writes.lock().await;
        let name_key = format!("{NAMES}{name}");
        if self.store.get(&name_key).await?.is_some() {
            return Err(TokenError::Exists(name.to_string()));
        }
        let hash = hash_secret(token);
        let expires_at_ms = expires_in.map_or(0, |d| {
            now_ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        });
        let record = TokenRecord {
            name: name.to_string(),
            scope,
            created_at_ms: now_ms,
            expires_at_ms,
            revoked_at_ms: 0,
        };
        self.store
            .apply(vec![
                Op::Put {
                    key: format!("{RECORDS}{hash}"),
                    value: serde_json::to_vec(&record).expect("a token record serializes"),
                },
                Op::Put {
                    key: name_key,
                    value: hash.into_bytes(),
                },
            ])
            .await?;
        Ok(record)
    }

    /// The record of a presented token, if it is one (revoked or expired
    /// ones included: the caller says which). One store read.
    pub async fn lookup(&self, token: &str) -> Result<Option<TokenRecord>, TokenError> {
        if !token.starts_with(TOKEN_PREFIX) {
            return Ok(None);
        }
        let key = format!("{RECORDS}{}", hash_secret(token));
        match self.store.get(&key).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| TokenError::Corrupt { key, source }),
        }
    }

    /// Every live (not revoked) token, by name.
    /// The record of the token whose SHA-256 is `hash` (a dashboard
    /// session names its token so, never by the token itself).
    pub(crate) async fn lookup_hash(&self, hash: &str) -> Result<Option<TokenRecord>, TokenError> {
        let key = format!("{RECORDS}{hash}");
        match self.store.get(&key).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| TokenError::Corrupt { key, source }),
        }
    }

    pub async fn list(&self) -> Result<Vec<TokenRecord>, TokenError> {
        let mut out = Vec::new();
        for (key, value) in self.store.scan_prefix(RECORDS).await? {
            let record: TokenRecord = serde_json::from_slice(&value)
                .map_err(|source| TokenError::Corrupt { key, source })?;
            if record.revoked_at_ms == 0 {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Revokes the token named `name`; the name is free again afterwards.
    pub async fn revoke(&self, name: &str, now_ms: i64) -> Result<TokenRecord, TokenError> {
        let _guard = self.writes.lock().await;
        let name_key = format!("{NAMES}{name}");
        let unknown = || TokenError::Unknown(name.to_string());
        let hash = self.store.get(&name_key).await?.ok_or_else(unknown)?;
        let key = format!("{RECORDS}{}", String::from_utf8_lossy(&hash));
        let bytes = self.store.get(&key).await?.ok_or_else(unknown)?;
        let mut record: TokenRecord =
            serde_json::from_slice(&bytes).map_err(|source| TokenError::Corrupt {
                key: key.clone(),
                source,
            })?;
        record.revoked_at_ms = now_ms;
        self.store
            .apply(vec![
                Op::Put {
                    key,
                    value: serde_json::to_vec(&record).expect("a token record serializes"),
                },
                Op::Delete { key: name_key },
            ])
            .await?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn tokens() -> (Arc<MemoryStore>, Tokens) {
        let store = Arc::new(MemoryStore::new());
        (store.clone(), Tokens::new(store))
    }

    #[test]
    fn tokens_are_256_random_bits_with_the_prefix() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        let body = a.strip_prefix(TOKEN_PREFIX).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap();
        assert_eq!(bytes.len(), 32);
    }

    #[tokio::test]
    async fn create_lookup_list_revoke() {
        let (store, t) = tokens();
        let (token, record) = t.create("ci", Scope::Submit, None, 1000).await.unwrap();
        assert_eq!(t.lookup(&token).await.unwrap(), Some(record.clone()));
        assert_eq!(t.lookup("capstan_nope").await.unwrap(), None);
        assert_eq!(t.lookup("not-even-a-token").await.unwrap(), None);
        // Only the hash is stored.
        for (key, value) in store.scan_prefix("").await.unwrap() {
            assert!(!key.contains(&token) && !String::from_utf8_lossy(&value).contains(&token));
        }
        let err = t.create("ci", Scope::Read, None, 2000).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "a token named `ci` already exists: revoke it first or pick another name"
        );
        assert_eq!(t.list().await.unwrap(), vec![record]);
        let revoked = t.revoke("ci", 3000).await.unwrap();
        assert_eq!(revoked.revoked_at_ms, 3000);
        assert_eq!(t.lookup(&token).await.unwrap(), Some(revoked));
        assert!(t.list().await.unwrap().is_empty());
        let err = t.revoke("ci", 4000).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "no token named `ci` (see `capstan token list`)"
        );
        // The name is free again, for a new secret.
        let (again, _) = t.create("ci", Scope::Read, None, 5000).await.unwrap();
        assert_ne!(again, token);
    }

    #[tokio::test]
    async fn expiry_and_names() {
        let (_, t) = tokens();
        let (_, r) = t
            .create("short", Scope::Read, Some(Duration::from_secs(2)), 1000)
            .await
            .unwrap();
        assert_eq!(r.expires_at_ms, 3000);
        assert!(!r.expired(2999) && r.expired(3000));
        let err = t.create("a b", Scope::Read, None, 0).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad token name `a b`: use 1 to 64 of the characters a-z A-Z 0-9 . _ -"
        );
        assert_eq!(
            Scope::parse("root").unwrap_err().to_string(),
            "bad scope `root`: use read, submit or admin"
        );
        assert!(Scope::Read < Scope::Submit && Scope::Submit < Scope::Admin);
    }
}
