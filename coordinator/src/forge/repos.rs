//! Registered repositories in the store: `repos/<name>` holds a
//! [`RepoRecord`] (JSON) whose webhook secret, status token and fetch
//! credentials are sealed ([`crate::seal`]). Adding one makes its webhook
//! secret (256 random bits) and returns it, the only time it leaves the
//! coordinator.
//!
//! Doors: `store`, `seal`, `cron`; the API layer (`api::repos`), the
//! webhook handler and the schedules use it.

use super::Forge;
use crate::seal::{SealError, Sealer};
use crate::store::{Op, Store, StoreError};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const RECORDS: &str = "repos/";
const MAX_NAME: usize = 64;
/// Default pipeline file path in a repository.
pub(crate) const DEFAULT_PIPELINE: &str = ".capstan.yaml";

/// One repository as stored. The `sealed_*` fields are never shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RepoRecord {
    pub(crate) name: String,
    /// The URL without user info: what webhooks are matched against, what
    /// runs get as `git.repo`.
    pub(crate) url: String,
    pub(crate) pipeline: String,
    /// Branch patterns; empty: every branch.
    pub(crate) branches: Vec<String>,
    pub(crate) forge: Option<Forge>,
    pub(crate) api_url: String,
    pub(crate) schedules: Vec<String>,
    pub(crate) created_at_ms: i64,
    pub(crate) sealed_webhook_secret: String,
    #[serde(default)]
    pub(crate) sealed_status_token: String,
    /// `user:password` from the registered URL, for the coordinator's fetch.
    #[serde(default)]
    pub(crate) sealed_fetch_login: String,
}

/// What `repo add` asks for.
#[derive(Clone, Debug, Default)]
pub(crate) struct NewRepo {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) pipeline: String,
    pub(crate) branches: Vec<String>,
    pub(crate) forge: Option<Forge>,
    pub(crate) api_url: String,
    pub(crate) status_token: String,
    pub(crate) schedules: Vec<String>,
}

/// A repository operation that failed; each says what to do.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RepoError {
    #[error("bad repository name `{0}`: use 1 to {MAX_NAME} of the characters a-z A-Z 0-9 . _ -")]
    BadName(String),
    #[error("bad repository setting: {0}")]
    Invalid(String),
    #[error("a repository named `{0}` already exists: remove it first or pick another name")]
    Exists(String),
    #[error("no repository named `{0}` (see `capstan repo list`)")]
    Unknown(String),
    #[error("the repository record at {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The repositories in a store.
pub(crate) struct Repos {
    store: Arc<dyn Store>,
    sealer: Sealer,
    writes: tokio::sync::Mutex<()>,
}

fn check_name(name: &str) -> Result<(), RepoError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RepoError::BadName(name.to_string()))
    }
}

/// Splits user info off a URL: (the URL without it, `user:password`).
/// scp-like SSH addresses (`git@host:path`) and paths are kept whole.
pub(crate) fn split_login(url: &str) -> (String, String) {
    match url::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() && u.scheme() != "ssh" => {
            let user = percent_decode(u.username());
            let pass = percent_decode(u.password().unwrap_or(""));
            let _ = u.set_username("");
            let _ = u.set_password(None);
            (u.to_string(), format!("{user}:{pass}"))
        }
        _ => (url.to_string(), String::new()),
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// A URL as webhooks are matched: no scheme case, no user info, no
/// trailing `/` or `.git`, host in lower case.
pub(crate) fn normalize(url: &str) -> String {
    let (bare, _) = split_login(url.trim());
    let mut s = match url::Url::parse(&bare) {
        Ok(u) if u.has_host() => {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}{}",
                u.scheme(),
                u.host_str().unwrap_or("").to_ascii_lowercase(),
                u.path()
            )
        }
        _ => bare,
    };
    while s.ends_with('/') {
        s.pop();
    }
    s.strip_suffix(".git").map(str::to_string).unwrap_or(s)
}

impl RepoRecord {
    /// Does a push to `branch` start a run?
    pub(crate) fn wants(&self, branch: &str) -> bool {
        self.branches.is_empty() || self.branches.iter().any(|p| glob(p, branch))
    }

    /// `owner/name` of the repository on its forge: the registered URL's
    /// path (never a name taken from a payload).
    pub(crate) fn forge_path(&self) -> String {
        let path = match url::Url::parse(&self.url) {
            Ok(u) if u.has_host() => u.path().to_string(),
            // scp-like `git@host:owner/name.git`
            _ => self
                .url
                .split_once(':')
                .map_or(self.url.clone(), |(_, p)| p.to_string()),
        };
        let path = path.trim_matches('/');
        path.strip_suffix(".git").unwrap_or(path).to_string()
    }

