//! `capstan approve RUN TASK` and `capstan reject RUN TASK`: decide a
//! task's approval gate; prints the task's state and the decision.

use capstan_proto::ids::RunId;

use super::{Context, print_json};
use crate::exit::{Exit, Failure};
use crate::output::{Format, run_json, task_state_name};

pub(crate) async fn run(
    ctx: &Context,
    run: &str,
    task: &str,
    approve: bool,
    reason: &str,
) -> Result<Exit, Failure> {
    let client = ctx.connect().await?;
    let after = client
        .decide_approval(&RunId::from_string(run), task, approve, reason)
        .await
        .map_err(Failure::from)?;
    match ctx.format {
        Format::Text => {
            let t = after.tasks.iter().find(|t| t.name == task);
            let (state, message) = t.map_or(("unknown", ""), |t| {
                (task_state_name(t.state), t.message.as_str())
            });
            println!("{} {task} {state}: {message}", after.id);
        }
        Format::Json => print_json(&run_json(&after)),
    }
    Ok(Exit::Success)
}
