//! Prometheus metrics served on the HTTP side port at `/metrics` (README
//! "Metrics" lists them; deploy/prometheus/alerts.yaml alerts on them).
//! Names are in base units (seconds, bytes); label values are bounded
//! (outcomes, reasons, classes: never a run or runner id).

use crate::scheduler::state::{LossReason, RetryClass, RunOutcome, Tally, TaskOutcome};
use capstan_telemetry::exposition::{self, Format};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The `result` label values of `capstan_webhook_deliveries_total`.
const WEBHOOK_RESULTS: [&str; 3] = ["accepted", "refused", "failed"];
/// How asking a forge for a pull request ended (`capstan_pull_requests_total`):
/// opened, found already open, refused by the forge (4xx), or no answer.
pub(crate) const PULL_REQUEST_RESULTS: [&str; 4] = ["opened", "existing", "refused", "failed"];

/// How sending a commit status ended (`capstan_commit_statuses_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StatusResult {
    Posted,
    /// A 4xx other than 429: not retried.
    Refused,
    /// Given up after the retries, or no token to send.
    Failed,
}

impl StatusResult {
    const ALL: [StatusResult; 3] = [Self::Posted, Self::Refused, Self::Failed];

    fn label(self) -> &'static str {
        match self {
            Self::Posted => "posted",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// A counter with one bounded label.
pub(crate) type Labeled = Family<[(&'static str, &'static str); 1], Counter>;

/// Every metric the coordinator exports. Cheap to update from any task.
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) queue_depth: Gauge,
    pub(crate) runners_connected: Gauge,
    /// Runs the scheduler holds in memory: the unfinished ones (finished
    /// runs live in the store).
    pub(crate) runs_held: Gauge,
    pub(crate) runs_submitted: Counter,
    /// Finished runs deleted by retention.
    pub(crate) runs_deleted: Counter,
    pub(crate) log_bytes: Counter,
    /// Raw and stored bytes of the logs this replica sealed, and their
    /// ratio (stored / raw): what compression at rest saves.
    log_sealed_raw: Counter,
    log_sealed_stored: Counter,
    log_compression_ratio: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Queued -> accepted by a runner, seconds.
    pub(crate) pickup_seconds: Histogram,
    /// Task wall time from first start to end, seconds.
    pub(crate) task_seconds: Histogram,
    /// One group commit's store write, seconds.
    pub(crate) store_commit_seconds: Histogram,
    /// One retention pass (find, forget, delete in the store): the loop
    /// dispatches nothing meanwhile.
    pub(crate) retention_pass_seconds: Histogram,
    tasks_finished: Labeled,
    runs_finished: Labeled,
    task_requeues: Labeled,
    task_retries: Labeled,
    webhook_deliveries: Labeled,
    commit_statuses: Labeled,
    pull_requests: Labeled,
    is_leader: Gauge,
    leader_epoch: Gauge,
    leader_changes: Counter,
    /// etcd request tries (election and store) that failed, by kind.
    etcd_request_errors: Labeled,
    /// etcd request latency, seconds.
    etcd_request_seconds: Histogram,
    pub(crate) log_store: crate::logs::usage::LogStoreUsage,
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
    /// The sum of `unmatched`: always there (0 on a follower), for alerts.
    pub(crate) unmatched_total: Gauge,
}

impl DemandGauges {
    fn register(&self, registry: &mut Registry) {
        let counts = [
            (
                "demand_queued_tasks",
                "Queued tasks by runs-on label set",
                &self.queued,
            ),
            (
                "demand_running_tasks",
                "Offered or running tasks by runs-on label set",
                &self.running,
            ),
            (
                "demand_free_slots",
                "Free slots of connected runners matching the label set",
                &self.free_slots,
            ),
            (
                "demand_unmatched_tasks",
                "Queued tasks whose labels no runner, runner token or --runner-pool could match",
                &self.unmatched,
            ),
        ];
        for (name, help, g) in counts {
            registry.register(name, help, g.clone());
        }
        registry.register(
            "demand_unmatched_queued_tasks",
            "Queued tasks of every label set no runner, runner token or --runner-pool could match",
            self.unmatched_total.clone(),
        );
        registry.register(
            "demand_oldest_queued_seconds",
            "Age of the longest-waiting queued task of the label set",
            self.oldest_queued.clone(),
        );
    }

