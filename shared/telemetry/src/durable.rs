//! Spans recorded after the fact, with ids chosen before they end, and
//! exported the moment they end (README "Tracing").
//!
//! The coordinator's `run` span lasts as long as the run, across leaders:
//! its ids are persisted in the run record at submit, and the span is built
//! from the record by whichever leader ends the run. Its `task.dispatch`
//! spans are the parents of the runners' spans. Neither may wait in the
//! batch processor's queue (5 s by default): a kill -9 in that time would
//! leave every runner span below them an orphan. So they go through a
//! processor of their own that exports each span as it ends (batches of
//! one, a few exports in flight), while every other span keeps the
//! standard batching.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, Config, IdGenerator as _, RandomIdGenerator, SamplingDecision,
    ShouldSample, SpanData, SpanEvents, SpanLinks, SpanProcessor as _,
};

/// Exports in flight at once: a slow collector does not hold every later
/// span behind one export.
const CONCURRENT_EXPORTS: usize = 4;

struct Durable {
    processor: BatchSpanProcessor<opentelemetry_sdk::runtime::Tokio>,
    sampler: Box<dyn ShouldSample>,
    ids: RandomIdGenerator,
    scope: InstrumentationScope,
}

static DURABLE: OnceLock<Durable> = OnceLock::new();

/// Installs the eager processor on `exporter` (once per process; [`crate::init`]).
pub(crate) fn install(
    exporter: opentelemetry_otlp::SpanExporter,
    resource: &Resource,
) -> Result<(), crate::TelemetryError> {
    let config = BatchConfigBuilder::default()
        .with_max_export_batch_size(1)
        .with_max_concurrent_exports(CONCURRENT_EXPORTS)
        .build();
    let mut processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
        .with_batch_config(config)
        .build();
    processor.set_resource(resource);
    let durable = Durable {
        processor,
        // The same sampler the provider gets from OTEL_TRACES_SAMPLER.
        sampler: Config::default().sampler,
        ids: RandomIdGenerator::default(),
        scope: InstrumentationScope::builder("capstan").build(),
    };
    DURABLE
        .set(durable)
        .map_err(|_| crate::TelemetryError::AlreadyInstalled)
}

/// Sends what is queued and stops the processor (blocking; [`crate::Telemetry::shutdown`]).
pub(crate) fn shutdown(timeout: Duration) -> Result<(), String> {
    match DURABLE.get() {
        Some(d) => d
            .processor
            .shutdown_with_timeout(timeout)
            .map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// The context of a new span named `name` below `parent`'s span (a root if
/// it has none): fresh ids, sampled as the process's sampler decides. None
/// when export is off. Persist it (as [`crate::TraceHeaders`]) to
/// [`emit`] the span later, from any process.
pub fn new_context(
    parent: &Context,
    name: &str,
    kind: SpanKind,
    attributes: &[KeyValue],
) -> Option<SpanContext> {
    let d = DURABLE.get()?;
    let parent_span = Some(parent.span().span_context().clone()).filter(SpanContext::is_valid);
    let trace_id = parent_span
        .as_ref()
        .map_or_else(|| d.ids.new_trace_id(), SpanContext::trace_id);
    let result = d
        .sampler
        .should_sample(Some(parent), trace_id, name, &kind, attributes, &[]);
    let flags = if result.decision == SamplingDecision::RecordAndSample {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Some(SpanContext::new(
        trace_id,
        d.ids.new_span_id(),
        flags,
        false,
        result.trace_state,
    ))
}

/// A span whose every field is known when it is emitted.
#[derive(Debug)]
pub struct Recorded {
    /// From [`new_context`], possibly by another process.
    pub context: SpanContext,
    /// [`SpanId::INVALID`] for a root.
    pub parent: SpanId,
    pub kind: SpanKind,
    pub name: Cow<'static, str>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    pub events: Vec<Event>,
    pub status: Status,
}

/// Hands `span` to the eager processor, if export is on and its context is
/// sampled. Never blocks: a full queue drops the span (as the SDK does).
pub fn emit(span: Recorded) {
    let Some(d) = DURABLE.get() else {
        return;
    };
    if !span.context.is_sampled() {
        return;
    }
    // Non-exhaustive, with public fields.
    let mut events = SpanEvents::default();
    events.events = span.events;
    d.processor.on_end(SpanData {
        span_context: span.context,
        parent_span_id: span.parent,
        parent_span_is_remote: span.parent != SpanId::INVALID,
        span_kind: span.kind,
        name: span.name,
        start_time: span.start,
        end_time: span.end.max(span.start),
        attributes: span.attributes,
        dropped_attributes_count: 0,
        events,
        links: SpanLinks::default(),
        status: span.status,
        instrumentation_scope: d.scope.clone(),
    });
}

/// The span context in `traceparent` (W3C), if it holds a valid one.
pub fn context_of(traceparent: &str, tracestate: &str) -> Option<SpanContext> {
    let headers = crate::TraceHeaders {
        traceparent: traceparent.to_owned(),
        tracestate: tracestate.to_owned(),
    };
    let sc = headers.context().span().span_context().clone();
    sc.is_valid().then_some(sc)
}