    /// The repository's resource in `forge`'s API (statuses, pull requests
    /// and merge requests hang below it).
    pub(crate) fn api_root(&self, forge: Forge) -> String {
        let path = self.forge_path();
        match forge {
            Forge::Github => format!("{}/repos/{path}", self.api_url),
            Forge::Gitea => format!("{}/api/v1/repos/{path}", self.api_url),
            Forge::Gitlab => format!(
                "{}/api/v4/projects/{}",
                self.api_url,
                url::form_urlencoded::byte_serialize(path.as_bytes()).collect::<String>()
            ),
        }
    }
}

/// `*` matches any run of characters but `/`; `**` any run at all.
pub(crate) fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => (0..=t.len()).any(|i| go(&p[2..], &t[i..])),
            Some(b'*') => (0..=t.len())
                .take_while(|&i| i == 0 || t[i - 1] != b'/')
                .any(|i| go(&p[1..], &t[i..])),
            Some(c) => t.first() == Some(c) && go(&p[1..], &t[1..]),
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

/// A fresh webhook secret: 256 random bits, base64url.
fn generate_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn check_new(new: &NewRepo) -> Result<(), RepoError> {
    check_name(&new.name)?;
    capstan_proto::source::check_repo(&new.url)
        .map_err(|e| RepoError::Invalid(e.replace("--repo", "--url")))?;
    for s in &new.schedules {
        super::cron::parse_cron(s).map_err(RepoError::Invalid)?;
    }
    for b in &new.branches {
        if b.is_empty() || b.starts_with('-') || b.chars().any(char::is_whitespace) {
            return Err(RepoError::Invalid(format!(
                "branch pattern `{b}`: give names or globs such as `main` or `release/*`"
            )));
        }
    }
    match new.forge {
        Some(_) if new.api_url.is_empty() || new.status_token.is_empty() => {
            Err(RepoError::Invalid(
                "--forge needs --api-url and --status-token (the token the status API takes)"
                    .into(),
            ))
        }
        Some(_) if url::Url::parse(&new.api_url).is_err() => Err(RepoError::Invalid(format!(
            "--api-url `{}` is not a URL: give e.g. https://api.github.com",
            new.api_url
        ))),
        None if !new.api_url.is_empty() || !new.status_token.is_empty() => Err(RepoError::Invalid(
            "--api-url and --status-token need --forge github|gitea|gitlab".into(),
        )),
        _ => Ok(()),
    }
}

impl Repos {
    pub(crate) fn new(store: Arc<dyn Store>, sealer: Sealer) -> Self {
        Self {
            store,
            sealer,
            writes: tokio::sync::Mutex::new(()),
        }
    }

    /// Registers a repository; returns its webhook secret and record.
    pub(crate) async fn add(
        &self,
        new: NewRepo,
        now_ms: i64,
    ) -> Result<(String, RepoRecord), RepoError> {
        check_new(&new)?;
        let _guard = self.writes.lock().await;
        let key = format!("{RECORDS}{}", new.name);
        if self.store.get(&key).await?.is_some() {
            return Err(RepoError::Exists(new.name));
        }
        let secret = generate_secret();
        let (url, login) = split_login(&new.url);
        let record = RepoRecord {
            name: new.name,
            url,
            pipeline: if new.pipeline.is_empty() {
                DEFAULT_PIPELINE.into()
            } else {
                new.pipeline
            },
            branches: new.branches,
            forge: new.forge,
            api_url: new.api_url.trim_end_matches('/').to_string(),
            schedules: new.schedules,
            created_at_ms: now_ms,
            sealed_webhook_secret: self.sealer.seal(&secret),
            sealed_status_token: self.sealer.seal(&new.status_token),
            sealed_fetch_login: self.sealer.seal(&login),
        };
        let value = serde_json::to_vec(&record).expect("a repo record serializes");
        self.store.apply(vec![Op::Put { key, value }]).await?;
        Ok((secret, record))
    }

    /// Every repository, by name.
    pub(crate) async fn list(&self) -> Result<Vec<RepoRecord>, RepoError> {
        let mut out = Vec::new();
        for (key, value) in self.store.scan_prefix(RECORDS).await? {
            out.push(
                serde_json::from_slice(&value)
                    .map_err(|source| RepoError::Corrupt { key, source })?,
            );
        }
        Ok(out)
    }

    /// Forgets the repository named `name`.
    pub(crate) async fn remove(&self, name: &str) -> Result<RepoRecord, RepoError> {
        let _guard = self.writes.lock().await;
        let key = format!("{RECORDS}{name}");
        let bytes = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| RepoError::Unknown(name.to_string()))?;
        let record = serde_json::from_slice(&bytes).map_err(|source| RepoError::Corrupt {
            key: key.clone(),
            source,
        })?;
        self.store.apply(vec![Op::Delete { key }]).await?;
        Ok(record)
    }

    /// The repositories registered with the URL `url` (matched as
    /// [`normalize`] makes it).
    pub(crate) async fn by_url(&self, urls: &[String]) -> Result<Vec<RepoRecord>, RepoError> {
        let wanted: Vec<String> = urls.iter().map(|u| normalize(u)).collect();
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|r| wanted.contains(&normalize(&r.url)))
            .collect())
    }

    /// The repository's webhook secret, status token and fetch login.
    pub(crate) fn secrets(&self, r: &RepoRecord) -> Result<RepoSecrets, RepoError> {
        Ok(RepoSecrets {
            webhook: self.sealer.open(&r.sealed_webhook_secret)?,
            status_token: self.sealer.open(&r.sealed_status_token)?,
            fetch_login: self.sealer.open(&r.sealed_fetch_login)?,
        })
    }
}

