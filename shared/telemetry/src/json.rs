//! `--log-format json`: one JSON object a line on stderr, for log
//! collectors (Loki, Elasticsearch, Cloud Logging):
//!
//! ```json
//! {"timestamp":"2026-12-07T07:00:00.123456Z","level":"INFO",
//!  "target":"capstan_runner::attempt","message":"checked out",
//!  "fields":{"attempt":"a-1"},"spans":["attempt build","step 1 run"],
//!  "trace_id":"4bf9...","span_id":"00f0..."}
//! ```
//!
//! `trace_id` and `span_id` are those of the OpenTelemetry span the line
//! was logged in, present while trace export is on, so a line links to its
//! trace in the collector; an event with both as fields names its span
//! itself (for spans made with the SDK directly). tracing-subscriber's own JSON format has no
//! field for them, hence this formatter.

use opentelemetry::trace::TraceContextExt as _;
use serde_json::{Map, Value};
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime as _;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// What a log line is written as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (tracing-subscriber's default format).
    #[default]
    Text,
    /// One JSON object a line (module docs).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format `{other}`: use `text` or `json`"
            )),
        }
    }
}

/// The JSON line formatter.
pub(crate) struct JsonLines;

/// An event's fields as JSON values (numbers and booleans stay typed).
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let mut timestamp = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), timestamp.into());
        let meta = event.metadata();
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        let mut fields = Map::new();
        event.record(&mut Fields(&mut fields));
        let message = fields.remove("message").unwrap_or_default();
        // An event may name its span itself (the coordinator's run and
        // dispatch spans are made with the SDK, outside `tracing`).
        let explicit = match (fields.remove("trace_id"), fields.remove("span_id")) {
            (Some(t), Some(s)) => Some((t, s)),
            (t, s) => {
                fields.extend(t.map(|t| ("trace_id".to_owned(), t)));
                fields.extend(s.map(|s| ("span_id".to_owned(), s)));
                None
            }
        };
        line.insert("message".into(), message);
        line.insert("fields".into(), Value::Object(fields));
        let mut innermost = None;
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|s| {
                    innermost = Some(s.id());
                    Value::String(s.name().to_owned())
                })
                .collect();
            line.insert("spans".into(), Value::Array(spans));
        }
        if let Some((trace, span)) = explicit {
            line.insert("trace_id".into(), trace);
            line.insert("span_id".into(), span);
        } else if crate::enabled()
            && let Some(id) = innermost
        {
            let cx = tracing::dispatcher::get_default(|d| {
                tracing_opentelemetry::get_otel_context(&id, d)
            });
            if let Some(cx) = cx {
                let sc = cx.span().span_context().clone();
                if sc.is_valid() {
                    line.insert("trace_id".into(), sc.trace_id().to_string().into());
                    line.insert("span_id".into(), sc.span_id().to_string().into());
                }
            }
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_a_wrong_one_says_what_to_use() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!(" TEXT ".parse::<LogFormat>(), Ok(LogFormat::Text));
        let e = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(e.contains("`yaml`") && e.contains("`json`"), "{e}");
    }
}
