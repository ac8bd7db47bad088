//! The log store's disk use, for `/metrics`: bytes its files hold and the
//! bytes still free on its filesystem (`capstan_log_store_bytes`,
//! `capstan_log_store_free_bytes`). Measured when scraped, at most once
//! per [`REFRESH`]: the byte count walks the log directory.

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// The shortest time between two measurements.
const REFRESH: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(crate) struct LogStoreUsage {
    dir: OnceLock<PathBuf>,
    bytes: Gauge,
    free_bytes: Gauge,
    last: Mutex<Option<Instant>>,
}

impl LogStoreUsage {
    pub(crate) fn register(&self, r: &mut Registry) {
        r.register(
            "log_store_bytes",
            "Bytes of log files in the local log store",
            self.bytes.clone(),
        );
        r.register(
            "log_store_free_bytes",
            "Bytes free (to unprivileged users) on the log store's filesystem",
            self.free_bytes.clone(),
        );
    }

    /// Measures `dir` from now on (the first call wins).
    pub(crate) fn watch(&self, dir: &Path) {
        let _ = self.dir.set(dir.to_path_buf());
        self.refresh_now();
    }

    /// Measures again if the last measurement is older than [`REFRESH`].
    pub(crate) fn refresh(&self) {
        let mut last = self.last.lock().expect("not poisoned");
        if last.is_some_and(|t| t.elapsed() < REFRESH) {
            return;
        }
        *last = Some(Instant::now());
        drop(last);
        self.refresh_now();
    }

    fn refresh_now(&self) {
        let Some(dir) = self.dir.get() else {
            return;
        };
        match nix::sys::statvfs::statvfs(dir.as_path()) {
            Ok(s) => {
                // The widths of these C types differ between platforms.
                #[allow(clippy::unnecessary_cast)]
                let free = (s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64);
                self.free_bytes.set(free as i64);
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the log store's free space")
            }
        }
        self.bytes.set(dir_bytes(dir) as i64);
    }
}

/// The bytes of the regular files under `dir` (unreadable entries count 0).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_files_bytes_and_some_free_space() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.log"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b.log"), vec![0u8; 234]).unwrap();
        let u = LogStoreUsage::default();
        u.watch(dir.path());
        assert_eq!(u.bytes.get(), 1234);
        assert!(u.free_bytes.get() > 0);
    }
}
