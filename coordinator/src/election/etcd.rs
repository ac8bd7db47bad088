//! Leader election on etcd's v3 election service.
//!
//! Each replica grants a lease (TTL = `ttl`), keeps it alive (see
//! [`keep_alive`] for when a failed renewal means stepping down), and campaigns with its advertised URL as the
//! value. Winning makes it leader only after one more keep-alive succeeds.
//! Losing the lease cancels `lost` at once, and the lease is revoked when
//! etcd can still be reached so the next replica need not wait out the TTL.
//! The leader key's create revision is the epoch and the store's fence.
//! While campaigning, a replica ends a dead leader's term early
//! ([`super::watch`]).

use super::candidates::{candidates, revoke};
use super::*;
use crate::store::etcd::{EtcdPool, EtcdStore, Fence, is_transport};
use etcd_client::{GetOptions, LeaderKey, ResignOptions};
use std::sync::Mutex;
use std::time::Duration;

pub(crate) struct EtcdElection {
    pool: EtcdPool,
    /// Election name: `<prefix>election`; candidates' keys live under `<name>/`.
    name: String,
    advertise: String,
    ttl: Duration,
    store: EtcdStore,
    current: Mutex<Option<(LeaderKey, CancellationToken)>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> ElectionError {
    ElectionError::Backend(Box::new(e))
}

impl EtcdElection {
    /// `store` gets the fence of every leadership this election wins.
    pub(crate) fn new(
        pool: EtcdPool,
        prefix: &str,
        advertise: String,
        ttl: Duration,
        store: EtcdStore,
    ) -> Self {
        Self {
            pool,
            name: format!("{prefix}election"),
            advertise,
            ttl: ttl.max(Duration::from_secs(1)),
            store,
            current: Mutex::new(None),
        }
    }

