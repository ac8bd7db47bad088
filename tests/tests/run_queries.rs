//! `capstan runs` against a real coordinator: pages newest first that
//! cover every run exactly once while new runs are submitted between
//! pages, filters by state and pipeline, and a bad cursor refused with a
//! clear error.

use capstan_tests::*;
use std::collections::BTreeSet;
use std::time::Duration;

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_filters_and_cursors() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .runners(1)
        .capacity(4)
        .start()
        .await?;
    let ok = |name: &str| {
        format!("version: 1\nname: {name}\ntasks:\n  t:\n    steps: [ {{ run: 'true' }} ]\n")
    };
    let failing = "version: 1\nname: b\ntasks:\n  t:\n    steps: [ { run: 'exit 3' } ]\n";
    let mut first: Vec<String> = Vec::new();
    for i in 0..7 {
        let yaml = if i % 3 == 2 {
            failing.to_owned()
        } else {
            ok(if i % 2 == 0 { "a" } else { "b" })
        };
        first.push(c.submit(&yaml).await?);
    }
    for id in &first {
        c.wait_done(id, Duration::from_secs(30)).await?;
    }

    // Pages of 3, with new runs submitted between pages: every first run
    // exactly once, newest first, none of the new ones.
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut later = Vec::new();
    for _ in 0..10 {
        let mut args = vec!["runs", "--limit", "3", "-o", "json"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let v = json(&c.cli(&args));
        seen.extend(ids(&v));
        later.push(c.submit(&ok("a")).await?);
        match v["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut newest_first = first.clone();
    newest_first.reverse();
    assert_eq!(
        seen, newest_first,
        "pages cover the first runs once, in order"
    );
    assert!(later.iter().all(|l| !seen.contains(l)));

    // Filters, and text output saying there is more.
    let v = json(&c.cli(&["runs", "--state", "failed", "-o", "json"]));
    let failed: BTreeSet<String> = ids(&v).into_iter().collect();
    let want: BTreeSet<String> = [2, 5].iter().map(|&i| first[i].clone()).collect();
    assert_eq!(failed, want);
    assert!(v["next"].is_null(), "{v}");
    let v = json(&c.cli(&["runs", "--pipeline", "b", "--since", "1h", "-o", "json"]));
    let b: BTreeSet<String> = ids(&v).into_iter().collect();
    let want: BTreeSet<String> = [1, 2, 3, 5].iter().map(|&i| first[i].clone()).collect();
    assert_eq!(b, want);
    let out = c.cli(&["runs", "--limit", "2"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("more: add --cursor s"),
        "{out:?}"
    );
    let out = c.cli(&["runs", "--pipeline", "nothing-like-it"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no runs match"),
        "{out:?}"
    );

    // A cursor that is not one: a usage error saying what to pass.
    let out = c.cli(&["runs", "--cursor", "page-2"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pass the next_cursor of the previous page"),
        "{out:?}"
    );
    Ok(())
}
