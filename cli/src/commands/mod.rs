//! One module per subcommand; each returns the exit or a [`Failure`].

mod approve;
mod cancel;
pub(crate) mod cluster;
pub(crate) mod dev;
pub(crate) mod drain;
pub(crate) mod logs;
pub(crate) mod repo;
pub(crate) mod runners;
pub(crate) mod runs;
pub(crate) mod status;
pub(crate) mod submit;
pub(crate) mod token;
pub(crate) mod validate;

use std::io::Read;
use std::path::Path;

use capstan_client::Client;
use capstan_pipeline::MAX_FILE_BYTES;

use crate::args::{Cli, Command};
use crate::exit::{Exit, Failure};
use crate::output::Format;

/// What every command gets from the global flags.
pub(crate) struct Context {
    pub(crate) servers: Vec<String>,
    pub(crate) format: Format,
    /// The API token (--token, CAPSTAN_TOKEN, or the --token-file's text).
    pub(crate) token: Option<String>,
    /// `--ca-cert`.
    pub(crate) tls: capstan_tls::ClientTls,
}

impl Context {
    pub(crate) async fn connect(&self) -> Result<Client, Failure> {
        let token = capstan_client::Bearer::new(self.token.as_deref())
            .map_err(|e| Failure::usage(e.to_string()))?;
        let options = capstan_client::ClientOptions {
            tls: self.tls.clone(),
            token,
            ..Default::default()
        };
        Ok(Client::connect_with(&self.servers, options).await?)
    }
}

/// The token of --token, or else the text of --token-file.
fn token(cli: &Cli) -> Result<Option<String>, Failure> {
    if let Some(token) = &cli.token {
        return Ok(Some(token.trim().to_string()));
    }
    let Some(path) = &cli.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::usage(format!(
            "cannot read the token file {} (--token-file): {e}",
            path.display()
        ))
    })?;
    Ok(Some(text.trim().to_string()))
}

pub(crate) async fn run(cli: Cli) -> Result<Exit, Failure> {
    let ctx = Context {
        token: token(&cli)?,
        servers: cli.server,
        format: cli.output,
        tls: capstan_tls::ClientTls {
            ca_cert: cli.ca_cert,
            ..Default::default()
        },
    };
    match cli.command {
        Command::Submit(args) => submit::run(&ctx, args).await,
        Command::Status { run } => status::run(&ctx, &run).await,
        Command::Runs(args) => runs::run(&ctx, &args).await,
        Command::Logs { run, task, follow } => logs::run(&ctx, &run, task.as_deref(), follow).await,
        Command::Cancel { run } => cancel::run(&ctx, &run).await,
        Command::Approve { run, task, reason } => {
            approve::run(&ctx, &run, &task, true, &reason).await
        }
        Command::Reject { run, task, reason } => {
            approve::run(&ctx, &run, &task, false, &reason).await
        }
        Command::Runners => runners::run(&ctx).await,
        Command::Drain { runner } => drain::run(&ctx, &runner).await,
        Command::Resume { runner } => drain::resume(&ctx, &runner).await,
        Command::Cluster => cluster::run(&ctx).await,
        Command::Validate { file } => validate::run(&ctx, &file),
        Command::Dev(args) => dev::run(&ctx, args).await,
        Command::Token(command) => token::run(&ctx, command).await,
        Command::RunnerToken(command) => token::runner_token(&ctx, command).await,
        Command::Repo(command) => repo::run(&ctx, command).await,
    }
}

/// Reads a pipeline file, refusing anything over the coordinator's limit
/// before sending it anywhere.
pub(crate) fn read_pipeline(path: &Path) -> Result<String, Failure> {
    let shown = path.display();
    let file = std::fs::File::open(path)
        .map_err(|e| Failure::usage(format!("cannot read {shown}: {e}")))?;
    let mut bytes = Vec::new();
    // One byte over the limit is enough to know it is too big.
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Failure::usage(format!("cannot read {shown}: {e}")))?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(Failure::usage(format!(
            "{shown} is larger than 1 MiB, the limit for a pipeline file; \
             move large scripts into the repository and run them from a step"
        )));
    }
    String::from_utf8(bytes).map_err(|e| Failure::usage(format!("{shown} is not UTF-8 text: {e}")))
}

/// Prints a JSON value on stdout, pretty.
pub(crate) fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}
