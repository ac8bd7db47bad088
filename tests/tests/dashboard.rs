//! The web dashboard in a real headless Chromium (WebDriver) against a real
//! coordinator and runner: log in with a token, watch a run's state change
//! on its page without a reload, watch log lines appear while the step
//! prints them (one a second), cancel a run and drain a runner from the
//! page. Screenshots of every page go to the screenshot dir (test
//! artifacts). The HTTP side (`dashboard_http.rs`) checks auth, CSRF, JSON
//! and long logs without a browser.

use capstan_proto::pipeline::v1::RunState;
use capstan_tests::browser::Browser;
use capstan_tests::*;
use fantoccini::Locator;
use std::time::Duration;

const SLOW: &str = "version: 1\nname: slow\ntasks:\n  build:\n    steps:\n      - run: |\n          for i in 1 2 3 4 5 6; do echo \"line $i\"; sleep 1; done\n          printf '\\033[31mred done\\033[0m\\n'\n  test:\n    needs: [build]\n    steps: [ { run: echo tested } ]\n";

const GATED: &str = "version: 1\nname: gated\ntasks:\n  build:\n    steps: [run: echo built]\n  deploy:\n    needs: [build]\n    approval: {prompt: \"bump the manifest?\"}\n    steps: [run: echo deployed]\n";

const LONG: &str = "version: 1\nname: long\ntasks:\n  wait:\n    steps: [ { run: 'sleep 120' } ]\n";

/// A value the page keeps until it is reloaded.
async fn mark(b: &Browser) -> anyhow::Result<()> {
    b.client
        .execute("window.__capstanMark = 42; return 1;", vec![])
        .await?;
    Ok(())
}

async fn still_marked(b: &Browser) -> anyhow::Result<bool> {
    let v = b
        .client
        .execute("return window.__capstanMark === 42;", vec![])
        .await?;
    Ok(v == serde_json::Value::Bool(true))
}

