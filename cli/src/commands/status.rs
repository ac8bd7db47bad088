//! `capstan status RUN`: reports the run; exits 0 whatever its state.

use capstan_proto::ids::RunId;

use super::{Context, print_json};
use crate::exit::{Exit, Failure};
use crate::output::{Format, run_json, run_text};

pub(crate) async fn run(ctx: &Context, run: &str) -> Result<Exit, Failure> {
    let client = ctx.connect().await?;
    let found = client
        .get_run(&RunId::from_string(run))
        .await
        .map_err(|e| Failure::for_run(e, run))?;
    match ctx.format {
        Format::Text => print!("{}", run_text(&found)),
        Format::Json => print_json(&run_json(&found)),
    }
    Ok(Exit::Success)
}
