//! The etcd side of the election that both the campaign (`etcd`) and a
//! standby's watch of the leader (`watch`) use: who the candidates are, and
//! revoking a lease.

use crate::store::etcd::EtcdPool;
use etcd_client::GetOptions;
use std::time::Duration;

/// One replica campaigning in an election.
pub(super) struct Candidate {
    /// Its advertised URL (the key's value).
    pub(super) url: String,
    /// The key's create revision: the epoch if it leads.
    pub(super) revision: u64,
    /// The lease its key is attached to.
    pub(super) lease: i64,
}

/// The candidates of election `name`, oldest (the leader) first; `limit` 0
/// for all.
pub(super) async fn candidates(
    pool: &EtcdPool,
    name: &str,
    limit: i64,
) -> Result<Vec<Candidate>, etcd_client::Error> {
    let key = format!("{name}/");
    let resp = pool
        .call(|mut c| {
            let key = key.clone();
            let opts = GetOptions::new()
                .with_prefix()
                .with_sort(
                    etcd_client::SortTarget::Create,
                    etcd_client::SortOrder::Ascend,
                )
                .with_limit(limit);
            async move { c.get(key, Some(opts)).await }
        })
        .await?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| Candidate {
            url: String::from_utf8_lossy(kv.value()).into_owned(),
            revision: kv.create_revision() as u64,
            lease: kv.lease(),
        })
        .collect())
}

/// Best effort: lets the next candidate win at once instead of after the
/// TTL. Says what went wrong, if anything.
pub(super) async fn revoke(pool: &EtcdPool, lease: i64) -> Result<(), String> {
    match tokio::time::timeout(
        Duration::from_secs(1),
        pool.call(|mut c| async move { c.lease_revoke(lease).await }),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 1 s".into()),
    }
}
