//! `capstan-bench`: starts real coordinator and runner processes on loopback,
//! runs the benchmark scenarios and writes `report.json` (flat: one key per
//! figure) and `report.md` next to it. A benchmark, not a test: it never
//! fails on a threshold. A scenario that needs what the machine may lack
//! (Docker, PyPI) is reported as skipped; any other scenario that cannot
//! measure is reported as failed and makes the exit status non-zero, so CI
//! notices benchmark code that rotted.
//!
//! Layout:
//! - `procs`: the real binaries (found next to this one), `/proc` figures;
//! - `fleet`: lightweight protocol-client runners, many per process;
//! - `scenarios`: one module per scenario;
//! - `report`: JSON and Markdown.

mod fleet;
mod procs;
mod report;
mod scenarios;

use clap::Parser;
use scenarios::{Ctx, Figures};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Every scenario, in the order a full run takes them.
const SCENARIOS: &[&str] = &[
    "store",
    "pickup",
    "pickup-tls",
    "throughput",
    "throughput-tls",
    "throughput-etcd",
    "logs",
    "connected",
    "lost-runner",
    "failover",
    "compose-failover",
    "container",
    "buildbot",
    "webhook",
    "dashboard",
    "history",
    "retention",
];

/// Scenarios a full run leaves out; they run only when named.
/// `pickup-ab` compares two builds and needs `$CAPSTAN_AB_BIN_DIR`.
const ON_REQUEST: &[&str] = &["pickup-ab"];

