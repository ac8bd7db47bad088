//! `capstan runs`: runs, newest first, a page at a time, filtered.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capstan_proto::api::v1::ListRunsRequest;
use capstan_proto::pipeline::v1::RunState;

use super::{Context, print_json};
use crate::args::{RunStateArg, RunsArgs};
use crate::exit::{Exit, Failure};
use crate::output::{Format, run_json, runs_text};

pub(crate) async fn run(ctx: &Context, args: &RunsArgs) -> Result<Exit, Failure> {
    let client = ctx.connect().await?;
    let page = client
        .list_runs_page(request(args, SystemTime::now()))
        .await?;
    let next = (!page.next_cursor.is_empty()).then_some(page.next_cursor.as_str());
    match ctx.format {
        Format::Text if page.runs.is_empty() && args.cursor.is_none() && filtered(args) => {
            eprintln!("no runs match");
        }
        Format::Text if page.runs.is_empty() && args.cursor.is_none() => {
            eprintln!("no runs yet; queue one with `capstan submit FILE`");
        }
        Format::Text => {
            print!("{}", runs_text(&page.runs));
            if let Some(next) = next {
                eprintln!("more: add --cursor {next}");
            }
        }
        Format::Json => print_json(&serde_json::json!({
            "runs": page.runs.iter().map(run_json).collect::<Vec<_>>(),
            "next": next,
        })),
    }
    Ok(Exit::Success)
}

fn filtered(a: &RunsArgs) -> bool {
    a.state.is_some()
        || a.pipeline.is_some()
        || a.submitter.is_some()
        || a.repo.is_some()
        || a.commit.is_some()
        || a.since.is_some()
}

/// The request for `args`, `--since` counted back from `now`.
fn request(a: &RunsArgs, now: SystemTime) -> ListRunsRequest {
    let state = a.state.map(|s| match s {
        RunStateArg::Queued => RunState::Queued,
        RunStateArg::Running => RunState::Running,
        RunStateArg::Succeeded => RunState::Succeeded,
        RunStateArg::Failed => RunState::Failed,
        RunStateArg::Cancelled => RunState::Cancelled,
    });
    let since = a.since.map(|d| {
        let at = now.checked_sub(d).unwrap_or(UNIX_EPOCH);
        let ms = at
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis();
        // 0 means no bound: the epoch itself is 1 ms later.
        i64::try_from(ms).unwrap_or(i64::MAX).max(1)
    });
    let text = |s: &Option<String>| s.clone().unwrap_or_default();
    ListRunsRequest {
        limit: a.limit,
        cursor: text(&a.cursor),
        state: state.map_or(0, |s| s as i32),
        pipeline: text(&a.pipeline),
        submitted_by: text(&a.submitter),
        repo: text(&a.repo),
        rev: text(&a.commit),
        created_after_ms: since.unwrap_or(0),
        created_before_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn flags_become_the_request() {
        let cli = crate::args::Cli::try_parse_from([
            "capstan",
            "runs",
            "--limit",
            "5",
            "--state",
            "failed",
            "--pipeline",
            "p",
            "--submitter",
            "ci",
            "--commit",
            "abcd",
            "--since",
            "2h",
            "--cursor",
            "s9",
        ])
        .unwrap();
        let crate::args::Command::Runs(args) = cli.command else {
            panic!()
        };
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let r = request(&args, now);
        assert_eq!(r.limit, 5);
        assert_eq!(r.state, RunState::Failed as i32);
        assert_eq!(
            (r.pipeline.as_str(), r.submitted_by.as_str(), r.rev.as_str()),
            ("p", "ci", "abcd")
        );
        assert_eq!(r.cursor, "s9");
        assert_eq!(r.created_after_ms, (10_000 - 7200) * 1000);
        assert!(crate::args::Cli::try_parse_from(["capstan", "runs", "--state", "lost"]).is_err());
        assert!(crate::args::Cli::try_parse_from(["capstan", "runs", "--since", "soon"]).is_err());
    }
}
