//! The one test suite every [`LogStore`] implementation must pass.
//!
//! Call [`run_all`] from a `#[tokio::test(flavor = "multi_thread")]` of the
//! implementation's crate, on an empty store. Failures panic (through
//! `assert!`), naming the check. Each check uses its own attempt ids.

use super::{LogError, LogStore};
use capstan_proto::ids::AttemptId;
use std::sync::Arc;

/// Runs every check below, in order.
pub(crate) async fn run_all(store: Arc<dyn LogStore>) {
    append_sequence(&*store).await;
    overlapping_resend_is_written_once(&*store).await;
    partial_overlap(&*store).await;
    append_parts_is_one_append(&*store).await;
    gap_is_refused_and_writes_nothing(&*store).await;
    read_ranges(&*store).await;
    unknown_attempt(&*store).await;
    bad_ids(&*store).await;
    attempts_are_independent(&*store).await;
    concurrent_appends_store_one_copy(store.clone()).await;
    ten_mib_log(&*store).await;
    delete_forgets_the_log(&*store).await;
    list_names_every_log(&*store).await;
}

/// The orphan sweep's view: every log written and not deleted is listed.
pub(crate) async fn list_names_every_log(store: &dyn LogStore) {
    let a = AttemptId::generate();
    let b = AttemptId::generate();
    store.append(&a, 0, b"a\n").await.unwrap();
    store.append(&b, 0, b"b\n").await.unwrap();
    let listed = store.list().await.unwrap();
    assert!(
        listed.contains(&a) && listed.contains(&b),
        "list: written logs"
    );
    store.delete(&a).await.unwrap();
    let listed = store.list().await.unwrap();
    assert!(!listed.contains(&a), "list: a deleted log");
    assert!(listed.contains(&b), "list: other logs");
    assert!(
        !listed.contains(&AttemptId::generate()),
        "list: a log never written"
    );
}

/// Retention: a deleted log reads as never written, deleting twice (or a
/// log never written) is fine, and a new log can start again at 0.
pub(crate) async fn delete_forgets_the_log(store: &dyn LogStore) {
    let a = AttemptId::generate();
    let b = AttemptId::generate();
    store.append(&a, 0, b"old output\n").await.unwrap();
    store.append(&b, 0, b"kept\n").await.unwrap();
    store.sync(&a).await.unwrap();
    store.delete(&a).await.unwrap();
    assert_eq!(store.len(&a).await.unwrap(), 0, "delete: len");
    assert!(
        store.read(&a, 0, 100).await.unwrap().is_empty(),
        "delete: read"
    );
    store.delete(&a).await.unwrap();
    store.delete(&AttemptId::generate()).await.unwrap();
    assert_eq!(contents(store, &b).await, b"kept\n", "delete: other logs");
    assert_eq!(
        store.append(&a, 0, b"new").await.unwrap(),
        3,
        "delete: reuse"
    );
    assert!(matches!(
        store.delete(&AttemptId::from_string("../x")).await,
        Err(LogError::BadId(_))
    ));
}

async fn contents(store: &dyn LogStore, attempt: &AttemptId) -> Vec<u8> {
    let len = store.len(attempt).await.unwrap();
    let all = store.read(attempt, 0, usize::MAX).await.unwrap();
    assert_eq!(all.len() as u64, len, "read(0, MAX) returns len bytes");
    all.to_vec()
}

pub(crate) async fn append_sequence(store: &dyn LogStore) {
    let a = AttemptId::generate();
    assert_eq!(store.append(&a, 0, b"hello ").await.unwrap(), 6, "append");
    assert_eq!(store.append(&a, 6, b"world").await.unwrap(), 11, "append");
    assert_eq!(store.append(&a, 11, b"").await.unwrap(), 11, "empty append");
    assert_eq!(store.append(&a, 11, b"\n\0\xff").await.unwrap(), 14);
    assert_eq!(store.len(&a).await.unwrap(), 14, "len");
    assert_eq!(contents(store, &a).await, b"hello world\n\0\xff", "append");
    store.sync(&a).await.unwrap();
    assert_eq!(contents(store, &a).await, b"hello world\n\0\xff", "sync");
}

/// Chunks resent whole (a reconnecting runner) leave the log as it was.
pub(crate) async fn overlapping_resend_is_written_once(store: &dyn LogStore) {
    let a = AttemptId::generate();
    store.append(&a, 0, b"line 1\n").await.unwrap();
    store.append(&a, 7, b"line 2\n").await.unwrap();
    assert_eq!(
        store.append(&a, 0, b"line 1\n").await.unwrap(),
        14,
        "resend"
    );
    assert_eq!(
        store.append(&a, 7, b"line 2\n").await.unwrap(),
        14,
        "resend"
    );
    assert_eq!(
        store.append(&a, 0, b"line 1\nline 2\n").await.unwrap(),
        14,
        "resend of both"
    );
    assert_eq!(
        store.append(&a, 3, b"e").await.unwrap(),
        14,
        "resend inside"
    );
    assert_eq!(store.append(&a, 14, b"").await.unwrap(), 14);
    assert_eq!(contents(store, &a).await, b"line 1\nline 2\n", "resend");
}

