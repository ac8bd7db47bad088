//! The log page's live lines: Server-Sent Events of whole lines, rendered
//! as the page renders them. Each event's id is `ATTEMPT:OFFSET:LINE`, the
//! byte after the last line sent and the next line's number, so a browser
//! that reconnects (it sends `Last-Event-ID`) goes on exactly there, on this
//! replica or the next leader. Events: `lines` (HTML), `attempt` (a newer
//! attempt started: the page reloads onto it), `end` (the attempt ended and
//! all of its log was sent).

use super::client::Api;
use super::log::{finished, locate, render_lines};
use super::{Dash, Viewer, refusal};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use capstan_proto::ids::AttemptId;
use serde::Deserialize;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// One read of the store; a line longer than this is sent in pieces.
const CHUNK: usize = 256 * 1024;
/// Log bytes in one `lines` event, at most.
const EVENT_BYTES: usize = 16 * 1024;
/// How often the task's attempts are looked at again (a new attempt, the end).
const RECHECK: Duration = Duration::from_millis(300);

#[derive(Deserialize)]
pub(crate) struct From {
    from: Option<String>,
}

/// Where to go on: attempt number (0: the first one, once it starts),
/// byte offset, next line number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    attempt: u32,
    offset: u64,
    line: u64,
}

impl Position {
    pub(crate) fn parse(s: &str) -> Option<Position> {
        let mut it = s.split(':');
        let p = Position {
            attempt: it.next()?.parse().ok()?,
            offset: it.next()?.parse().ok()?,
            line: it.next()?.parse().ok()?,
        };
        (it.next().is_none() && p.line >= 1).then_some(p)
    }

    fn id(&self) -> String {
        format!("{}:{}:{}", self.attempt, self.offset, self.line)
    }
}

pub(crate) async fn events(
    State(dash): State<Dash>,
    viewer: Viewer,
    headers: HeaderMap,
    Path((id, task)): Path<(String, String)>,
    Query(q): Query<From>,
) -> Response {
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let from = last
        .or(q.from)
        .as_deref()
        .and_then(Position::parse)
        .unwrap_or(Position {
            attempt: 0,
            offset: 0,
            line: 1,
        });
    // Refuse an unknown run or task before the stream starts.
    if let Err(status) = locate(&Api::new(&dash.shared, &viewer.caller), &id, &task, None).await {
        return refusal(&status, false);
    }
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        if let Err(message) = follow(&dash, &viewer, &id, &task, from, &tx).await {
            let _ = tx
                .send(Ok(Event::default().event("failed").data(message)))
                .await;
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

type Tx = mpsc::Sender<Result<Event, Infallible>>;

async fn follow(
    dash: &Dash,
    viewer: &Viewer,
    id: &str,
    task: &str,
    mut at: Position,
    tx: &Tx,
) -> Result<(), String> {
    let api = Api::new(&dash.shared, &viewer.caller);
    let leader = dash
        .shared
        .leader()
        .await
        .map_err(|s| s.message().to_string())?;
    let mut feed = dash.shared.feed.subscribe();
    feed.borrow_and_update();
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Vec<u8> = Vec::new();
    let (mut refresh, mut attempt, mut newest) = (true, None, 0);
    loop {
        // The attempts change with task state only: looked at on the timer,
        // not on every append (the feed moves for every log of every run).
        if refresh {
            let located = locate(&api, id, task, None)
                .await
                .map_err(|s| s.message().to_string())?;
            let history = located.task.history;
            if at.attempt == 0 {
                at.attempt = history.first().map_or(0, |a| a.number);
            }
            newest = history.iter().map(|a| a.number).max().unwrap_or(0);
            let ended = capstan_proto::render::task_finished(located.task.state);
            if at.attempt > newest && (ended || newest > 0) {
                // Skipped or cancelled before any attempt; or an attempt
                // this task never had: nothing will ever come.
                return if at.attempt == 0 {
                    let _ = tx.send(Ok(Event::default().event("end").data("end"))).await;
                    Ok(())
                } else {
                    Err(format!("task `{task}` has no attempt {}", at.attempt))
                };
            }
            attempt = history.into_iter().find(|a| a.number == at.attempt);
        }
        if let Some(a) = &attempt {
            // As of the last look: a finished attempt's log is complete then.
            let done = finished(a);
            let log = AttemptId::from_string(a.id.clone());
            if !send_new(&leader, &log, tx, &mut at, &mut pending).await? {
                return Ok(());
            }
            if done {
                let n = pending.len();
                if n > 0 && !send(tx, &mut at, &mut pending, n).await {
                    return Ok(());
                }
                let event = if newest > at.attempt {
                    Event::default().event("attempt").data(newest.to_string())
                } else {
                    Event::default().event("end").data("end")
                };
                let _ = tx.send(Ok(event.id(at.id()))).await;
                return Ok(());
            }
        }
        tokio::select! {
            _ = feed.changed() => refresh = false,
            _ = recheck.tick() => refresh = true,
            _ = tx.closed() => return Ok(()),
            _ = leader.token.cancelled() => return Err(
                "this coordinator is no longer the leader: reload the page at the leader".into(),
            ),
        }
    }
}

/// Sends the whole lines the log has past `at`; false once the browser left.
async fn send_new(
    leader: &crate::api::LeaderCtx,
    log: &AttemptId,
    tx: &Tx,
    at: &mut Position,
    pending: &mut Vec<u8>,
) -> Result<bool, String> {
    loop {
        let data = leader
            .logs
            .read(log, at.offset + pending.len() as u64, CHUNK)
            .await
            .map_err(|e| e.to_string())?;
        if data.is_empty() {
            return Ok(true);
        }
        pending.extend_from_slice(&data);
        let whole = match pending.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            // A line longer than a chunk goes in pieces (each numbered as
            // a line), cut between characters.
            None if pending.len() >= CHUNK => match std::str::from_utf8(pending) {
                Ok(_) => pending.len(),
                Err(e) => e.valid_up_to().max(1),
            },
            None => continue,
        };
        if !send(tx, at, pending, whole).await {
            return Ok(false);
        }
    }
}

/// Sends the first `n` pending bytes as lines, in events of at most
/// [`EVENT_BYTES`] of log each (a short line is ~70 bytes of markup: a
/// backlog of newlines must not become one huge event); false once the
/// browser left.
async fn send(tx: &Tx, at: &mut Position, pending: &mut Vec<u8>, n: usize) -> bool {
    let mut sent = 0;
    while sent < n {
        let rest = &pending[sent..n];
        let cut = if rest.len() <= EVENT_BYTES {
            rest.len()
        } else {
            // Whole lines: the last newline within the bound, else the end
            // of the one long line that crosses it.
            match rest[..EVENT_BYTES].iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(rest.len(), |i| i + 1),
            }
        };
        let (html, lines) = render_lines(&rest[..cut], at.line);
        at.offset += cut as u64;
        at.line += lines;
        sent += cut;
        let event = Event::default().event("lines").id(at.id()).data(html);
        if tx.send(Ok(event)).await.is_err() {
            return false;
        }
    }
    pending.drain(..n);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_bad_ones_are_refused() {
        let p = Position::parse("2:1024:17").unwrap();
        assert_eq!((p.attempt, p.offset, p.line), (2, 1024, 17));
        assert_eq!(Position::parse(&p.id()), Some(p));
        for bad in ["", "1:2", "1:2:0", "a:1:1", "1:2:3:4", "-1:0:1"] {
            assert_eq!(Position::parse(bad), None, "{bad}");
        }
    }
}
