//! `capstan drain RUNNER`: the runner finishes its work and takes no more.

use super::{Context, print_json};
use crate::exit::{Exit, Failure};
use crate::output::{Format, runner_json};

pub async fn run(ctx: &Context, runner: &str) -> Result<Exit, Failure> {
    let client = ctx.connect().await?;
    let drained = client.drain_runner(runner).await.map_err(|e| {
        Failure::from_client(e, || {
            format!("no runner `{runner}` (see `capstan runners`)")
        })
    })?;
    match ctx.format {
        Format::Text => println!(
            "runner {} ({}) is draining: it finishes its {} running task(s) and takes no new ones",
            drained.name, drained.id, drained.busy
        ),
        Format::Json => print_json(&runner_json(&drained)),
    }
    Ok(Exit::Success)
}
