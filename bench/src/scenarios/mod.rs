//! One module per scenario. Each prints what it measured and returns its
//! figures as flat `(key, value)` pairs for `report.json`.

pub(crate) mod buildbot;
pub(crate) mod compose_failover;
pub(crate) mod connected;
pub(crate) mod container_overhead;
pub(crate) mod dashboard;
pub(crate) mod failover;
pub(crate) mod history;
pub(crate) mod log_throughput;
pub(crate) mod lost_runner;
pub(crate) mod pickup;
pub(crate) mod retention;
pub(crate) mod store_commit;
pub(crate) mod throughput;
pub(crate) mod webhook;

use std::path::PathBuf;

/// A scenario that cannot run on this machine (a missing tool), as opposed
/// to one that failed.
#[derive(Debug)]
pub(crate) struct Skip(pub(crate) String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Skip {}

/// Figures of one scenario, in the order they were measured.
pub(crate) type Figures = Vec<(String, f64)>;

/// What every scenario gets.
pub(crate) struct Ctx {
    /// Smoke-run sizes (CI), not the sizes.
    pub(crate) quick: bool,
    /// A scratch directory for this scenario's processes and data.
    pub(crate) dir: PathBuf,
    /// Runners of the `connected` scenario, instead of its default size.
    pub(crate) connected_runners: Option<usize>,
}

/// Percentile by nearest rank of sorted `v` (`p` in 0..=100).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts in place and returns (p50, p99, max).
pub(crate) fn summary(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (
        percentile(v, 50.0),
        percentile(v, 99.0),
        v.last().copied().unwrap_or(f64::NAN),
    )
}

/// The core count, printed by every scenario.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// `$var` if set, else `~/.cache/<name>`: where the bench's scratch dir and
/// the Buildbot harness's copy live.
pub(crate) fn cache_dir(var: &str, name: &str) -> anyhow::Result<PathBuf> {
    match std::env::var_os(var) {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => {
            let home =
                std::env::var_os("HOME").ok_or_else(|| anyhow::anyhow!("set HOME or {var}"))?;
            Ok(PathBuf::from(home).join(".cache").join(name))
        }
    }
}

/// Median time to create an empty file in `dir` (made if missing), over
/// `n` new files, in ms. The files stay: deleting them would free inodes,
/// and on ext4 without a journal (these VMs) every inode freed in the last
/// minute or so slows each later allocation in its block group. That cost
/// is what the probe is for: a pickup's step creates its stamp file, and
/// what one creation costs depends on where the directory is and what was
/// deleted near it (bench/findings.md).
pub(crate) fn file_create_ms(dir: &std::path::Path, n: usize) -> std::io::Result<f64> {
    std::fs::create_dir_all(dir)?;
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let started = std::time::Instant::now();
        std::fs::File::create(dir.join(format!("probe-{i}")))?;
        ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(summary(&mut ms).0)
}
