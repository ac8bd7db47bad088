//! The runner's Prometheus metrics, served by [`http`](crate::http) when
//! `--http-listen` is set (README "Metrics"). Names in base units, labels
//! bounded (slot state, step kind).
//!
//! One set per process ([`get`]): a process runs one agent (the binary, or
//! `capstan dev`'s embedded runner), and the counters are updated deep in
//! the attempt and executor code, which a handle threaded through every
//! constructor would clutter for no gain. (The runner crate's unit tests
//! run several agents in one process; they assert nothing on these.)

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::LazyLock;

type Label = [(&'static str, &'static str); 1];

/// The step kinds, for the `kind` label (as `step::step_kind_name` names them).
const STEP_KINDS: [&str; 6] = ["run", "build", "push", "set-image", "git-push", "unknown"];

/// Every metric the runner exports.
pub(crate) struct RunnerMetrics {
    registry: Registry,
    /// Slots by state: `busy` (an attempt holds it) and `free`.
    slots: Family<Label, Gauge>,
    /// Control streams opened after the first one.
    reconnects: Counter,
    connected_once: std::sync::atomic::AtomicBool,
    step_seconds: Family<Label, Histogram>,
    /// Create, attach and start of a step container, seconds.
    pub(crate) container_start_seconds: Histogram,
    /// Log bytes held on this runner that the coordinator has not acknowledged.
    pub(crate) spool_bytes: Gauge,
}

static METRICS: LazyLock<RunnerMetrics> = LazyLock::new(RunnerMetrics::new);

/// This process's runner metrics.
pub(crate) fn get() -> &'static RunnerMetrics {
    &METRICS
}

fn step_histogram() -> Histogram {
    // 10 ms .. ~1.5 h.
    Histogram::new(exponential_buckets(0.01, 2.0, 20))
}

impl RunnerMetrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("capstan_runner");
        let m = Self {
            registry: Registry::default(),
            slots: Family::default(),
            reconnects: Counter::default(),
            connected_once: Default::default(),
            step_seconds: Family::new_with_constructor(step_histogram),
            container_start_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            spool_bytes: Gauge::default(),
        };
        r.register(
            "slots",
            "Attempt slots by state: busy (an attempt holds it) or free",
            m.slots.clone(),
        );
        r.register(
            "reconnects",
            "Control streams to a coordinator opened after the first (failovers, \
             network loss, coordinator restarts)",
            m.reconnects.clone(),
        );
        r.register(
            "step_duration_seconds",
            "Wall time of steps, by kind (run, build, push, set-image, git-push)",
            m.step_seconds.clone(),
        );
        r.register(
            "container_start_seconds",
            "Time to create, attach to and start a step container",
            m.container_start_seconds.clone(),
        );
        r.register(
            "log_spool_bytes",
            "Log bytes held on this runner that the coordinator has not acknowledged",
            m.spool_bytes.clone(),
        );
        for kind in STEP_KINDS {
            let _ = m.step_seconds.get_or_create(&[("kind", kind)]);
        }
        Self { registry: r, ..m }
    }

    /// `busy` of `capacity` slots are taken.
    pub(crate) fn slots(&self, busy: u32, capacity: u32) {
        let free = capacity.saturating_sub(busy);
        self.slots
            .get_or_create(&[("state", "busy")])
            .set(busy.into());
        self.slots
            .get_or_create(&[("state", "free")])
            .set(free.into());
    }

    /// A control stream was opened (the first one is no reconnect).
    pub(crate) fn connected(&self) {
        if self
            .connected_once
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            self.reconnects.inc();
        }
    }

    /// A step of `kind` ran for `secs`.
    pub(crate) fn step_ran(&self, kind: &'static str, secs: f64) {
        self.step_seconds
            .get_or_create(&[("kind", kind)])
            .observe(secs);
    }

    /// The exposition in `format`.
    pub(crate) fn render(&self, format: capstan_telemetry::exposition::Format) -> String {
        capstan_telemetry::exposition::render(&self.registry, format)
    }
}
