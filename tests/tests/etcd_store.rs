//! The store conformance suite on the etcd store, against a real etcd, plus
//! the fencing that keeps a deposed leader from writing.

use capstan_coordinator::store::etcd::{EtcdStore, Fence, connect};
use capstan_coordinator::store::{Op, Store, StoreError, conformance};
use capstan_tests::etcd::EtcdCluster;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread")]
async fn etcd_store_passes_the_conformance_suite() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let client = connect(&etcd.endpoints()).await?;
    let store = EtcdStore::new(client, "/conformance-test/");
    conformance::run_all(Arc::new(store)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fenced_writes_fail_once_the_leader_key_is_gone() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let pool = connect(&etcd.endpoints()).await?;
    let mut client = pool.client().1;
    let store = EtcdStore::new(pool, "/fence-test/");
    let leader_key = b"/fence-test/election/leader".to_vec();
    let put = client.put(leader_key.clone(), "me", None).await?;
    let revision = put.header().map(|h| h.revision()).unwrap_or_default();
    store.set_fence(Some(Fence {
        key: leader_key.clone(),
        revision,
    }));
    let op = |v: &str| {
        vec![Op::Put {
            key: "runs/x".into(),
            value: v.as_bytes().to_vec(),
        }]
    };
    store.apply(op("while leading")).await?;
    assert_eq!(store.get("runs/x").await?, Some(b"while leading".to_vec()));
    // Another replica takes over: the key is recreated with a new revision.
    client.delete(leader_key.clone(), None).await?;
    client.put(leader_key.clone(), "someone else", None).await?;
    let err = store.apply(op("deposed")).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced), "{err}");
    assert_eq!(store.get("runs/x").await?, Some(b"while leading".to_vec()));
    // A big batch is split into fenced parts; every part is refused.
    let big: Vec<Op> = (0..250)
        .map(|i| Op::Put {
            key: format!("runs/{i}"),
            value: vec![1],
        })
        .collect();
    assert!(matches!(store.apply(big).await, Err(StoreError::Fenced)));
    assert!(store.scan_prefix("runs/1").await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_etcd_is_a_clear_error() {
    let port = capstan_tests::free_port();
    let err = connect(&[format!("http://127.0.0.1:{port}")])
        .await
        .err()
        .expect("nothing listens there");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}
