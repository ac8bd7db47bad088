//! How fast each side of a Control stream notices that the other went
//! silent, derived from the one number both sides know: the heartbeat
//! interval the coordinator's `Welcome` announces. The runner uses it for
//! its watchdog, HTTP/2 keepalive, connect timeouts and reconnect backoff;
//! a newly elected leader uses the same functions for the time it gives
//! runners to re-attach before it requeues their attempts. Keeping both in
//! one place is the point: the leader's grace must cover the runner's
//! detection and reconnect, or a partitioned leader costs every step it had
//! in flight a second execution (issue 25; the numbers are in
//! docs/decisions.md).
//!
//! A partition sends no RST: the only sign of it is silence. The
//! coordinator answers every heartbeat (`HeartbeatAck`), so a runner that
//! sent a heartbeat and heard nothing for [`silence_bound`] knows the stream
//! is dead.

use std::time::Duration;

/// Heartbeat answers a runner may miss in a row before it drops the stream.
pub const MISSED_ACKS: u32 = 3;

/// Longest wait, never mind the heartbeat, for one connection attempt
/// (a loaded machine may be slow to accept, but 5 s is already long).
const MAX_TRY: Duration = Duration::from_secs(5);
/// Shortest of the derived timeouts: a handshake on a loaded host takes
/// some hundreds of milliseconds.
const MIN_TRY: Duration = Duration::from_secs(1);

/// A runner that sent a heartbeat and heard nothing on its Control stream
/// for this long drops the stream and reconnects: [`MISSED_ACKS`] intervals.
/// Also the HTTP/2 keepalive's reach: a ping every `heartbeat`, answered
/// within two more.
pub fn silence_bound(heartbeat: Duration) -> Duration {
    heartbeat * MISSED_ACKS
}

/// The HTTP/2 keepalive: (ping interval, time to wait for its ack). Ping
/// and ack together take at most [`silence_bound`].
pub fn keepalive(heartbeat: Duration) -> (Duration, Duration) {
    (heartbeat, heartbeat * (MISSED_ACKS - 1))
}

/// From the moment a coordinator goes silent until a busy runner has
/// dropped its stream: the next heartbeat goes out within one interval,
/// then [`silence_bound`] passes without an answer.
pub fn detection_bound(heartbeat: Duration) -> Duration {
    heartbeat + silence_bound(heartbeat)
}

/// How long one connection attempt (TCP, TLS, HTTP/2 up to the request) may
/// take before the runner tries the next coordinator: an unreachable one
/// must not hold it for long.
pub fn connect_timeout(heartbeat: Duration) -> Duration {
    silence_bound(heartbeat).clamp(MIN_TRY, MAX_TRY)
}

/// How long a runner waits for the welcome after its hello: longer than a
/// connect, since the leader may be busy, but a stalled one is cut off by
/// the keepalive within [`silence_bound`] anyway.
pub fn welcome_timeout(heartbeat: Duration) -> Duration {
    connect_timeout(heartbeat) * 2
}

/// The longest a runner waits between reconnect attempts (its jittered
/// backoff's cap, jitter included is at most 1.2 times this).
pub fn backoff_cap(heartbeat: Duration) -> Duration {
    (heartbeat * 2).clamp(MIN_TRY, MAX_TRY)
}

/// From dropping a dead stream until the runner is welcomed by the new
/// leader, once there is one: one attempt wasted on an unreachable
/// coordinator, one full backoff (with jitter), and a heartbeat interval for
/// the followers' "not the leader" answers and the welcome itself.
pub fn reconnect_bound(heartbeat: Duration) -> Duration {
    connect_timeout(heartbeat) + backoff_cap(heartbeat).mul_f64(1.2) + heartbeat
}

/// What a newly elected leader adds to one lease before it requeues the
/// attempts of runners that have not re-attached: the runner's detection
/// of the old leader's silence plus its reconnect. Counted from the moment
/// the new leader loads its state, which is at least one election TTL after
/// the old leader went silent, so the bound holds with room to spare.
pub fn reattach_grace(heartbeat: Duration) -> Duration {
    detection_bound(heartbeat) + reconnect_bound(heartbeat)
}

/// How long the coordinator waits for a runner whose Control stream broke
/// to come back before it requeues the runner's attempts. A live runner
/// reconnects after its first backoff (about 100 ms); a dead one never does,
/// and the wait is most of the time a killed runner's task takes to run
/// elsewhere (issue 24: <= 1.5 s at the default heartbeat). At least 1 s, so
/// a loaded machine's slow reconnect is not taken for a death.
pub fn disconnect_grace(heartbeat: Duration) -> Duration {
    (heartbeat + Duration::from_millis(250)).max(MIN_TRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_heartbeat_gives_these_numbers() {
        let h = Duration::from_secs(1);
        assert_eq!(silence_bound(h), Duration::from_secs(3));
        assert_eq!(keepalive(h), (h, Duration::from_secs(2)));
        assert_eq!(detection_bound(h), Duration::from_secs(4));
        assert_eq!(connect_timeout(h), Duration::from_secs(3));
        assert_eq!(welcome_timeout(h), Duration::from_secs(6));
        assert_eq!(backoff_cap(h), Duration::from_secs(2));
        assert_eq!(reconnect_bound(h), Duration::from_millis(6400));
        assert_eq!(reattach_grace(h), Duration::from_millis(10_400));
        assert_eq!(disconnect_grace(h), Duration::from_millis(1250));
        assert_eq!(disconnect_grace(h / 4), Duration::from_secs(1));
    }

    #[test]
    fn the_grace_covers_detection_and_reconnect_for_any_heartbeat() {
        for ms in [50, 200, 1000, 3000, 10_000] {
            let h = Duration::from_millis(ms);
            let keepalive_reach = keepalive(h).0 + keepalive(h).1;
            assert!(keepalive_reach <= silence_bound(h), "{ms}");
            assert!(
                reattach_grace(h) >= detection_bound(h) + connect_timeout(h) + backoff_cap(h),
                "{ms}"
            );
            assert!(connect_timeout(h) >= MIN_TRY && connect_timeout(h) <= MAX_TRY);
        }
    }
}
