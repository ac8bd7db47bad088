//! An OpenSSH server on `127.0.0.1:<free port>` for git-over-SSH tests: the
//! machine's `sshd` (Debian's `openssh-server`, installed by
//! `scripts/testbed up`) with its own host key, config and authorized key in
//! a temporary directory, started in the foreground (`-D`) as a child that is
//! killed when the [`SshServer`] is dropped. It serves whatever path the URL
//! names, so it can serve the bare repositories of a
//! [`crate::git_server::GitServer`] root.
//!
//! It logs in as the user running the tests (root in CI): sshd cannot switch
//! to another user unless it runs as root, and a test user would need
//! `useradd`. Public-key authentication only.

use crate::wait::poll_until_blocking;
use anyhow::{Context, bail};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where Debian puts the daemon; sshd must be started by absolute path.
const SSHD: &str = "/usr/sbin/sshd";

pub struct SshServer {
    child: Child,
    addr: SocketAddr,
    user: String,
    dir: tempfile::TempDir,
}

/// A key pair made with `ssh-keygen`.
pub struct KeyPair {
    /// The private key, OpenSSH format.
    pub private: String,
    /// `ssh-ed25519 AAAA... comment`
    pub public: String,
}

/// A new ed25519 key pair without a passphrase.
pub fn keygen(dir: &Path, name: &str) -> anyhow::Result<KeyPair> {
    let path = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .output()
        .context("running ssh-keygen (scripts/testbed up installs openssh-client)")?;
    if !out.status.success() {
        bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(KeyPair {
        private: std::fs::read_to_string(&path)?,
        public: std::fs::read_to_string(path.with_extension("pub"))?
            .trim()
            .to_owned(),
    })
}

impl SshServer {
    /// Starts sshd accepting `client` (a public key line) for the current user.
    pub fn start(client_public_key: &str) -> anyhow::Result<SshServer> {
        if !Path::new(SSHD).exists() {
            bail!("{SSHD} is missing: run scripts/testbed up (it installs openssh-server)");
        }
        // sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        let dir = tempfile::Builder::new().prefix("capstan-sshd-").tempdir()?;
        keygen(dir.path(), "host_key")?;
        let authorized = dir.path().join("authorized_keys");
        std::fs::write(&authorized, format!("{client_public_key}\n"))?;
        let user = current_user()?;
        let mut last_error = String::new();
        // A free port can be taken between choosing it and sshd's bind: try
        // a few.
        for _ in 0..5 {
            let port = crate::net::free_port();
            let config = dir.path().join("sshd_config");
            std::fs::write(&config, config_text(dir.path(), port, &user))?;
            let log = dir.path().join(format!("sshd-{port}.log"));
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-f")
                .arg(&config)
                .arg("-E")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {SSHD}"))?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let up =
                poll_until_blocking(Duration::from_secs(10), Duration::from_millis(20), || {
                    if let Some(status) = child.try_wait()? {
                        return Ok(Some(Err(format!(
                            "sshd exited ({status}): {}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        ))));
                    }
                    let listening =
                        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
                    Ok(listening.then_some(Ok(())))
                })?;
            match up {
                Some(Ok(())) => {
                    return Ok(SshServer {
                        child,
                        addr,
                        user,
                        dir,
                    });
                }
                Some(Err(e)) => last_error = e,
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "sshd did not listen on {addr} within 10 s: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        }
        bail!("sshd could not start: {last_error}")
    }

    /// `ssh://USER@127.0.0.1:PORT/ABSOLUTE/PATH`
    pub fn url(&self, path: &Path) -> String {
        format!("ssh://{}@{}{}", self.user, self.addr, path.display())
    }

    /// The known_hosts line for this server: `[127.0.0.1]:PORT ssh-ed25519 AAAA...`.
    pub fn known_hosts(&self) -> String {
        let public = std::fs::read_to_string(self.dir.path().join("host_key.pub"))
            .expect("the host key written at start");
        let mut fields = public.split_whitespace();
        let (kind, key) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
        format!("[{}]:{} {kind} {key}", self.addr.ip(), self.addr.port())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// sshd's own log (authentication failures and the like).
    pub fn log(&self) -> String {
        let log = self
            .dir
            .path()
            .join(format!("sshd-{}.log", self.addr.port()));
        std::fs::read_to_string(log).unwrap_or_default()
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_text(dir: &Path, port: u16, user: &str) -> String {
    let path = |name: &str| -> PathBuf { dir.join(name) };
    format!(
        "ListenAddress 127.0.0.1:{port}\n\
         HostKey {host_key}\n\
         AuthorizedKeysFile {authorized}\n\
         AllowUsers {user}\n\
         PidFile none\n\
         UsePAM no\n\
         StrictModes no\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\n\
         LogLevel VERBOSE\n",
        host_key = path("host_key").display(),
        authorized = path("authorized_keys").display(),
    )
}

fn current_user() -> anyhow::Result<String> {
    let out = Command::new("id")
        .arg("-un")
        .output()
        .context("running id -un")?;
    if !out.status.success() {
        bail!("id -un: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}
