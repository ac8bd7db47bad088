//! The dashboard over plain HTTP (the browser test is `dashboard.rs`):
//! login and its nonce, the session cookie's attributes, scopes and CSRF on
//! every POST, revocation, JSON equal to the CLI's `-o json`, a long log as
//! head and tail with the whole of it downloadable, and a follower's answer.

use capstan_proto::pipeline::v1::RunState;
use capstan_tests::net::http_request;
use capstan_tests::*;
use std::net::SocketAddr;
use std::time::Duration;

const QUICK: &str = "version: 1\nname: quick\ntasks:\n  a:\n    steps: [ { run: echo a } ]\n  b:\n    needs: [a]\n    steps: [ { run: echo b } ]\n";
const LONG: &str = "version: 1\nname: long\ntasks:\n  wait:\n    steps: [ { run: 'sleep 120' } ]\n";

fn get(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    http_request(addr, "GET", path, headers, "").expect("GET")
}

fn post(addr: SocketAddr, path: &str, cookie: &str, form: &str) -> (u16, String, String) {
    let headers =
        format!("Cookie: {cookie}\r\nContent-Type: application/x-www-form-urlencoded\r\n");
    http_request(addr, "POST", path, &headers, form).expect("POST")
}

fn json_get(addr: SocketAddr, path: &str, token: &str) -> serde_json::Value {
    let (code, _, body) = get(
        addr,
        path,
        &format!("Authorization: Bearer {token}\r\nAccept: application/json\r\n"),
    );
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

fn cli_json(c: &TestCluster, args: &[&str]) -> serde_json::Value {
    let out = c.cli(args);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// A response header's value (first of that name).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `value="..."` of the hidden input `name` in a page.
fn hidden(page: &str, name: &str) -> String {
    let at = page
        .find(&format!("name=\"{name}\" value=\""))
        .unwrap_or_else(|| panic!("no {name} in {page}"));
    let rest = &page[at + name.len() + 15..];
    rest[..rest.find('"').unwrap()].to_string()
}

/// Logs in through the form as a browser does: the session cookie.
fn log_in(addr: SocketAddr, token: &str) -> String {
    let (code, head, page) = get(addr, "/login?next=%2Frunners", "");
    assert_eq!(code, 200, "{page}");
    let nonce_cookie = header(&head, "set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let nonce = hidden(&page, "nonce");
    let form = format!("token={token}&nonce={nonce}&next=%2Frunners");
    let (code, head, body) = post(addr, "/login", &nonce_cookie, &form);
    assert_eq!(code, 303, "{head}\n{body}");
    assert_eq!(header(&head, "location"), Some("/runners"));
    let session = head
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .find(|l| l.contains("capstan_session="))
        .expect("a session cookie")
        .to_string();
    assert!(session.contains("HttpOnly"), "{session}");
    assert!(session.contains("SameSite=Strict"), "{session}");
    assert!(
        !session.contains("Secure"),
        "plain HTTP: not Secure: {session}"
    );
    assert!(
        !session.contains(token),
        "the cookie holds a session secret, not the token"
    );
    session["set-cookie:".len()..]
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_scopes_csrf_and_json() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .runners(1)
        .capacity(4)
        .start()
        .await?;
    let addr = c.replicas[0].http;
    let done = c.submit(QUICK).await?;
    c.wait_done(&done, Duration::from_secs(30)).await?;

    // No session: browsers go to the login page, JSON callers get 401.
    let (code, head, _) = get(addr, "/runs/x", "");
    assert_eq!(code, 303);
    assert!(
        header(&head, "location")
            .unwrap()
            .starts_with("/login?next=%2Fruns%2Fx"),
        "{head}"
    );
    let (code, _, body) = get(addr, "/", "Accept: application/json\r\n");
    assert_eq!(code, 401);
    assert!(body.contains("log in with an API token"), "{body}");
    assert!(
        header(&head, "content-security-policy")
            .unwrap()
            .contains("script-src 'self'")
    );

    // The login form: a stale nonce and a bad token are refused, clearly.
    let (_, _, page) = get(addr, "/login", "");
    let nonce = hidden(&page, "nonce");
    let (code, _, body) = post(
        addr,
        "/login",
        "capstan_login=other",
        &format!("token=x&nonce={nonce}"),
    );
    assert_eq!(code, 403);
    assert!(body.contains("expired or came from another site"), "{body}");
    let (code, _, body) = post(
        addr,
        "/login",
        &format!("capstan_login={nonce}"),
        &format!("token=capstan_wrong&nonce={nonce}"),
    );
    assert_eq!(code, 401);
    assert!(body.contains("does not know that token"), "{body}");

    // JSON is the CLI's.
    let reader = c.create_token("viewer", "read").await?;
    assert_eq!(
        json_get(addr, "/", &reader),
        cli_json(&c, &["runs", "-o", "json"])
    );
    assert_eq!(
        json_get(addr, &format!("/runs/{done}"), &reader),
        cli_json(&c, &["status", &done, "-o", "json"])
    );
    assert_eq!(
        json_get(addr, "/cluster", &reader),
        cli_json(&c, &["cluster", "-o", "json"])
    );
    let runners = json_get(addr, "/runners", &reader);
    assert_eq!(runners[0]["name"], "runner-0", "{runners}");
    let history = &json_get(addr, &format!("/runs/{done}"), &reader)["tasks"][0]["history"];
    assert_eq!(history[0]["state"], "succeeded", "{history}");
    assert_eq!(history[0]["runner"], "runner-0", "{history}");

    // Errors say what is wrong, as the API does.
    let (code, _, body) = get(
        addr,
        "/runs/run-nope",
        &format!("Authorization: Bearer {reader}\r\n"),
    );
    assert_eq!(code, 404, "{body}");
    let (code, _, body) = get(
        addr,
        &format!("/runs/{done}/tasks/zz"),
        &format!("Authorization: Bearer {reader}\r\n"),
    );
    assert_eq!(code, 404);
    assert!(body.contains("has no task `zz`"), "{body}");
    let (code, _, body) = get(
        addr,
        "/?state=bogus",
        &format!("Authorization: Bearer {reader}\r\n"),
    );
    assert_eq!(code, 400);
    assert!(body.contains("is not one of queued, running"), "{body}");

    // Buttons and POSTs: scope and CSRF.
    let long = c.submit(LONG).await?;
    c.wait_run(&long, Duration::from_secs(20), |r| {
        task(r, "wait").started_at_ms > 0
    })
    .await?;
    let reader_cookie = log_in(addr, &reader);
    let (code, _, page) = get(
        addr,
        &format!("/runs/{long}"),
        &format!("Cookie: {reader_cookie}\r\n"),
    );
    assert_eq!(code, 200);
    assert!(
        !page.contains("id=\"cancel\""),
        "a read token sees no cancel button"
    );
    let reader_csrf = hidden(&page, "csrf");
    let (code, _, body) = post(
        addr,
        &format!("/runs/{long}/cancel"),
        &reader_cookie,
        &format!("csrf={reader_csrf}"),
    );
    assert_eq!(code, 403);
    assert!(
        body.contains("needs a token with the `submit` scope"),
        "{body}"
    );
    let (code, _, body) = post(
        addr,
        "/runners/runner-0/drain",
        &reader_cookie,
        &format!("csrf={reader_csrf}"),
    );
    assert_eq!(code, 403);
    assert!(body.contains("`admin` scope"), "{body}");

    let admin_cookie = log_in(addr, &c.api_token);
    let (_, _, page) = get(
        addr,
        &format!("/runs/{long}"),
        &format!("Cookie: {admin_cookie}\r\n"),
    );
    assert!(
        page.contains("id=\"cancel\""),
        "an admin sees the cancel button"
    );
    let admin_csrf = hidden(&page, "csrf");
    assert_ne!(admin_csrf, reader_csrf, "a CSRF token per session");
    for forged in ["", "csrf=", &format!("csrf={reader_csrf}")] {
        let (code, _, body) = post(addr, &format!("/runs/{long}/cancel"), &admin_cookie, forged);
        assert_eq!(code, 403, "{forged}: {body}");
        assert!(body.contains("CSRF token does not match"), "{body}");
    }
    assert_eq!(
        c.get_run(&long).await?.state,
        RunState::Running as i32,
        "no forged POST cancelled it"
    );
    let (code, head, _) = post(
        addr,
        &format!("/runs/{long}/cancel"),
        &admin_cookie,
        &format!("csrf={admin_csrf}"),
    );
    assert_eq!(code, 303, "{head}");
    let run = c.wait_done(&long, Duration::from_secs(20)).await?;
    assert_eq!(run.state, RunState::Cancelled as i32);

    // A revoked token's session ends at its next request.
    let out = c.cli(&["token", "revoke", "viewer"]);
    assert!(out.status.success(), "{out:?}");
    let (code, head, _) = get(addr, "/", &format!("Cookie: {reader_cookie}\r\n"));
    assert_eq!(code, 303);
    assert!(
        header(&head, "location").unwrap().ends_with("why=token"),
        "{head}"
    );
    let (_, _, page) = get(addr, "/login?next=%2F&why=token", "");
    assert!(page.contains("was revoked or has expired"), "{page}");
    let (_, _, page) = get(addr, "/login?why=paste+your+token+at+evil.example", "");
    assert!(
        !page.contains("evil.example"),
        "no text from the URL on the page"
    );

    // Logging out ends the session on the server, not only in the browser.
    let (_, _, page) = get(addr, "/runners", &format!("Cookie: {admin_cookie}\r\n"));
    let csrf = hidden(&page, "csrf");
    let (code, _, _) = post(addr, "/logout", &admin_cookie, &format!("csrf={csrf}"));
    assert_eq!(code, 303);
    let (code, head, _) = get(addr, "/", &format!("Cookie: {admin_cookie}\r\n"));
    assert_eq!(code, 303, "a copied cookie no longer works");
    assert!(
        header(&head, "location").unwrap().ends_with("why=expired"),
        "{head}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_log_shows_head_and_tail_and_downloads_whole() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(1).start().await?;
    let addr = c.replicas[0].http;
    let yaml = "version: 1\nname: big\ntasks:\n  t:\n    steps: [ { run: 'seq 1 300000' } ]\n";
    let id = c.submit(yaml).await?;
    c.wait_done(&id, Duration::from_secs(60)).await?;
    let log = c.task_log(&id, "t").await?;
    let lines = log.iter().filter(|&&b| b == b'\n').count();
    assert!(log.len() > 1_500_000, "{} bytes", log.len());

    let auth = format!("Authorization: Bearer {}\r\n", c.api_token);
    let (code, _, page) = get(addr, &format!("/runs/{id}/tasks/t"), &auth);
    assert_eq!(code, 200);
    assert!(
        page.len() < 3 * 1024 * 1024,
        "a page, not the log: {} bytes",
        page.len()
    );
    assert!(page.contains("id=\"omitted\""), "the cut is said");
    assert!(
        page.contains("id=\"L1\"") && page.contains(&format!("id=\"L{lines}\"")),
        "head and tail, numbered as in the log"
    );
    let last = String::from_utf8_lossy(&log)
        .lines()
        .last()
        .unwrap()
        .to_string();
    assert!(
        page.contains(&format!("href=\"#L{lines}\">{lines}</a>{last}")),
        "the last line is line {lines}: {last}"
    );
    assert!(
        !page.contains("id=\"L150000\""),
        "the middle is not on the page"
    );
    let value = json_get(addr, &format!("/runs/{id}/tasks/t"), &c.api_token);
    let omitted = value["omitted_bytes"].as_u64().unwrap();
    assert!(omitted > 0 && omitted < log.len() as u64, "{value}");

    let (code, head, raw) = get(addr, &format!("/runs/{id}/tasks/t/raw"), &auth);
    assert_eq!(code, 200);
    assert!(
        header(&head, "content-disposition")
            .unwrap()
            .starts_with("attachment"),
        "{head}"
    );
    assert_eq!(
        raw.as_bytes(),
        &log[..],
        "the download is the whole log, byte for byte"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_names_the_leader() -> anyhow::Result<()> {
    let c = TestCluster::builder().replicas(2).etcd().start().await?;
    let (leader, _) = c.wait_leader(Duration::from_secs(30)).await?;
    let follower = 1 - leader;
    let auth = format!("Authorization: Bearer {}\r\n", c.api_token);
    let (code, _, page) = get(c.replicas[follower].http, "/", &auth);
    assert_eq!(code, 503, "{page}");
    assert!(page.contains("is a follower"), "{page}");
    assert!(
        page.contains(&c.replicas[leader].url()),
        "names the leader: {page}"
    );
    let (code, _, _) = get(c.replicas[leader].http, "/", &auth);
    assert_eq!(code, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_log_goes_on_from_the_last_event_id() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(1).start().await?;
    let addr = c.replicas[0].http;
    let yaml = "version: 1\nname: few\ntasks:\n  t:\n    steps: [ { run: 'seq 1 40' } ]\n";
    let id = c.submit(yaml).await?;
    c.wait_done(&id, Duration::from_secs(30)).await?;
    let log = c.task_log(&id, "t").await?;
    let lines: Vec<&[u8]> = log.split_inclusive(|&b| b == b'\n').collect();
    // Where line 10 starts.
    let offset: usize = lines[..9].iter().map(|l| l.len()).sum();
    let auth = format!("Authorization: Bearer {}\r\n", c.api_token);
    let path = format!("/runs/{id}/tasks/t/events");

    let resumed = format!("{auth}Last-Event-ID: 1:{offset}:10\r\n");
    let (code, head, body) = get(addr, &path, &resumed);
    assert_eq!(code, 200, "{body}");
    assert!(
        header(&head, "content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert!(
        body.contains("id=\"L10\"") && !body.contains("id=\"L9\""),
        "from line 10 on: {body}"
    );
    let total = lines.len();
    assert!(
        body.contains(&format!("id=\"L{total}\"")),
        "to the last line: {body}"
    );
    let end = format!("event: end\ndata: end\nid: 1:{}:{}\n", log.len(), total + 1);
    assert!(body.contains(&end), "ends where the log ends: {body}");

    // The page's own `from=` does the same; a bad position starts over.
    let (_, _, from_query) = get(addr, &format!("{path}?from=1:{offset}:10"), &auth);
    assert!(from_query.contains("id=\"L10\"") && !from_query.contains("id=\"L9\""));
    let (_, _, again) = get(addr, &path, &format!("{auth}Last-Event-ID: nonsense\r\n"));
    assert!(again.contains("id=\"L1\""), "{again}");
    Ok(())
}

/// Text from users (log bytes, a rev) is shown as text: never markup, and
/// a non-ASCII rev (cut for the table) breaks no page.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_text_is_escaped_and_breaks_no_page() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(1).start().await?;
    let addr = c.replicas[0].http;
    let yaml = "version: 1\nname: hostile\ntasks:\n  t:\n    steps:\n      - run: |\n          printf '%s\\n' '<script>alert(1)</script>' '<img src=x onerror=alert(2)>' '\"quoted\" & amp'\n";
    let id = c
        .client()
        .await?
        .submit_run(capstan_proto::api::v1::SubmitRunRequest {
            pipeline_yaml: yaml.into(),
            file_name: "hostile.yaml".into(),
            // Byte 10 falls inside the second `é`.
            rev: "abcdefghiéé".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    c.wait_done(&id, Duration::from_secs(30)).await?;
    let auth = format!("Authorization: Bearer {}\r\n", c.api_token);
    let (code, _, page) = get(addr, &format!("/runs/{id}/tasks/t"), &auth);
    assert_eq!(code, 200);
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(
        !page.contains("<script>alert") && !page.contains("<img src=x"),
        "{page}"
    );
    let (code, _, list) = get(addr, "/", &auth);
    assert_eq!(code, 200, "{list}");
    assert!(
        list.contains(">abcdefghié<"),
        "the rev is shown, cut between characters: {list}"
    );
    let (code, _, run) = get(addr, &format!("/runs/{id}"), &auth);
    assert_eq!(code, 200, "{run}");
    Ok(())
}

/// An approval gate on the run's page: a token whose scope the gate does
/// not take sees no buttons, and its POST is refused by the scheduler's
/// check; an admin's approval queues the task.
#[tokio::test(flavor = "multi_thread")]
async fn approval_buttons_follow_the_gates_scopes() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(1).start().await?;
    let addr = c.replicas[0].http;
    let yaml = "version: 1\nname: gated\ntasks:\n  build:\n    steps: [run: echo built]\n  deploy:\n    needs: [build]\n    approval: {prompt: \"ship <it>?\"}\n    steps: [run: echo deployed]\n";
    let id = c.submit(yaml).await?;
    c.wait_run(&id, Duration::from_secs(30), |r| {
        task(r, "deploy")
            .approval
            .as_ref()
            .is_some_and(|a| a.asked_at_ms > 0)
    })
    .await?;
    let reader = c.create_token("looker", "read").await?;
    let reader_cookie = log_in(addr, &reader);
    let (code, _, page) = get(
        addr,
        &format!("/runs/{id}"),
        &format!("Cookie: {reader_cookie}\r\n"),
    );
    assert_eq!(code, 200);
    assert!(
        page.contains("ship &lt;it&gt;?"),
        "the prompt, escaped: {page}"
    );
    assert!(
        !page.contains("id=\"approve-deploy\""),
        "no button for a read token"
    );
    let csrf = hidden(&page, "csrf");
    let (code, _, body) = post(
        addr,
        &format!("/runs/{id}/tasks/deploy/approve"),
        &reader_cookie,
        &format!("csrf={csrf}"),
    );
    assert_eq!(code, 403, "{body}");
    assert!(
        task(&c.get_run(&id).await?, "deploy")
            .approval
            .as_ref()
            .is_some_and(|a| !a.decided)
    );

    let admin_cookie = log_in(addr, &c.api_token);
    let (_, _, page) = get(
        addr,
        &format!("/runs/{id}"),
        &format!("Cookie: {admin_cookie}\r\n"),
    );
    assert!(page.contains("id=\"approve-deploy\"") && page.contains("id=\"reject-deploy\""));
    let csrf = hidden(&page, "csrf");
    let (code, head, _) = post(
        addr,
        &format!("/runs/{id}/tasks/deploy/approve"),
        &admin_cookie,
        &format!("csrf={csrf}&reason=looks+good"),
    );
    assert_eq!(code, 303, "{head}");
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    let a = task(&run, "deploy").approval.clone().unwrap_or_default();
    assert!(a.approved && a.reason == "looks good", "{a:?}");
    Ok(())
}
