//! `/runs/{id}`: one run: its DAG, each task's attempts (runner, exit code,
//! infrastructure or script failure, timings), a cancel button for tokens
//! that may cancel it.

use super::client::Api;
use super::session::CsrfForm;
use super::{Dash, Viewer, answer, dag, layout, refusal};
use crate::tokens::Scope;
use axum::extract::{Form, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use capstan_proto::api::v1::{Run, Task};
use capstan_proto::render::{
    failure_class, run_finished, run_json, run_state_name, task_state_name,
};
use maud::{Markup, html};

pub(crate) async fn page(
    State(dash): State<Dash>,
    viewer: Viewer,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let json = super::wants_json(&headers);
    let run = match Api::new(&dash.shared, &viewer.caller).run(&id).await {
        Ok(run) => run,
        Err(status) => return refusal(&status, json),
    };
    let body = html! {
        h1 { "Run " code { (run.id) } }
        div #live data-live=(format!("/runs/{}/events", run.id)) { (body(&run, &viewer)) }
    };
    let title = format!("Run {}", run.id);
    answer(
        json,
        run_json(&run),
        layout::page(&title, "Runs", Some(&viewer), body),
    )
}

/// Everything below the title: what the live refresh replaces.
pub(crate) fn body(run: &Run, viewer: &Viewer) -> Markup {
    let may_cancel = viewer.may(Scope::Admin)
        || (viewer.may(Scope::Submit) && run.submitted_by == viewer.caller.name);
    html! {
        dl.facts {
            dt { "State" } dd #run-state { (layout::badge(run_state_name(run.state))) }
            dt { "Pipeline" } dd { (run.pipeline) }
            dt { "Submitted by" } dd { (or_dash(&run.submitted_by)) }
            dt { "Repository" } dd { (or_dash(&run.repo)) }
            dt { "Commit" } dd { code { (or_dash(&run.rev)) } }
            dt { "Created" } dd { (layout::time(run.created_at_ms)) }
            dt { "Duration" } dd { (layout::duration(run.created_at_ms, run.finished_at_ms)) }
        }
        @if may_cancel && !run_finished(run.state) {
            (layout::post_button(viewer, &format!("/runs/{}/cancel", run.id), "Cancel run", "cancel"))
        }
        @for task in run.tasks.iter().filter(|t| at_gate(t)) {
            (gate(run, task, viewer))
        }
        div.graph { (dag::svg(run)) }
        table.tasks {
            thead { tr {
                th { "Task" } th { "State" } th { "Attempt" } th { "Runner" } th { "Exit" }
                th { "Failure" } th { "Started" } th { "Duration" } th { "Message" }
            } }
            tbody { @for task in &run.tasks { (task_rows(run, task)) } }
        }
    }
}

/// The task waits at its approval gate.
fn at_gate(task: &Task) -> bool {
    task.approval
        .as_ref()
        .is_some_and(|a| a.asked_at_ms > 0 && !a.decided)
}

/// A gate's prompt and, for a viewer whose scope it accepts, the approve
/// and reject buttons (the scheduler checks the scope again).
fn gate(run: &Run, task: &Task, viewer: &Viewer) -> Markup {
    let Some(a) = &task.approval else {
        return html! {};
    };
    let may =
        a.by.iter()
            .filter_map(|s| Scope::parse(s).ok())
            .any(|s| viewer.may(s));
    let base = format!("/runs/{}/tasks/{}", run.id, dag::url_path(&task.name));
    html! {
        div.gate data-task=(task.name) {
            p { strong { (task.name) } " waits for approval: " span.prompt { (a.prompt) } }
            @if may {
                form.inline method="post" action=(format!("{base}/approve")) {
                    input type="hidden" name="csrf" value=(viewer.csrf);
                    input type="text" name="reason" placeholder="reason (optional)" maxlength="500";
                    button type="submit" id=(format!("approve-{}", task.name)) { "Approve" }
                }
                " "
                form.inline method="post" action=(format!("{base}/reject")) {
                    input type="hidden" name="csrf" value=(viewer.csrf);
                    input type="hidden" name="reason" value="rejected in the dashboard";
                    button type="submit" id=(format!("reject-{}", task.name)) { "Reject" }
                }
            } @else {
                span.hint { " (a token with scope " (a.by.join(" or ")) " may decide)" }
            }
        }
    }
}

/// The task's row, then one row per earlier attempt (newest first).
fn task_rows(run: &Run, task: &Task) -> Markup {
    let state = task_state_name(task.state);
    let href = format!("/runs/{}/tasks/{}", run.id, dag::url_path(&task.name));
    let last = task.history.last();
    html! {
        tr.task data-task=(task.name) {
            td { a href=(href) { (task.name) } }
            td { (layout::badge(state)) }
            td { (last.map_or(0, |a| a.number)) }
            td { (or_dash(&task.runner)) }
            td { (task.exit_code.map_or("–".to_string(), |c| c.to_string())) }
            td { (last.and_then(failure_class).unwrap_or("–")) }
            td { (layout::time(task.started_at_ms)) }
            td { (layout::duration(task.started_at_ms, task.finished_at_ms)) }
            td.msg { (task.message) }
        }
        @for a in task.history.iter().rev().skip(1) {
            tr.attempt {
                td { a href=(format!("{href}?attempt={}", a.number)) { "earlier attempt" } }
                td { (layout::badge(&a.state)) }
                td { (a.number) }
                td { (or_dash(&a.runner)) }
                td { "–" }
                td { (failure_class(a).unwrap_or("–")) }
                td { (layout::time(a.started_at_ms.max(a.offered_at_ms))) }
                td { (layout::duration(a.started_at_ms.max(a.offered_at_ms), a.finished_at_ms)) }
                td {}
            }
        }
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "–" } else { s }
}

pub(crate) async fn cancel(
    State(dash): State<Dash>,
    viewer: Viewer,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = viewer.csrf_refusal(&form.csrf) {
        return refused;
    }
    match Api::new(&dash.shared, &viewer.caller).cancel(&id).await {
        Ok(run) => Redirect::to(&format!("/runs/{}", run.id)).into_response(),
        Err(status) => refusal(&status, super::wants_json(&headers)),
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct DecisionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

pub(crate) async fn approve(
    State(dash): State<Dash>,
    viewer: Viewer,
    headers: HeaderMap,
    Path((id, task)): Path<(String, String)>,
    Form(form): Form<DecisionForm>,
) -> Response {
    decide(dash, viewer, headers, id, task, form, true).await
}

pub(crate) async fn reject(
    State(dash): State<Dash>,
    viewer: Viewer,
    headers: HeaderMap,
    Path((id, task)): Path<(String, String)>,
    Form(form): Form<DecisionForm>,
) -> Response {
    decide(dash, viewer, headers, id, task, form, false).await
}

async fn decide(
    dash: Dash,
    viewer: Viewer,
    headers: HeaderMap,
    id: String,
    task: String,
    form: DecisionForm,
    approve: bool,
) -> Response {
    if let Some(refused) = viewer.csrf_refusal(&form.csrf) {
        return refused;
    }
    let api = Api::new(&dash.shared, &viewer.caller);
    match api.decide(&id, &task, approve, form.reason.trim()).await {
        Ok(run) => Redirect::to(&format!("/runs/{}", run.id)).into_response(),
        Err(status) => refusal(&status, super::wants_json(&headers)),
    }
}
