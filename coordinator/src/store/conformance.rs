//! The one test suite every [`Store`] implementation must pass.
//!
//! Call [`run_all`] from a `#[tokio::test(flavor = "multi_thread")]` of the
//! implementation's crate. Failures panic (through `assert!`), naming the
//! check. Every check writes under its own `conformance/<check>/` prefix, so
//! the suite can share one store; the store must hold nothing under
//! `conformance/` when it starts (an etcd store should use a fresh key
//! prefix).

use super::{Op, Store};
use std::sync::Arc;

fn put(key: &str, value: &[u8]) -> Op {
    Op::Put {
        key: key.to_string(),
        value: value.to_vec(),
    }
}

fn delete(key: &str) -> Op {
    Op::Delete {
        key: key.to_string(),
    }
}

/// Runs every check below, in order.
pub async fn run_all(store: Arc<dyn Store>) {
    get_missing(&*store).await;
    put_then_get(&*store).await;
    overwrite(&*store).await;
    delete_key(&*store).await;
    batch_applies_in_order(&*store).await;
    scan_prefix_order_and_boundaries(&*store).await;
    empty_batch(&*store).await;
    large_value(&*store).await;
    many_keys(&*store).await;
    concurrent_applies(store.clone()).await;
}

/// A key never written reads as absent; a scan of an unused prefix is empty.
pub async fn get_missing(store: &dyn Store) {
    assert_eq!(
        store.get("conformance/missing/x").await.unwrap(),
        None,
        "get_missing"
    );
    assert!(
        store
            .scan_prefix("conformance/missing/")
            .await
            .unwrap()
            .is_empty(),
        "get_missing: scan"
    );
    // Deleting an absent key is not an error.
    store
        .apply(vec![delete("conformance/missing/x")])
        .await
        .unwrap();
    assert_eq!(store.get("conformance/missing/x").await.unwrap(), None);
}

pub async fn put_then_get(store: &dyn Store) {
    store
        .apply(vec![
            put("conformance/put/a", b"alpha"),
            put("conformance/put/empty", b""),
            put("conformance/put/bin", &[0, 255, 1, 254]),
        ])
        .await
        .unwrap();
    assert_eq!(
        store.get("conformance/put/a").await.unwrap().as_deref(),
        Some(&b"alpha"[..]),
        "put_then_get"
    );
    // An empty value is present, not absent.
    assert_eq!(
        store.get("conformance/put/empty").await.unwrap().as_deref(),
        Some(&b""[..]),
        "put_then_get: empty value"
    );
    assert_eq!(
        store.get("conformance/put/bin").await.unwrap().as_deref(),
        Some(&[0u8, 255, 1, 254][..]),
        "put_then_get: binary value"
    );
}

pub async fn overwrite(store: &dyn Store) {
    store
        .apply(vec![put("conformance/overwrite/k", b"first value")])
        .await
        .unwrap();
    store
        .apply(vec![put("conformance/overwrite/k", b"2nd")])
        .await
        .unwrap();
    assert_eq!(
        store
            .get("conformance/overwrite/k")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"2nd"[..]),
        "overwrite"
    );
    assert_eq!(
        store.scan_prefix("conformance/overwrite/").await.unwrap(),
        vec![("conformance/overwrite/k".to_string(), b"2nd".to_vec())],
        "overwrite: one entry"
    );
}

pub async fn delete_key(store: &dyn Store) {
    store
        .apply(vec![
            put("conformance/delete/gone", b"x"),
            put("conformance/delete/kept", b"y"),
        ])
        .await
        .unwrap();
    store
        .apply(vec![delete("conformance/delete/gone")])
        .await
        .unwrap();
    assert_eq!(
        store.get("conformance/delete/gone").await.unwrap(),
        None,
        "delete"
    );
    assert_eq!(
        store.scan_prefix("conformance/delete/").await.unwrap(),
        vec![("conformance/delete/kept".to_string(), b"y".to_vec())],
        "delete: scan"
    );
}

