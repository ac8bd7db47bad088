//! `capstan cancel RUN`: cancels the unfinished tasks; prints the run's state.

use capstan_proto::ids::RunId;

use super::{Context, print_json};
use crate::exit::{Exit, Failure};
use crate::output::{Format, run_json, run_state_name};

pub(crate) async fn run(ctx: &Context, run: &str) -> Result<Exit, Failure> {
    let client = ctx.connect().await?;
    let after = client
        .cancel_run(&RunId::from_string(run))
        .await
        .map_err(|e| Failure::for_run(e, run))?;
    match ctx.format {
        Format::Text => println!("run {} {}", after.id, run_state_name(after.state)),
        Format::Json => print_json(&run_json(&after)),
    }
    Ok(Exit::Success)
}
