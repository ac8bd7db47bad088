//! How the runner proves who it is to a git remote, and checks who the
//! remote is: one set of git2 callbacks for the source checkout, `set-image`
//! clones and `git-push`.
//!
//! - HTTP(S): a `{ username, password }` secret, or a text secret (a token,
//!   see [`Secret::login`]), as basic auth. TLS certificates are left to
//!   libgit2's own checks (the system's CA store).
//! - SSH (`ssh://[user@]host[:port]/path` or `[user@]host:path`): a
//!   `{ ssh_key, username?, passphrase?, known_hosts? }` secret. The user is
//!   the secret's `username`, else the URL's, else `git`.
//!
//! The SSH server's host key must be listed for the host in OpenSSH's
//! `known_hosts` format: the secret's `known_hosts` text when it has one,
//! else `~/.ssh/known_hosts` of the runner's user. An unknown host or a key
//! that differs from the listed one refuses the connection, as
//! `StrictHostKeyChecking yes` does: a runner that pushes deploy commits must
//! not hand them to whoever answers on the address.
//!
//! Doors: imports [`crate::secrets`] only; `git::remote` is its one caller.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use git2::{CertificateCheckStatus, CredentialType};
use hmac::{Hmac, Mac};
use ssh_key::known_hosts::{HostPatterns, KnownHosts, Marker};

use crate::secrets::Secret;

/// User name of SSH remotes whose URL and secret name none.
const DEFAULT_SSH_USER: &str = "git";

/// What the callbacks saw, for turning libgit2's terse errors into ones that
/// say what to fix. Shared by reference with the callbacks of one operation.
#[derive(Debug, Default)]
pub(crate) struct AuthReport {
    /// The server refused the credentials given, or wanted some and none
    /// were configured.
    auth_failed: AtomicBool,
    /// Why the connection was refused before authenticating (host key, or a
    /// secret of the wrong kind for the remote): the whole message.
    refused: Mutex<Option<String>>,
}

impl AuthReport {
    pub(crate) fn auth_failed(&self) -> bool {
        self.auth_failed.load(Ordering::SeqCst)
    }

    /// The reason the callbacks refused the remote, if they did.
    pub(crate) fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Sorts the error of the operation these callbacks served: refused
    /// before authenticating, credentials not accepted, or anything else.
    /// The source checkout and the GitOps steps both use this, so the same
    /// failure reads the same way wherever it happens.
    pub(crate) fn classify(&self, source: git2::Error) -> Failure {
        if let Some(message) = self.refused() {
            return Failure::Refused(message);
        }
        // libgit2 reports some credential failures only in the message
        // ("too many redirects or authentication replays").
        let auth = self.auth_failed()
            || source.code() == git2::ErrorCode::Auth
            || source.message().contains("authentication");
        if auth {
            Failure::Auth(source)
        } else {
            Failure::Other(source)
        }
    }

    fn refuse(&self, message: String) -> git2::Error {
        let error = git2::Error::from_str(&message);
        *self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(message);
        error
    }
}

/// A failed git network operation, sorted by [`AuthReport::classify`].
#[derive(Debug)]
pub(crate) enum Failure {
    /// The callbacks refused the remote (host key, wrong kind of secret):
    /// the whole message, which says what to do.
    Refused(String),
    /// The remote did not accept the credentials, or wanted some.
    Auth(git2::Error),
    /// Anything else (network, missing repository, ...).
    Other(git2::Error),
}

/// Callbacks for one operation against `url` with `secret` (named
/// `secret_name` in error messages). `report` says afterwards why it failed.
pub(crate) fn callbacks<'a>(
    url: &str,
    secret: Option<&'a Secret>,
    secret_name: Option<&str>,
    report: &'a AuthReport,
) -> git2::RemoteCallbacks<'a> {
    let name = secret_name.map_or_else(|| "(none)".to_owned(), |n| format!("`{n}`"));
    let mut callbacks = git2::RemoteCallbacks::new();
    callbacks.certificate_check(host_key_check(
        url,
        secret,
        wrong_kind_for_ssh(&name),
        report,
    ));
    callbacks.credentials(credentials(secret, name, report));
    callbacks
}