/// Ops of one batch apply in order.
pub async fn batch_applies_in_order(store: &dyn Store) {
    store
        .apply(vec![
            put("conformance/batch/a", b"1"),
            delete("conformance/batch/a"),
            delete("conformance/batch/b"),
            put("conformance/batch/b", b"2"),
            put("conformance/batch/c", b"old"),
            put("conformance/batch/c", b"new"),
        ])
        .await
        .unwrap();
    assert_eq!(
        store.get("conformance/batch/a").await.unwrap(),
        None,
        "batch: put then delete leaves the key absent"
    );
    assert_eq!(
        store.get("conformance/batch/b").await.unwrap().as_deref(),
        Some(&b"2"[..]),
        "batch: delete then put leaves the key present"
    );
    assert_eq!(
        store.get("conformance/batch/c").await.unwrap().as_deref(),
        Some(&b"new"[..]),
        "batch: the last put wins"
    );
    // Across batches too: a key that existed, put and deleted in one batch.
    store
        .apply(vec![
            put("conformance/batch/c", b"newer"),
            delete("conformance/batch/c"),
        ])
        .await
        .unwrap();
    assert_eq!(store.get("conformance/batch/c").await.unwrap(), None);
}

/// Scans return exactly the keys starting with the prefix, sorted by bytes.
pub async fn scan_prefix_order_and_boundaries(store: &dyn Store) {
    let keys = [
        "conformance/scan/runs",
        "conformance/scan/runs/",
        "conformance/scan/runs/b",
        "conformance/scan/runs/a",
        "conformance/scan/runs/a/x",
        "conformance/scan/runs/Z",
        "conformance/scan/runs/é",
        "conformance/scan/runs/~",
        "conformance/scan/runs0",
        "conformance/scan/runs.",
        "conformance/scan/run",
        "conformance/scan/rung",
        "conformance/scan/runt",
    ];
    // Written in an order unrelated to the sorted one, over several batches.
    for chunk in keys.chunks(4) {
        store
            .apply(chunk.iter().map(|k| put(k, k.as_bytes())).collect())
            .await
            .unwrap();
    }

    let scan = |prefix: &'static str| async move {
        let got = store.scan_prefix(prefix).await.unwrap();
        for (key, value) in &got {
            assert_eq!(
                key.as_bytes(),
                &value[..],
                "scan {prefix:?}: value of {key}"
            );
        }
        got.into_iter().map(|(key, _)| key).collect::<Vec<_>>()
    };
    let expected = |prefix: &str| {
        let mut want: Vec<String> = keys
            .iter()
            .filter(|k| k.starts_with(prefix))
            .map(|k| k.to_string())
            .collect();
        want.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        want
    };

    for prefix in [
        "conformance/scan/runs/",
        "conformance/scan/runs",
        "conformance/scan/run",
        "conformance/scan/runs/a",
        "conformance/scan/runs0",
        "conformance/scan/",
        "conformance/scan/nothing",
    ] {
        assert_eq!(scan(prefix).await, expected(prefix), "scan {prefix:?}");
    }
    // Spelled out, in case `expected` and the store agree on something wrong.
    assert_eq!(
        scan("conformance/scan/runs/").await,
        vec![
            "conformance/scan/runs/",
            "conformance/scan/runs/Z",
            "conformance/scan/runs/a",
            "conformance/scan/runs/a/x",
            "conformance/scan/runs/b",
            "conformance/scan/runs/~",
            "conformance/scan/runs/é",
        ],
        "scan: \"runs/\" excludes \"runs0\" and \"runs.\", sorts by bytes"
    );
    // The empty prefix covers everything, including this check's keys.
    let all = store.scan_prefix("").await.unwrap();
    let all_keys: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        all_keys
            .windows(2)
            .all(|w| w[0].as_bytes() < w[1].as_bytes()),
        "scan \"\": sorted, no duplicates"
    );
    for key in keys {
        assert!(all_keys.contains(&key), "scan \"\": has {key}");
    }
}

/// An empty batch succeeds and changes nothing.
pub async fn empty_batch(store: &dyn Store) {
    store
        .apply(vec![put("conformance/empty/k", b"v")])
        .await
        .unwrap();
    store.apply(Vec::new()).await.unwrap();
    assert_eq!(
        store.scan_prefix("conformance/empty/").await.unwrap(),
        vec![("conformance/empty/k".to_string(), b"v".to_vec())],
        "empty batch"
    );
}

