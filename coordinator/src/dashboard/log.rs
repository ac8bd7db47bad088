//! `/runs/{id}/tasks/{task}`: an attempt's log, with ANSI colours, linkable
//! line numbers (`#L120`) and a raw download. A log longer than a page is
//! shown as its head and tail with what is left out said in bytes (the rest
//! is in the download), so a 100 MB log costs the coordinator a page of
//! memory, not the log. While the attempt runs, `log_stream` sends the lines
//! that follow.

use super::client::Api;
use super::{Dash, Viewer, dag, layout, refusal};
use crate::api::LeaderCtx;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use capstan_proto::api::v1::{Attempt, Run, Task};
use capstan_proto::ids::AttemptId;
use capstan_proto::render::task_state_name;
use maud::{Markup, PreEscaped, html};
use serde::Deserialize;

/// The head and the tail a page shows of a long log: each at most this
/// many bytes and `PAGE_LINES` lines (a line is ~70 bytes of markup).
pub(crate) const HALF_PAGE: u64 = 256 * 1024;
pub(crate) const PAGE_LINES: usize = 2500;
/// One read of the log store.
const CHUNK: usize = 256 * 1024;

#[derive(Deserialize)]
pub(crate) struct AttemptQuery {
    pub(crate) attempt: Option<u32>,
}

/// The run, its task and the attempt asked for (the latest by default).
pub(crate) struct Located {
    pub(crate) run: Run,
    pub(crate) task: Task,
    pub(crate) attempt: Option<Attempt>,
}

pub(crate) async fn locate(
    api: &Api<'_>,
    id: &str,
    task: &str,
    number: Option<u32>,
) -> Result<Located, tonic::Status> {
    let run = api.run(id).await?;
    let Some(t) = run.tasks.iter().find(|t| t.name == task).cloned() else {
        return Err(tonic::Status::not_found(format!(
            "run {id} has no task `{task}`"
        )));
    };
    let attempt = match number {
        None => t.history.last().cloned(),
        Some(n) => Some(
            t.history
                .iter()
                .find(|a| a.number == n)
                .cloned()
                .ok_or_else(|| {
                    tonic::Status::not_found(format!(
                        "task `{task}` has no attempt {n} (it has {})",
                        t.history.len()
                    ))
                })?,
        ),
    };
    Ok(Located {
        run,
        task: t,
        attempt,
    })
}

/// [`locate`] for the viewer, and the leader whose store holds the log;
/// otherwise the refusal, as page or JSON.
async fn open(
    dash: &Dash,
    viewer: &Viewer,
    id: &str,
    task: &str,
    number: Option<u32>,
    json: bool,
) -> Result<(Located, LeaderCtx), Response> {
    let api = Api::new(&dash.shared, &viewer.caller);
    let at = locate(&api, id, task, number)
        .await
        .map_err(|status| refusal(&status, json))?;
    let leader = dash
        .shared
        .leader()
        .await
        .map_err(|status| refusal(&status, json))?;
    Ok((at, leader))
}

/// The attempt's log will not grow.
pub(crate) fn finished(a: &Attempt) -> bool {
    !matches!(a.state.as_str(), "offered" | "running" | "cancelling")
}

pub(crate) async fn page(
    State(dash): State<Dash>,
    viewer: Viewer,
    headers: HeaderMap,
    Path((id, task)): Path<(String, String)>,
    Query(q): Query<AttemptQuery>,
) -> Response {
    let json = super::wants_json(&headers);
    let (at, leader) = match open(&dash, &viewer, &id, &task, q.attempt, json).await {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    let shown = match &at.attempt {
        Some(a) => match shown_log(&leader, a, &dash.line_counts).await {
            Ok(s) => Some(s),
            Err(e) => return refusal(&crate::api::status::from_log(e), json),
        },
        None => None,
    };
    if json {
        let value = serde_json::json!({
            "run": at.run.id, "task": at.task.name,
            "attempt": at.attempt.as_ref().map(|a| a.number),
            "log_bytes": at.attempt.as_ref().map_or(0, |a| a.log_bytes),
            "omitted_bytes": shown.as_ref().map_or(0, |s| s.omitted),
        });
        return axum::Json(value).into_response();
    }
    let body = body(&at, shown.as_ref());
    let title = format!("{} · run {}", at.task.name, at.run.id);
    layout::page(&title, "Runs", Some(&viewer), body).into_response()
}

fn body(at: &Located, shown: Option<&Shown>) -> Markup {
    let run_href = format!("/runs/{}", at.run.id);
    let base = format!("{run_href}/tasks/{}", dag::url_path(&at.task.name));
    html! {
        h1 { a href=(run_href) { "Run " code { (at.run.id) } } " · " (at.task.name) }
        p.facts {
            (layout::badge(task_state_name(at.task.state)))
            @if !at.task.message.is_empty() { " " span.msg { (at.task.message) } }
        }
        @if at.task.history.len() > 1 {
            p.attempts { "Attempts: "
                @for a in &at.task.history {
                    a href=(format!("{base}?attempt={}", a.number))
                        class=(if at.attempt.as_ref().is_some_and(|x| x.number == a.number) { "here" } else { "" })
                    { (a.number) " (" (a.state) ")" } " "
                }
            }
        }
        @match (&at.attempt, shown) {
            (Some(a), Some(s)) => {
                p.logbar {
                    "Attempt " (a.number) " on " (a.runner) ", " (s.total) " bytes. "
                    a #raw href=(format!("{base}/raw?attempt={}", a.number)) { "Download raw" }
                }
                @let follow = (!finished(a)).then(|| format!(
                    "{base}/events?from={}:{}:{}", a.number, s.resume_offset, s.resume_line));
                pre #log.log data-follow=[follow] {
                    (PreEscaped(&s.head))
                    @if s.omitted > 0 {
                        div.omitted #omitted {
                            (s.omitted) " bytes not shown here (the log is longer than a page): "
                            a href=(format!("{base}/raw?attempt={}", a.number)) { "download the whole log" }
                        }
                        (PreEscaped(&s.tail))
                    }
                }
                @if !finished(a) { p.live #following { "Following the log as the step writes it…" } }
            }
            _ => {
                p.empty { "No attempt has started yet; this page shows the log once one does." }
                pre #log.log data-follow=(format!("{base}/events?from=0:0:1")) {}
            }
        }
    }
}

