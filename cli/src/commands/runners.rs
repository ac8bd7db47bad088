//! `capstan runners`: registered runners.

use super::{Context, print_json};
use crate::exit::{Exit, Failure};
use crate::output::{Format, runner_json, runners_text};

pub(crate) async fn run(ctx: &Context) -> Result<Exit, Failure> {
    let client = ctx.connect().await?;
    let runners = client.list_runners().await?;
    match ctx.format {
        Format::Text if runners.is_empty() => eprintln!(
            "no runners registered; start one with \
             `capstan-runner --coordinator URL --registration-token TOKEN --name NAME`"
        ),
        Format::Text => print!("{}", runners_text(&runners)),
        Format::Json => print_json(&serde_json::Value::Array(
            runners.iter().map(runner_json).collect(),
        )),
    }
    Ok(Exit::Success)
}