/// A 1 MiB value round-trips intact.
pub async fn large_value(store: &dyn Store) {
    let value: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    store
        .apply(vec![
            put("conformance/large/v", &value),
            put("conformance/large/w", b"after"),
        ])
        .await
        .unwrap();
    let got = store.get("conformance/large/v").await.unwrap();
    assert!(got.as_deref() == Some(&value[..]), "large value: get");
    let scan = store.scan_prefix("conformance/large/").await.unwrap();
    assert_eq!(scan.len(), 2, "large value: scan");
    assert!(scan[0].1 == value, "large value: scanned value");
    assert_eq!(scan[1].1, b"after");
}

/// 10,000 keys, written in 10 batches, all come back in order.
pub async fn many_keys(store: &dyn Store) {
    const N: usize = 10_000;
    let key = |i: usize| format!("conformance/many/{i:05}");
    for start in (0..N).step_by(1000) {
        store
            .apply(
                (start..start + 1000)
                    .map(|i| put(&key(i), i.to_string().as_bytes()))
                    .collect(),
            )
            .await
            .unwrap();
    }
    let scan = store.scan_prefix("conformance/many/").await.unwrap();
    assert_eq!(scan.len(), N, "many keys: count");
    for (i, (k, v)) in scan.iter().enumerate() {
        assert_eq!(*k, key(i), "many keys: order");
        assert_eq!(*v, i.to_string().as_bytes(), "many keys: value of {k}");
    }
    assert_eq!(
        store.get(&key(4321)).await.unwrap().as_deref(),
        Some(&b"4321"[..]),
        "many keys: get"
    );
    // Delete every other one in one batch.
    store
        .apply((0..N).step_by(2).map(|i| delete(&key(i))).collect())
        .await
        .unwrap();
    let scan = store.scan_prefix("conformance/many/").await.unwrap();
    assert_eq!(scan.len(), N / 2, "many keys: after deletes");
    assert!(
        scan.iter()
            .enumerate()
            .all(|(j, (k, _))| *k == key(2 * j + 1)),
        "many keys: the odd ones remain"
    );
}

/// 16 tasks apply batches at once; every write is visible afterwards, and each
/// batch is seen whole.
pub async fn concurrent_applies(store: Arc<dyn Store>) {
    const TASKS: usize = 16;
    const BATCHES: usize = 8;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for b in 0..BATCHES {
                    let value = format!("{t}/{b}");
                    store
                        .apply(vec![
                            put(
                                &format!("conformance/concurrent/a/{t:02}/{b}"),
                                value.as_bytes(),
                            ),
                            put(
                                &format!("conformance/concurrent/b/{t:02}/{b}"),
                                value.as_bytes(),
                            ),
                            put(
                                &format!("conformance/concurrent/last/{t:02}"),
                                value.as_bytes(),
                            ),
                        ])
                        .await
                        .unwrap();
                    // Read your own write, whatever the other tasks do.
                    assert_eq!(
                        store
                            .get(&format!("conformance/concurrent/b/{t:02}/{b}"))
                            .await
                            .unwrap()
                            .as_deref(),
                        Some(value.as_bytes()),
                        "concurrent: read own write"
                    );
                    // A batch is all-or-nothing for concurrent readers too.
                    let a = store
                        .scan_prefix("conformance/concurrent/a/")
                        .await
                        .unwrap();
                    let bs = store
                        .scan_prefix("conformance/concurrent/b/")
                        .await
                        .unwrap();
                    assert!(
                        a.len() <= bs.len(),
                        "concurrent: b keys are written with a keys"
                    );
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("concurrent task panicked");
    }
    for side in ["a", "b"] {
        let scan = store
            .scan_prefix(&format!("conformance/concurrent/{side}/"))
            .await
            .unwrap();
        assert_eq!(scan.len(), TASKS * BATCHES, "concurrent: all {side} keys");
        for t in 0..TASKS {
            for b in 0..BATCHES {
                let (key, value) = &scan[t * BATCHES + b];
                assert_eq!(*key, format!("conformance/concurrent/{side}/{t:02}/{b}"));
                assert_eq!(*value, format!("{t}/{b}").into_bytes());
            }
        }
    }
    for t in 0..TASKS {
        assert_eq!(
            store
                .get(&format!("conformance/concurrent/last/{t:02}"))
                .await
                .unwrap(),
            Some(format!("{t}/{}", BATCHES - 1).into_bytes()),
            "concurrent: each task's last write wins for its key"
        );
    }
}
