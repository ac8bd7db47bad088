//! The one test suite every [`Store`] implementation must pass.
//!
//! Call [`run_all`] from a `#[tokio::test(flavor = "multi_thread")]` of the
//! implementation's crate. Failures panic (through `assert!`), naming the
//! check. Every check writes under its own `conformance/<check>/` prefix, so
//! the suite can share one store; the store must hold nothing under
//! `conformance/` when it starts (an etcd store should use a fresh key
//! prefix).

use super::{Op, Order, Page, Store};
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
    scan_page_orders_bounds_and_limits(&*store).await;
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

/// Pages: at most `limit` keys of the prefix, in either order, strictly
/// beyond `from` whatever it is; paging with each page's last key as the
/// next `from` returns every key once.
pub async fn scan_page_orders_bounds_and_limits(store: &dyn Store) {
    const P: &str = "conformance/page/";
    let keys: Vec<String> = [
        // Around the prefix "idx/b/".
        "idx/a/1",
        "idx/a/z",
        "idx/b",
        "idx/b.",
        "idx/b/",
        "idx/b/01",
        "idx/b/02",
        "idx/b/04",
        "idx/b/04/x",
        "idx/b/10",
        "idx/b/Z",
        "idx/b/z",
        "idx/b/~",
        "idx/b/é",
        "idx/b/中",
        // U+FF21 sorts before U+1F600 by bytes (EF.. < F0..), after it in
        // UTF-16 (FF21 > D83D).
        "idx/b/\u{FF21}",
        "idx/b/😀",
        "idx/b/\u{10FFFF}",
        "idx/b0",
        "idx/c/1",
        // Prefixes ending in a multi-byte character, the last one before
        // the surrogates, and the last one of all.
        "idx/é",
        "idx/é/x",
        "idx/éa",
        "idx/é\u{10FFFF}",
        "idx/ê",
        "sur/\u{D7FF}",
        "sur/\u{D7FF}1",
        "sur/\u{E000}",
        "max/\u{10FFFF}",
        "max/\u{10FFFF}x",
        "max/\u{10FFFF}\u{10FFFF}",
        "max0",
    ]
    .iter()
    .map(|k| format!("{P}{k}"))
    .collect();
    // Written in an order unrelated to the sorted one, over several batches.
    for chunk in keys.rchunks(5) {
        store
            .apply(chunk.iter().map(|k| put(k, k.as_bytes())).collect())
            .await
            .unwrap();
    }

    let page = |prefix: String, from: Option<String>, limit: usize, order: Order| async move {
        let got = store
            .scan_page(Page {
                prefix: &prefix,
                from: from.as_deref(),
                limit,
                order,
            })
            .await
            .unwrap();
        for (key, value) in &got {
            assert_eq!(
                key.as_bytes(),
                &value[..],
                "scan_page {prefix:?} from {from:?}: value of {key}"
            );
        }
        got.into_iter().map(|(key, _)| key).collect::<Vec<_>>()
    };
    // What a page should be, from the keys written.
    let expected = |prefix: &str, from: Option<&str>, limit: usize, order: Order| {
        let mut want: Vec<&String> = keys.iter().filter(|k| k.starts_with(prefix)).collect();
        want.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        if order == Order::Descending {
            want.reverse();
        }
        want.into_iter()
            .filter(|k| match (from, order) {
                (None, _) => true,
                (Some(f), Order::Ascending) => k.as_bytes() > f.as_bytes(),
                (Some(f), Order::Descending) => k.as_bytes() < f.as_bytes(),
            })
            .take(limit)
            .cloned()
            .collect::<Vec<_>>()
    };
    let p = |k: &str| format!("{P}{k}");
    let orders = [Order::Ascending, Order::Descending];

    // Spelled out, in case `expected` and the store agree on something wrong.
    let b = p("idx/b/");
    let all_b: Vec<String> = [
        "idx/b/",
        "idx/b/01",
        "idx/b/02",
        "idx/b/04",
        "idx/b/04/x",
        "idx/b/10",
        "idx/b/Z",
        "idx/b/z",
        "idx/b/~",
        "idx/b/é",
        "idx/b/中",
        "idx/b/\u{FF21}",
        "idx/b/😀",
        "idx/b/\u{10FFFF}",
    ]
    .iter()
    .map(|k| p(k))
    .collect();
    let rev_b: Vec<String> = all_b.iter().rev().cloned().collect();
    assert_eq!(
        page(b.clone(), None, 100, Order::Ascending).await,
        all_b,
        "scan_page: ascending, every key of the prefix, sorted by bytes"
    );
    assert_eq!(
        page(b.clone(), None, 100, Order::Descending).await,
        rev_b,
        "scan_page: descending, every key of the prefix, by bytes"
    );
    assert_eq!(
        page(b.clone(), None, 3, Order::Ascending).await,
        all_b[..3],
        "scan_page: ascending, the first 3"
    );
    assert_eq!(
        page(b.clone(), None, 3, Order::Descending).await,
        rev_b[..3],
        "scan_page: descending, the last 3"
    );
    assert_eq!(
        page(b.clone(), Some(p("idx/b/02")), 2, Order::Ascending).await,
        [p("idx/b/04"), p("idx/b/04/x")],
        "scan_page: ascending after a present key excludes it"
    );
    assert_eq!(
        page(b.clone(), Some(p("idx/b/04")), 2, Order::Descending).await,
        [p("idx/b/02"), p("idx/b/01")],
        "scan_page: descending before a present key excludes it"
    );
    assert_eq!(
        page(b.clone(), Some(p("idx/b/03")), 1, Order::Ascending).await,
        [p("idx/b/04")],
        "scan_page: ascending after an absent key"
    );
    assert_eq!(
        page(b.clone(), Some(p("idx/b/03")), 1, Order::Descending).await,
        [p("idx/b/02")],
        "scan_page: descending before an absent key"
    );
    assert_eq!(
        page(b.clone(), Some(p("idx/b")), 1, Order::Ascending).await,
        [p("idx/b/")],
        "scan_page: ascending from before the prefix starts at its first key"
    );
    assert_eq!(
        page(b.clone(), Some(p("idx/c/")), 1, Order::Descending).await,
        [p("idx/b/\u{10FFFF}")],
        "scan_page: descending from after the prefix starts at its last key"
    );
    assert_eq!(
        page(b.clone(), Some(p("idx/b/")), 100, Order::Descending).await,
        Vec::<String>::new(),
        "scan_page: nothing of the prefix is before the prefix itself"
    );
    assert_eq!(
        page(
            b.clone(),
            Some(p("idx/b/\u{10FFFF}")),
            100,
            Order::Ascending
        )
        .await,
        Vec::<String>::new(),
        "scan_page: nothing after the last key"
    );
    for order in orders {
        assert!(
            page(b.clone(), None, 0, order).await.is_empty(),
            "scan_page: limit 0 {order:?}"
        );
        assert!(
            page(p("idx/nothing/"), None, 10, order).await.is_empty(),
            "scan_page: an unused prefix {order:?}"
        );
    }
    assert_eq!(
        page(p("idx/é"), None, 100, Order::Descending).await,
        [p("idx/é\u{10FFFF}"), p("idx/éa"), p("idx/é/x"), p("idx/é")],
        "scan_page: descending, a prefix ending in a multi-byte character"
    );
    assert_eq!(
        page(p("max/\u{10FFFF}"), None, 100, Order::Descending).await,
        [
            p("max/\u{10FFFF}\u{10FFFF}"),
            p("max/\u{10FFFF}x"),
            p("max/\u{10FFFF}"),
        ],
        "scan_page: descending, a prefix ending in char::MAX"
    );
    assert_eq!(
        page(p("sur/\u{D7FF}"), None, 100, Order::Descending).await,
        [p("sur/\u{D7FF}1"), p("sur/\u{D7FF}")],
        "scan_page: descending, a prefix ending in U+D7FF"
    );

    // Against `expected`: every prefix, order, `from` and limit.
    let prefixes = [
        "idx/b/",
        "idx/b",
        "idx/",
        "idx/b/04",
        "idx/é",
        "sur/\u{D7FF}",
        "max/\u{10FFFF}",
        "max",
        "",
        "nothing/",
    ];
    let mut froms: Vec<Option<String>> = vec![None, Some(String::new()), Some(P.to_string())];
    froms.extend(keys.iter().map(|k| Some(k.clone())));
    froms.extend(
        [
            "idx/",
            "idx/b/00",
            "idx/b/03",
            "idx/b/0",
            "idx/b/ü",
            "idx/b/\u{FFFF}",
            "idx/b/\u{10FFFF}\u{10FFFF}",
            "idx/c/",
            "idx/é0",
            "sur/\u{D7FF}0",
            "zzz",
        ]
        .iter()
        .map(|k| Some(p(k))),
    );
    froms.extend(["a", "\u{10FFFF}"].iter().map(|k| Some(k.to_string())));
    for prefix in prefixes {
        let prefix = p(prefix);
        let n = keys.iter().filter(|k| k.starts_with(&prefix)).count();
        for order in orders {
            for from in &froms {
                for limit in [0, 1, 2, n.saturating_sub(1), n, n + 1, 1000] {
                    assert_eq!(
                        page(prefix.clone(), from.clone(), limit, order).await,
                        expected(&prefix, from.as_deref(), limit, order),
                        "scan_page {prefix:?} from {from:?}, limit {limit}, {order:?}"
                    );
                }
            }
        }
    }

    // Paging with the last key as the next `from` returns every key once.
    for prefix in ["idx/b/", "idx/", ""] {
        let prefix = p(prefix);
        for order in orders {
            let all = expected(&prefix, None, usize::MAX, order);
            for size in [1, 2, 3, 5, all.len()] {
                let mut seen = Vec::new();
                let mut from = None;
                loop {
                    let got = page(prefix.clone(), from.clone(), size, order).await;
                    assert!(got.len() <= size, "scan_page: a page of {size}");
                    match got.last() {
                        Some(last) => from = Some(last.clone()),
                        None => break,
                    }
                    seen.extend(got);
                }
                assert_eq!(
                    seen, all,
                    "scan_page: paging {prefix:?} {size} at a time, {order:?}"
                );
            }
        }
    }

    // More keys than one read of a store may return (etcd's pages).
    const N: usize = 450;
    let many = |i: usize| format!("{P}many/{i:04}");
    store
        .apply((0..N).map(|i| put(&many(i), many(i).as_bytes())).collect())
        .await
        .unwrap();
    let prefix = format!("{P}many/");
    let ascending: Vec<String> = (0..N).map(many).collect();
    let descending: Vec<String> = (0..N).rev().map(many).collect();
    assert_eq!(
        page(prefix.clone(), None, 1000, Order::Ascending).await,
        ascending,
        "scan_page: many keys ascending"
    );
    assert_eq!(
        page(prefix.clone(), None, 1000, Order::Descending).await,
        descending,
        "scan_page: many keys descending"
    );
    assert_eq!(
        page(prefix.clone(), Some(many(20)), 401, Order::Ascending).await,
        ascending[21..422],
        "scan_page: many keys ascending, after one, limited"
    );
    assert_eq!(
        page(prefix.clone(), Some(many(430)), 401, Order::Descending).await,
        descending[20..421],
        "scan_page: many keys descending, before one, limited"
    );
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