/// The `credentials` callback: answers once from `secret`, and counts a
/// second question as the server refusing the answer.
fn credentials<'a>(
    secret: Option<&'a Secret>,
    name: String,
    report: &'a AuthReport,
) -> impl FnMut(&str, Option<&str>, CredentialType) -> Result<git2::Cred, git2::Error> + 'a {
    let mut answered = false;
    move |_url, url_user, allowed| {
        let user = match secret {
            Some(Secret::SshKey {
                username: Some(u), ..
            }) => u.clone(),
            _ => url_user.unwrap_or(DEFAULT_SSH_USER).to_owned(),
        };
        // SSH first asks for the user name alone; that is not an attempt.
        if allowed == CredentialType::USERNAME {
            return git2::Cred::username(&user);
        }
        if answered {
            // libgit2 asks again after a refusal; it would replay the same
            // credentials forever.
            report.auth_failed.store(true, Ordering::SeqCst);
            return Err(git2::Error::from_str("authentication failed"));
        }
        answered = true;
        match secret {
            None => {
                report.auth_failed.store(true, Ordering::SeqCst);
                Err(git2::Error::from_str(
                    "the server wants credentials and none are configured",
                ))
            }
            Some(Secret::SshKey {
                ssh_key,
                passphrase,
                ..
            }) => {
                if !allowed.contains(CredentialType::SSH_KEY) {
                    return Err(report.refuse(format!(
                        "secret {name} is an SSH key, but the remote asks for a user name and password: use an ssh:// URL, or a {{ username, password }} secret"
                    )));
                }
                git2::Cred::ssh_key_from_memory(&user, None, ssh_key, passphrase.as_deref())
            }
            Some(login) => {
                if !allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
                    return Err(report.refuse(wrong_kind_for_ssh(&name)));
                }
                let (user, pass) = login.login().expect("every kind but an SSH key is a login");
                git2::Cred::userpass_plaintext(&user, &pass)
            }
        }
    }
}

/// The `certificate_check` callback: X.509 is libgit2's to check; an SSH
/// host key must be listed for the URL's host (see the module docs).
fn host_key_check<'a>(
    url: &str,
    secret: Option<&Secret>,
    wrong_kind: String,
    report: &'a AuthReport,
) -> impl FnMut(&git2::cert::Cert<'_>, &str) -> Result<CertificateCheckStatus, git2::Error> + 'a {
    let host = ssh_host(url);
    let known_hosts = match secret {
        Some(Secret::SshKey {
            known_hosts: Some(text),
            ..
        }) => KnownHostsSource::Text(text.clone()),
        _ => KnownHostsSource::File(home_known_hosts()),
    };
    let password_secret = secret.is_some_and(|s| s.login().is_some());
    move |cert, _host| {
        let Some(hostkey) = cert.as_hostkey() else {
            // X.509 (HTTPS): libgit2 checks it against the system's CAs.
            return Ok(CertificateCheckStatus::CertificatePassthrough);
        };
        // Said before the host key, which such a secret has no list for.
        if password_secret {
            return Err(report.refuse(wrong_kind.clone()));
        }
        let Some(key) = hostkey.hostkey() else {
            return Err(report.refuse("the SSH server's host key could not be read".into()));
        };
        let Some((host, port)) = &host else {
            return Err(report
                .refuse("cannot tell which host the SSH URL names to check its host key".into()));
        };
        let text = known_hosts.read();
        match host_key_refusal(
            check_host_key(&text, host, *port, key),
            host,
            *port,
            &known_hosts,
        ) {
            None => Ok(CertificateCheckStatus::CertificateOk),
            Some(message) => Err(report.refuse(message)),
        }
    }
}

/// Why the connection is refused after looking the host key up; `None`
/// when the key is known.
fn host_key_refusal(
    found: HostKey,
    host: &str,
    port: u16,
    known_hosts: &KnownHostsSource,
) -> Option<String> {
    let name = lookup_name(host, port);
    let list = known_hosts.describe();
    match found {
        HostKey::Known => None,
        HostKey::Unknown => Some(format!(
            "host key check failed: {name} is not in {list}; add the output of `ssh-keyscan -p {port} {host}` there (after checking its fingerprint)",
        )),
        HostKey::Changed => Some(format!(
            "host key check failed: the key {name} offers differs from the one in {list} (the host's key changed, or someone is intercepting the connection); refusing to connect",
        )),
        HostKey::Revoked => Some(format!(
            "host key check failed: the key {name} offers is marked @revoked in {list}",
        )),
    }
}

fn wrong_kind_for_ssh(name: &str) -> String {
    format!(
        "secret {name} is a user name and password, but the remote is SSH: give it an `ssh_key` (and `known_hosts`), or use an https:// URL"
    )
}

/// Where the known hosts come from.
enum KnownHostsSource {
    Text(String),
    File(Option<PathBuf>),
}

impl KnownHostsSource {
    /// The text; a missing file knows no hosts.
    fn read(&self) -> String {
        match self {
            KnownHostsSource::Text(text) => text.clone(),
            KnownHostsSource::File(Some(path)) => std::fs::read_to_string(path).unwrap_or_default(),
            KnownHostsSource::File(None) => String::new(),
        }
    }

    fn describe(&self) -> String {
        match self {
            KnownHostsSource::Text(_) => "the secret's `known_hosts`".into(),
            KnownHostsSource::File(Some(path)) => {
                format!("{} (or set `known_hosts` in the secret)", path.display())
            }
            KnownHostsSource::File(None) => {
                "known_hosts (HOME is not set; set `known_hosts` in the secret)".into()
            }
        }
    }
}

fn home_known_hosts() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ssh/known_hosts"))
}

