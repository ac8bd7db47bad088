//! Logging and OpenTelemetry trace export, shared by the coordinator and the
//! runner (README "Tracing").
//!
//! [`init`] installs the `tracing` subscriber: human-readable lines on stderr
//! (filtered by `RUST_LOG`) and, only when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED` is
//! not `true`, `OTEL_TRACES_EXPORTER` not `none`), an OTLP/gRPC exporter.
//! Without those variables no exporter, layer or tracer exists and
//! [`enabled`] is false, so callers skip building spans altogether.
//!
//! The SDK reads the other standard variables itself: `OTEL_SERVICE_NAME`
//! and `OTEL_RESOURCE_ATTRIBUTES` (service name defaulting to the binary's,
//! e.g. `capstan-coordinator`), `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`,
//! `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`, `_HEADERS`, `_COMPRESSION`.
//!
//! Spans are batched and exported by a task on the caller's tokio runtime
//! (the SDK's async-runtime batch processor): the SDK's default batch
//! processor exports from a plain thread, where tonic has no reactor and
//! every export fails, silently. So [`init`] must run inside the runtime,
//! and [`Telemetry::shutdown`] must be awaited before the runtime ends, or
//! the last batch is lost.
//!
//! Trace context travels as W3C `traceparent` / `tracestate` strings
//! ([`TraceHeaders`]): in the run record, in the runner's `Offer`, and in
//! SubmitRun's gRPC metadata.

pub mod durable;
pub mod exposition;
mod json;

pub use json::LogFormat;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use opentelemetry;
pub use opentelemetry_sdk::trace::{SdkTracer, Span as OtelSpan};
pub use tracing_opentelemetry::OpenTelemetrySpanExt;

/// How long [`Telemetry::shutdown`] waits for the last export. A collector
/// that is down or slow must never hold up a process's exit for long.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Crates whose spans and events are exported: ours. tonic's, h2's and the
/// SDK's own are not (the last would feed back into the exporter).
const EXPORTED_TARGETS: [&str; 5] = [
    "capstan_coordinator",
    "capstan_runner",
    "capstan_cli",
    "capstan_client",
    "capstan_pipeline",
];

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Trace export is on in this process.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// The process's tracer, when export is on. For spans whose ids or times
/// `tracing` cannot set (the coordinator's run and dispatch spans).
pub fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Why telemetry could not start; each says which variable to fix.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "{var}={value:?}: only OTLP over gRPC is supported; set it to `grpc` or unset it \
         (the collector's gRPC port is usually 4317)"
    )]
    UnsupportedProtocol { var: &'static str, value: String },
    #[error(
        "cannot set up the OTLP trace exporter: {source}; fix OTEL_EXPORTER_OTLP_ENDPOINT \
         (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) to a gRPC URL such as http://127.0.0.1:4317, \
         or unset it to turn trace export off"
    )]
    Exporter {
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error(
        "{var}={value:?}: TLS to the collector is not built in; use plain gRPC \
         (http://) to a collector or agent on the host or in the pod, which may forward over TLS"
    )]
    TlsUnsupported { var: &'static str, value: String },
    #[error("a tracing subscriber is already installed in this process")]
    AlreadyInstalled,
}

/// What the environment asks for (see the module docs).
#[derive(Debug, PartialEq, Eq)]
pub enum ExportSetting {
    Off,
    Otlp,
}

/// Reads the switches from `var` (the process environment in [`init`]).
pub fn export_setting(
    var: impl Fn(&str) -> Option<String>,
) -> Result<ExportSetting, TelemetryError> {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"))
    {
        return Ok(ExportSetting::Off);
    }
    // The signal-specific endpoint wins, as in the SDK.
    let Some((var, endpoint)) = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .find_map(|name| set(name).map(|v| (name, v))) else {
        return Ok(ExportSetting::Off);
    };
    if endpoint.trim().to_ascii_lowercase().starts_with("https://") {
        return Err(TelemetryError::TlsUnsupported {
            var,
            value: endpoint,
        });
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(value) = set(name) {
            if value.trim() != "grpc" {
                return Err(TelemetryError::UnsupportedProtocol { var: name, value });
            }
            break;
        }
    }
    Ok(ExportSetting::Otlp)
}

/// The installed subscriber's exporter, to flush on exit.
#[must_use = "call `shutdown().await` before the process exits, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still buffered and stops the exporter, waiting at
    /// most a few seconds (an unreachable collector must not delay exit).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK blocks its caller until the export task answers; that
        // task runs on this runtime, so block a pool thread, not a worker.
        let done = tokio::task::spawn_blocking(move || {
            let eager = durable::shutdown(SHUTDOWN_GRACE);
            provider.shutdown()?;
            eager.map_err(opentelemetry_sdk::error::OTelSdkError::InternalFailure)
        });
        match tokio::time::timeout(SHUTDOWN_GRACE, done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "flushing trace spans failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing trace spans panicked"),
            Err(_) => tracing::warn!(
                "the trace collector did not take the last spans within {SHUTDOWN_GRACE:?}; exiting without them"
            ),
        }
    }
}

