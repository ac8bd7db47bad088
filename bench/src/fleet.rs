//! Lightweight runners: protocol clients in this process that register, hold
//! a Control stream, heartbeat at the coordinator's interval and finish every
//! offer at once (accept, then `TaskFinished` succeeded with an empty log).
//! They stand in for real runners where thousands of them, or zero work per
//! task, are the point (throughput, connected runners).
//!
//! `per_conn` clients share one HTTP/2 connection (one tonic `Channel`), each
//! on its own streams: 10,000 runners are 100 connections, not 10,000.

use anyhow::Context;
use capstan_proto::runner::v1 as rpb;
use capstan_proto::runner::v1::runner_service_client::RunnerServiceClient;
use futures::StreamExt;
use rpb::coordinator_message::Kind as Down;
use rpb::runner_message::Kind as Up;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

#[derive(Clone, Debug)]
pub(crate) struct FleetConfig {
    pub(crate) url: String,
    /// The CA of an `https://` coordinator.
    pub(crate) ca_cert: Option<std::path::PathBuf>,
    pub(crate) token: String,
    pub(crate) count: usize,
    pub(crate) capacity: u32,
    /// Clients per HTTP/2 connection.
    pub(crate) per_conn: usize,
    pub(crate) name_prefix: String,
}

#[derive(Default)]
pub(crate) struct Counters {
    /// Clients that got their welcome.
    pub(crate) welcomed: AtomicU64,
    /// Offers received (and finished).
    pub(crate) offers: AtomicU64,
    pub(crate) heartbeats: AtomicU64,
    /// Clients whose stream ended with an error.
    pub(crate) failed: AtomicU64,
    /// Wall clock (ns since the Unix epoch) when the latest offer arrived.
    pub(crate) last_offer_ns: AtomicU64,
}

pub(crate) struct Fleet {
    pub(crate) counters: Arc<Counters>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Registers `count` runners and opens their Control streams; returns once
    /// every one got its welcome.
    pub(crate) async fn start(cfg: FleetConfig) -> anyhow::Result<Self> {
        let conns = cfg.count.div_ceil(cfg.per_conn.max(1));
        let mut channels = Vec::with_capacity(conns);
        for _ in 0..conns {
            let ch = crate::procs::endpoint(&cfg.url, cfg.ca_cert.as_deref())?
                .http2_keep_alive_interval(Duration::from_secs(10))
                .connect()
                .await
                .context("connect to the coordinator")?;
            channels.push(ch);
        }
        // Register with some concurrency: each is one scheduler command.
        let creds: Vec<(usize, String, String)> = futures::stream::iter(0..cfg.count)
            .map(|i| {
                let mut rpc = RunnerServiceClient::new(channels[i % conns].clone());
                let req = rpb::RegisterRequest {
                    registration_token: cfg.token.clone(),
                    name: format!("{}-{i}", cfg.name_prefix),
                    labels: Default::default(),
                    capacity: cfg.capacity,
                    version: "bench".into(),
                    ..Default::default()
                };
                async move {
                    let r = rpc.register(req).await?.into_inner();
                    anyhow::Ok((i, r.runner_id, r.runner_secret))
                }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for (i, id, secret) in creds {
            let rpc = RunnerServiceClient::new(channels[i % conns].clone());
            let (c, s, cap) = (counters.clone(), stop.clone(), cfg.capacity);
            tasks.spawn(async move {
                if client(rpc, id, secret, cap, &c, s).await.is_err() {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let fleet = Self {
            counters,
            stop,
            tasks,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while fleet.counters.welcomed.load(Ordering::Relaxed) < cfg.count as u64 {
            if fleet.counters.failed.load(Ordering::Relaxed) > 0 {
                anyhow::bail!("a lightweight runner's control stream failed");
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("lightweight runners not all welcomed within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(fleet)
    }

    pub(crate) fn offers(&self) -> u64 {
        self.counters.offers.load(Ordering::Relaxed)
    }

    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

fn up(kind: Up) -> rpb::RunnerMessage {
    rpb::RunnerMessage { kind: Some(kind) }
}

async fn client(
    mut rpc: RunnerServiceClient<Channel>,
    id: String,
    secret: String,
    capacity: u32,
    counters: &Counters,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(up(Up::Hello(rpb::Hello {
        runner_id: id,
        runner_secret: secret,
        protocol_version: 1,
        running_attempts: Vec::new(),
        capacity,
        labels: Default::default(),
        version: "bench".into(),
        last_epoch: 0,
        // It reports an attempt finished as soon as it is offered, so it
        // must only get offers that are already durable.
        confirms_offers: false,
        dropped_attempts: Vec::new(),
        // As real runners: each heartbeat is answered (the answers are
        // part of what the fleet costs the coordinator).
        wants_heartbeat_acks: true,
    })))?;
    let mut inbound = rpc
        .control(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let interval = match inbound.message().await? {
        Some(rpb::CoordinatorMessage {
            kind: Some(Down::Welcome(w)),
            // Idle, as real runners with nothing to run: the idle interval
            // (an older coordinator sends 0: the one interval).
        }) => Duration::from_millis(u64::from(
            w.idle_heartbeat_interval_ms
                .max(w.heartbeat_interval_ms)
                .max(10),
        )),
        other => anyhow::bail!("expected a welcome, got {other:?}"),
    };
    counters.welcomed.fetch_add(1, Ordering::Relaxed);
    // Spread the heartbeats of many clients over the interval, like real
    // runners that started at different times.
    let phase = Duration::from_nanos(rand_below(interval.as_nanos() as u64));
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + phase, interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                let _ = tx.send(up(Up::GoingAway(rpb::GoingAway { reason: "bench over".into() })));
                return Ok(());
            }
            m = inbound.message() => match m? {
                Some(rpb::CoordinatorMessage { kind: Some(Down::Offer(o)) }) => {
                    let now = crate::procs::epoch_ns();
                    counters.last_offer_ns.store(u64::try_from(now).unwrap_or(0), Ordering::Relaxed);
                    tx.send(up(Up::Accept(rpb::OfferAccepted { attempt_id: o.attempt_id.clone() })))?;
                    tx.send(up(Up::Finished(rpb::TaskFinished {
                        attempt_id: o.attempt_id,
                        outcome: rpb::AttemptOutcome::Succeeded as i32,
                        exit_code: Some(0),
                        message: String::new(),
                        log_length: 0,
                        outputs: Default::default(),
                    })))?;
                    counters.offers.fetch_add(1, Ordering::Relaxed);
                }
                Some(_) => {}
                None => return Ok(()),
            },
            _ = heartbeat.tick() => {
                tx.send(up(Up::Heartbeat(rpb::Heartbeat { free_slots: capacity, load: 0.0, draining: false })))?;
                counters.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A cheap pseudo-random number below `n` (spreading heartbeats needs no quality).
fn rand_below(n: u64) -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let mut x = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % n.max(1)
}