#[derive(Parser, Debug)]
#[command(
    name = "capstan-bench",
    about = "Capstan benchmarks: a JSON and Markdown report"
)]
struct Args {
    /// Smoke run in under a minute (CI): small sizes, Buildbot skipped.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON report; the Markdown goes next to it (`.md`).
    #[arg(long, default_value = "bench/report.json")]
    out: PathBuf,
    /// Run only this scenario (repeatable); its figures are merged into an
    /// existing report at --out. One of: store, pickup, pickup-tls,
    /// throughput, throughput-tls, throughput-etcd, logs, connected, lost-runner, failover, compose-failover, container, buildbot, webhook, dashboard, history, retention;
    /// or pickup-ab (two builds' pickup, alternating; build A's binaries in
    /// `$CAPSTAN_AB_BIN_DIR`).
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Take Buildbot's figures from this harness summary (its `work/summary.txt`
    /// or saved output) instead of running the harness.
    #[arg(long)]
    buildbot_summary: Option<PathBuf>,
    /// Runners of the `connected` scenario (default 10,000; quick 500).
    #[arg(long)]
    connected_runners: Option<usize>,
    /// Only re-render the Markdown from the JSON at --out (and findings.md).
    #[arg(long)]
    render_only: bool,
    /// Keep the scratch directory (process logs, data dirs) for inspection.
    #[arg(long)]
    keep: bool,
    /// Run every selected scenario this many times, round after round, and
    /// report each figure's median (each round's values go in
    /// `<figure>_rounds`). These shared VMs drift by tens of percent within
    /// minutes; the Buildbot harness takes medians over runs the same way.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capstan-bench: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    for s in &args.scenarios {
        if !SCENARIOS.contains(&s.as_str()) && !ON_REQUEST.contains(&s.as_str()) {
            anyhow::bail!(
                "unknown scenario `{s}`; choose from {}, {}",
                SCENARIOS.join(", "),
                ON_REQUEST.join(", ")
            );
        }
    }
    if args.render_only {
        let text = std::fs::read_to_string(&args.out)?;
        let Value::Object(report) = serde_json::from_str(&text)? else {
            anyhow::bail!("{} is not a JSON object", args.out.display());
        };
        return write_markdown(&args.out, &report);
    }
    let fds = procs::raise_fd_limit();
    let selected: Vec<&str> = if args.scenarios.is_empty() {
        SCENARIOS.to_vec()
    } else {
        args.scenarios.iter().map(String::as_str).collect()
    };
    let mode = if args.quick { "quick" } else { "full" };
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "capstan-bench: mode {mode}, profile {profile}, {} cores, binaries from {}, open files limit {fds}",
        scenarios::cores(),
        procs::bin_dir().display()
    );
    let scratch = tempfile::Builder::new()
        .prefix("capstan-bench-")
        .tempdir_in(scratch_root()?)?;

    let mut report = Map::new();
    if !args.scenarios.is_empty()
        && let Ok(text) = std::fs::read_to_string(&args.out)
        && let Ok(Value::Object(old)) = serde_json::from_str(&text)
    {
        report = old;
    }
    let failed = run_rounds(&args, &selected, scratch.path(), &mut report).await;
    report.insert("rounds".into(), args.rounds.into());
    report.insert("cores".into(), scenarios::cores().into());
    report.insert("git_commit".into(), git_commit().into());
    report.insert("mode".into(), mode.into());
    report.insert("profile".into(), profile.into());
    report.insert("date".into(), date().into());
    report::add_ratios(&mut report);

    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&Value::Object(report.clone()))? + "\n",
    )?;
    println!("capstan-bench: wrote {}", args.out.display());
    write_markdown(&args.out, &report)?;
    if args.keep {
        let kept = scratch.keep();
        println!("capstan-bench: kept scratch dir {}", kept.display());
    }
    // Figures never fail the run; a scenario that could not measure does, so
    // CI notices benchmark code that rotted.
    if !failed.is_empty() {
        anyhow::bail!("scenarios failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Runs every selected scenario `args.rounds` times, round after round,
/// into `report`: each figure's median (and, over several rounds, every
/// round's value in `<figure>_rounds`), `skipped_<name>` and
/// `failed_<name>`. Returns the scenarios that failed.
async fn run_rounds<'a>(
    args: &Args,
    selected: &[&'a str],
    scratch: &Path,
    report: &mut Map<String, Value>,
) -> Vec<&'a str> {
    let mut failed = Vec::new();
    // Each figure's value in every round, in the order first measured.
    let mut rounds: Vec<(String, Vec<f64>)> = Vec::new();
    for (round, name) in (0..args.rounds).flat_map(|r| selected.iter().map(move |n| (r, *n))) {
        if args.rounds > 1 && name == selected[0] {
            println!("capstan-bench: round {} of {}", round + 1, args.rounds);
        }
        let ctx = Ctx {
            quick: args.quick,
            dir: scratch.join(format!("{name}-{round}")),
            connected_runners: args.connected_runners,
        };
        let started = std::time::Instant::now();
        let result = run_scenario(args, name, &ctx).await;
        let key = name.replace('-', "_");
        report.remove(&format!("skipped_{key}"));
        report.remove(&format!("failed_{key}"));
        match result {
            Ok(figures) => {
                for (k, v) in figures {
                    match rounds.iter_mut().find(|(key, _)| *key == k) {
                        Some((_, values)) => values.push(v),
                        None => rounds.push((k, vec![v])),
                    }
                }
            }
            // These depend on things outside the fleet (Docker, PyPI, etcd).
            Err(e) if matches!(name, "container" | "buildbot") || e.is::<scenarios::Skip>() => {
                println!("{name}: skipped: {e:#}");
                report.insert(format!("skipped_{key}"), format!("{e:#}").into());
            }
            Err(e) => {
                println!("{name}: FAILED: {e:#}");
                report.insert(format!("failed_{key}"), format!("{e:#}").into());
                failed.push(name);
            }
        }
        println!("  ({name} took {:.1} s)", started.elapsed().as_secs_f64());
    }
    for (k, values) in rounds {
        report.insert(k.clone(), round(median(&values)));
        report.remove(&format!("{k}_rounds"));
        if args.rounds > 1 {
            let each: Vec<Value> = values.iter().map(|v| round(*v)).collect();
            report.insert(format!("{k}_rounds"), each.into());
        }
    }
    failed
}

/// One scenario, by name (checked against [`SCENARIOS`] and [`ON_REQUEST`]).
async fn run_scenario(args: &Args, name: &str, ctx: &Ctx) -> anyhow::Result<Figures> {
    match name {
        "store" => scenarios::store_commit::run(ctx).await,
        "pickup" => scenarios::pickup::run(ctx).await,
        "pickup-ab" => scenarios::pickup::run_ab(ctx).await,
        "pickup-tls" => scenarios::pickup::run_tls(ctx).await,
        "throughput-tls" => scenarios::throughput::run_tls(ctx).await,
        "throughput" => scenarios::throughput::run(ctx).await,
        "throughput-etcd" => scenarios::throughput::run_etcd(ctx).await,
        "logs" => scenarios::log_throughput::run(ctx).await,
        "connected" => scenarios::connected::run(ctx).await,
        "lost-runner" => scenarios::lost_runner::run(ctx).await,
        "failover" => scenarios::failover::run(ctx).await,
        "compose-failover" => scenarios::compose_failover::run(ctx).await,
        "container" => scenarios::container_overhead::run(args.quick).await,
        "webhook" => scenarios::webhook::run(ctx).await,
        "dashboard" => scenarios::dashboard::run(ctx).await,
        "history" => scenarios::history::run(ctx).await,
        "retention" => scenarios::retention::run(ctx).await,
        "buildbot" => {
            if args.quick && args.buildbot_summary.is_none() && args.scenarios.is_empty() {
                Err(anyhow::anyhow!(
                    "skipped in --quick (run without --quick, or pass --buildbot-summary)"
                ))
            } else {
                let summary = args.buildbot_summary.clone();
                tokio::task::spawn_blocking(move || scenarios::buildbot::run(summary.as_deref()))
                    .await?
            }
        }
        _ => unreachable!("checked above"),
    }
}

/// Writes the `.md` next to the JSON: the table, then `bench/findings.md`
/// (the hand-written profiling notes) if it exists.
fn write_markdown(out: &std::path::Path, report: &Map<String, Value>) -> anyhow::Result<()> {
    let mut md = report::markdown(report);
    let findings = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("findings.md");
    if let Ok(text) = std::fs::read_to_string(findings) {
        md.push('\n');
        md.push_str(&text);
    }
    let path = out.with_extension("md");
    std::fs::write(&path, md)?;
    println!("capstan-bench: wrote {}", path.display());
    Ok(())
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Three significant decimals are plenty and keep the JSON diff readable.
fn round(v: f64) -> Value {
    if v.is_finite() {
        Value::from((v * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

/// `$CAPSTAN_GIT_COMMIT` (set when benchmarking an exported tree), else HEAD
/// of the repository the bench was built in (read-only `git rev-parse`).
fn git_commit() -> String {
    if let Ok(c) = std::env::var("CAPSTAN_GIT_COMMIT") {
        return c;
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Where the scratch dir goes: `$CAPSTAN_BENCH_DIR`, or `~/.cache/capstan-bench`,
/// beside the Buildbot harness's copy (`~/.cache/capstan-buildbot`), not in
/// `/tmp`. A pickup's step creates a file, and on ext4 without a journal
/// what creating one costs depends on the directory's block group and what
/// was deleted there lately (bench/findings.md); both harnesses' steps
/// should write under the same tree. `pickup_file_create_ms` and
/// `buildbot_file_create_ms` show what it cost on each side.
fn scratch_root() -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let root = scenarios::cache_dir("CAPSTAN_BENCH_DIR", "capstan-bench")?;
    std::fs::create_dir_all(&root)
        .with_context(|| format!("cannot create the bench's scratch root {}", root.display()))?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(super::median(&[7.5]), 7.5);
    }
}
