//! A campaigning replica ends a dead leader's term instead of waiting out
//! its lease (issue 24: failover in about a second with the default TTL).
//!
//! While it campaigns, a standby probes the leader's advertised address
//! with a TCP connect every [`PROBE_EVERY`] and revokes the leader's lease
//! when the evidence says the leader is gone:
//! - **refused** [`REFUSALS`] times in a row: the host answers and nothing
//!   listens on the port, so the leader's process is dead (kill -9, crash,
//!   OOM kill). A live process, even a frozen one (SIGSTOP, a long GC-like
//!   stall), keeps its listening socket and the kernel completes the
//!   handshake, so slowness never looks like this;
//! - **silent** (no answer within [`PROBE_TIMEOUT`]) [`SILENCES`] times in a
//!   row *and* etcd shows that the leader's keep-alives stopped: its lease
//!   has not been renewed for at least two renewal periods (renewals come
//!   every TTL/5). A dead host or a leader cut off from everything; a leader
//!   cut off from this standby only keeps renewing and is left alone.
//!
//! Either way the leader's address must first have been seen answering
//! (as leader or, before it won, as a candidate), so an address that peers cannot reach (a misconfigured `--advertise`)
//! never costs a healthy leader its term.
//!
//! Safety does not rest on this guess (docs/decisions.md, "Issue 24"):
//! revoking the lease deletes the leader key, every write of the old epoch
//! is fenced on that key's create revision, and a runner runs nothing of an
//! offer that was not confirmed after a successful write. A leader that was
//! only slow learns it lost at its next keep-alive (TTL 0) and steps down.

use super::candidates::{Candidate, candidates, revoke};
use crate::store::etcd::EtcdPool;
use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

/// How often a standby looks at the leader.
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// A connect not answered by then counts as silence.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// Consecutive refused connects that mean the process is gone.
const REFUSALS: u32 = 2;
/// Consecutive silent probes before etcd is asked about the keep-alives.
const SILENCES: u32 = 3;

/// What a TCP connect to the leader's address said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    Answered,
    Refused,
    Silent,
    /// No address to probe (an unparsable URL, a name that does not resolve).
    Unknown,
}

/// What the standby has seen of one leadership (one lease).
#[derive(Debug, Default)]
struct Evidence {
    lease: i64,
    answered: bool,
    refused: u32,
    silent: u32,
}

/// What to do after a probe.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Wait,
    /// Revoke: the process is gone.
    Dead,
    /// Ask etcd whether the keep-alives stopped.
    AskEtcd,
}

impl Evidence {
    /// The leader holding `lease` answered before (perhaps as a candidate).
    fn answered_before(&mut self, lease: i64) {
        if lease != self.lease {
            *self = Evidence {
                lease,
                ..Default::default()
            };
        }
        self.answered = true;
    }

    /// Folds one probe of the leader holding `lease` into the evidence.
    fn observe(&mut self, lease: i64, probe: Probe) -> Verdict {
        if lease != self.lease {
            *self = Evidence {
                lease,
                ..Default::default()
            };
        }
        match probe {
            Probe::Answered => {
                self.answered = true;
                self.refused = 0;
                self.silent = 0;
            }
            Probe::Refused => {
                self.refused += 1;
                self.silent = 0;
            }
            Probe::Silent => {
                self.silent += 1;
                self.refused = 0;
            }
            Probe::Unknown => {
                self.refused = 0;
                self.silent = 0;
            }
        }
        if !self.answered {
            Verdict::Wait
        } else if self.refused >= REFUSALS {
            Verdict::Dead
        } else if self.silent >= SILENCES {
            Verdict::AskEtcd
        } else {
            Verdict::Wait
        }
    }
}

/// True when a lease granted for `ttl` with `remaining_s` seconds left (as
/// etcd reports it, whole seconds) missed at least two renewals.
fn renewals_stopped(ttl: Duration, remaining_s: i64) -> bool {
    let ttl_s = ttl.as_secs() as i64;
    remaining_s > 0 && remaining_s <= ttl_s - 3
}

/// `host:port` of a gRPC URL (`http://h:p`, `https://h` = port 443).
fn address(url: &str) -> Option<String> {
    let uri: axum::http::Uri = url.parse().ok()?;
    let host = uri.host()?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    Some(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

async fn probe(url: &str) -> Probe {
    let Some(addr) = address(url) else {
        return Probe::Unknown;
    };
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&addr)).await {
        Ok(Ok(_)) => Probe::Answered,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused,
        // No route to the host, or a name that does not resolve: not proof.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::HostUnreachable => Probe::Silent,
        Ok(Err(_)) => Probe::Unknown,
        Err(_) => Probe::Silent,
    }
}

async fn remaining_s(pool: &EtcdPool, lease: i64) -> Option<i64> {
    let read = pool.call(|mut c| async move { c.lease_time_to_live(lease, None).await });
    let resp = tokio::time::timeout(Duration::from_secs(1), read)
        .await
        .ok()?
        .ok()?;
    Some(resp.ttl())
}

