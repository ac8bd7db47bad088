//! `/runners` (name, labels, identity, slots, last heartbeat, drain state;
//! drain and resume for admin tokens) and `/cluster` (replicas, leader,
//! epoch).

use super::client::Api;
use super::session::CsrfForm;
use super::{Dash, Viewer, answer, layout, refusal};
use crate::tokens::Scope;
use axum::extract::{Form, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use capstan_proto::api::v1::Runner;
use capstan_proto::cluster::v1::{AskLeaderResponse, ListMembersResponse};
use capstan_proto::render::{cluster_json, runner_json};
use maud::{Markup, html};

pub(crate) async fn runners(
    State(dash): State<Dash>,
    viewer: Viewer,
    headers: HeaderMap,
) -> Response {
    let json = super::wants_json(&headers);
    let list = match Api::new(&dash.shared, &viewer.caller).runners().await {
        Ok(list) => list,
        Err(status) => return refusal(&status, json),
    };
    let value = serde_json::json!(list.iter().map(runner_json).collect::<Vec<_>>());
    let body = html! {
        h1 { "Runners" }
        div #live data-live="/runners/events" { (runners_table(&list, &viewer)) }
    };
    answer(
        json,
        value,
        layout::page("Runners", "Runners", Some(&viewer), body),
    )
}

/// The table: what the live refresh replaces.
pub(crate) fn runners_table(list: &[Runner], viewer: &Viewer) -> Markup {
    let admin = viewer.may(Scope::Admin);
    html! {
        @if list.is_empty() { p.empty { "No runner has registered." } }
        @else {
            table.runners {
                thead { tr {
                    th { "Name" } th { "Labels" } th { "Identity" } th { "Slots used" }
                    th { "Slots free" } th { "Connected" } th { "Last heartbeat" } th { "Drain" }
                    @if admin { th {} }
                } }
                tbody {
                    @for r in list {
                        tr data-runner=(r.name) {
                            td { (r.name) }
                            td.labels { @for (k, v) in sorted(r) { code { (k) "=" (v) } " " } }
                            td { (if r.tls_identity.is_empty() { "–" } else { &r.tls_identity }) }
                            td.busy { (r.busy) }
                            td { (r.capacity.saturating_sub(r.busy)) }
                            td { (if r.connected { "yes" } else { "no" }) }
                            td { @if r.last_seen_ms > 0 { (layout::clock(r.last_seen_ms)) } @else { "–" } }
                            td.drain { (if r.draining { "draining" } else { "–" }) }
                            @if admin {
                                td {
                                    @let name = super::dag::url_path(&r.name);
                                    @if r.draining {
                                        (layout::post_button(viewer, &format!("/runners/{name}/resume"), "Resume", &format!("resume-{}", r.name)))
                                    } @else {
                                        (layout::post_button(viewer, &format!("/runners/{name}/drain"), "Drain", &format!("drain-{}", r.name)))
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn sorted(r: &Runner) -> Vec<(&String, &String)> {
    let mut labels: Vec<_> = r.labels.iter().collect();
    labels.sort();
    labels
}

pub(crate) async fn drain(
    State(dash): State<Dash>,
    viewer: Viewer,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    set_draining(&dash, &viewer, &headers, &name, &form, true).await
}

pub(crate) async fn resume(
    State(dash): State<Dash>,
    viewer: Viewer,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    set_draining(&dash, &viewer, &headers, &name, &form, false).await
}

/// Drains (`drain`) or resumes the runner `name`, then back to the list.
async fn set_draining(
    dash: &Dash,
    viewer: &Viewer,
    headers: &HeaderMap,
    name: &str,
    form: &CsrfForm,
    drain: bool,
) -> Response {
    if let Some(refused) = viewer.csrf_refusal(&form.csrf) {
        return refused;
    }
    let api = Api::new(&dash.shared, &viewer.caller);
    let done = if drain {
        api.drain(name).await
    } else {
        api.resume(name).await
    };
    match done {
        Ok(()) => Redirect::to("/runners").into_response(),
        Err(status) => refusal(&status, super::wants_json(headers)),
    }
}

pub(crate) async fn cluster(
    State(dash): State<Dash>,
    viewer: Viewer,
    headers: HeaderMap,
) -> Response {
    let json = super::wants_json(&headers);
    let (leader, members) = match Api::new(&dash.shared, &viewer.caller).cluster().await {
        Ok(c) => c,
        Err(status) => return refusal(&status, json),
    };
    let body = html! {
        h1 { "Cluster" }
        div #live data-live="/cluster/events" { (cluster_body(&leader, &members)) }
    };
    answer(
        json,
        cluster_json(&leader, &members),
        layout::page("Cluster", "Cluster", Some(&viewer), body),
    )
}

pub(crate) fn cluster_body(leader: &AskLeaderResponse, members: &ListMembersResponse) -> Markup {
    html! {
        dl.facts {
            dt { "Leader" } dd #leader { (if leader.leader.is_empty() { "none elected" } else { &leader.leader }) }
            dt { "Epoch" } dd #epoch { (leader.epoch) }
            dt { "This replica" } dd { (if leader.is_leader { "leader" } else { "follower" }) }
        }
        table.members {
            thead { tr { th { "Replica" } th { "Role" } } }
            tbody {
                @for m in &members.members {
                    tr { td { code { (m.endpoint) } } td { (if m.is_leader { "leader" } else { "follower" }) } }
                }
            }
        }
    }
}