/// Installs the global subscriber: stderr lines (`format`) filtered by
/// `RUST_LOG` (else `default_filter`), plus OTLP export when the environment asks for it
/// (module docs), with `service_name` unless `OTEL_SERVICE_NAME` or
/// `OTEL_RESOURCE_ATTRIBUTES` names the service. Must run inside a tokio
/// runtime.
pub fn init(
    service_name: &'static str,
    default_filter: &str,
    format: LogFormat,
) -> Result<Telemetry, TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .event_format(json::JsonLines)
            .with_filter(filter)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(fmt);
    if export_setting(|name| std::env::var(name).ok())? == ExportSetting::Off {
        registry
            .try_init()
            .map_err(|_| TelemetryError::AlreadyInstalled)?;
        return Ok(Telemetry { provider: None });
    }
    let exporter = || {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|source| TelemetryError::Exporter { source })
    };
    let batch =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter()?,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let mut resource = opentelemetry_sdk::Resource::builder().build();
    let unnamed = resource
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_none_or(|v| v.as_str().starts_with("unknown_service"));
    if unnamed {
        resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service_name)
            .build();
    }
    durable::install(exporter()?, &resource)?;
    // The sampler comes from OTEL_TRACES_SAMPLER through the SDK's default
    // config; the builder does not override it.
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("capstan");
    let mut targets = tracing_subscriber::filter::Targets::new();
    for t in EXPORTED_TARGETS {
        targets = targets.with_target(t, tracing::Level::INFO);
    }
    // No `busy_ns`/`idle_ns`/`thread.*` on every span: tracing's
    // bookkeeping, not the work's.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer.clone())
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_filter(targets);
    registry
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    let _ = TRACER.set(tracer);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    tracing::info!(service = service_name, "exporting traces over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// A trace context in W3C Trace Context form. Empty `traceparent`: none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: String,
    pub tracestate: String,
}

impl TraceHeaders {
    pub fn is_empty(&self) -> bool {
        self.traceparent.is_empty()
    }

    /// The headers of `cx`'s span; empty if it has no valid span.
    pub fn of(cx: &opentelemetry::Context) -> Self {
        if !cx.span().span_context().is_valid() {
            return Self::default();
        }
        let mut map = HashMap::new();
        TraceContextPropagator::new().inject_context(cx, &mut map);
        Self {
            traceparent: map.remove("traceparent").unwrap_or_default(),
            tracestate: map.remove("tracestate").unwrap_or_default(),
        }
    }

    /// A context whose remote parent is this one; the empty context if the
    /// headers are empty or malformed (a bad header must not fail a run).
    pub fn context(&self) -> opentelemetry::Context {
        if self.traceparent.is_empty() {
            return opentelemetry::Context::new();
        }
        let mut map = HashMap::with_capacity(2);
        map.insert("traceparent".to_string(), self.traceparent.clone());
        if !self.tracestate.is_empty() {
            map.insert("tracestate".to_string(), self.tracestate.clone());
        }
        TraceContextPropagator::new().extract(&map)
    }

    /// Makes this context the parent of `span`, if export is on and the
    /// headers hold one.
    pub fn set_parent_of(&self, span: &tracing::Span) {
        if enabled() && !self.is_empty() {
            let _ = span.set_parent(self.context());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn export_is_off_without_an_endpoint_and_when_disabled() {
        let off = |vars: &[(&str, &str)]| export_setting(env(vars)).unwrap();
        assert_eq!(off(&[]), ExportSetting::Off);
        assert_eq!(
            off(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]),
            ExportSetting::Off
        );
        assert_eq!(
            off(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]),
            ExportSetting::Otlp
        );
        assert_eq!(
            off(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")]),
            ExportSetting::Otlp
        );
        assert_eq!(
            off(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_SDK_DISABLED", "TRUE"),
            ]),
            ExportSetting::Off
        );
        assert_eq!(
            off(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_TRACES_EXPORTER", "none"),
            ]),
            ExportSetting::Off
        );
    }

    #[test]
    fn a_protocol_other_than_grpc_or_tls_is_refused_with_the_variable_named() {
        let e = export_setting(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{e}");
        let e = export_setting(env(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "HTTPS://c:4317"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
        ]))
        .unwrap_err();
        assert!(
            e.to_string().contains("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                && e.to_string().contains("http://"),
            "{e}"
        );
        // The signal-specific variable wins over the generic one.
        assert_eq!(
            export_setting(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ]))
            .unwrap(),
            ExportSetting::Otlp
        );
    }

    #[test]
    fn headers_round_trip_and_bad_ones_give_no_parent() {
        let h = TraceHeaders {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: "vendor=x".into(),
        };
        let cx = h.context();
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(TraceHeaders::of(&cx), h);
        let bad = TraceHeaders {
            traceparent: "not a traceparent".into(),
            tracestate: String::new(),
        };
        assert!(!bad.context().span().span_context().is_valid());
        assert!(TraceHeaders::of(&bad.context()).is_empty());
    }
}