/// `append_parts` behaves as one append of the concatenated parts: parts
/// already stored (whole or in part) are skipped, a gap writes nothing.
pub(crate) async fn append_parts_is_one_append(store: &dyn LogStore) {
    use bytes::Bytes;
    let parts = |p: &[&'static [u8]]| p.iter().map(|s| Bytes::from_static(s)).collect::<Vec<_>>();
    let a = AttemptId::generate();
    assert_eq!(
        store.append_parts(&a, 0, parts(&[])).await.unwrap(),
        0,
        "no parts"
    );
    assert_eq!(
        store
            .append_parts(&a, 0, parts(&[b"ab", b"", b"cdef"]))
            .await
            .unwrap(),
        6,
        "parts"
    );
    assert_eq!(
        store
            .append_parts(&a, 2, parts(&[b"cd", b"efGH", b"IJ"]))
            .await
            .unwrap(),
        10,
        "resend that goes past the end"
    );
    assert_eq!(
        store
            .append_parts(&a, 0, parts(&[b"abc", b"defG"]))
            .await
            .unwrap(),
        10,
        "resend inside"
    );
    assert_eq!(
        store.append_parts(&a, 10, parts(&[b"K"])).await.unwrap(),
        11,
        "append after parts"
    );
    assert!(
        matches!(
            store.append_parts(&a, 12, parts(&[b"x", b"y"])).await,
            Err(LogError::Gap {
                expected: 11,
                got: 12,
                ..
            })
        ),
        "gap"
    );
    assert!(matches!(
        store.append_parts(&a, 12, parts(&[])).await,
        Err(LogError::Gap { .. })
    ));
    assert_eq!(contents(store, &a).await, b"abcdefGHIJK", "parts");
}

/// A chunk that is partly stored appends only its new part.
pub(crate) async fn partial_overlap(store: &dyn LogStore) {
    let a = AttemptId::generate();
    store.append(&a, 0, b"abcdef").await.unwrap();
    assert_eq!(store.append(&a, 4, b"efGHI").await.unwrap(), 9, "overlap");
    assert_eq!(contents(store, &a).await, b"abcdefGHI", "overlap");
    // From the very start, going past the end.
    assert_eq!(store.append(&a, 0, b"abcdefGHIjk").await.unwrap(), 11);
    assert_eq!(contents(store, &a).await, b"abcdefGHIjk", "overlap from 0");
    // Ending exactly at the end writes nothing.
    assert_eq!(store.append(&a, 9, b"jk").await.unwrap(), 11);
    assert_eq!(contents(store, &a).await, b"abcdefGHIjk");
}

/// Data starting past the end is refused, and nothing of it is written.
pub(crate) async fn gap_is_refused_and_writes_nothing(store: &dyn LogStore) {
    let a = AttemptId::generate();
    store.append(&a, 0, b"0123").await.unwrap();
    match store.append(&a, 5, b"56789").await {
        Err(LogError::Gap {
            attempt,
            expected: 4,
            got: 5,
        }) => assert_eq!(attempt, a, "gap: attempt"),
        other => panic!("gap: expected Gap {{ expected: 4, got: 5 }}, got {other:?}"),
    }
    assert!(matches!(
        store.append(&a, 1000, b"").await,
        Err(LogError::Gap {
            expected: 4,
            got: 1000,
            ..
        })
    ));
    assert_eq!(store.len(&a).await.unwrap(), 4, "gap: len unchanged");
    assert_eq!(contents(store, &a).await, b"0123", "gap: nothing written");
    // Filling the gap then works.
    assert_eq!(store.append(&a, 4, b"456789").await.unwrap(), 10);
    assert_eq!(contents(store, &a).await, b"0123456789");

    // A log never written: any offset but 0 is a gap, and creates nothing.
    let b = AttemptId::generate();
    assert!(
        matches!(
            store.append(&b, 3, b"xyz").await,
            Err(LogError::Gap {
                expected: 0,
                got: 3,
                ..
            })
        ),
        "gap on a new log"
    );
    assert_eq!(store.len(&b).await.unwrap(), 0, "gap on a new log: len");
    assert!(store.read(&b, 0, 10).await.unwrap().is_empty());
}

pub(crate) async fn read_ranges(store: &dyn LogStore) {
    let a = AttemptId::generate();
    store.append(&a, 0, b"0123456789").await.unwrap();
    let read = |offset: u64, max: usize| {
        let a = a.clone();
        async move { store.read(&a, offset, max).await.unwrap().to_vec() }
    };
    assert_eq!(read(0, 10).await, b"0123456789", "read all");
    assert_eq!(read(0, 100).await, b"0123456789", "read past the end");
    assert_eq!(read(0, 3).await, b"012", "read a prefix");
    assert_eq!(read(3, 4).await, b"3456", "read the middle");
    assert_eq!(read(7, 100).await, b"789", "read to the end");
    assert_eq!(read(9, 1).await, b"9", "read the last byte");
    assert_eq!(read(5, 0).await, b"", "read 0 bytes");
    assert_eq!(read(10, 5).await, b"", "read at the end");
    assert_eq!(read(11, 5).await, b"", "read past the end");
    assert_eq!(
        read(u64::MAX, usize::MAX).await,
        b"",
        "read far past the end"
    );
    // Reads see later appends.
    store.append(&a, 10, b"ab").await.unwrap();
    assert_eq!(read(9, 10).await, b"9ab", "read after append");
}

/// An attempt never written is empty, and looking at it creates nothing.
pub(crate) async fn unknown_attempt(store: &dyn LogStore) {
    let a = AttemptId::generate();
    assert_eq!(store.len(&a).await.unwrap(), 0, "len of an unknown attempt");
    assert!(store.read(&a, 0, 100).await.unwrap().is_empty(), "read");
    assert!(store.read(&a, 50, 100).await.unwrap().is_empty(), "read");
    store.sync(&a).await.unwrap();
    assert_eq!(store.append(&a, 0, b"").await.unwrap(), 0, "empty append");
    assert_eq!(store.len(&a).await.unwrap(), 0);
}

/// Ids outside `[A-Za-z0-9_-]` are refused by every call.
pub(crate) async fn bad_ids(store: &dyn LogStore) {
    for bad in [
        "",
        "att/x",
        "../att-x",
        "att-x.log",
        "att x",
        "att\0",
        "att-é",
    ] {
        let a = AttemptId::from_string(bad);
        let is_bad_id =
            |r: Result<(), LogError>| matches!(r, Err(LogError::BadId(id)) if id == bad);
        assert!(
            is_bad_id(store.append(&a, 0, b"x").await.map(drop)),
            "append {bad:?}"
        );
        assert!(is_bad_id(store.len(&a).await.map(drop)), "len {bad:?}");
        assert!(
            is_bad_id(store.read(&a, 0, 1).await.map(drop)),
            "read {bad:?}"
        );
        assert!(is_bad_id(store.sync(&a).await), "sync {bad:?}");
    }
    // Valid ids that are not of the `att-` form are fine.
    let a = AttemptId::from_string("Some_id-09");
    assert_eq!(store.append(&a, 0, b"ok").await.unwrap(), 2);
}

pub(crate) async fn attempts_are_independent(store: &dyn LogStore) {
    let a = AttemptId::generate();
    let b = AttemptId::generate();
    store.append(&a, 0, b"aaaa").await.unwrap();
    store.append(&b, 0, b"b").await.unwrap();
    store.append(&a, 4, b"AA").await.unwrap();
    assert_eq!(contents(store, &a).await, b"aaaaAA", "independent");
    assert_eq!(contents(store, &b).await, b"b", "independent");
}

/// 8 tasks append the same log at once, each cutting it into chunks of its
/// own size: every byte is stored exactly once.
pub(crate) async fn concurrent_appends_store_one_copy(store: Arc<dyn LogStore>) {
    const TASKS: usize = 8;
    let a = AttemptId::generate();
    let log: Arc<Vec<u8>> = Arc::new(
        (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect(),
    );
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (store, a, log) = (store.clone(), a.clone(), log.clone());
            tokio::spawn(async move {
                // Task 0 and 1 use the same chunks, so whole chunks race too.
                let chunk = 997 * (t.max(1));
                let mut offset = 0;
                while offset < log.len() {
                    let end = (offset + chunk).min(log.len());
                    let len = store
                        .append(&a, offset as u64, &log[offset..end])
                        .await
                        .unwrap();
                    assert!(len >= end as u64, "concurrent: length covers the chunk");
                    offset = end;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("concurrent task panicked");
    }
    assert_eq!(store.len(&a).await.unwrap(), log.len() as u64, "concurrent");
    assert!(
        contents(&*store, &a).await == *log,
        "concurrent: one copy of each byte"
    );
}

/// A 10 MiB log, appended in 64 KiB chunks, reads back intact.
pub(crate) async fn ten_mib_log(store: &dyn LogStore) {
    const SIZE: usize = 10 * 1024 * 1024;
    let a = AttemptId::generate();
    let log: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 17) as u8)
        .collect();
    for (i, chunk) in log.chunks(64 * 1024).enumerate() {
        let offset = (i * 64 * 1024) as u64;
        assert_eq!(
            store.append(&a, offset, chunk).await.unwrap(),
            offset + chunk.len() as u64,
            "10 MiB: append"
        );
    }
    store.sync(&a).await.unwrap();
    assert_eq!(store.len(&a).await.unwrap(), SIZE as u64, "10 MiB: len");
    let mut got = Vec::with_capacity(SIZE);
    loop {
        let part = store.read(&a, got.len() as u64, 1024 * 1024).await.unwrap();
        if part.is_empty() {
            break;
        }
        assert!(part.len() <= 1024 * 1024, "10 MiB: read respects max");
        got.extend_from_slice(&part);
    }
    assert!(got == log, "10 MiB: content");
    let tail = store.read(&a, SIZE as u64 - 10, 100).await.unwrap();
    assert_eq!(&tail[..], &log[SIZE - 10..], "10 MiB: tail");
}
