//! `/`: the runs, newest first, filtered and paged as `capstan runs` is
//! (the same `ListRuns` call).

use super::client::Api;
use super::{Dash, Viewer, answer, layout, refusal};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use capstan_proto::api::v1::{ListRunsRequest, ListRunsResponse, Run};
use capstan_proto::pipeline::v1::RunState;
use capstan_proto::render::{run_json, task_state_name};
use maud::{Markup, html};
use serde::Deserialize;
use std::collections::BTreeMap;

/// The filters of the page, as its query string carries them.
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct RunsQuery {
    #[serde(default)]
    pub(crate) state: String,
    #[serde(default)]
    pub(crate) pipeline: String,
    #[serde(default)]
    pub(crate) submitter: String,
    #[serde(default)]
    pub(crate) cursor: String,
    pub(crate) limit: Option<u32>,
}

const STATES: [&str; 5] = ["queued", "running", "succeeded", "failed", "cancelled"];

impl RunsQuery {
    pub(crate) fn request(&self) -> Result<ListRunsRequest, tonic::Status> {
        let state = match self.state.as_str() {
            "" => RunState::Unspecified,
            s => RunState::from_str_name(&format!("RUN_STATE_{}", s.to_uppercase())).ok_or_else(
                || {
                    tonic::Status::invalid_argument(format!(
                        "state `{s}` is not one of {}",
                        STATES.join(", ")
                    ))
                },
            )?,
        };
        Ok(ListRunsRequest {
            limit: self.limit.unwrap_or(50),
            cursor: self.cursor.clone(),
            state: state as i32,
            pipeline: self.pipeline.trim().to_string(),
            submitted_by: self.submitter.trim().to_string(),
            ..Default::default()
        })
    }

    /// The query string of these filters (no cursor: page one).
    pub(crate) fn filters(&self) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("state", &self.state),
            ("pipeline", &self.pipeline),
            ("submitter", &self.submitter),
        ] {
            if !v.is_empty() {
                q.append_pair(k, v);
            }
        }
        if let Some(limit) = self.limit {
            q.append_pair("limit", &limit.to_string());
        }
        q.finish()
    }
}

pub(crate) async fn page(
    State(dash): State<Dash>,
    viewer: Viewer,
    headers: HeaderMap,
    Query(q): Query<RunsQuery>,
) -> Response {
    let json = super::wants_json(&headers);
    let listed = match q.request() {
        Ok(req) => Api::new(&dash.shared, &viewer.caller).runs(req).await,
        Err(e) => Err(e),
    };
    let list = match listed {
        Ok(list) => list,
        Err(status) => return refusal(&status, json),
    };
    let value = serde_json::json!({
        "runs": list.runs.iter().map(run_json).collect::<Vec<_>>(),
        "next": (!list.next_cursor.is_empty()).then_some(&list.next_cursor),
    });
    let body = html! {
        h1 { "Runs" }
        (filter_form(&q))
        div #live data-live=(format!("/events?{}", live_query(&q))) { (table(&list, &q)) }
    };
    answer(
        json,
        value,
        layout::page("Runs", "Runs", Some(&viewer), body),
    )
}

/// The live refresh keeps the page the viewer is on (its cursor too).
fn live_query(q: &RunsQuery) -> String {
    let mut s = q.filters();
    if !q.cursor.is_empty() {
        let mut c = url::form_urlencoded::Serializer::new(String::new());
        c.append_pair("cursor", &q.cursor);
        if !s.is_empty() {
            s.push('&');
        }
        s.push_str(&c.finish());
    }
    s
}

fn filter_form(q: &RunsQuery) -> Markup {
    html! {
        form.filters method="get" action="/" {
            label { "State "
                select name="state" {
                    option value="" selected[q.state.is_empty()] { "any" }
                    @for s in STATES { option value=(s) selected[q.state == s] { (s) } }
                }
            }
            label { "Pipeline " input name="pipeline" value=(q.pipeline); }
            label { "Submitted by " input name="submitter" value=(q.submitter); }
            button type="submit" { "Filter" }
            @if !q.filters().is_empty() { a href="/" { "clear" } }
        }
    }
}

/// The table and the paging links: the part the live refresh replaces.
pub(crate) fn table(list: &ListRunsResponse, q: &RunsQuery) -> Markup {
    html! {
        @if list.runs.is_empty() {
            p.empty { "No runs match." }
        } @else {
            table.runs {
                thead { tr {
                    th { "Run" } th { "Pipeline" } th { "State" } th { "Tasks" }
                    th { "Duration" } th { "Submitted by" } th { "Commit" } th { "Created" }
                } }
                tbody {
                    @for run in &list.runs { (row(run)) }
                }
            }
        }
        p.paging {
            @if !q.cursor.is_empty() { a href=(format!("/?{}", q.filters())) { "« Newest" } " " }
            @if !list.next_cursor.is_empty() {
                @let mut next = url::form_urlencoded::Serializer::new(q.filters());
                a #next href=(format!("/?{}", next.append_pair("cursor", &list.next_cursor).finish())) { "Older »" }
            }
        }
    }
}

fn row(run: &Run) -> Markup {
    let state = capstan_proto::render::run_state_name(run.state);
    html! {
        tr data-run=(run.id) {
            td { a href=(format!("/runs/{}", run.id)) { code { (run.id) } } }
            td { (run.pipeline) }
            td { (layout::badge(state)) }
            td.counts { (task_counts(run)) }
            td { (layout::duration(run.created_at_ms, run.finished_at_ms)) }
            td { (dash(&run.submitted_by)) }
            td { code title=(run.rev) { (short(&run.rev)) } }
            td { (layout::time(run.created_at_ms)) }
        }
    }
}

/// "3 succeeded, 1 running".
fn task_counts(run: &Run) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &run.tasks {
        *counts.entry(task_state_name(t.state)).or_default() += 1;
    }
    counts
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn dash(s: &str) -> &str {
    if s.is_empty() { "–" } else { s }
}

/// The first 10 characters of a commit (a rev may be any text a user gave).
fn short(rev: &str) -> String {
    if rev.is_empty() {
        "–".to_string()
    } else {
        rev.chars().take(10).collect()
    }
}
