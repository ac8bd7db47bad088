//! The coordinator's part of a run's trace (README "Tracing").
//!
//! - `run`: the root, opened when the scheduler accepts a SubmitRun (a child
//!   of the submitter's context if the request carried `traceparent`) and
//!   ended when the run finishes. Its context is persisted in the run record.
//! - `run.resumed`: opened by a new leader for each unfinished run it loads,
//!   a child of the persisted `run`, ended when the run finishes: the trace
//!   goes on across failovers and restarts. (The old leader's `run` span
//!   ends when its scheduler stops, if the process lives to export it.)
//! - `task.dispatch`: one per offer, from the moment the task was queued to
//!   the offer, a child of `run`. Its context goes to the runner in the
//!   `Offer`, so the runner's `attempt` and `step` spans hang below it.
//!
//! Spans are built with the OpenTelemetry API rather than `tracing` because
//! their ids outlive the process (persisted) and their start times lie in
//! the past. Every function is a no-op unless export is on
//! ([`capstan_telemetry::enabled`]), so the scheduler's hot path pays one load.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use capstan_proto::ids::RunId;
use capstan_telemetry::opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _,
};
use capstan_telemetry::opentelemetry::{Context, KeyValue};
use capstan_telemetry::{OtelSpan, TraceHeaders};

use crate::model::{RunRecord, StoredRunState, TaskRecord};

