//! Rendering of runs, runners and the cluster as text tables; the JSON and
//! the state names are `capstan_proto::render`'s (the dashboard serves the
//! same), re-exported here.

use std::fmt::Write as _;

use capstan_proto::api::v1::{Run, Runner, Task};
use capstan_proto::cluster::v1::{AskLeaderResponse, ListMembersResponse};
use clap::ValueEnum;

pub(crate) use capstan_proto::render::{
    cluster_json, format_duration_ms, format_time, run_finished, run_json, run_state_name,
    runner_json, task_finished, task_json, task_state_name,
};

/// `-o/--output`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    #[default]
    Text,
    Json,
}

/// `status RUN` as text: a header line, then one row per task.
pub(crate) fn run_text(run: &Run) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "run {}  pipeline {}  {}",
        run.id,
        run.pipeline,
        run_state_name(run.state)
    );
    if !run.submitted_by.is_empty() {
        let _ = write!(out, "  by {}", run.submitted_by);
    }
    if run.created_at_ms > 0 {
        let _ = write!(out, "  created {}", format_time(run.created_at_ms));
        if run.finished_at_ms >= run.created_at_ms {
            let _ = write!(
                out,
                "  took {}",
                format_duration_ms(run.finished_at_ms - run.created_at_ms)
            );
        }
    }
    out.push('\n');
    let mut table = Table::new(["TASK", "STATE", "ATTEMPTS", "RUNNER", "MESSAGE"]);
    let mut group = "";
    for t in &run.tasks {
        let mut name = t.name.clone();
        // A matrix's expansions (`NAME[k=v,...]`, side by side) go under
        // one row for `NAME` that counts their states.
        if let Some((base, values)) = matrix_name(&t.name) {
            if base != group {
                group = base;
                let members: Vec<&Task> = (run.tasks.iter())
                    .filter(|m| matrix_name(&m.name).is_some_and(|(b, _)| b == base))
                    .collect();
                table.row([
                    base.to_string(),
                    state_counts(&members),
                    members.iter().map(|m| m.attempts).sum::<u32>().to_string(),
                    "-".into(),
                    format!("matrix of {}", members.len()),
                ]);
            }
            name = format!("  [{values}]");
        } else {
            group = "";
        }
        table.row([
            name,
            task_state_name(t.state).to_string(),
            t.attempts.to_string(),
            dash(&t.runner),
            t.message.clone(),
        ]);
    }
    out.push_str(&table.render());
    for t in &run.tasks {
        let outputs: std::collections::BTreeMap<_, _> = t.outputs.iter().collect();
        for (k, v) in outputs {
            let _ = writeln!(out, "{}.{k}: {v}", t.name);
        }
    }
    out
}

/// `NAME[k=v,...]` as (`NAME`, `k=v,...`): a matrix task's expansion.
fn matrix_name(name: &str) -> Option<(&str, &str)> {
    let (base, rest) = name.split_once('[')?;
    Some((base, rest.strip_suffix(']')?))
}

/// `4 succeeded, 2 running`: how many of `tasks` are in each state.
fn state_counts(tasks: &[&Task]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for t in tasks {
        let s = task_state_name(t.state);
        match counts.iter_mut().find(|(n, _)| *n == s) {
            Some((_, c)) => *c += 1,
            None => counts.push((s, 1)),
        }
    }
    let parts: Vec<String> = counts.iter().map(|(s, c)| format!("{c} {s}")).collect();
    parts.join(", ")
}

/// `runs` as text.
pub(crate) fn runs_text(runs: &[Run]) -> String {
    let mut table = Table::new(["RUN", "PIPELINE", "STATE", "CREATED"]);
    for r in runs {
        table.row([
            r.id.clone(),
            r.pipeline.clone(),
            run_state_name(r.state).to_string(),
            if r.created_at_ms > 0 {
                format_time(r.created_at_ms)
            } else {
                "-".into()
            },
        ]);
    }
    table.render()
}

/// `runners` as text.
pub(crate) fn runners_text(runners: &[Runner]) -> String {
    let mut table = Table::new([
        "NAME",
        "ID",
        "CONNECTED",
        "BUSY",
        "LABELS",
        "DRAINING",
        "IDENTITY",
    ]);
    for r in runners {
        let mut labels: Vec<_> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        table.row([
            r.name.clone(),
            r.id.clone(),
            yes_no(r.connected),
            format!("{}/{}", r.busy, r.capacity),
            if labels.is_empty() {
                "-".into()
            } else {
                labels.join(",")
            },
            yes_no(r.draining),
            // The client certificate's subject under mTLS.
            if r.tls_identity.is_empty() {
                "-".into()
            } else {
                r.tls_identity.clone()
            },
        ]);
    }
    table.render()
}