/// What the page shows of a log.
pub(crate) struct Shown {
    total: u64,
    head: String,
    /// Bytes between head and tail, not on the page.
    omitted: u64,
    tail: String,
    /// Where the live stream goes on: past the last whole line shown.
    resume_offset: u64,
    resume_line: u64,
}

async fn read_all(
    leader: &LeaderCtx,
    id: &AttemptId,
    from: u64,
    to: u64,
) -> Result<Vec<u8>, crate::logs::LogError> {
    let mut out = Vec::with_capacity((to - from) as usize);
    let mut at = from;
    while at < to {
        let want = ((to - at) as usize).min(CHUNK);
        let data = leader.logs.read(id, at, want).await?;
        if data.is_empty() {
            break;
        }
        at += data.len() as u64;
        out.extend_from_slice(&data);
    }
    Ok(out)
}

/// Newlines in `[from, to)`, read a chunk at a time.
async fn count_lines(
    leader: &LeaderCtx,
    id: &AttemptId,
    from: u64,
    to: u64,
) -> Result<u64, crate::logs::LogError> {
    let (mut at, mut lines) = (from, 0u64);
    while at < to {
        let data = leader
            .logs
            .read(id, at, ((to - at) as usize).min(CHUNK))
            .await?;
        if data.is_empty() {
            break;
        }
        at += data.len() as u64;
        lines += data.iter().filter(|&&b| b == b'\n').count() as u64;
    }
    Ok(lines)
}

/// Newlines before the tail of ended attempts' logs, counted once: a page
/// of a 100 MB log would otherwise read all of it on every view.
#[derive(Default)]
pub(crate) struct LineCounts(std::sync::Mutex<std::collections::HashMap<(String, u64), u64>>);

impl LineCounts {
    /// At most this many logs' counts are kept (then all are forgotten).
    const MAX: usize = 1024;

    fn get(&self, key: &(String, u64)) -> Option<u64> {
        self.0.lock().ok()?.get(key).copied()
    }

    fn put(&self, key: (String, u64), lines: u64) {
        if let Ok(mut map) = self.0.lock() {
            if map.len() >= Self::MAX {
                map.clear();
            }
            map.insert(key, lines);
        }
    }
}

async fn shown_log(
    leader: &LeaderCtx,
    a: &Attempt,
    counts: &LineCounts,
) -> Result<Shown, crate::logs::LogError> {
    let id = AttemptId::from_string(a.id.clone());
    let total = leader.logs.len(&id).await?;
    // A running attempt's last line may be incomplete: the stream sends it.
    let end = if finished(a) {
        total
    } else {
        let last = read_all(leader, &id, total.saturating_sub(HALF_PAGE), total).await?;
        total
            - last
                .iter()
                .rev()
                .position(|&b| b == b'\n')
                .map_or(last.len(), |i| i) as u64
    };
    let head = read_all(leader, &id, 0, end.min(HALF_PAGE)).await?;
    let head_end = cut_after_lines(&head, PAGE_LINES);
    let tail_from = end.saturating_sub(HALF_PAGE);
    let tail = read_all(leader, &id, tail_from, end).await?;
    let tail_skip = keep_last_lines(&tail, PAGE_LINES, tail_from > 0);
    let tail_start = tail_from + tail_skip as u64;
    if tail_start <= head_end as u64 {
        // Head and tail meet: the whole log fits on the page.
        let bytes = read_all(leader, &id, 0, end).await?;
        let (html, lines) = render_lines(&bytes, 1);
        return Ok(Shown {
            total,
            head: html,
            omitted: 0,
            tail: String::new(),
            resume_offset: end,
            resume_line: 1 + lines,
        });
    }
    let (head_html, _) = render_lines(&head[..head_end], 1);
    let key = (a.id.clone(), tail_start);
    let cached = finished(a).then(|| counts.get(&key)).flatten();
    let before_tail = match cached {
        Some(n) => n,
        None => {
            let n = count_lines(leader, &id, 0, tail_start).await?;
            if finished(a) {
                counts.put(key, n);
            }
            n
        }
    };
    let first_tail_line = 1 + before_tail;
    let (tail_html, tail_lines) = render_lines(&tail[tail_skip..], first_tail_line);
    Ok(Shown {
        total,
        head: head_html,
        omitted: tail_start - head_end as u64,
        tail: tail_html,
        resume_offset: end,
        resume_line: first_tail_line + tail_lines,
    })
}