    /// Forgets every label set (before setting the current ones).
    pub(crate) fn clear(&self) {
        self.queued.clear();
        self.running.clear();
        self.free_slots.clear();
        self.oldest_queued.clear();
        self.unmatched.clear();
        self.unmatched_total.set(0);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("capstan");
        let m = Self {
            queue_depth: Gauge::default(),
            runners_connected: Gauge::default(),
            runs_held: Gauge::default(),
            runs_submitted: Counter::default(),
            runs_deleted: Counter::default(),
            log_bytes: Counter::default(),
            log_sealed_raw: Counter::default(),
            log_sealed_stored: Counter::default(),
            log_compression_ratio: Gauge::default(),
            // 10 ms .. ~46 min.
            pickup_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 19)),
            task_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 20)),
            // 0.25 ms .. ~4 s.
            store_commit_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 15)),
            retention_pass_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 15)),
            tasks_finished: Labeled::default(),
            runs_finished: Labeled::default(),
            task_requeues: Labeled::default(),
            task_retries: Labeled::default(),
            webhook_deliveries: Labeled::default(),
            commit_statuses: Labeled::default(),
            pull_requests: Labeled::default(),
            is_leader: Gauge::default(),
            leader_epoch: Gauge::default(),
            leader_changes: Counter::default(),
            etcd_request_errors: Labeled::default(),
            etcd_request_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 15)),
            log_store: crate::logs::usage::LogStoreUsage::default(),
            demand: DemandGauges::default(),
            registry: Registry::default(),
        };
        m.register_scalars(&mut r);
        m.register_families(&mut r);
        m.register_histograms(&mut r);
        m.log_store.register(&mut r);
        m.demand.register(&mut r);
        m.zero_every_label();
        Self { registry: r, ..m }
    }
}

/// Registration, by kind.
impl Metrics {
    fn register_scalars(&self, r: &mut Registry) {
        let m = self;
        let gauges = [
            ("queue_depth", "Tasks waiting for a runner", &m.queue_depth),
            (
                "runners_connected",
                "Runners with an open control stream to this replica",
                &m.runners_connected,
            ),
            (
                "runs_held",
                "Runs the scheduler holds in memory: the unfinished ones (finished runs are read from the store)",
                &m.runs_held,
            ),
            (
                "is_leader",
                "1 while this replica leads (schedules and serves the API), else 0",
                &m.is_leader,
            ),
            (
                "leader_epoch",
                "The epoch (etcd create revision of the leader key) of this replica's \
                 current or last leadership; 0 before it first led",
                &m.leader_epoch,
            ),
        ];
        for (name, help, g) in gauges {
            r.register(name, help, g.clone());
        }
        let counters = [
            ("runs_submitted", "Runs accepted", &m.runs_submitted),
            (
                "runs_deleted",
                "Finished runs deleted by retention",
                &m.runs_deleted,
            ),
            (
                "log_bytes",
                "Log bytes written to the log store",
                &m.log_bytes,
            ),
            (
                "leader_changes",
                "Times this replica started or stopped leading",
                &m.leader_changes,
            ),
            (
                "log_sealed_raw_bytes",
                "Bytes of the ended attempts' logs this replica compressed at rest",
                &m.log_sealed_raw,
            ),
            (
                "log_sealed_stored_bytes",
                "What those logs take on disk once compressed",
                &m.log_sealed_stored,
            ),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
        r.register(
            "log_compression_ratio",
            "Stored / raw bytes of the logs this replica sealed (0 until one is)",
            m.log_compression_ratio.clone(),
        );
    }

    fn register_families(&self, r: &mut Registry) {
        let m = self;
        let families = [
            (
                "tasks_finished",
                "Tasks ended, by outcome: succeeded, failed (script), infra_failed, \
                 cancelled, skipped",
                &m.tasks_finished,
            ),
            (
                "runs_finished",
                "Runs ended, by outcome: succeeded, failed, infra_failed, cancelled",
                &m.runs_finished,
            ),
            (
                "task_requeues",
                "Attempts that ended without a report and were queued again, by reason: \
                 runner_lost, offer_timeout, offer_rejected, offer_dropped",
                &m.task_requeues,
            ),
            (
                "task_retries",
                "Failed tasks run again, by class: script (the pipeline's retries) or \
                 infra (infrastructure failures)",
                &m.task_retries,
            ),
            (
                "webhook_deliveries",
                "Forge webhook deliveries answered, by result: accepted (2xx: queued or \
                 ignored), refused (4xx: signature, repository, payload), failed (5xx: no \
                 leader, pipeline fetch or submit failed; the forge redelivers)",
                &m.webhook_deliveries,
            ),
            (
                "commit_statuses",
                "Commit statuses sent to forges, by result: posted, refused (4xx, not \
                 retried: check the status token and API URL), failed (given up after \
                 retries, or the token could not be opened)",
                &m.commit_statuses,
            ),
            (
                "pull_requests",
                "Pull requests asked of forges by git-push steps in pull-request mode, by \
                 result: opened, existing (already open from that branch), refused (4xx: \
                 check the status token and API URL), failed (no answer)",
                &m.pull_requests,
            ),
            (
                "etcd_request_errors",
                "etcd request tries that failed, by kind: unavailable (member down or \
                 without a raft leader), timeout, error (refused)",
                &m.etcd_request_errors,
            ),
        ];
        for (name, help, f) in families {
            r.register(name, help, f.clone());
        }
    }

    fn register_histograms(&self, r: &mut Registry) {
        let m = self;
        let histograms = [
            (
                "pickup_latency_seconds",
                "Time from a task being queued to a runner accepting it",
                &m.pickup_seconds,
            ),
            (
                "task_duration_seconds",
                "Wall time of tasks ended by their runner's report",
                &m.task_seconds,
            ),
            (
                "store_commit_seconds",
                "Time of one group commit's write to the state store",
                &m.store_commit_seconds,
            ),
            (
                "etcd_request_seconds",
                "Latency of etcd requests (store and election)",
                &m.etcd_request_seconds,
            ),
            (
                "retention_pass_seconds",
                "One retention pass, during which the scheduler dispatches nothing",
                &m.retention_pass_seconds,
            ),
        ];
        for (name, help, h) in histograms {
            r.register(name, help, h.clone());
        }
    }
}

impl Metrics {
    /// The exposition of every metric in `format`.
    pub(crate) fn render(&self, format: Format) -> String {
        self.log_store.refresh();
        exposition::render(&self.registry, format)
    }

