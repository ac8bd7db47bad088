//! The shipper against the test coordinator ([`crate::testing`]) and its
//! injected faults.

use super::*;
use crate::credentials::Credentials;
use crate::testing::{self, RUNNER_ID, SECRET};
use capstan_proto::ids::RunnerId;

async fn target(
    server: &testing::Handle,
) -> (
    watch::Sender<Option<LogTarget>>,
    watch::Receiver<Option<LogTarget>>,
) {
    let target = LogTarget::new(
        server.channel(),
        Credentials {
            runner_id: RunnerId::from_string(RUNNER_ID),
            runner_secret: SECRET.into(),
        },
    );
    watch::channel(Some(target))
}

fn data(i: usize, size: usize) -> Vec<u8> {
    (0..size).map(|j| ((i * 31 + j) % 251) as u8).collect()
}

/// A new spool with `budget` bytes of memory and its shipper to the test
/// coordinator. Keep the dir and the target's sender until the end:
/// dropping either ends the shipping early.
async fn shipping(
    server: &testing::Handle,
    attempt: &str,
    budget: u64,
    limits: Limits,
) -> (
    tempfile::TempDir,
    watch::Sender<Option<LogTarget>>,
    Arc<Spool>,
    ShipperHandle,
) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::create_with_budget(dir.path(), attempt, budget).unwrap();
    let (target_tx, target_rx) = target(server).await;
    let shipper = ShipperHandle::spawn_with(Arc::clone(&spool), target_rx, limits);
    (dir, target_tx, spool, shipper)
}

