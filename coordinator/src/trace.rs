//! The coordinator's part of a run's trace (README "Tracing").
//!
//! - `run`: the root (a child of the submitter's context if SubmitRun
//!   carried `traceparent`), from submission to the run's end. Its ids are
//!   chosen when the scheduler accepts the run and persisted in the run
//!   record; the span is emitted when the run ends, by whichever leader
//!   ends it, so no crash or failover loses or splits it.
//! - `run.resumed`: opened by a new leader for each unfinished run it loads,
//!   a child of `run`, ended when the run finishes: it shows the takeover.
//! - `task.dispatch`: one per offer, from the moment the task was queued to
//!   the offer, a child of `run`, exported as soon as it ends. Its context
//!   goes to the runner in the `Offer`, so the runner's `attempt` and `step`
//!   spans hang below it.
//!
//! `run` and `task.dispatch` go through [`capstan_telemetry::durable`]
//! (ids chosen up front, start times in the past, eager export). Every
//! function is a no-op unless export is on ([`capstan_telemetry::enabled`]),
//! so the scheduler's hot path pays one load.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use capstan_proto::ids::RunId;
use capstan_telemetry::durable;
use capstan_telemetry::opentelemetry::trace::{
    Event, Span as _, SpanId, SpanKind, Status, TraceContextExt as _, Tracer as _,
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

/// What this leadership adds to the `run` spans of its runs before they end
/// (requeue events), and the `run.resumed` spans it opened.
#[derive(Default)]
pub(crate) struct RunSpans {
    events: HashMap<RunId, Vec<Event>>,
    resumed: HashMap<RunId, OtelSpan>,
}

impl RunSpans {
    /// Chooses the `run` span's ids for a newly accepted run and stores
    /// them in the record (the submitter's context, if any, moves to
    /// `parent_span_id`). The span itself is emitted when the run ends.
    pub(crate) fn submitted(&mut self, run: &mut RunRecord, epoch: u64) {
        let parent = headers(run).context();
        let Some(sc) = durable::new_context(
            &parent,
            "run",
            SpanKind::Server,
            &run_attributes(run, epoch),
        ) else {
            return;
        };
        let parent_span = parent.span().span_context().span_id();
        run.parent_span_id = if parent_span == SpanId::INVALID {
            String::new()
        } else {
            parent_span.to_string()
        };
        let own = TraceHeaders::of(&Context::new().with_remote_span_context(sc));
        run.traceparent = own.traceparent;
        run.tracestate = own.tracestate;
        run.run_span = true;
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
        self.resumed.insert(run.id.clone(), span);
    }

    /// Records for the run's span that an attempt of `task` ended without a
    /// report (`reason`: runner_lost, offer_timeout, ...) and was requeued.
    pub(crate) fn requeued(&mut self, run: &RunId, task: &str, attempt: u32, reason: &'static str) {
        if !capstan_telemetry::enabled() {
            return;
        }
        let event = Event::new(
            "requeue",
            SystemTime::now(),
            vec![
                KeyValue::new("capstan.task", task.to_owned()),
                KeyValue::new("capstan.attempt.number", i64::from(attempt)),
                KeyValue::new("capstan.requeue.reason", reason),
            ],
            0,
        );
        self.events.entry(run.clone()).or_default().push(event);
    }

    /// Emits the run's `run` span, from its submission to now, with its
    /// final state (a failed run's is an error), and ends `run.resumed`.
    /// Whichever leader ends the run emits it, with the ids chosen at
    /// submit, so the span exists once, after any number of failovers.
    pub(crate) fn finished(&mut self, run: &RunRecord, epoch: u64) {
        if !capstan_telemetry::enabled() {
            return;
        }
        let state = format!("{:?}", run.state).to_lowercase();
        let status = if run.state == StoredRunState::Failed {
            let failed: Vec<&str> = run
                .tasks
                .iter()
                .filter(|t| t.state == crate::model::StoredTaskState::Failed)
                .map(|t| t.name.as_str())
                .collect();
            Status::error(format!("failed tasks: {}", failed.join(", ")))
        } else {
            Status::Ok
        };
        let events = self.events.remove(&run.id).unwrap_or_default();
        if let Some(mut span) = self.resumed.remove(&run.id) {
            span.set_attribute(KeyValue::new("capstan.run.state", state.clone()));
            span.set_status(status.clone());
            span.end();
        }
        if !run.run_span {
            return;
        }
        let Some(context) = durable::context_of(&run.traceparent, &run.tracestate) else {
            return;
        };
        let mut attributes = run_attributes(run, epoch);
        attributes.push(KeyValue::new("capstan.run.state", state));
        durable::emit(durable::Recorded {
            context,
            parent: SpanId::from_hex(&run.parent_span_id).unwrap_or(SpanId::INVALID),
            kind: SpanKind::Server,
            name: "run".into(),
            start: at_ms(run.created_at_ms),
            end: SystemTime::now(),
            attributes,
            events,
            status,
        });
    }
}

/// Records the `task.dispatch` span of an offer (exported at once, so that
/// the runner's spans below it are never orphans) and returns the context
/// the runner continues. With export off, the run's own context (a
/// submitter's, if any) passes through, so a runner that exports still
/// joins that trace.
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
    let Some(parent) = durable::context_of(&run.traceparent, &run.tracestate) else {
        return TraceHeaders::default();
    };
    let attributes = vec![
        KeyValue::new("capstan.run.id", run.id.to_string()),
        KeyValue::new("capstan.task", task.name.clone()),
        KeyValue::new("capstan.attempt.id", attempt.to_owned()),
        KeyValue::new("capstan.attempt.number", i64::from(number)),
        KeyValue::new("capstan.runner", runner.to_owned()),
    ];
    let parent_cx = Context::new().with_remote_span_context(parent.clone());
    let Some(sc) =
        durable::new_context(&parent_cx, "task.dispatch", SpanKind::Producer, &attributes)
    else {
        return headers(run);
    };
    let start = if task.queued_at_ms > 0 {
        at_ms(task.queued_at_ms)
    } else {
        SystemTime::now()
    };
    let mut events = Vec::new();
    if number > 1 && !task.message.is_empty() {
        // Why this attempt exists: the last one's failure, and the
        // backoff waited for an infrastructure retry.
        events.push(Event::new(
            "retry",
            SystemTime::now(),
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
            0,
        ));
    }
    tracing::info!(
        run = %run.id,
        task = %task.name,
        attempt,
        runner,
        trace_id = %sc.trace_id(),
        span_id = %sc.span_id(),
        "task dispatched"
    );
    let out = TraceHeaders::of(&Context::new().with_remote_span_context(sc.clone()));
    durable::emit(durable::Recorded {
        context: sc,
        parent: parent.span_id(),
        kind: SpanKind::Producer,
        name: "task.dispatch".into(),
        start,
        end: SystemTime::now(),
        attributes,
        events,
        status: Status::Unset,
    });
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
        spans.requeued(&r.id, "t", 1, "runner_lost");
        assert!(r.traceparent.is_empty() && r.parent_span_id.is_empty() && !r.run_span);
        assert!(spans.events.is_empty() && spans.resumed.is_empty());
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
