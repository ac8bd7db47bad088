//! `capstan dev FILE [--executor shell|fake|docker] [--param k=v]...`: an
//! embedded coordinator and one runner in this process, on loopback, with
//! throw-away state; submits the file, follows the run, exits with its result.

use std::collections::BTreeMap;
use std::time::Duration;

use capstan_client::Client;
use capstan_coordinator::CoordinatorConfig;
use capstan_pipeline::parse;
use capstan_proto::api::v1::SubmitRunRequest;
use capstan_runner::{ExecutorKind, RunnerConfig};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Context, read_pipeline};
use crate::args::{DevArgs, Executor};
use crate::exit::{Exit, Failure};
use crate::follow::follow;
use crate::output::Format;

/// Bound on stopping the embedded coordinator and runner.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn run(ctx: &Context, args: DevArgs) -> Result<Exit, Failure> {
    let file = args.file.display().to_string();
    let text = read_pipeline(&args.file)?;
    // Fail fast on a bad file, before starting anything.
    if let Err(errors) = parse(&file, &text) {
        return Err(Failure {
            exit: Exit::Usage,
            message: errors.to_string(),
        });
    }

    let temp = tempfile::Builder::new()
        .prefix("capstan-dev-")
        .tempdir()
        .map_err(|e| Failure::failed(format!("cannot create a temporary directory: {e}")))?;
    let token = format!("{:032x}", rand::random::<u128>());
    let grpc = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Failure::failed(format!("cannot listen on 127.0.0.1: {e}")))?;
    let addr = grpc
        .local_addr()
        .map_err(|e| Failure::failed(format!("cannot listen on 127.0.0.1: {e}")))?;
    let url = format!("http://{addr}");

    let shutdown = CancellationToken::new();
    // Its own admin API token, stored in the throw-away data dir: nothing to
    // pass, nothing left behind.
    let config = CoordinatorConfig::for_dev(temp.path().join("data"), token.clone());
    let api_token = config.dev_admin_token.clone();
    let coordinator = tokio::spawn(capstan_coordinator::run(
        config,
        grpc,
        None,
        shutdown.child_token(),
    ));
    let runner = tokio::spawn(capstan_runner::run(
        RunnerConfig {
            coordinators: vec![url.clone()],
            registration_token: token,
            name: "dev".into(),
            labels: BTreeMap::new(),
            capacity: 2,
            executor: match args.executor {
                Executor::Shell => ExecutorKind::Shell,
                Executor::Fake => ExecutorKind::Fake,
                Executor::Docker => ExecutorKind::Docker,
            },
            work_dir: temp.path().join("work"),
            ..RunnerConfig::default()
        },
        shutdown.child_token(),
    ));
    let mut embedded = Embedded {
        coordinator,
        runner,
        shutdown,
    };

    let result = tokio::select! {
        r = submit_and_follow(ctx, &url, api_token.as_deref(), &file, text, args.params) => r,
        failure = embedded.first_failure() => Err(failure),
    };
    embedded.stop().await;
    drop(temp);
    result
}

async fn submit_and_follow(
    ctx: &Context,
    url: &str,
    api_token: Option<&str>,
    file: &str,
    text: String,
    params: Vec<(String, String)>,
) -> Result<Exit, Failure> {
    let client = Client::connect_with_token(&[url.to_string()], api_token).await?;
    let run = client
        .submit_run(SubmitRunRequest {
            pipeline_yaml: text,
            file_name: file.to_string(),
            params: params.into_iter().collect(),
            ..SubmitRunRequest::default()
        })
        .await?;
    match ctx.format {
        Format::Text => {
            eprintln!("dev: run {run} on an embedded coordinator ({url}) and runner `dev`");
        }
        Format::Json => println!("{}", json!({ "event": "submitted", "id": run.as_str() })),
    }
    follow(&client, &run, ctx.format, false).await
}

struct Embedded {
    coordinator: JoinHandle<anyhow::Result<()>>,
    runner: JoinHandle<anyhow::Result<()>>,
    shutdown: CancellationToken,
}

impl Embedded {
    /// Resolves only if the coordinator or the runner stops on its own,
    /// which while a run is followed is always a failure.
    async fn first_failure(&mut self) -> Failure {
        let (what, result) = tokio::select! {
            r = &mut self.coordinator => ("coordinator", r),
            r = &mut self.runner => ("runner", r),
        };
        let why = match result {
            Ok(Ok(())) => "stopped unexpectedly".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) => format!("crashed: {e}"),
        };
        Failure::failed(format!("the embedded {what} failed: {why}"))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let wait = async {
            for (what, handle) in [("coordinator", self.coordinator), ("runner", self.runner)] {
                if handle.is_finished() {
                    continue;
                }
                if let Ok(Err(e)) = handle.await {
                    tracing::debug!(what, "stopped with an error: {e:#}");
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, wait).await.is_err() {
            eprintln!("dev: the embedded coordinator and runner did not stop within 10 s");
        }
    }
}
