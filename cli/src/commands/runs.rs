//! `capstan runs`: runs, newest first.

use super::{Context, print_json};
use crate::exit::{Exit, Failure};
use crate::output::{Format, run_json, runs_text};

pub(crate) async fn run(ctx: &Context, limit: u32) -> Result<Exit, Failure> {
    let client = ctx.connect().await?;
    let runs = client.list_runs(limit).await?;
    match ctx.format {
        Format::Text if runs.is_empty() => {
            eprintln!("no runs yet; queue one with `capstan submit FILE`");
        }
        Format::Text => print!("{}", runs_text(&runs)),
        Format::Json => print_json(&serde_json::Value::Array(
            runs.iter().map(run_json).collect(),
        )),
    }
    Ok(Exit::Success)
}