    async fn try_campaign(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Leadership>, ElectionError> {
        let ttl_secs = self.ttl.as_secs().max(1) as i64;
        let lease = self
            .pool
            .call(|mut c| async move { c.lease_grant(ttl_secs, None).await })
            .await
            .map_err(backend)?
            .id();
        let lost = CancellationToken::new();
        let (keeper, stream) = self
            .pool
            .call(|mut c| async move { c.lease_keep_alive(lease).await })
            .await
            .map_err(backend)?;
        tokio::spawn(keep_alive(
            self.pool.clone(),
            keeper,
            stream,
            lease,
            self.ttl,
            lost.clone(),
        ));
        let Some(won) = self.campaign_on_member(lease, &lost, shutdown).await? else {
            return Ok(None);
        };
        let key = won
            .leader()
            .cloned()
            .ok_or_else(|| backend(Msg("campaign answered without a leader key".into())))?;
        // Count as leader only once a keep-alive after the win succeeded.
        let confirmed = tokio::time::timeout(
            self.ttl / 3,
            self.pool.call(|mut c| async move {
                let (mut k, mut s) = c.lease_keep_alive(lease).await?;
                k.keep_alive().await?;
                s.message().await
            }),
        )
        .await;
        match confirmed {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
            _ => {
                lost.cancel();
                return Err(backend(Msg("keep-alive after winning failed".into())));
            }
        }
        self.store.set_fence(Some(Fence {
            key: key.key().to_vec(),
            revision: key.rev(),
        }));
        let epoch = key.rev() as u64;
        *self.current.lock().expect("lock") = Some((key, lost.clone()));
        tracing::info!(epoch, advertise = %self.advertise, "won the election");
        Ok(Some(Leadership { epoch, lost }))
    }

    /// Campaigns with `lease` on the pool's current member until it wins
    /// (`Some`), shutdown (`None`), or something makes this attempt
    /// worthless: the campaign failed, the lease was lost, or the member
    /// lost its quorum (its watch would wait forever). On an error `lost`
    /// is cancelled, so the lease is revoked and a new attempt starts over.
    async fn campaign_on_member(
        &self,
        lease: i64,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<Option<etcd_client::CampaignResponse>, ElectionError> {
        let (i, mut client) = self.pool.client();
        let probe = client.clone();
        tokio::select! {
            r = client.campaign(self.name.clone(), self.advertise.clone(), lease) => match r {
                Ok(r) => Ok(Some(r)),
                Err(e) => {
                    if is_transport(&e) {
                        self.pool.failed(i);
                    }
                    lost.cancel();
                    Err(backend(e))
                }
            },
            _ = lost.cancelled() => {
                Err(ElectionError::Backend(Box::new(Msg("lease lost while campaigning".into()))))
            }
            why = out_of_quorum(probe, self.name.clone(), self.ttl) => {
                let member = self.pool.endpoint(i).to_string();
                self.pool.failed(i);
                lost.cancel();
                Err(backend(Msg(format!(
                    "etcd member {member} {why} while we campaigned on it \
                     (cut off from its quorum?); campaigning on the next member"
                ))))
            }
            never = super::watch::end_dead_terms(self.pool.clone(), self.name.clone(), lease, self.ttl) => match never {},
            _ = shutdown.cancelled() => {
                lost.cancel();
                Ok(None)
            }
        }
    }
}

impl EtcdElection {
    /// Candidates (value, create revision), oldest first; `limit` 0 for all.
    async fn candidates(&self, limit: i64) -> Result<Vec<(String, u64)>, ElectionError> {
        Ok(candidates(&self.pool, &self.name, limit)
            .await
            .map_err(backend)?
            .into_iter()
            .map(|c| (c.url, c.revision))
            .collect())
    }
}

/// Returns once the member `client` talks to fails a linearizable read
/// (an error, or no answer within `ttl / 2`); probes every `ttl / 2`.
///
/// A campaign waits on a watch of the older candidates' keys, and a member
/// cut off from its peers (but still reachable) keeps such a watch open
/// without an error and without events: the campaign would wait forever
/// while the majority elects no one. A linearizable read needs the member's
/// raft leader, so it fails on such a member. Returns what went wrong.
async fn out_of_quorum(mut client: etcd_client::Client, key: String, ttl: Duration) -> String {
    let every = ttl / 2;
    loop {
        tokio::time::sleep(every).await;
        let read = tokio::time::timeout(
            every,
            client.get(key.clone(), Some(GetOptions::new().with_count_only())),
        )
        .await;
        match read {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("failed a read ({e})"),
            Err(_) => return format!("did not answer a read within {every:?}"),
        }
    }
}

/// Renews `lease` every `ttl / 5`. A failed renewal (error, timeout, a
/// broken keep-alive stream, as when the etcd member it went to died) is
/// retried at once on a fresh stream. Leadership is given up — `lost`
/// cancelled, lease revoked — as soon as etcd says the lease expired (as
/// after a SIGSTOP), or when no renewal succeeded for `4/5 ttl`: past that
/// point the lease may expire before we hear of it, and another replica may
/// win (and if it does, fenced writes still keep this one from writing).
/// Not on the first miss, as GreptimeDB does: that turns every etcd leader
/// change into a coordinator failover (docs/decisions.md, "High
/// availability").
async fn keep_alive(
    pool: EtcdPool,
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
    lease: i64,
    ttl: Duration,
    lost: CancellationToken,
) {
    let every = ttl / 5;
    let give_up_after = ttl * 4 / 5;
    let mut channel = Some((keeper, stream));
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = lost.cancelled() => break,
        }
        loop {
            let left = give_up_after.saturating_sub(last_ok.elapsed());
            if left.is_zero() {
                tracing::warn!(
                    lease,
                    "no lease renewal for {give_up_after:?}; stepping down"
                );
                lost.cancel();
                break;
            }
            let renewed = tokio::time::timeout(left.min(every), async {
                let (keeper, stream) = match channel.as_mut() {
                    Some(c) => c,
                    None => {
                        let opened = pool
                            .call(|mut c| async move { c.lease_keep_alive(lease).await })
                            .await?;
                        channel.insert(opened)
                    }
                };
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
            match renewed {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    last_ok = tokio::time::Instant::now();
                    break;
                }
                Ok(Ok(Some(_))) => {
                    tracing::warn!(lease, "the leader lease expired; stepping down");
                    lost.cancel();
                    break;
                }
                other => {
                    tracing::info!(lease, outcome = ?other.map(|r| r.map(|m| m.map(|m| m.ttl()))), "lease renewal failed; retrying");
                    // The stream may sit on a dead member: reopen on the next one.
                    pool.failed(pool.client().0);
                    channel = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if lost.is_cancelled() {
            break;
        }
    }
    lost.cancel();
    let _ = revoke(&pool, lease).await;
}

#[async_trait]
impl Election for EtcdElection {
    async fn campaign(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Leadership>, ElectionError> {
        loop {
            match self.try_campaign(shutdown).await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    tracing::warn!(error = %e, "campaign failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = shutdown.cancelled() => return Ok(None),
                    }
                }
            }
        }
    }

    async fn leader(&self) -> Result<LeaderInfo, ElectionError> {
        // The leader is the candidate with the lowest create revision.
        Ok(self
            .candidates(1)
            .await?
            .into_iter()
            .next()
            .map(|(endpoint, epoch)| LeaderInfo { endpoint, epoch })
            .unwrap_or_default())
    }

    async fn members(&self) -> Result<Vec<String>, ElectionError> {
        let mut out: Vec<String> = self
            .candidates(0)
            .await?
            .into_iter()
            .map(|(endpoint, _)| endpoint)
            .collect();
        out.dedup();
        Ok(out)
    }

    async fn resign(&self) {
        let current = self.current.lock().expect("lock").take();
        if let Some((key, lost)) = current {
            let lease = key.lease();
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                self.pool.call(|mut c| {
                    let key = key.clone();
                    async move { c.resign(Some(ResignOptions::new().with_leader(key))).await }
                }),
            )
            .await;
            lost.cancel();
            let _ = revoke(&self.pool, lease).await;
            tracing::info!("resigned leadership");
        }
    }
}
