//! The Buildbot peer: runs `bench/buildbot.sh` (the harness in
//! `../shared/peers/buildbot`, from a scratch copy) with small knobs and parses
//! its summary line into `buildbot_*` figures. `--buildbot-summary FILE`
//! reuses a summary from an earlier run on the same machine instead.
//!
//! The summary line looks like
//! `buildbot version=4.3.0 db=disk workers=4 runs=1 pickup_p50_ms=... pickup_p95_ms=...
//! throughput_builds_per_s=... log_mb_per_s=... master_rss_mb=...`.

use super::{Figures, cores};
use anyhow::Context;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs the harness (or reads `summary`) and returns the `buildbot_*` figures.
pub(crate) fn run(summary: Option<&Path>) -> anyhow::Result<Figures> {
    let text = match summary {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read Buildbot summary {}", p.display()))?,
        None => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("buildbot.sh");
            println!(
                "buildbot: running {} (small knobs; several minutes)...",
                script.display()
            );
            let out = Command::new(&script)
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
                .with_context(|| format!("cannot run {}", script.display()))?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if !out.status.success() {
                anyhow::bail!(
                    "{} failed with {}:\n{}",
                    script.display(),
                    out.status,
                    tail(&text, 30)
                );
            }
            text
        }
    };
    let mut figures = parse(&text)?;
    if summary.is_none() {
        // Where the harness's steps wrote their stamps, after it ran (the
        // harness wipes `work/` when it starts).
        let work = super::cache_dir("CAPSTAN_BUILDBOT_DIR", "capstan-buildbot")?.join("work");
        figures.push((
            "buildbot_file_create_ms".into(),
            super::file_create_ms(&work.join("probe"), 50)?,
        ));
    }
    println!(
        "buildbot: {}, {} cores",
        figures
            .iter()
            .map(|(k, v)| format!("{k}={v:.2}"))
            .collect::<Vec<_>>()
            .join(" "),
        cores()
    );
    Ok(figures)
}

/// Parses the last `buildbot version=...` line.
pub(crate) fn parse(text: &str) -> anyhow::Result<Figures> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("buildbot version="))
        .context("no `buildbot version=...` summary line in the harness output")?;
    let mut out = Figures::new();
    for word in line.split_whitespace().skip(1) {
        let Some((k, v)) = word.split_once('=') else {
            continue;
        };
        if let Ok(v) = v.parse::<f64>() {
            let key = if k == "version" {
                continue;
            } else {
                format!("buildbot_{k}")
            };
            out.push((key, v));
        }
    }
    Ok(out)
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_summary_line() {
        let text = "noise\nbuildbot_run db=disk run=1 pickup_p50_ms=400.0\n\
            buildbot version=4.3.0 db=disk workers=4 runs=1 pickup_p50_ms=349.5 pickup_p95_ms=398.0 \
            throughput_builds_per_s=2.24 log_mb_per_s=na master_rss_mb=93.0\n";
        let f = parse(text).expect("parses");
        assert!(f.contains(&("buildbot_pickup_p50_ms".into(), 349.5)));
        assert!(f.contains(&("buildbot_throughput_builds_per_s".into(), 2.24)));
        assert!(f.contains(&("buildbot_workers".into(), 4.0)));
        assert!(!f.iter().any(|(k, _)| k == "buildbot_log_mb_per_s"));
    }
}
