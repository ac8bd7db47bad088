//! `capstan cluster`: leader, epoch and members.

use super::{Context, print_json};
use crate::exit::{Exit, Failure};
use crate::output::{Format, cluster_json, cluster_text};

pub(crate) async fn run(ctx: &Context) -> Result<Exit, Failure> {
    let client = ctx.connect().await?;
    let leader = client.ask_leader().await?;
    let members = client.list_members().await?;
    match ctx.format {
        Format::Text => print!("{}", cluster_text(&leader, &members)),
        Format::Json => print_json(&cluster_json(&leader, &members)),
    }
    Ok(Exit::Success)
}
