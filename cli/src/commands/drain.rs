//! `capstan drain RUNNER`: the runner finishes its work and takes no more.
//! `capstan resume RUNNER` undoes it.

use super::{Context, print_json};
use crate::exit::{Exit, Failure};
use crate::output::{Format, runner_json};

pub(crate) async fn run(ctx: &Context, runner: &str) -> Result<Exit, Failure> {
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

pub(crate) async fn resume(ctx: &Context, runner: &str) -> Result<Exit, Failure> {
    let client = ctx.connect().await?;
    let resumed = client.resume_runner(runner).await.map_err(|e| {
        Failure::from_client(e, || {
            format!("no runner `{runner}` (see `capstan runners`)")
        })
    })?;
    match ctx.format {
        Format::Text if resumed.connected && resumed.draining => println!(
            "runner {} ({}) may take work again; it is still draining (its agent got the drain \
             and exits when its work ends): start it again to use it",
            resumed.name, resumed.id
        ),
        Format::Text => println!(
            "runner {} ({}) takes work again{}",
            resumed.name,
            resumed.id,
            if resumed.connected {
                ""
            } else {
                " once it connects"
            }
        ),
        Format::Json => print_json(&runner_json(&resumed)),
    }
    Ok(Exit::Success)
}
