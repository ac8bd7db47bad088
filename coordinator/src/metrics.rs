//! Prometheus metrics served on the HTTP side port at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Every metric the coordinator exports. Cheap to update from any task.
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) queue_depth: Gauge,
    pub(crate) runners_connected: Gauge,
    pub(crate) runs_submitted: Counter,
    /// Finished runs deleted by retention.
    pub(crate) runs_deleted: Counter,
    pub(crate) log_bytes: Counter,
    /// Queued -> accepted by a runner, milliseconds.
    pub(crate) pickup_ms: Histogram,
    /// Task wall time from first start to end, seconds.
    pub(crate) task_seconds: Histogram,
    /// The demand signal by `runs-on` label set (`crate::demand`), set at
    /// each scrape on the leader.
    pub(crate) demand: DemandGauges,
}

type ByLabels<G> = Family<Vec<(String, String)>, G>;

/// `capstan_demand_*{labels="k=v,k=v"}`.
#[derive(Default)]
pub(crate) struct DemandGauges {
    pub(crate) queued: ByLabels<Gauge>,
    pub(crate) running: ByLabels<Gauge>,
    pub(crate) free_slots: ByLabels<Gauge>,
    pub(crate) oldest_queued: ByLabels<Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) unmatched: ByLabels<Gauge>,
}

impl DemandGauges {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "demand_queued_tasks",
            "Queued tasks by runs-on label set",
            self.queued.clone(),
        );
        registry.register(
            "demand_running_tasks",
            "Offered or running tasks by runs-on label set",
            self.running.clone(),
        );
        registry.register(
            "demand_free_slots",
            "Free slots of connected runners matching the label set",
            self.free_slots.clone(),
        );
        registry.register(
            "demand_oldest_queued_seconds",
            "Age of the longest-waiting queued task of the label set",
            self.oldest_queued.clone(),
        );
        registry.register(
            "demand_unmatched_tasks",
            "Queued tasks whose labels no runner, runner token or --runner-pool could match",
            self.unmatched.clone(),
        );
    }

    /// Forgets every label set (before setting the current ones).
    pub(crate) fn clear(&self) {
        self.queued.clear();
        self.running.clear();
        self.free_slots.clear();
        self.oldest_queued.clear();
        self.unmatched.clear();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("capstan");
        let queue_depth = Gauge::default();
        let runners_connected = Gauge::default();
        let runs_submitted = Counter::default();
        let runs_deleted = Counter::default();
        let log_bytes = Counter::default();
        let pickup_ms = Histogram::new(exponential_buckets(0.5, 2.0, 16));
        let task_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 20));
        registry.register(
            "queue_depth",
            "Tasks waiting for a runner",
            queue_depth.clone(),
        );
        registry.register(
            "runners_connected",
            "Runners with an open control stream",
            runners_connected.clone(),
        );
        registry.register("runs_submitted", "Runs accepted", runs_submitted.clone());
        registry.register(
            "runs_deleted",
            "Finished runs deleted by retention",
            runs_deleted.clone(),
        );
        registry.register("log_bytes", "Log bytes written", log_bytes.clone());
        registry.register(
            "pickup_latency_ms",
            "Time from a task being queued to a runner accepting it",
            pickup_ms.clone(),
        );
        registry.register(
            "task_duration_seconds",
            "Wall time of finished tasks",
            task_seconds.clone(),
        );
        let demand = DemandGauges::default();
        demand.register(&mut registry);
        Self {
            registry,
            demand,
            queue_depth,
            runners_connected,
            runs_submitted,
            runs_deleted,
            log_bytes,
            pickup_ms,
            task_seconds,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