/// Host and port of an SSH URL (`ssh://[user@]host[:port]/path`, or
/// scp-like `[user@]host:path`); `None` for other schemes.
pub(crate) fn ssh_host(url: &str) -> Option<(String, u16)> {
    if url.contains("://") {
        let parsed = url::Url::parse(url).ok()?;
        if !matches!(parsed.scheme(), "ssh" | "git+ssh" | "ssh+git") {
            return None;
        }
        let host = parsed
            .host_str()?
            .trim_start_matches('[')
            .trim_end_matches(']');
        return Some((host.to_owned(), parsed.port().unwrap_or(22)));
    }
    // scp-like: a colon before any slash.
    let (before, _) = url.split_once(':')?;
    if before.contains('/') || before.is_empty() {
        return None;
    }
    let host = before.rsplit_once('@').map_or(before, |(_, h)| h);
    Some((host.to_owned(), 22))
}

/// The name known_hosts lists a host under: `host`, or `[host]:port` off 22.
fn lookup_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

#[derive(Debug, PartialEq, Eq)]
enum HostKey {
    Known,
    /// No line names the host.
    Unknown,
    /// Lines name the host, none with this key.
    Changed,
    Revoked,
}

/// Looks `key` (the SSH wire encoding of the server's public key) up for
/// `host:port` in known_hosts `text`. Lines that do not parse are skipped,
/// as OpenSSH skips them.
fn check_host_key(text: &str, host: &str, port: u16, key: &[u8]) -> HostKey {
    let name = lookup_name(host, port);
    let mut listed = false;
    let mut matched = false;
    for line in text.lines() {
        // One bad line must not hide the others: parse line by line.
        let Some(Ok(entry)) = KnownHosts::new(line).next() else {
            continue;
        };
        if !host_matches(entry.host_patterns(), &name) {
            continue;
        }
        let same_key = entry
            .public_key()
            .to_bytes()
            .is_ok_and(|bytes| bytes == key);
        match entry.marker() {
            Some(Marker::Revoked) if same_key => return HostKey::Revoked,
            Some(_) => continue, // @cert-authority: host certificates are not supported
            None => {
                listed = true;
                matched |= same_key;
            }
        }
    }
    match (listed, matched) {
        (_, true) => HostKey::Known,
        (true, false) => HostKey::Changed,
        (false, false) => HostKey::Unknown,
    }
}

/// OpenSSH's rule: some pattern matches and no negated (`!`) one does;
/// a hashed entry (`|1|salt|hash`) matches when HMAC-SHA1(salt, name) is
/// the hash.
fn host_matches(patterns: &HostPatterns, name: &str) -> bool {
    match patterns {
        HostPatterns::Patterns(list) => {
            let mut any = false;
            for pattern in list {
                if let Some(negated) = pattern.strip_prefix('!') {
                    if glob(negated, name) {
                        return false;
                    }
                } else if glob(pattern, name) {
                    any = true;
                }
            }
            any
        }
        HostPatterns::HashedName { salt, hash } => {
            let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(salt) else {
                return false;
            };
            mac.update(name.as_bytes());
            mac.verify_slice(hash).is_ok()
        }
    }
}