/// Waits until the coordinator acknowledged `n` bytes, then makes it
/// lose every log it holds (a restart that lost acknowledged data).
async fn lose_after_ack(server: &testing::Handle, shipper: &ShipperHandle, n: u64) {
    while shipper.acked() < n {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut st = server.coordinator.logs.lock().unwrap();
    st.logs.clear();
    st.steps.clear();
}

/// Small streams, so that a test sees many of them.
const SMALL: Limits = Limits {
    max_chunk: 16 * 1024,
    stream_max_bytes: 100_000,
    max_in_flight: 4,
    max_unacked: 1 << 30,
    first_retry: crate::backoff::MIN,
};

/// Appends 300 chunks of 1 to 20,000 bytes over three steps, pausing
/// now and then; returns what was written and each byte's step.
async fn produce(spool: &Spool) -> (Vec<u8>, Vec<u32>) {
    let mut produced = Vec::new();
    let mut steps = Vec::new();
    for i in 0..300 {
        let step = u32::try_from(i / 100).unwrap();
        let chunk = data(i, 1 + (i * 7919) % 20_000);
        spool.append(step, &chunk).await.unwrap();
        steps.extend(std::iter::repeat_n(step, chunk.len()));
        produced.extend_from_slice(&chunk);
        if i % 40 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    (produced, steps)
}

async fn ship_and_check(
    server: &testing::Handle,
    attempt: &str,
    limits: Limits,
) -> testing::LogStats {
    let (_dir, _target, spool, shipper) =
        shipping(server, attempt, crate::logs::spool::MEMORY_BUDGET, limits).await;
    let (produced, steps) = produce(&spool).await;
    let total = shipper.finish().await;
    assert_eq!(total, produced.len() as u64);
    let st = server.coordinator.logs.lock().unwrap();
    assert!(st.logs[attempt] == produced, "log differs");
    assert_eq!(
        st.appended,
        produced.len() as u64,
        "a byte was written twice"
    );
    assert!(st.steps[attempt] == steps, "step indexes differ");
    st.stats()
}

#[tokio::test]
async fn ships_every_byte_once_in_order_across_a_dropped_stream() {
    let server = testing::start().await;
    server.coordinator.logs.lock().unwrap().fail_after_chunks = Some(2);
    let stats = ship_and_check(&server, "att-ship", Limits::default()).await;
    assert!(stats.fault_injected, "the fault was not injected");
    assert!(stats.streams >= 2, "streams: {}", stats.streams);
}

#[tokio::test]
async fn keeps_several_streams_in_flight() {
    let server = testing::start().await;
    // Acks come back slowly (the coordinator's fsync).
    server.coordinator.logs.lock().unwrap().ack_delay = Duration::from_millis(100);
    let stats = ship_and_check(&server, "att-window", SMALL).await;
    assert!(stats.streams >= 10, "streams: {}", stats.streams);
    assert!(
        (2..=SMALL.max_in_flight).contains(&stats.max_in_flight),
        "streams in flight at once: {}",
        stats.max_in_flight
    );
}

#[tokio::test]
async fn resends_after_an_error_mid_window() {
    let server = testing::start().await;
    {
        let mut st = server.coordinator.logs.lock().unwrap();
        st.ack_delay = Duration::from_millis(100);
        // Streams that already sent their chunks wait for their acks
        // when the fourth one fails after its first chunk.
        st.fail_stream = Some(4);
    }
    let stats = ship_and_check(&server, "att-midwin", SMALL).await;
    assert!(stats.fault_injected, "the fault was not injected");
    assert!(stats.max_in_flight >= 2, "{}", stats.max_in_flight);
}

#[tokio::test]
async fn a_stream_that_overtakes_waits_at_the_coordinator() {
    let server = testing::start().await;
    {
        let mut st = server.coordinator.logs.lock().unwrap();
        // A slow coordinator: the next stream's first chunk arrives while
        // the one before is still being appended.
        st.chunk_delay = Duration::from_millis(5);
    }
    let stats = ship_and_check(&server, "att-overtake", SMALL).await;
    assert_eq!(stats.out_of_range_sent, 0);
}

#[tokio::test]
async fn one_stream_at_a_time_with_a_coordinator_that_refuses_gaps() {
    let server = testing::start().await;
    {
        let mut st = server.coordinator.logs.lock().unwrap();
        st.chunk_delay = Duration::from_millis(5);
        st.refuse_gaps = true;
    }
    let stats = ship_and_check(&server, "att-nogap", SMALL).await;
    // The overtaking stream was refused, the shipper fell back to one
    // stream at a time and did not resend from 0.
    assert!(stats.out_of_range_sent >= 1);
    assert_eq!(
        stats.restarts_from_zero, 0,
        "an overtaking stream's OUT_OF_RANGE was taken for a coordinator that lost data: \
         the whole log was resent from 0 (and the shipper kept pipelining)"
    );
}

#[tokio::test]
async fn resends_from_zero_after_out_of_range() {
    let server = testing::start().await;
    let (_dir, _target, spool, shipper) = shipping(
        &server,
        "att-oor",
        crate::logs::spool::MEMORY_BUDGET,
        Limits::default(),
    )
    .await;
    let first = data(1, 100_000);
    spool.append(0, &first).await.unwrap();
    lose_after_ack(&server, &shipper, first.len() as u64).await;
    let second = data(2, 100_000);
    spool.append(1, &second).await.unwrap();
    let total = shipper.finish().await;
    assert_eq!(total, 200_000);
    let st = server.coordinator.logs.lock().unwrap();
    assert!(st.out_of_range_sent >= 1);
    let mut produced = first.clone();
    produced.extend_from_slice(&second);
    assert!(st.logs["att-oor"] == produced, "log differs");
}

/// While no coordinator can be reached, a log past the spool's memory
/// budget goes to the spool's file; once one can, every byte is shipped
/// once, in order, from memory and file alike.
#[tokio::test]
async fn ships_what_was_spilled_while_the_coordinator_was_away() {
    let server = testing::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::create_with_budget(dir.path(), "att-away", 200_000).unwrap();
    let (target_tx, target_rx) = watch::channel(None);
    let shipper = ShipperHandle::spawn_with(Arc::clone(&spool), target_rx, SMALL);
    let mut produced = Vec::new();
    for i in 0..6 {
        let chunk = data(i, 100_000);
        spool.append(0, &chunk).await.unwrap();
        produced.extend_from_slice(&chunk);
    }
    let spilled = std::fs::metadata(spool.path()).unwrap().len();
    assert!(
        spilled > 200_000,
        "nothing went to the file ({spilled} bytes)"
    );
    let (_tx, reachable) = target(&server).await;
    target_tx.send_replace(reachable.borrow().clone());
    let more = data(9, 300_000);
    spool.append(1, &more).await.unwrap();
    produced.extend_from_slice(&more);
    let total = shipper.finish().await;
    assert_eq!(total, produced.len() as u64);
    let st = server.coordinator.logs.lock().unwrap();
    assert!(st.logs["att-away"] == produced, "log differs");
    assert_eq!(
        st.appended,
        produced.len() as u64,
        "a byte was written twice"
    );
    // Streams end at a quarter of the spool's budget (50 KB; at most
    // one 16 KiB chunk past it), not at the limits' 100 KB.
    assert!(
        st.streams >= produced.len() / (50_000 + 16 * 1024),
        "{} streams for {} bytes",
        st.streams,
        produced.len()
    );
}

/// A coordinator that lost a long log it had acknowledged cannot be sent
/// it again (the runner dropped the acknowledged bytes): the shipper
/// stops instead of resending forever, and the attempt can finish.
#[tokio::test]
async fn stops_when_the_coordinator_lost_what_was_released() {
    let server = testing::start().await;
    // Refused at once instead of after the test server's gap wait.
    server.coordinator.logs.lock().unwrap().refuse_gaps = true;
    let (_dir, _target, spool, shipper) = shipping(&server, "att-lost", 160_000, SMALL).await;
    let first = data(1, 100_000);
    spool.append(0, &first).await.unwrap();
    while shipper.acked() < first.len() as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        spool.first_held(),
        100_000,
        "the acknowledged bytes were kept"
    );
    lose_after_ack(&server, &shipper, 100_000).await;
    spool.append(0, &data(2, 1000)).await.unwrap();
    let total = tokio::time::timeout(Duration::from_secs(20), shipper.finish())
        .await
        .expect("the shipper kept resending what it no longer holds");
    assert_eq!(total, 101_000);
    let st = server.coordinator.logs.lock().unwrap();
    assert!(st.out_of_range_sent >= 1);
    assert!(!st.logs.contains_key("att-lost"), "sent bytes past a gap");
}

/// A short log the coordinator lost is sent again from byte 0, and
/// keeps being sent whole while it grows past what the spool keeps
/// whole: the acknowledgements of the resend, not the ones before the
/// loss, decide what the spool may drop.
#[tokio::test]
async fn resends_a_lost_short_log_whole_while_it_grows() {
    let server = testing::start().await;
    server.coordinator.logs.lock().unwrap().refuse_gaps = true;
    // Small streams, each read only after the ack of the one before.
    let limits = Limits {
        stream_max_bytes: 20_000,
        max_in_flight: 1,
        ..SMALL
    };
    // The spool keeps a log whole up to 100 KB (a quarter of 400 KB).
    let (_dir, _target, spool, shipper) = shipping(&server, "att-regrow", 400_000, limits).await;
    let mut produced = data(1, 70_000);
    spool.append(0, &produced).await.unwrap();
    lose_after_ack(&server, &shipper, 70_000).await;
    // The resend takes a while: the log grows past 100 KB meanwhile.
    server.coordinator.logs.lock().unwrap().ack_delay = Duration::from_millis(50);
    // Still short when the shipper finds out what was lost...
    let more = data(2, 20_000);
    spool.append(0, &more).await.unwrap();
    produced.extend_from_slice(&more);
    // (Until the resend has begun: a log that grows past 100 KB before
    // the shipper learns of the loss has dropped what it acknowledged.)
    while !server
        .coordinator
        .logs
        .lock()
        .unwrap()
        .logs
        .contains_key("att-regrow")
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ... and past what the spool keeps whole during the resend.
    for i in 3..7 {
        let more = data(i, 70_000);
        spool.append(0, &more).await.unwrap();
        produced.extend_from_slice(&more);
    }
    let total = tokio::time::timeout(Duration::from_secs(20), shipper.finish())
        .await
        .expect("the shipper did not finish");
    assert_eq!(total, produced.len() as u64);
    let st = server.coordinator.logs.lock().unwrap();
    assert!(st.out_of_range_sent >= 1, "the loss was not noticed");
    let held = st.logs.get("att-regrow").map_or(0, Vec::len);
    assert!(
        st.logs["att-regrow"] == produced,
        "the coordinator holds {held} of {} bytes",
        produced.len()
    );
}

/// The coordinator says the attempt is not this runner's (it forgot a
/// run past its retention while a runner that had lost its lease still
/// ran a superseded attempt): no resend can ever be taken. Once the
/// attempt ended, the shipper gives up instead of retrying forever (which
/// held the attempt's slot and spool until the runner restarted).
#[tokio::test]
async fn gives_up_when_the_attempt_is_not_the_runners() {
    let server = testing::start().await;
    server.coordinator.logs.lock().unwrap().refuse_attempts = true;
    let (_dir, _target, spool, shipper) = shipping(
        &server,
        "att-gone",
        crate::logs::spool::MEMORY_BUDGET,
        Limits::default(),
    )
    .await;
    spool
        .append(0, b"output of a superseded attempt\n")
        .await
        .unwrap();
    // While the attempt runs, refusals do not end the shipping.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !shipper.task.is_finished(),
        "gave up while the attempt still ran"
    );
    let total = tokio::time::timeout(Duration::from_secs(20), shipper.finish())
        .await
        .expect("the shipper retried a refusal that cannot change, forever");
    assert_eq!(total, 31);
}