    /// Counts a sealed log.
    pub(crate) fn sealed(&self, stats: crate::logs::sealed::SealStats) {
        let raw = self.log_sealed_raw.inc_by(stats.raw) + stats.raw;
        let stored = self.log_sealed_stored.inc_by(stats.stored) + stats.stored;
        if raw > 0 {
            self.log_compression_ratio.set(stored as f64 / raw as f64);
        }
    }

    /// Counts what a committed batch of transitions tallied.
    pub(crate) fn count(&self, tally: &Tally) {
        for o in &tally.tasks {
            self.tasks_finished
                .get_or_create(&[("outcome", o.label())])
                .inc();
        }
        for &secs in &tally.task_seconds {
            self.task_seconds.observe(secs);
        }
        for o in &tally.runs {
            self.runs_finished
                .get_or_create(&[("outcome", o.label())])
                .inc();
        }
        for r in tally.requeues.iter().map(|r| r.why) {
            self.task_requeues
                .get_or_create(&[("reason", r.label())])
                .inc();
        }
        for c in &tally.retries {
            self.task_retries
                .get_or_create(&[("class", c.label())])
                .inc();
        }
    }

    /// Creates every series at 0, so a scrape shows each family before
    /// its first event and `rate()` sees the first increase.
    fn zero_every_label(&self) {
        for o in TaskOutcome::ALL {
            self.tasks_finished
                .get_or_create(&[("outcome", o.label())])
                .inc_by(0);
        }
        for o in RunOutcome::ALL {
            self.runs_finished
                .get_or_create(&[("outcome", o.label())])
                .inc_by(0);
        }
        for r in LossReason::ALL {
            self.task_requeues
                .get_or_create(&[("reason", r.label())])
                .inc_by(0);
        }
        for c in RetryClass::ALL {
            self.task_retries
                .get_or_create(&[("class", c.label())])
                .inc_by(0);
        }
        for result in WEBHOOK_RESULTS {
            self.webhook_deliveries
                .get_or_create(&[("result", result)])
                .inc_by(0);
        }
        for result in PULL_REQUEST_RESULTS {
            self.pull_requests
                .get_or_create(&[("result", result)])
                .inc_by(0);
        }
        for result in StatusResult::ALL {
            self.commit_statuses
                .get_or_create(&[("result", result.label())])
                .inc_by(0);
        }
        for kind in ["unavailable", "timeout", "error"] {
            self.etcd_request_errors
                .get_or_create(&[("kind", kind)])
                .inc_by(0);
        }
    }

    /// A webhook delivery answered with HTTP `code`.
    pub(crate) fn webhook_answered(&self, code: u16) {
        let result = match code {
            200..=299 => WEBHOOK_RESULTS[0],
            400..=499 => WEBHOOK_RESULTS[1],
            _ => WEBHOOK_RESULTS[2],
        };
        self.webhook_deliveries
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// `result` is one of [`PULL_REQUEST_RESULTS`].
    pub(crate) fn pull_request(&self, result: &'static str) {
        debug_assert!(PULL_REQUEST_RESULTS.contains(&result));
        self.pull_requests
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// How sending one commit status to a forge ended.
    pub(crate) fn commit_status(&self, result: StatusResult) {
        self.commit_statuses
            .get_or_create(&[("result", result.label())])
            .inc();
    }

    /// Where the etcd pool records its requests.
    pub(crate) fn etcd_observer(&self) -> crate::store::etcd::EtcdObserver {
        crate::store::etcd::EtcdObserver {
            errors: self.etcd_request_errors.clone(),
            seconds: self.etcd_request_seconds.clone(),
        }
    }

    /// This replica leads from now on, at `epoch`.
    pub(crate) fn leading(&self, epoch: u64) {
        self.is_leader.set(1);
        self.leader_epoch.set(epoch as i64);
        self.leader_changes.inc();
    }

    /// This replica stopped leading.
    pub(crate) fn stopped_leading(&self) {
        // Held by a leader only: a follower holds none.
        self.runs_held.set(0);
        if self.is_leader.get() == 1 {
            self.is_leader.set(0);
            self.leader_changes.inc();
        }
    }
}