/// Runs while this replica campaigns with `own_lease` (never returns; the
/// campaign drops it): ends the term of a leader of election `name` that
/// is gone.
pub(super) async fn end_dead_terms(
    pool: EtcdPool,
    name: String,
    own_lease: i64,
    ttl: Duration,
) -> Infallible {
    let mut evidence = Evidence::default();
    // Addresses seen answering while their replica was a candidate: a
    // leader killed right after it won was seen before it won.
    let mut answered: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let all = tokio::time::timeout(Duration::from_secs(1), candidates(&pool, &name, 0)).await;
        let all = all.ok().and_then(Result::ok).unwrap_or_default();
        for c in all.iter().skip(1) {
            if c.lease != own_lease
                && !answered.contains(&c.url)
                && probe(&c.url).await == Probe::Answered
            {
                answered.insert(c.url.clone());
            }
        }
        let Some(Candidate { url, lease, .. }) = all.into_iter().next() else {
            continue;
        };
        if lease == own_lease || lease == 0 {
            continue;
        }
        let seen = probe(&url).await;
        if seen == Probe::Answered {
            answered.insert(url.clone());
        }
        if answered.contains(&url) {
            evidence.answered_before(lease);
        }
        let why = match evidence.observe(lease, seen) {
            Verdict::Wait => continue,
            Verdict::Dead => "refuses connections: its process is gone",
            Verdict::AskEtcd => match remaining_s(&pool, lease).await {
                Some(left) if renewals_stopped(ttl, left) => {
                    "does not answer and has not renewed its lease for two renewal periods"
                }
                _ => continue,
            },
        };
        // Logged before the revoke: once etcd deletes the key, this
        // replica's own campaign may win and drop this future at the await.
        tracing::warn!(leader = %url, lease, "the leader {why}; ending its term early");
        if let Err(e) = revoke(&pool, lease).await {
            tracing::info!(leader = %url, lease, error = %e, "could not end the leader's term");
        }
        evidence = Evidence::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_never_seen_answering_is_never_judged() {
        let mut e = Evidence::default();
        for _ in 0..10 {
            assert_eq!(e.observe(7, Probe::Refused), Verdict::Wait);
        }
        for _ in 0..10 {
            assert_eq!(e.observe(7, Probe::Silent), Verdict::Wait);
        }
    }

    #[test]
    fn refusals_in_a_row_after_an_answer_mean_dead() {
        let mut e = Evidence::default();
        assert_eq!(e.observe(7, Probe::Answered), Verdict::Wait);
        assert_eq!(e.observe(7, Probe::Refused), Verdict::Wait);
        assert_eq!(e.observe(7, Probe::Answered), Verdict::Wait);
        assert_eq!(e.observe(7, Probe::Refused), Verdict::Wait);
        assert_eq!(e.observe(7, Probe::Refused), Verdict::Dead);
    }

    #[test]
    fn silence_asks_etcd_and_a_new_lease_starts_over() {
        let mut e = Evidence::default();
        e.observe(7, Probe::Answered);
        assert_eq!(e.observe(7, Probe::Silent), Verdict::Wait);
        assert_eq!(e.observe(7, Probe::Silent), Verdict::Wait);
        assert_eq!(e.observe(7, Probe::Silent), Verdict::AskEtcd);
        // Another leadership: what was seen of the last one does not count.
        assert_eq!(e.observe(8, Probe::Refused), Verdict::Wait);
        assert_eq!(e.observe(8, Probe::Refused), Verdict::Wait);
        // An unknown probe breaks a run of refusals.
        e.observe(8, Probe::Answered);
        e.observe(8, Probe::Refused);
        e.observe(8, Probe::Unknown);
        assert_eq!(e.observe(8, Probe::Refused), Verdict::Wait);
    }

    #[test]
    fn two_missed_renewals_of_a_five_second_lease() {
        let ttl = Duration::from_secs(5);
        assert!(!renewals_stopped(ttl, 4));
        assert!(!renewals_stopped(ttl, 3));
        assert!(renewals_stopped(ttl, 2));
        assert!(renewals_stopped(ttl, 1));
        // Expired (-1) or gone: nothing to revoke.
        assert!(!renewals_stopped(ttl, -1));
        // A short TTL gives silence no early verdict.
        assert!(!renewals_stopped(Duration::from_secs(3), 1));
    }

    #[test]
    fn addresses_of_grpc_urls() {
        assert_eq!(address("http://127.0.0.1:7701").unwrap(), "127.0.0.1:7701");
        assert_eq!(
            address("https://coord-0.capstan").unwrap(),
            "coord-0.capstan:443"
        );
        assert_eq!(address("http://[::1]:9").unwrap(), "[::1]:9");
        assert_eq!(address("not a url"), None);
    }

    #[tokio::test]
    async fn a_closed_port_is_refused_and_a_listener_answers() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        assert_eq!(probe(&url).await, Probe::Answered);
        drop(l);
        assert_eq!(probe(&url).await, Probe::Refused);
    }
}