/// `*` and `?` wildcards, ASCII case-insensitive (host names).
fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some((b'?', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some((c, rest)) => n
                .split_first()
                .is_some_and(|(d, tail)| c.eq_ignore_ascii_case(d) && go(rest, tail)),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const KEY_A: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIMACfBMByrD6Zy11f50UYkGJtzqGRRU/n30vW/HGRb82";
    const KEY_B: &str = "AAAAC3NzaC1lZDI1NTE5AAAAINELTZYPblAEr0IReYLWHRXqCQmNCEvjv5aooONVHMQO";

    fn raw(key: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(key)
            .unwrap()
    }

    #[test]
    fn ssh_urls_name_their_host_and_port() {
        assert_eq!(
            ssh_host("ssh://git@127.0.0.1:2222/srv/repo.git"),
            Some(("127.0.0.1".into(), 2222))
        );
        assert_eq!(
            ssh_host("ssh://example.com/repo.git"),
            Some(("example.com".into(), 22))
        );
        assert_eq!(
            ssh_host("ssh://git@[::1]:2200/r.git"),
            Some(("::1".into(), 2200))
        );
        assert_eq!(
            ssh_host("git@github.com:org/repo.git"),
            Some(("github.com".into(), 22))
        );
        assert_eq!(ssh_host("https://example.com/repo.git"), None);
        assert_eq!(ssh_host("/srv/git/repo.git"), None);
        assert_eq!(ssh_host("./a:b"), None);
    }

    #[test]
    fn plain_and_port_entries() {
        let text = format!(
            "# comment\n\nexample.com,other ssh-ed25519 {KEY_A}\n[127.0.0.1]:2222 ssh-ed25519 {KEY_B} c\n"
        );
        assert_eq!(
            check_host_key(&text, "example.com", 22, &raw(KEY_A)),
            HostKey::Known
        );
        assert_eq!(
            check_host_key(&text, "EXAMPLE.com", 22, &raw(KEY_A)),
            HostKey::Known
        );
        assert_eq!(
            check_host_key(&text, "example.com", 22, &raw(KEY_B)),
            HostKey::Changed
        );
        assert_eq!(
            check_host_key(&text, "127.0.0.1", 2222, &raw(KEY_B)),
            HostKey::Known
        );
        // The same address on another port is another host.
        assert_eq!(
            check_host_key(&text, "127.0.0.1", 22, &raw(KEY_B)),
            HostKey::Unknown
        );
        assert_eq!(
            check_host_key(&text, "nowhere", 22, &raw(KEY_A)),
            HostKey::Unknown
        );
        assert_eq!(check_host_key("", "x", 22, &raw(KEY_A)), HostKey::Unknown);
    }

    #[test]
    fn bad_lines_are_skipped_and_later_lines_count() {
        let text = format!(
            "garbage line\nexample.com ssh-ed25519 !!notbase64\nexample.com ssh-ed25519 {KEY_A}\n"
        );
        assert_eq!(
            check_host_key(&text, "example.com", 22, &raw(KEY_A)),
            HostKey::Known
        );
    }

    #[test]
    fn wildcards_negation_and_markers() {
        let text = format!(
            "*.corp,!bad.corp ssh-ed25519 {KEY_A}\n@revoked * ssh-ed25519 {KEY_B}\n@cert-authority *.corp ssh-ed25519 {KEY_B}\n"
        );
        assert_eq!(
            check_host_key(&text, "git.corp", 22, &raw(KEY_A)),
            HostKey::Known
        );
        assert_eq!(
            check_host_key(&text, "bad.corp", 22, &raw(KEY_A)),
            HostKey::Unknown
        );
        assert_eq!(
            check_host_key(&text, "git.corp", 22, &raw(KEY_B)),
            HostKey::Revoked
        );
        assert!(glob("g?t.*", "git.corp"));
        assert!(!glob("g?t", "gt"));
    }

    #[test]
    fn hashed_names() {
        // `ssh-keygen -H` of "[127.0.0.1]:2222" with salt 0x01..0x14.
        let salt: Vec<u8> = (1..=20).collect();
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&salt).unwrap();
        mac.update(b"[127.0.0.1]:2222");
        let hash = mac.finalize().into_bytes();
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let text = format!("|1|{}|{} ssh-ed25519 {KEY_A}\n", b64(&salt), b64(&hash));
        assert_eq!(
            check_host_key(&text, "127.0.0.1", 2222, &raw(KEY_A)),
            HostKey::Known
        );
        assert_eq!(
            check_host_key(&text, "127.0.0.1", 2223, &raw(KEY_A)),
            HostKey::Unknown
        );
    }
}
