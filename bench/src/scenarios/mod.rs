//! One module per scenario. Each prints what it measured and returns its
//! figures as flat `(key, value)` pairs for `report.json`.

pub mod buildbot;
pub mod connected;
pub mod container_overhead;
pub mod failover;
pub mod log_throughput;
pub mod lost_runner;
pub mod pickup;
pub mod store_commit;
pub mod throughput;

use std::path::PathBuf;

/// A scenario that cannot run on this machine (a missing tool), as opposed
/// to one that failed.
#[derive(Debug)]
pub struct Skip(pub String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Skip {}

/// Figures of one scenario, in the order they were measured.
pub type Figures = Vec<(String, f64)>;

/// What every scenario gets.
pub struct Ctx {
    /// Smoke-run sizes (CI), not the sizes.
    pub quick: bool,
    /// A scratch directory for this scenario's processes and data.
    pub dir: PathBuf,
    /// Runners of the `connected` scenario, instead of its default size.
    pub connected_runners: Option<usize>,
}

/// Percentile by nearest rank of sorted `v` (`p` in 0..=100).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts in place and returns (p50, p99, max).
pub fn summary(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (
        percentile(v, 50.0),
        percentile(v, 99.0),
        v.last().copied().unwrap_or(f64::NAN),
    )
}

/// The core count, printed by every scenario.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