/// A repository's opened secrets; kept out of `Debug`.
pub(crate) struct RepoSecrets {
    pub(crate) webhook: String,
    pub(crate) status_token: String,
    pub(crate) fetch_login: String,
}

impl std::fmt::Debug for RepoSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RepoSecrets(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn repos() -> (Arc<MemoryStore>, Repos) {
        let store = Arc::new(MemoryStore::new());
        (store.clone(), Repos::new(store, Sealer::from_key(&[1; 32])))
    }

    fn new(name: &str, url: &str) -> NewRepo {
        NewRepo {
            name: name.into(),
            url: url.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn add_list_remove_and_no_secret_in_the_store() {
        let (store, r) = repos();
        let mut n = new("app", "http://bot:pa%2Bss@127.0.0.1:9/demo/app.git");
        n.forge = Some(Forge::Gitea);
        n.api_url = "http://127.0.0.1:10/".into();
        n.status_token = "status-token-123".into();
        let (secret, rec) = r.add(n, 5).await.unwrap();
        assert_eq!(rec.url, "http://127.0.0.1:9/demo/app.git");
        assert_eq!(rec.pipeline, ".capstan.yaml");
        assert_eq!(rec.api_url, "http://127.0.0.1:10");
        for (_, v) in store.scan_prefix("").await.unwrap() {
            let v = String::from_utf8_lossy(&v);
            assert!(
                !v.contains(&secret) && !v.contains("status-token-123") && !v.contains("pa+ss")
            );
        }
        let s = r.secrets(&rec).unwrap();
        assert_eq!(s.webhook, secret);
        assert_eq!(s.status_token, "status-token-123");
        assert_eq!(s.fetch_login, "bot:pa+ss");
        let err = r.add(new("app", "http://x/y"), 6).await.unwrap_err();
        assert!(matches!(err, RepoError::Exists(_)), "{err}");
        let found = r
            .by_url(&["HTTP://127.0.0.1:9/demo/app/".into()])
            .await
            .unwrap();
        assert_eq!(found, vec![rec.clone()]);
        assert_eq!(r.list().await.unwrap(), vec![rec.clone()]);
        assert_eq!(r.remove("app").await.unwrap(), rec);
        assert!(r.list().await.unwrap().is_empty());
        assert!(matches!(r.remove("app").await, Err(RepoError::Unknown(_))));
    }

    #[tokio::test]
    async fn bad_settings_are_refused_with_what_to_do() {
        let (_, r) = repos();
        let err = |n: NewRepo| {
            futures::executor::block_on(r.add(n, 0))
                .unwrap_err()
                .to_string()
        };
        assert!(err(new("a b", "http://x/y")).contains("bad repository name"));
        assert!(err(new("a", "-u")).contains("--url"));
        let mut n = new("a", "http://x/y");
        n.forge = Some(Forge::Github);
        assert!(err(n).contains("--forge needs --api-url and --status-token"));
        let mut n = new("a", "http://x/y");
        n.status_token = "t".into();
        assert!(err(n).contains("need --forge"));
        let mut n = new("a", "http://x/y");
        n.schedules = vec!["every day".into()];
        assert!(err(n).contains("cron"));
    }

    #[test]
    fn branch_globs_and_forge_paths() {
        assert!(glob("main", "main") && !glob("main", "mainx"));
        assert!(glob("release/*", "release/1.2") && !glob("release/*", "release/1/2"));
        assert!(glob("feature/**", "feature/a/b"));
        let mut rec = RepoRecord {
            name: "a".into(),
            url: "https://github.com/octo/app.git".into(),
            pipeline: DEFAULT_PIPELINE.into(),
            branches: vec!["main".into(), "release/*".into()],
            forge: None,
            api_url: String::new(),
            schedules: vec![],
            created_at_ms: 0,
            sealed_webhook_secret: String::new(),
            sealed_status_token: String::new(),
            sealed_fetch_login: String::new(),
        };
        assert!(rec.wants("main") && rec.wants("release/2") && !rec.wants("dev"));
        assert_eq!(rec.forge_path(), "octo/app");
        rec.url = "git@gitlab.example.com:group/sub/app.git".into();
        assert_eq!(rec.forge_path(), "group/sub/app");
        assert_eq!(
            normalize("https://GitHub.com/octo/app.git/"),
            "https://github.com/octo/app"
        );
    }
}