fn at_ms(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn headers(run: &RunRecord) -> TraceHeaders {
    TraceHeaders {
        traceparent: run.traceparent.clone(),
        tracestate: run.tracestate.clone(),
    }
}

fn run_attributes(run: &RunRecord, epoch: u64) -> Vec<KeyValue> {
    vec![
        KeyValue::new("capstan.run.id", run.id.to_string()),
        KeyValue::new("capstan.pipeline", run.pipeline.clone()),
        KeyValue::new(
            "capstan.repo",
            capstan_proto::redact::redact_url(&run.repo).into_owned(),
        ),
        KeyValue::new("capstan.commit", run.rev.clone()),
        KeyValue::new("capstan.leader_epoch", epoch as i64),
    ]
}

/// The open run spans of this leadership, by run. Dropping it ends them.
#[derive(Default)]
pub(crate) struct RunSpans(HashMap<RunId, OtelSpan>);

impl RunSpans {
    /// Opens the `run` span of a newly accepted run and stores its context
    /// in the record (replacing the submitter's, which becomes its parent).
    pub(crate) fn submitted(&mut self, run: &mut RunRecord, epoch: u64) {
        let Some(tracer) = capstan_telemetry::tracer() else {
            return;
        };
        let parent = headers(run).context();
        let span = tracer
            .span_builder("run")
            .with_kind(SpanKind::Server)
            .with_start_time(at_ms(run.created_at_ms))
            .with_attributes(run_attributes(run, epoch))
            .start_with_context(tracer, &parent);
        let own =
            TraceHeaders::of(&Context::new().with_remote_span_context(span.span_context().clone()));
        run.traceparent = own.traceparent;
        run.tracestate = own.tracestate;
        self.0.insert(run.id.clone(), span);
    }

    /// Opens `run.resumed` for an unfinished run a new leader loaded.
    pub(crate) fn resumed(&mut self, run: &RunRecord, epoch: u64) {
        let Some(tracer) = capstan_telemetry::tracer() else {
            return;
        };
        if run.traceparent.is_empty() || run.state.is_terminal() {
            return;
        }
        let span = tracer
            .span_builder("run.resumed")
            .with_attributes(run_attributes(run, epoch))
            .start_with_context(tracer, &headers(run).context());
        self.0.insert(run.id.clone(), span);
    }

    /// Records on the run's span that an attempt of `task` ended without a
    /// report (`reason`: runner_lost, offer_timeout, ...) and was requeued.
    pub(crate) fn requeued(&mut self, run: &RunId, task: &str, attempt: u32, reason: &'static str) {
        if let Some(span) = self.0.get_mut(run) {
            span.add_event(
                "requeue",
                vec![
                    KeyValue::new("capstan.task", task.to_owned()),
                    KeyValue::new("capstan.attempt.number", i64::from(attempt)),
                    KeyValue::new("capstan.requeue.reason", reason),
                ],
            );
        }
    }

    /// Ends the run's span with its final state; a failed run's is an error.
    pub(crate) fn finished(&mut self, run: &RunRecord) {
        if self.0.is_empty() {
            return;
        }
        let Some(mut span) = self.0.remove(&run.id) else {
            return;
        };
        let state = format!("{:?}", run.state).to_lowercase();
        span.set_attribute(KeyValue::new("capstan.run.state", state));
        if run.state == StoredRunState::Failed {
            let failed: Vec<&str> = run
                .tasks
                .iter()
                .filter(|t| t.state == crate::model::StoredTaskState::Failed)
                .map(|t| t.name.as_str())
                .collect();
            span.set_status(Status::error(format!(
                "failed tasks: {}",
                failed.join(", ")
            )));
        } else {
            span.set_status(Status::Ok);
        }
        span.end();
    }
}

/// Records the `task.dispatch` span of an offer and returns the context the
/// runner continues. With export off, the run's own context (a submitter's,
/// if any) passes through, so a runner that exports still joins that trace.
pub(crate) fn dispatch(
    run: &RunRecord,
    task: &TaskRecord,
    attempt: &str,
    number: u32,
    runner: &str,
) -> TraceHeaders {
    if run.traceparent.is_empty() {
        return TraceHeaders::default();
    }
    let Some(tracer) = capstan_telemetry::tracer() else {
        return headers(run);
    };
    let start = if task.queued_at_ms > 0 {
        at_ms(task.queued_at_ms)
    } else {
        SystemTime::now()
    };
    let mut span = tracer
        .span_builder("task.dispatch")
        .with_kind(SpanKind::Producer)
        .with_start_time(start)
        .with_attributes([
            KeyValue::new("capstan.run.id", run.id.to_string()),
            KeyValue::new("capstan.task", task.name.clone()),
            KeyValue::new("capstan.attempt.id", attempt.to_owned()),
            KeyValue::new("capstan.attempt.number", i64::from(number)),
            KeyValue::new("capstan.runner", runner.to_owned()),
        ])
        .start_with_context(tracer, &headers(run).context());
    if number > 1 && !task.message.is_empty() {
        // Why this attempt exists: the last one's failure, and the
        // backoff waited for an infrastructure retry.
        span.add_event(
            "retry",
            vec![
                KeyValue::new("capstan.retry.reason", task.message.clone()),
                KeyValue::new(
                    "capstan.retry.infra_failures",
                    i64::from(task.infra_failures),
                ),
                KeyValue::new(
                    "capstan.retry.script_failures",
                    i64::from(task.script_failures),
                ),
            ],
        );
    }
    let sc = span.span_context().clone();
    tracing::info!(
        run = %run.id,
        task = %task.name,
        attempt,
        runner,
        trace_id = %sc.trace_id(),
        span_id = %sc.span_id(),
        "task dispatched"
    );
    let out = TraceHeaders::of(&Context::new().with_remote_span_context(sc));
    span.end();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::api::v1::SubmitRunRequest;

    fn run() -> RunRecord {
        crate::api::pipeline::build_run(SubmitRunRequest {
            pipeline_yaml: "version: 1\nname: p\ntasks:\n  t:\n    steps: [ { run: 'true' } ]\n"
                .into(),
            ..Default::default()
        })
        .expect("valid pipeline")
    }

    // These unit tests run without an exporter (export is only ever
    // installed by the binaries); tests/tests/tracing.rs covers it on.
    #[test]
    fn without_export_offers_pass_the_submitters_context_through() {
        assert!(!capstan_telemetry::enabled());
        let mut r = run();
        let task = r.tasks[0].clone();
        assert!(dispatch(&r, &task, "a1", 1, "runner").is_empty());
        r.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into();
        r.tracestate = "vendor=x".into();
        let h = dispatch(&r, &task, "a1", 1, "runner");
        assert_eq!(h.traceparent, r.traceparent);
        assert_eq!(h.tracestate, r.tracestate);
    }

    #[test]
    fn without_export_no_run_span_is_kept_and_the_record_is_untouched() {
        let mut spans = RunSpans::default();
        let mut r = run();
        spans.submitted(&mut r, 1);
        spans.resumed(&r, 2);
        assert!(r.traceparent.is_empty());
        assert!(spans.0.is_empty());
    }

    #[test]
    fn records_without_trace_fields_still_load() {
        let r = run();
        let mut json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert!(
            json.get("traceparent").is_none(),
            "empty fields are not stored"
        );
        json.as_object_mut().unwrap().remove("tracestate");
        let back: RunRecord = serde_json::from_value(json).unwrap();
        assert!(back.traceparent.is_empty() && back.tracestate.is_empty());
    }
}