/// Ships one line while a coordinator on loopback port `old_port` is
/// the target, publishes a working coordinator as the new target 300 ms
/// later (after the push to the old one failed or while it still
/// waits), and returns whether the line reached the new one within
/// `within`.
async fn moves_to_a_new_target(old_port: u16, limits: Limits, within: Duration) -> bool {
    let credentials = || Credentials {
        runner_id: RunnerId::from_string(RUNNER_ID),
        runner_secret: SECRET.into(),
    };
    let old = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{old_port}"))
        .unwrap()
        .connect_lazy();
    let (target_tx, target_rx) = watch::channel(Some(LogTarget::new(old, credentials())));
    let dir = tempfile::tempdir().unwrap();
    let spool =
        Spool::create_with_budget(dir.path(), "att-moved", crate::logs::spool::MEMORY_BUDGET)
            .unwrap();
    let shipper = ShipperHandle::spawn_with(Arc::clone(&spool), target_rx, limits);
    let line = b"written while the leader was gone\n";
    spool.append(0, line).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(shipper.acked(), 0, "acknowledged by the old target");
    let server = testing::start().await;
    target_tx.send_replace(Some(LogTarget::new(server.channel(), credentials())));
    let Ok(total) = tokio::time::timeout(within, shipper.finish()).await else {
        return false;
    };
    assert_eq!(total, line.len() as u64);
    assert!(server.coordinator.logs.lock().unwrap().logs["att-moved"] == line);
    true
}

/// After a leader failover the agent publishes the new leader as the
/// target. A shipper waiting out its backoff after failed pushes to the
/// old leader must try the new one at once: its attempt cannot report
/// that it finished before its log is acknowledged, so the wait held the
/// attempt's slot.
#[tokio::test]
async fn a_new_target_is_tried_without_waiting_out_the_backoff() {
    // The old leader was killed: its port refuses connections.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Waiting out the backoff would take a minute.
    let limits = Limits {
        first_retry: Duration::from_secs(60),
        ..Limits::default()
    };
    assert!(
        moves_to_a_new_target(port, limits, Duration::from_secs(20)).await,
        "the shipper waited out its backoff instead of trying the new leader"
    );
}

/// The old leader's host died or was cut off: nothing resets the
/// connection, and the push to it would wait for `CALL_TIMEOUT` (30 s).
#[tokio::test]
async fn a_new_target_ends_a_push_still_waiting_on_the_old_one() {
    // Connections complete (the kernel accepts them) and nothing answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    assert!(
        moves_to_a_new_target(port, Limits::default(), Duration::from_secs(10)).await,
        "the shipper kept waiting on the old leader after the new one was published"
    );
    drop(silent);
}
