//! The real services of `scripts/testbed up` (Docker Engine, test image,
//! registry with auth), read from its env file, and cleanup of the Docker
//! objects a test labels.

use crate::wait::poll_until;
use base64::Engine as _;
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The facts `scripts/testbed up` wrote (or `CAPSTAN_TEST_*` overrides).
pub struct Testbed {
    pub registry: String,
    pub user: String,
    pub password: String,
    pub image: String,
}

/// Reads the test bed, or panics saying to run `scripts/testbed up`: tests
/// that need it fail, never skip.
pub fn testbed() -> Testbed {
    let dir = std::env::var_os("TESTBED_DIR").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/capstan-testbed"),
        PathBuf::from,
    );
    let mut vars: BTreeMap<String, String> = std::fs::read_to_string(dir.join("env"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    vars.extend(std::env::vars().filter(|(k, _)| k.starts_with("CAPSTAN_TEST_")));
    let get = |k: &str| {
        vars.get(k).cloned().unwrap_or_else(|| {
            panic!(
                "{k} is not set and {}/env has no value: run scripts/testbed up",
                dir.display()
            )
        })
    };
    let tb = Testbed {
        registry: get("CAPSTAN_TEST_REGISTRY"),
        user: get("CAPSTAN_TEST_REGISTRY_USER"),
        password: get("CAPSTAN_TEST_REGISTRY_PASSWORD"),
        image: get("CAPSTAN_TEST_IMAGE"),
    };
    let ok = Command::new("docker")
        .args(["image", "inspect", &tb.image])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "no Docker Engine or no image {}: run scripts/testbed up",
        tb.image
    );
    tb
}

/// Everything labelled `capstan.test=<id>` goes when dropped.
pub struct Cleanup {
    pub id: String,
}

impl Cleanup {
    pub fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Self {
            id: format!("e2e-{name}-{}-{nanos}", std::process::id()),
        }
    }
    pub fn label(&self) -> String {
        format!("capstan.test={}", self.id)
    }
    pub fn list(&self, args: &[&str]) -> String {
        let out = Command::new("docker")
            .args(args)
            .args(["--filter", &format!("label={}", self.label()), "-q"])
            .output()
            .expect("docker CLI");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
    pub fn leftovers(&self) -> String {
        [
            self.list(&["ps", "-a"]),
            self.list(&["volume", "ls"]),
            self.list(&["network", "ls"]),
        ]
        .join(" ")
        .trim()
        .to_owned()
    }
    pub fn running(&self) -> String {
        self.list(&["ps", "--filter", "status=running"])
    }
    pub async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Self) -> bool,
    ) -> Duration {
        let start = Instant::now();
        let done = poll_until(timeout, Duration::from_millis(20), async || {
            Ok(pred(self).then_some(()))
        })
        .await
        .expect("the probe cannot fail");
        assert!(done.is_some(), "{what} not within {timeout:?}");
        start.elapsed()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let rm = |args: &[&str], ids: String| {
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(args)
                    .args(ids.split_whitespace())
                    .output();
            }
        };
        rm(&["rm", "-f", "-v"], self.list(&["ps", "-a"]));
        rm(&["volume", "rm", "-f"], self.list(&["volume", "ls"]));
        rm(&["network", "rm"], self.list(&["network", "ls"]));
    }
}

/// Removes a local image a test built. `--no-prune` keeps its untagged
/// parents: they are the build cache other tests running at the same time
/// may be building on (pruning them failed a concurrent build with "failed
/// to get digest ...: no such file or directory").
pub fn remove_image(image: &str) {
    let _ = Command::new("docker")
        .args(["image", "rm", "-f", "--no-prune", image])
        .output();
}

/// A GET on the test registry's HTTP API with basic auth: (status, whole response).
pub fn registry_get(tb: &Testbed, path: &str) -> (u16, String) {
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", tb.user, tb.password));
    let mut s = std::net::TcpStream::connect(&tb.registry).expect("registry");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {}\r\nAuthorization: Basic {auth}\r\n\
         Accept: application/vnd.docker.distribution.manifest.v2+json\r\n\r\n",
        tb.registry
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, resp)
}
