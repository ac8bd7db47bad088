//! The live part of every page: Server-Sent Events of the fragment the page
//! put in its `data-live` element, as HTML (`html` events; `end` once it
//! cannot change any more). A run's page follows `WatchRun` (an event per
//! change); the lists are rendered again every `POLL` and sent when they
//! differ, since no feed of every run's changes exists.

use super::client::Api;
use super::runs::RunsQuery;
use super::{Dash, Viewer, fleet, refusal, run, runs};
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use capstan_proto::render::run_finished;
use futures::StreamExt;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const POLL: Duration = Duration::from_secs(2);

type Tx = mpsc::Sender<Result<Event, Infallible>>;

fn stream(rx: mpsc::Receiver<Result<Event, Infallible>>) -> Response {
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn html(fragment: String) -> Result<Event, Infallible> {
    Ok(Event::default().event("html").data(fragment))
}

/// Renders every `POLL` and sends what changed, until the browser leaves or
/// a render fails (said in a `failed` event: the page stays as it was).
/// `render` may answer `None`: nothing changed since its last answer (it
/// compared the data, so it did not render).
fn poll<F, Fut>(mut render: F) -> Response
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<String>, tonic::Status>> + Send,
{
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = String::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tx.closed() => return,
            }
            match render().await {
                Ok(None) => {}
                Ok(Some(fragment)) if fragment == last => {}
                Ok(Some(fragment)) => {
                    if tx.send(html(fragment.clone())).await.is_err() {
                        return;
                    }
                    last = fragment;
                }
                Err(status) => return failed(&tx, &status).await,
            }
        }
    });
    stream(rx)
}

async fn failed(tx: &Tx, status: &tonic::Status) {
    let event = Event::default()
        .event("failed")
        .data(status.message().replace(['\r', '\n'], " "));
    let _ = tx.send(Ok(event)).await;
}

pub(crate) async fn runs(
    State(dash): State<Dash>,
    viewer: Viewer,
    Query(q): Query<RunsQuery>,
) -> Response {
    // The last page listed: an equal page (the usual idle case) is not
    // rendered again.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    poll(move || {
        let (dash, viewer, q, seen) = (dash.clone(), viewer.clone(), q.clone(), seen.clone());
        async move {
            let list = Api::new(&dash.shared, &viewer.caller)
                .runs(q.request()?)
                .await?;
            let mut last = seen.lock().unwrap_or_else(|p| p.into_inner());
            if last.as_ref() == Some(&list) {
                return Ok(None);
            }
            let fragment = runs::table(&list, &q).into_string();
            *last = Some(list);
            Ok(Some(fragment))
        }
    })
}

pub(crate) async fn runners(State(dash): State<Dash>, viewer: Viewer) -> Response {
    poll(move || {
        let (dash, viewer) = (dash.clone(), viewer.clone());
        async move {
            let list = Api::new(&dash.shared, &viewer.caller).runners().await?;
            Ok(Some(fleet::runners_table(&list, &viewer).into_string()))
        }
    })
}

pub(crate) async fn cluster(State(dash): State<Dash>, viewer: Viewer) -> Response {
    poll(move || {
        let (dash, viewer) = (dash.clone(), viewer.clone());
        async move {
            let (leader, members) = Api::new(&dash.shared, &viewer.caller).cluster().await?;
            Ok(Some(fleet::cluster_body(&leader, &members).into_string()))
        }
    })
}

/// The run's page body after every change, then `end` once it finished.
pub(crate) async fn run(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path(id): Path<String>,
) -> Response {
    let mut events = match Api::new(&dash.shared, &viewer.caller).watch(&id).await {
        Ok(events) => events,
        Err(status) => return refusal(&status, false),
    };
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = events.next() => next,
                _ = tx.closed() => return,
            };
            match next {
                Some(Ok(event)) => {
                    let Some(r) = event.run else { continue };
                    if tx
                        .send(html(run::body(&r, &viewer).into_string()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if run_finished(r.state) {
                        let _ = tx.send(Ok(Event::default().event("end").data("end"))).await;
                        return;
                    }
                }
                Some(Err(status)) => return failed(&tx, &status).await,
                // The leadership ended (this replica's watch stops with it).
                None => {
                    let status = tonic::Status::unavailable(
                        "this coordinator is no longer the leader: reload the page at the leader",
                    );
                    return failed(&tx, &status).await;
                }
            }
        }
    });
    stream(rx)
}
