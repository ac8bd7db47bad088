//! The report: a flat JSON object (one key per figure) and a Markdown table
//! of the issue's goals next to the measured figures and Buildbot's.

use serde_json::{Map, Value};
use std::fmt::Write as _;

/// How a goal compares: the measured figure must be at most / at least the goal.
#[derive(Clone, Copy)]
enum Goal {
    AtMost(f64),
    AtLeast(f64),
    None,
}

/// One row of the Markdown table.
struct Row {
    what: &'static str,
    key: &'static str,
    unit: &'static str,
    goal: Goal,
    /// Buildbot's figure for the same thing, and whether smaller is better.
    peer: Option<(&'static str, bool)>,
}

/// Buildbot counts builds where Capstan counts tasks.
fn peer_unit(unit: &str) -> &str {
    if unit == "tasks/s" { "builds/s" } else { unit }
}

const ROWS: &[Row] = &[
    Row {
        what: "pickup latency p50",
        key: "pickup_p50_ms",
        unit: "ms",
        goal: Goal::AtMost(5.0),
        peer: Some(("buildbot_pickup_p50_ms", true)),
    },
    Row {
        what: "pickup latency p99 (Buildbot: p95)",
        key: "pickup_p99_ms",
        unit: "ms",
        goal: Goal::AtMost(20.0),
        peer: Some(("buildbot_pickup_p95_ms", true)),
    },
    Row {
        what: "dispatch throughput, redb (submit + run concurrently)",
        key: "throughput_tasks_per_s",
        unit: "tasks/s",
        goal: Goal::AtLeast(5000.0),
        peer: Some(("buildbot_throughput_builds_per_s", false)),
    },
    Row {
        what: "dispatch throughput, redb (drain a queued backlog)",
        key: "throughput_drain_tasks_per_s",
        unit: "tasks/s",
        goal: Goal::AtLeast(5000.0),
        peer: Some(("buildbot_throughput_builds_per_s", false)),
    },
    Row {
        what: "ListRuns: a filtered page of 50 (issue 28; full: of 20,000 runs)",
        key: "throughput_list_runs_page_ms",
        unit: "ms",
        goal: Goal::AtMost(10.0),
        peer: None,
    },
    Row {
        what: "dispatch throughput, etcd (submit + run concurrently)",
        key: "throughput_etcd_tasks_per_s",
        unit: "tasks/s",
        goal: Goal::AtLeast(1000.0),
        peer: None,
    },
    Row {
        what: "dispatch throughput, etcd (drain a queued backlog)",
        key: "throughput_etcd_drain_tasks_per_s",
        unit: "tasks/s",
        goal: Goal::AtLeast(1000.0),
        peer: None,
    },
    Row {
        what: "log throughput runner -> coordinator -> follower",
        key: "log_mb_per_s",
        unit: "MB/s",
        goal: Goal::AtLeast(300.0),
        peer: Some(("buildbot_log_mb_per_s", false)),
    },
    Row {
        what: "a 2 MB log of numbered lines on disk once sealed (issue 28), % of raw",
        key: "log_at_rest_pct",
        unit: "%",
        goal: Goal::AtMost(25.0),
        peer: None,
    },
    Row {
        what: "coordinator peak RSS during the log",
        key: "log_coordinator_peak_rss_mb",
        unit: "MB",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "runner peak RSS during the log",
        key: "log_runner_peak_rss_mb",
        unit: "MB",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "coordinator RSS, N runners connected",
        key: "coordinator_rss_mb_10k_runners",
        unit: "MB",
        goal: Goal::AtMost(500.0),
        peer: None,
    },
    Row {
        what: "coordinator idle CPU, N runners heart-beating",
        key: "coordinator_idle_cpu_pct_10k_runners",
        unit: "% of a core",
        goal: Goal::AtMost(10.0),
        peer: None,
    },
    Row {
        what: "burst of N tasks over N runners",
        key: "burst_10k_tasks_s",
        unit: "s",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "lost runner: kill -9 -> running elsewhere",
        key: "lost_runner_requeue_s",
        unit: "s",
        goal: Goal::AtMost(1.5),
        peer: None,
    },
    Row {
        what: "lost runner: false requeues of short tasks, 2 busy loops per core",
        key: "lost_runner_false_requeues_under_load",
        unit: "requeues",
        goal: Goal::AtMost(0.0),
        peer: None,
    },
    Row {
        what: "leader failover: kill -9 -> first task dispatched, p50 (default flags, TTL 5 s)",
        key: "failover_first_task_p50_s",
        unit: "s",
        goal: Goal::AtMost(4.0),
        peer: None,
    },
    Row {
        what: "leader failover: max over the kills",
        key: "failover_first_task_max_s",
        unit: "s",
        goal: Goal::AtMost(1.5),
        peer: None,
    },
    Row {
        what: "leader failover: runs lost",
        key: "failover_runs_lost",
        unit: "runs",
        goal: Goal::AtMost(0.0),
        peer: None,
    },
    Row {
        what: "compose cluster failover: leader container killed -> first task dispatched, p50 (TTL 3 s)",
        key: "compose_failover_kill_p50_s",
        unit: "s",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "compose cluster failover: leader container killed, max",
        key: "compose_failover_kill_max_s",
        unit: "s",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "compose cluster failover: leader container partitioned -> first task dispatched, p50 (TTL 3 s)",
        key: "compose_failover_partition_p50_s",
        unit: "s",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "compose cluster failover: leader container partitioned, max",
        key: "compose_failover_partition_max_s",
        unit: "s",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "compose cluster failover: runs lost",
        key: "compose_failover_runs_lost",
        unit: "runs",
        goal: Goal::AtMost(0.0),
        peer: None,
    },
    Row {
        what: "container step overhead p50 (vs bare `docker run`)",
        key: "container_overhead_p50_ms",
        unit: "ms",
        goal: Goal::AtMost(50.0),
        peer: None,
    },
    Row {
        what: "dashboard: a page of 100 runs (client-timed over loopback)",
        key: "dashboard_runs_page_ms",
        unit: "ms",
        goal: Goal::AtMost(50.0),
        peer: None,
    },
    Row {
        what: "dashboard: the page of a 100 MB log (quick: 10 MB), its size",
        key: "dashboard_log_page_mb",
        unit: "MB",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "dashboard: coordinator RSS growth serving that page (goal: at most the page)",
        key: "dashboard_log_page_rss_growth_mb",
        unit: "MB",
        goal: Goal::AtMost(1.0),
        peer: None,
    },
    Row {
        what: "dashboard: 200 idle live followers of the runs list",
        key: "dashboard_sse_idle_cpu_pct_200",
        unit: "% of a core",
        goal: Goal::AtMost(5.0),
        peer: None,
    },
    Row {
        what: "restart to ready, empty store (issue 28)",
        key: "history_takeover_s_0",
        unit: "s",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "restart to ready, 100,000 finished runs (goal: within 10 % of empty)",
        key: "history_takeover_s_100k",
        unit: "s",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "coordinator RSS after a restart, empty store",
        key: "history_rss_mb_0",
        unit: "MB",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "coordinator RSS after a restart, 100,000 finished runs (goal: within 20 MB of empty)",
        key: "history_rss_mb_100k",
        unit: "MB",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "leader takeover on etcd, empty store",
        key: "history_etcd_takeover_s_0",
        unit: "s",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "leader takeover on etcd, 100,000 finished runs (goal: within 10 % of empty)",
        key: "history_etcd_takeover_s_100k",
        unit: "s",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "coordinator RSS after an etcd takeover, 100,000 finished runs",
        key: "history_etcd_rss_mb_100k",
        unit: "MB",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "ListRuns page of 50 with a filter, 100,000 finished runs",
        key: "history_list_page_ms_100k",
        unit: "ms",
        goal: Goal::AtMost(10.0),
        peer: None,
    },
    Row {
        what: "retention deleting 100,000 runs under load: longest gap between offers (issue 28)",
        key: "retention_max_dispatch_gap_ms",
        unit: "ms",
        goal: Goal::AtMost(50.0),
        peer: None,
    },
    Row {
        what: "the same before deletion began (the load's own spacing)",
        key: "retention_baseline_gap_ms",
        unit: "ms",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "creating a file where the pickup step writes its stamp (context)",
        key: "pickup_file_create_ms",
        unit: "ms",
        goal: Goal::None,
        peer: Some(("buildbot_file_create_ms", true)),
    },
    Row {
        what: "redb commit, batch of 1 record",
        key: "store_redb_commit_ms_batch_1",
        unit: "ms",
        goal: Goal::None,
        peer: None,
    },
    Row {
        what: "redb commit, batch of 100 records",
        key: "store_redb_commit_ms_batch_100",
        unit: "ms",
        goal: Goal::None,
        peer: None,
    },
];

fn num(report: &Map<String, Value>, key: &str) -> Option<f64> {
    report
        .get(key)
        .and_then(Value::as_f64)
        .filter(|v| v.is_finite())
}

fn fmt(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        // One decimal, so 4999.8 against a goal of 5000 does not read as 5000.
        format!("{v:.1}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn fmt_goal(g: f64) -> String {
    if g.fract() == 0.0 {
        format!("{g:.0}")
    } else {
        fmt(g)
    }
}

/// Adds the `ratio_*` keys (Capstan vs Buildbot; > 1 means Capstan is better).
pub(crate) fn add_ratios(report: &mut Map<String, Value>) {
    let pairs = [
        (
            "ratio_pickup_p50_vs_buildbot",
            "pickup_p50_ms",
            "buildbot_pickup_p50_ms",
            true,
        ),
        (
            "ratio_throughput_vs_buildbot",
            "throughput_tasks_per_s",
            "buildbot_throughput_builds_per_s",
            false,
        ),
        (
            "ratio_log_vs_buildbot",
            "log_mb_per_s",
            "buildbot_log_mb_per_s",
            false,
        ),
    ];
    for (name, ours, peer, smaller_better) in pairs {
        if let (Some(o), Some(p)) = (num(report, ours), num(report, peer)) {
            let r = if smaller_better { p / o } else { o / p };
            report.insert(name.into(), r.into());
        }
    }
    // What TLS (with the token check on both sides) keeps of plaintext's
    // throughput; the goal is >= 0.9.
    for (name, tls, plain) in [
        (
            "ratio_throughput_tls_vs_plain",
            "throughput_tls_tasks_per_s",
            "throughput_tasks_per_s",
        ),
        (
            "ratio_throughput_drain_tls_vs_plain",
            "throughput_tls_drain_tasks_per_s",
            "throughput_drain_tasks_per_s",
        ),
    ] {
        if let (Some(t), Some(p)) = (num(report, tls), num(report, plain)) {
            println!("{name}: {:.3} (goal >= 0.9)", t / p);
            report.insert(name.into(), (t / p).into());
        }
    }
}

/// `; per round: Ax, Bx, Cx` when both figures have a value in every round:
/// each round's ratio, the two measured minutes apart rather than across
/// the whole run. The goal is judged on the ratio of the medians.
fn per_round_ratios(report: &Map<String, Value>, over: &str, under: &str) -> String {
    let each = |k: &str| match report.get(&format!("{k}_rounds")) {
        Some(Value::Array(v)) => v.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>(),
        _ => None,
    };
    match (each(over), each(under)) {
        (Some(o), Some(u)) if o.len() > 1 && o.len() == u.len() => {
            let ratios: Vec<String> = o
                .iter()
                .zip(&u)
                .map(|(o, u)| format!("{}x", fmt(o / u)))
                .collect();
            format!("; per round: {}", ratios.join(", "))
        }
        _ => String::new(),
    }
}

/// The Markdown report: the header, the goals table, the peer goal, the
/// skipped and failed scenarios, and every figure.
pub(crate) fn markdown(report: &Map<String, Value>) -> String {
    let mut md = header(report);
    let _ = writeln!(
        md,
        "| figure | goal | Capstan | Buildbot 4.3 | Capstan vs Buildbot |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
    let n = num(report, "connected_runners").map_or("N".into(), |v| format!("{v:.0}"));
    for row in ROWS {
        let _ = writeln!(md, "{}", table_row(report, row, &n));
    }
    if let Some(peer) = peer_goal(report) {
        let _ = writeln!(
            md,
            "\nPeer goal, >= 100x Buildbot on pickup latency and on throughput: {peer}."
        );
    }
    for (prefix, title) in [
        ("skipped_", "Skipped scenarios"),
        ("failed_", "Failed scenarios"),
    ] {
        let listed: Vec<String> = report
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(prefix)
                    .map(|name| format!("- `{name}`: {}", v.as_str().unwrap_or("")))
            })
            .collect();
        if !listed.is_empty() {
            let _ = writeln!(md, "\n{title}:\n\n{}", listed.join("\n"));
        }
    }
    let _ = writeln!(md, "\nAll figures (`report.json`):\n\n```");
    for (k, v) in report {
        let _ = writeln!(md, "{k} = {v}");
    }
    let _ = writeln!(md, "```");
    md
}

/// The title and the paragraphs above the table (mode, commit, rounds).
fn header(report: &Map<String, Value>) -> String {
    let s = |k: &str| {
        report
            .get(k)
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_else(|| "?".into())
    };
    let mut md = String::new();
    let _ = writeln!(md, "# Capstan benchmark report\n");
    let _ = writeln!(
        md,
        "Generated by `capstan-bench` ([how each figure is measured](README.md)). \
         Mode `{}`, profile `{}`, {} cores, commit `{}`, {}.\n",
        s("mode"),
        s("profile"),
        s("cores"),
        s("git_commit"),
        s("date")
    );
    if let Some(rounds) = num(report, "rounds").filter(|r| *r > 1.0) {
        let _ = writeln!(
            md,
            "Each figure is the median of {rounds:.0} rounds (every scenario once per round, \
             Buildbot's harness included), with the range over the rounds in brackets; \
             ratios are of the medians.\n"
        );
    }
    md
}

/// One line of the goals table; `n` replaces the `N` of the row's text.
fn table_row(report: &Map<String, Value>, row: &Row, n: &str) -> String {
    let what = row.what.replace(" N ", &format!(" {n} "));
    let measured = num(report, row.key);
    let goal = match row.goal {
        Goal::AtMost(g) => format!("<= {} {}", fmt_goal(g), row.unit),
        Goal::AtLeast(g) => format!(">= {} {}", fmt_goal(g), row.unit),
        Goal::None => "-".into(),
    };
    let met = match (row.goal, measured) {
        (Goal::AtMost(g), Some(v)) => {
            if v <= g {
                " (met)"
            } else {
                " (**not met**)"
            }
        }
        (Goal::AtLeast(g), Some(v)) => {
            if v >= g {
                " (met)"
            } else {
                " (**not met**)"
            }
        }
        _ => "",
    };
    let spread = match report.get(&format!("{}_rounds", row.key)) {
        Some(Value::Array(each)) if each.len() > 1 => {
            let each: Vec<f64> = each.iter().filter_map(Value::as_f64).collect();
            let lo = each.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = each.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!(" [{}-{}]", fmt(lo), fmt(hi))
        }
        _ => String::new(),
    };
    let measured_s = match measured {
        Some(v) => format!("{} {}{spread}{met}", fmt(v), row.unit),
        None => "not measured".into(),
    };
    let (peer_s, ratio_s) = match (row.peer, measured) {
        (Some((pk, smaller)), Some(v)) => match num(report, pk) {
            Some(p) => {
                let r = if smaller { p / v } else { v / p };
                (
                    format!("{} {}", fmt(p), peer_unit(row.unit)),
                    format!("{}x", fmt(r)),
                )
            }
            None => ("not run".into(), "-".into()),
        },
        _ => ("-".into(), "-".into()),
    };
    format!("| {what} | {goal} | {measured_s} | {peer_s} | {ratio_s} |")
}

/// The ratios against Buildbot the peer goal is judged on, if measured.
fn peer_goal(report: &Map<String, Value>) -> Option<String> {
    let peer: Vec<String> = [
        (
            "pickup p50",
            "ratio_pickup_p50_vs_buildbot",
            ("buildbot_pickup_p50_ms", "pickup_p50_ms"),
        ),
        (
            "throughput",
            "ratio_throughput_vs_buildbot",
            ("throughput_tasks_per_s", "buildbot_throughput_builds_per_s"),
        ),
    ]
    .iter()
    .filter_map(|(what, key, (over, under))| {
        num(report, key).map(|r| {
            let met = if r >= 100.0 { "met" } else { "**not met**" };
            format!(
                "{what} {}x ({met}{})",
                fmt(r),
                per_round_ratios(report, over, under)
            )
        })
    })
    .collect();
    (!peer.is_empty()).then(|| peer.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report of several rounds shows each goal figure's median with the
    /// range over the rounds, judges the goal on the median, and says so.
    #[test]
    fn rounds_show_the_median_and_the_range() {
        let Value::Object(report) = serde_json::json!({
            "rounds": 3,
            "pickup_p50_ms": 3.12,
            "pickup_p50_ms_rounds": [2.93, 3.12, 3.67],
            "buildbot_pickup_p50_ms": 310.0,
            "buildbot_pickup_p50_ms_rounds": [310.0, 300.0, 330.0],
            "ratio_pickup_p50_vs_buildbot": 99.36,
            "log_mb_per_s": 294.0,
        }) else {
            unreachable!()
        };
        let md = markdown(&report);
        assert!(md.contains("median of 3 rounds"), "{md}");
        assert!(md.contains("3.12 ms [2.93-3.67] (met)"), "{md}");
        // A figure without per-round values shows no range.
        assert!(md.contains("294.0 MB/s (**not met**)"), "{md}");
        assert!(
            md.contains("pickup p50 99.4x (**not met**; per round: 105.8x, 96.2x, 89.9x)"),
            "{md}"
        );
    }

    #[test]
    fn one_round_says_nothing_of_rounds() {
        let Value::Object(report) = serde_json::json!({ "rounds": 1, "pickup_p50_ms": 3.12 })
        else {
            unreachable!()
        };
        let md = markdown(&report);
        assert!(!md.contains("median of"), "{md}");
        assert!(md.contains("3.12 ms (met)"), "{md}");
    }
}
