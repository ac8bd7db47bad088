//! `capstan logs RUN [--task T] [--follow]`: with `--task`, the task's log
//! bytes as they are; without, every task's lines prefixed with `[task] `.

use std::io::Write;

use capstan_client::{Client, ClientError};
use capstan_proto::ids::RunId;
use tonic::Code;

use super::Context;
use crate::exit::{Exit, Failure, no_run};
use crate::log_printer::{LogMode, LogPrinter};
use crate::output::Format;

/// Times a broken stream is reopened (after a coordinator failover).
const MAX_REOPENS: u32 = 5;

pub(crate) async fn run(
    ctx: &Context,
    run: &str,
    task: Option<&str>,
    follow: bool,
) -> Result<Exit, Failure> {
    let client = ctx.connect().await?;
    let id = RunId::from_string(run);
    let mode = match (ctx.format, task) {
        (Format::Json, _) => LogMode::Json,
        (Format::Text, Some(_)) => LogMode::Raw,
        (Format::Text, None) => LogMode::Prefixed,
    };
    let mut printer = LogPrinter::new(mode);
    let mut reopens = 0;
    loop {
        let mut stream = match client.read_logs(&id, task, follow).await {
            Ok(stream) => stream,
            Err(e) if e.code() == Some(Code::NotFound) => {
                return Err(explain_not_found(&client, &id, task, e).await);
            }
            Err(e) => return Err(e.into()),
        };
        let broken = loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    let mut out = Vec::new();
                    printer.push(&chunk, &mut out);
                    if !write_stdout(&out) {
                        // The reader went away (`capstan logs RUN | head`).
                        return Ok(Exit::Success);
                    }
                }
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        };
        let Some(status) = broken else { break };
        // Reopening resends from the start; the printer skips what it printed.
        reopens += 1;
        // A leader that dies mid-stream breaks the connection: tonic
        // reports that as UNKNOWN, not UNAVAILABLE.
        let reopenable =
            status.code() == Code::Unavailable || capstan_client::is_transport_failure(&status);
        if reopens > MAX_REOPENS || !reopenable {
            let mut out = Vec::new();
            printer.finish(&mut out);
            write_stdout(&out);
            return Err(ClientError::Status(status).into());
        }
    }
    let mut out = Vec::new();
    printer.finish(&mut out);
    write_stdout(&out);
    Ok(Exit::Success)
}

/// False once stdout is closed.
fn write_stdout(bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return true;
    }
    let mut out = std::io::stdout().lock();
    out.write_all(bytes).and_then(|()| out.flush()).is_ok()
}

/// Says whether the run or the task is what does not exist.
async fn explain_not_found(
    client: &Client,
    run: &RunId,
    task: Option<&str>,
    original: ClientError,
) -> Failure {
    match (client.get_run(run).await, task) {
        (Err(e), _) if e.code() == Some(Code::NotFound) => Failure::usage(no_run(run.as_str())),
        (Ok(found), Some(task)) if !found.tasks.iter().any(|t| t.name == task) => {
            let names: Vec<_> = found.tasks.iter().map(|t| t.name.as_str()).collect();
            Failure::usage(format!(
                "run {run} has no task `{task}`; its tasks are: {}",
                names.join(", ")
            ))
        }
        _ => Failure::from(original),
    }
}