/// The length of the first `max` lines of `bytes` (a last line without its
/// newline counts only if it is all there is).
fn cut_after_lines(bytes: &[u8], max: usize) -> usize {
    let mut seen = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            seen += 1;
            if seen == max {
                return i + 1;
            }
        }
    }
    if seen == 0 {
        return bytes.len();
    }
    bytes
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(bytes.len(), |i| i + 1)
}

/// Where the last `max` lines of `bytes` start; `partial_first`: `bytes`
/// starts inside a line, which is not shown.
fn keep_last_lines(bytes: &[u8], max: usize, partial_first: bool) -> usize {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut seen = 0;
    for (i, &b) in body.iter().enumerate().rev() {
        if b == b'\n' {
            seen += 1;
            if seen == max {
                return i + 1;
            }
        }
    }
    if partial_first {
        bytes
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |i| i + 1)
    } else {
        0
    }
}

/// Log bytes as numbered, linkable lines with ANSI colours as spans; the
/// number of lines. A carriage return shows what a terminal would: the text
/// after the last one.
pub(crate) fn render_lines(bytes: &[u8], first: u64) -> (String, u64) {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len() + text.len() / 2);
    let mut n = first;
    for line in text.split_inclusive('\n') {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = line.rsplit('\r').next().unwrap_or(line);
        let html = ansi_to_html::convert(line).unwrap_or_else(|_| escape(line));
        out.push_str(&format!(
            "<span class=\"l\" id=\"L{n}\"><a class=\"n\" href=\"#L{n}\">{n}</a>{html}\n</span>"
        ));
        n += 1;
    }
    (out, n - first)
}

fn escape(s: &str) -> String {
    maud::html! { (s) }.into_string()
}

pub(crate) async fn raw(
    State(dash): State<Dash>,
    viewer: Viewer,
    headers: HeaderMap,
    Path((id, task)): Path<(String, String)>,
    Query(q): Query<AttemptQuery>,
) -> Response {
    let json = super::wants_json(&headers);
    let (at, leader) = match open(&dash, &viewer, &id, &task, q.attempt, json).await {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    let Some(attempt) = at.attempt else {
        return (StatusCode::NOT_FOUND, "no attempt has started yet\n").into_response();
    };
    let log_id = AttemptId::from_string(attempt.id.clone());
    // A chunk at a time: memory stays at one chunk whatever the log's size.
    let body = futures::stream::unfold((leader, log_id, 0u64), |(leader, id, at)| async move {
        match leader.logs.read(&id, at, CHUNK).await {
            Ok(data) if data.is_empty() => None,
            Ok(data) => {
                let next = at + data.len() as u64;
                Some((Ok::<_, std::io::Error>(data), (leader, id, next)))
            }
            Err(e) => Some((
                Err(std::io::Error::other(e.to_string())),
                (leader, id, u64::MAX),
            )),
        }
    });
    let name = format!(
        "{}-{}-{}.log",
        at.run.id,
        sanitize(&at.task.name),
        attempt.number
    );
    (
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// A task name as a file name.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_escaped_and_coloured() {
        let (html, n) = render_lines(b"plain\n\x1b[31mred <b>\x1b[0m\nbar 10%\rbar 100%\n", 7);
        assert_eq!(n, 3);
        assert!(html.contains("id=\"L7\""), "{html}");
        assert!(html.contains("href=\"#L9\""), "{html}");
        assert!(
            html.contains("&lt;b&gt;") && !html.contains("<b>"),
            "{html}"
        );
        assert!(html.contains("color:") || html.contains("class="), "{html}");
        assert!(
            html.contains("bar 100%") && !html.contains("bar 10%<"),
            "{html}"
        );
        assert!(!html.contains('\r'));
    }

    #[test]
    fn head_and_tail_are_cut_at_whole_lines() {
        let text = b"1\n2\n3\n4\n5\n";
        assert_eq!(cut_after_lines(text, 2), 4);
        assert_eq!(cut_after_lines(text, 9), text.len());
        assert_eq!(cut_after_lines(b"no newline", 2), 10);
        assert_eq!(&text[keep_last_lines(text, 2, false)..], b"4\n5\n");
        assert_eq!(keep_last_lines(text, 9, false), 0);
        let partial = b"ial\n4\n5\n";
        assert_eq!(&partial[keep_last_lines(partial, 9, true)..], b"4\n5\n");
    }

    #[test]
    fn a_last_line_without_newline_is_a_line() {
        let (html, n) = render_lines(b"a\nb", 1);
        assert_eq!(n, 2);
        assert!(html.contains("id=\"L2\""));
    }
}