async fn log_in(b: &Browser, base: &str, token: &str) -> anyhow::Result<()> {
    b.client.goto(&format!("{base}/")).await?;
    let url = b.client.current_url().await?;
    assert_eq!(url.path(), "/login", "no session: the login page");
    b.screenshot("login").await?;
    b.client
        .find(Locator::Css("#token"))
        .await?
        .send_keys(token)
        .await?;
    b.click("#login").await?;
    b.wait_text("h1", "the runs page", |t| t == "Runs").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_follows_runs_logs_and_the_fleet_in_a_browser() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .runners(1)
        .capacity(4)
        .start()
        .await?;
    c.wait_runners_connected(1, Duration::from_secs(20)).await?;
    let base = format!("http://{}", c.replicas[0].http);
    let b = Browser::start(c.dir()).await?;
    log_in(&b, &base, &c.api_token).await?;

    // A run's page: the DAG, and the state going to succeeded without a reload.
    let first = c.submit(SLOW).await?;
    b.client.goto(&format!("{base}/runs/{first}")).await?;
    b.text("svg.dag").await?;
    assert_eq!(b.count("svg.dag g.node").await?, 2, "a node per task");
    assert_eq!(b.count("svg.dag path.edge").await?, 1, "test needs build");
    b.wait_text(
        "tr.task[data-task=\"build\"] .state",
        "build running",
        |t| t == "running",
    )
    .await?;
    mark(&b).await?;
    b.screenshot("run").await?;
    b.wait_text("#run-state", "succeeded", |t| t == "succeeded")
        .await?;
    assert!(
        still_marked(&b).await?,
        "the state changed without a reload"
    );
    let build = b.attr("svg.dag g.node[data-task=\"build\"]", "data-state");
    assert_eq!(build.await?.as_deref(), Some("succeeded"));

    // The log page of a running step: lines appear as the step prints them.
    let second = c.submit(SLOW).await?;
    c.wait_run(&second, Duration::from_secs(20), |r| {
        task(r, "build").started_at_ms > 0
    })
    .await?;
    b.client
        .goto(&format!("{base}/runs/{second}/tasks/build"))
        .await?;
    b.wait_text("#log", "line 1", |t| t.contains("line 1"))
        .await?;
    mark(&b).await?;
    let before = b.text("#log").await?;
    assert!(
        !before.contains("line 6"),
        "the step is still printing: {before}"
    );
    b.wait_text("#log", "line 4", |t| t.contains("line 4"))
        .await?;
    b.screenshot("log").await?;
    b.wait_text("#following", "the end of the attempt", |t| {
        t.contains("ended")
    })
    .await?;
    assert!(still_marked(&b).await?, "lines arrived without a reload");
    let html = b
        .js("return document.getElementById('log').innerHTML;", vec![])
        .await?;
    let html = html.as_str().unwrap_or_default().to_string();
    assert!(html.contains("red done"), "{html}");
    assert!(
        html.contains("style=") && !html.contains("\u{1b}["),
        "ANSI colours rendered: {html}"
    );
    // The page and its stream together: each line of the log once, in
    // order, numbered from 1.
    let raw = c.task_log(&second, "build").await?;
    let raw = String::from_utf8_lossy(&raw)
        .replace("\u{1b}[31m", "")
        .replace("\u{1b}[0m", "");
    let want: Vec<&str> = raw.lines().collect();
    assert_eq!(
        b.count("#log .l").await?,
        want.len(),
        "a line per line of {want:?}"
    );
    for (i, line) in want.iter().enumerate() {
        let n = i + 1;
        let anchor = format!("#L{n} a[href=\"#L{n}\"]");
        assert_eq!(b.count(&anchor).await?, 1, "line {n}");
        let shown = b.text(&format!("#L{n}")).await?;
        assert_eq!(shown, format!("{n}{line}").trim(), "line {n}");
    }
    // A line link opens the page at that line.
    b.client
        .goto(&format!("{base}/runs/{second}/tasks/build#L3"))
        .await?;
    assert_eq!(
        b.text("#L3").await?,
        format!("3{}", want[2]),
        "number, then the line"
    );
    assert_eq!(b.count("#L3.target").await?, 1, "the linked line is marked");

    // Cancel a run from its page.
    let long = c.submit(LONG).await?;
    b.client.goto(&format!("{base}/runs/{long}")).await?;
    b.wait_text("tr.task[data-task=\"wait\"] .state", "wait running", |t| {
        t == "running"
    })
    .await?;
    b.click("#cancel").await?;
    b.wait_text("#run-state", "cancelled", |t| t == "cancelled")
        .await?;
    let run = c.get_run(&long).await?;
    assert_eq!(run.state, RunState::Cancelled as i32, "{run:#?}");

    // Approve a gate from the run's page.
    let gated = c.submit(GATED).await?;
    b.client.goto(&format!("{base}/runs/{gated}")).await?;
    let prompt = b.text(".gate[data-task=\"deploy\"] .prompt").await?;
    assert_eq!(prompt, "bump the manifest?");
    b.screenshot("approval").await?;
    b.click("#approve-deploy").await?;
    b.wait_text("#run-state", "succeeded", |t| t == "succeeded")
        .await?;
    let run = c.get_run(&gated).await?;
    let decision = task(&run, "deploy").approval.clone().unwrap_or_default();
    assert!(decision.approved, "{run:#?}");
    assert_eq!(
        decision.decided_by,
        capstan_tests::cluster::ADMIN_TOKEN_NAME
    );

    // Drain and resume a runner.
    b.client.goto(&format!("{base}/runners")).await?;
    let row = "tr[data-runner=\"runner-0\"]";
    b.wait_text(&format!("{row} td.drain"), "not draining", |t| t == "–")
        .await?;
    b.click("#drain-runner-0").await?;
    b.wait_text(&format!("{row} td.drain"), "draining", |t| t == "draining")
        .await?;
    b.screenshot("runners").await?;
    let (code, body) = c.http_get_auth("/runners", Some(&c.api_token))?;
    assert_eq!(code, 200);
    assert!(body.contains("draining"), "{body}");
    b.click("#resume-runner-0").await?;
    b.wait_text(&format!("{row} td.drain"), "resumed", |t| t == "–")
        .await?;

    // The cluster and the runs list, filtered.
    b.client.goto(&format!("{base}/cluster")).await?;
    b.wait_text("#leader", "the leader's URL", |t| t == c.url())
        .await?;
    b.screenshot("cluster").await?;
    b.client.goto(&format!("{base}/")).await?;
    b.text("table.runs").await?;
    for id in [&first, &second, &long] {
        let row = format!("tr[data-run=\"{id}\"]");
        assert_eq!(b.count(&row).await?, 1, "{id} listed");
    }
    b.screenshot("runs").await?;
    b.client.goto(&format!("{base}/?state=cancelled")).await?;
    b.text("table.runs").await?;
    assert_eq!(b.count("tr[data-run]").await?, 1, "only the cancelled run");
    let only = b.attr("tr[data-run]", "data-run").await?;
    assert_eq!(only.as_deref(), Some(long.as_str()));

    // Log out: the next page asks for a token again.
    b.click("form.who button").await?;
    b.wait_text("h1", "the login page", |t| t == "Log in")
        .await?;
    b.client.goto(&format!("{base}/runners")).await?;
    assert_eq!(b.client.current_url().await?.path(), "/login");
    b.close().await
}
