//! `capstan submit FILE [--param k=v]... [--repo URL] [--rev REV] [--priority N]
//! [--idempotency-key KEY] [--follow]`

use capstan_proto::api::v1::SubmitRunRequest;
use serde_json::json;

use super::{Context, print_json, read_pipeline};
use crate::args::SubmitArgs;
use crate::exit::{Exit, Failure};
use crate::follow::follow;
use crate::output::Format;

pub(crate) async fn run(ctx: &Context, args: SubmitArgs) -> Result<Exit, Failure> {
    // The coordinator checks these too; here a mistake costs no connection.
    if let Some(rev) = &args.rev {
        capstan_proto::source::check_rev(rev).map_err(Failure::usage)?;
    }
    if let Some(repo) = &args.repo {
        capstan_proto::source::check_repo(repo).map_err(Failure::usage)?;
    }
    let text = read_pipeline(&args.file)?;
    let client = ctx.connect().await?;
    let request = SubmitRunRequest {
        pipeline_yaml: text,
        file_name: args.file.display().to_string(),
        params: args.params.into_iter().collect(),
        repo: args.repo.unwrap_or_default(),
        rev: args.rev.unwrap_or_default(),
        priority: args.priority,
        idempotency_key: args.idempotency_key.unwrap_or_default(),
        git_ref: String::new(),
    };
    // INVALID_ARGUMENT carries every `FILE:LINE:COL: msg`; `Failure` prints it alone, exit 2.
    // A CI job that is itself traced hands its context down the usual
    // way for processes (`TRACEPARENT`, `TRACESTATE`): the run's trace
    // becomes part of the job's (README "Tracing").
    let parent = capstan_telemetry::TraceHeaders {
        traceparent: std::env::var("TRACEPARENT").unwrap_or_default(),
        tracestate: std::env::var("TRACESTATE").unwrap_or_default(),
    };
    // With export on, the CLI's own span sits between the two.
    let span = tracing::info_span!("capstan submit", capstan.pipeline.file = %request.file_name);
    parent.set_parent_of(&span);
    let parent = if capstan_telemetry::enabled() {
        use capstan_telemetry::OpenTelemetrySpanExt as _;
        capstan_telemetry::TraceHeaders::of(&span.context())
    } else {
        parent
    };
    let run = {
        use tracing::Instrument as _;
        client
            .submit_run_in_trace(request, &parent)
            .instrument(span)
            .await?
    };
    match (args.follow, ctx.format) {
        (false, Format::Text) => println!("{run}"),
        (false, Format::Json) => print_json(&json!({ "id": run.as_str() })),
        (true, Format::Text) => {
            eprintln!("submitted run {run}");
        }
        (true, Format::Json) => println!("{}", json!({ "event": "submitted", "id": run.as_str() })),
    }
    if !args.follow {
        return Ok(Exit::Success);
    }
    follow(&client, &run, ctx.format, true).await
}