/// `cluster` as text.
pub(crate) fn cluster_text(leader: &AskLeaderResponse, members: &ListMembersResponse) -> String {
    let mut out = format!(
        "leader  {}\nepoch   {}\n",
        if leader.leader.is_empty() {
            "(none elected)"
        } else {
            &leader.leader
        },
        leader.epoch
    );
    let mut table = Table::new(["MEMBER", "ROLE"]);
    for m in &members.members {
        table.row([
            m.endpoint.clone(),
            if m.is_leader { "leader" } else { "follower" }.to_string(),
        ]);
    }
    out.push_str(&table.render());
    out
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub(crate) struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new<const N: usize>(header: [&str; N]) -> Self {
        Self {
            rows: vec![header.iter().map(|s| s.to_string()).collect()],
        }
    }

    pub(crate) fn row<const N: usize>(&mut self, cells: [String; N]) {
        // Keep each row on one line.
        self.rows
            .push(cells.into_iter().map(|c| c.replace('\n', " ")).collect());
    }

    pub(crate) fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[i] - cell.chars().count();
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::cluster::v1::Member;
    use capstan_proto::pipeline::v1::{RunState, TaskState};
    use serde_json::{Value, json};

    fn sample_run() -> Run {
        Run {
            id: "run-1".into(),
            pipeline: "hello".into(),
            state: RunState::Failed as i32,
            tasks: vec![
                Task {
                    name: "build".into(),
                    state: TaskState::Succeeded as i32,
                    attempts: 1,
                    runner: "dev".into(),
                    attempt_id: "att-1".into(),
                    exit_code: Some(0),
                    started_at_ms: 1_700_000_000_500,
                    finished_at_ms: 1_700_000_001_000,
                    ..Task::default()
                },
                Task {
                    name: "test".into(),
                    state: TaskState::Failed as i32,
                    attempts: 2,
                    runner: "dev".into(),
                    message: "step 1 exited with 3".into(),
                    needs: vec!["build".into()],
                    exit_code: Some(3),
                    ..Task::default()
                },
                Task {
                    name: "deploy".into(),
                    state: TaskState::Skipped as i32,
                    message: "skipped: test failed".into(),
                    needs: vec!["test".into()],
                    ..Task::default()
                },
            ],
            created_at_ms: 1_700_000_000_000,
            finished_at_ms: 1_700_000_004_200,
            submitted_by: "ci".into(),
            ..Run::default()
        }
    }

    #[test]
    fn status_json_has_the_contract_fields() {
        let v = run_json(&sample_run());
        assert_eq!(v["id"], "run-1");
        assert_eq!(v["pipeline"], "hello");
        assert_eq!(v["state"], "failed");
        assert_eq!(v["submitted_by"], "ci");
        assert_eq!(v["created"], "2023-11-14T22:13:20Z");
        let tasks = v["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 3);
        assert_eq!(
            tasks[1],
            json!({
                "name": "test", "state": "failed", "attempts": 2, "runner": "dev",
                "message": "step 1 exited with 3", "exit_code": 3, "needs": ["build"],
                "outputs": {}, "attempt_id": null, "started_at_ms": null, "finished_at_ms": null,
                "approval": null, "history": [],
            })
        );
        assert_eq!(tasks[2]["state"], "skipped");
        assert_eq!(tasks[2]["runner"], Value::Null);
        assert_eq!(tasks[2]["exit_code"], Value::Null);
    }

    #[test]
    fn every_state_name_is_lower_case_without_prefix() {
        let names: Vec<_> = (1..=8).map(task_state_name).collect();
        assert_eq!(
            names,
            [
                "waiting",
                "queued",
                "offered",
                "running",
                "succeeded",
                "failed",
                "cancelled",
                "skipped"
            ]
        );
        let names: Vec<_> = (1..=5).map(run_state_name).collect();
        assert_eq!(
            names,
            ["queued", "running", "succeeded", "failed", "cancelled"]
        );
        assert_eq!(task_state_name(99), "unknown");
    }

    #[test]
    fn status_text_is_a_table() {
        let text = run_text(&sample_run());
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(
            lines[0],
            "run run-1  pipeline hello  failed  by ci  created 2023-11-14T22:13:20Z  took 4.2s"
        );
        assert_eq!(lines[1], "TASK    STATE      ATTEMPTS  RUNNER  MESSAGE");
        assert_eq!(
            lines[3],
            "test    failed     2         dev     step 1 exited with 3"
        );
        assert_eq!(
            lines[4],
            "deploy  skipped    0         -       skipped: test failed"
        );
    }

    #[test]
    fn a_matrix_is_grouped_under_its_name() {
        let task = |name: &str, state: TaskState| Task {
            name: name.into(),
            state: state as i32,
            attempts: 1,
            ..Task::default()
        };
        let run = Run {
            id: "r".into(),
            tasks: vec![
                task("test[db=pg15]", TaskState::Succeeded),
                task("test[db=pg16]", TaskState::Failed),
                task("test[db=pg17]", TaskState::Succeeded),
                task("report", TaskState::Skipped),
            ],
            ..Run::default()
        };
        let text = run_text(&run);
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        let cells = |l: &str| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[2]),
            ["test", "2 succeeded, 1 failed", "3", "-", "matrix of 3"],
            "{text}"
        );
        assert_eq!(cells(lines[3])[..2], ["[db=pg15]", "succeeded"], "{text}");
        assert!(lines[3].starts_with("  [db=pg15]"), "{text}");
        assert_eq!(cells(lines[5])[..2], ["[db=pg17]", "succeeded"], "{text}");
        assert_eq!(cells(lines[6])[..2], ["report", "skipped"], "{text}");
    }

    #[test]
    fn cluster_json_lists_member_urls() {
        let leader = AskLeaderResponse {
            leader: "http://a:7700".into(),
            epoch: 4,
            is_leader: true,
        };
        let members = ListMembersResponse {
            members: vec![
                Member {
                    endpoint: "http://a:7700".into(),
                    is_leader: true,
                },
                Member {
                    endpoint: "http://b:7700".into(),
                    is_leader: false,
                },
            ],
            leader: "http://a:7700".into(),
            epoch: 4,
        };
        assert_eq!(
            cluster_json(&leader, &members),
            json!({"leader": "http://a:7700", "epoch": 4, "members": ["http://a:7700", "http://b:7700"]})
        );
    }

    #[test]
    fn formats_times_and_durations() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_duration_ms(850), "850ms");
        assert_eq!(format_duration_ms(4_200), "4.2s");
        assert_eq!(format_duration_ms(187_000), "3m07s");
        assert_eq!(format_duration_ms(3_720_000), "1h02m");
    }
}
