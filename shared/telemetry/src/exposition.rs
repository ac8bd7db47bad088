//! `/metrics` in the format the scraper asks for: OpenMetrics 1.0 when the
//! `Accept` header prefers `application/openmetrics-text`, else the
//! Prometheus text format 0.0.4 (what `promtool check metrics`, older
//! Prometheus servers and most other scrapers read).
//!
//! The metrics themselves live in a `prometheus_client` registry (one
//! crate for both daemons). Its encoder writes OpenMetrics only; the 0.0.4
//! text is derived from that output by [`openmetrics_to_text`], because the
//! two differ, for what we export (counters, gauges, histograms without
//! exemplars), only in three places: a counter's `# HELP`/`# TYPE` name the
//! family without `_total` in OpenMetrics and the sample name with it in
//! 0.0.4; OpenMetrics has `# UNIT` lines and a closing `# EOF`, 0.0.4 has
//! neither. (The `prometheus` crate would be a second metrics library and
//! registry for a 30-line transformation.)

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// The `Content-Type` of an OpenMetrics answer.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The `Content-Type` of a Prometheus text format 0.0.4 answer.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An exposition format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Text,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::Text => TEXT_CONTENT_TYPE,
        }
    }
}

/// The format an `Accept` header (absent: `None`) asks for: OpenMetrics
/// only when it lists `application/openmetrics-text` with a quality above
/// zero and at least that of any text or wildcard range it also lists
/// (Prometheus sends OpenMetrics at q=1 and `text/plain` at q=0.5).
pub fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::Text;
    };
    let (mut om, mut text) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|v| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => om = om.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    if om > 0.0 && om >= text {
        Format::OpenMetrics
    } else {
        Format::Text
    }
}

/// `registry` encoded in `format`.
pub fn render(registry: &Registry, format: Format) -> String {
    let mut out = String::new();
    encode(&mut out, registry).expect("writing to a String cannot fail");
    match format {
        Format::OpenMetrics => out,
        Format::Text => openmetrics_to_text(&out),
    }
}

/// The Prometheus 0.0.4 text of an OpenMetrics exposition of counters,
/// gauges and histograms (module docs).
pub fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + 16 * counters.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                let tail = if tail == "unknown" { "untyped" } else { tail };
                out.push_str(prefix);
                out.push_str(name);
                out.push_str(suffix);
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    #[test]
    fn prometheus_s_accept_header_gets_openmetrics_and_others_get_text() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                    version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(negotiate(None), Format::Text);
        assert_eq!(negotiate(Some("*/*")), Format::Text);
        assert_eq!(negotiate(Some("text/plain;version=0.0.4")), Format::Text);
        assert_eq!(
            negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.2")),
            Format::Text
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
        assert_eq!(
            negotiate(Some("Application/OpenMetrics-Text; version=1.0.0")),
            Format::OpenMetrics
        );
    }

    #[test]
    fn text_names_counters_with_total_and_drops_unit_and_eof() {
        let mut r = Registry::with_prefix("x");
        let c = Counter::<u64>::default();
        c.inc();
        r.register("jobs", "Jobs done", c);
        let f = Family::<[(&'static str, &'static str); 1], Counter>::default();
        f.get_or_create(&[("outcome", "ok")]).inc();
        r.register("ends", "Ends by outcome", f);
        r.register("depth", "Depth", Gauge::<i64>::default());
        r.register_with_unit(
            "wait",
            "Wait",
            prometheus_client::registry::Unit::Seconds,
            Histogram::new([1.0]),
        );
        let om = render(&r, Format::OpenMetrics);
        assert!(
            om.contains("# TYPE x_jobs counter\n") && om.ends_with("# EOF\n"),
            "{om}"
        );
        let text = render(&r, Format::Text);
        for want in [
            "# HELP x_jobs_total Jobs done.\n",
            "# TYPE x_jobs_total counter\nx_jobs_total 1\n",
            "# TYPE x_ends_total counter\nx_ends_total{outcome=\"ok\"} 1\n",
            "# TYPE x_depth gauge\nx_depth 0\n",
            "# TYPE x_wait_seconds histogram\n",
            "x_wait_seconds_bucket{le=\"+Inf\"} 0\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }
}
