//! The page frame (head, navigation, who is logged in) and the small pieces
//! every page uses: state badges, times, durations, POST buttons.

use super::Viewer;
use axum::http::StatusCode;
use capstan_proto::render::{format_duration_ms, format_time};
use maud::{DOCTYPE, Markup, html};

/// A whole page: `title`, the navigation with `here` marked, the body.
pub(crate) fn page(title: &str, here: &str, viewer: Option<&Viewer>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Capstan" }
                link rel="stylesheet" href="/assets/dashboard.css";
                script src="/assets/dashboard.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "Capstan" }
                    nav {
                        @for (href, label) in [("/", "Runs"), ("/runners", "Runners"), ("/cluster", "Cluster")] {
                            a href=(href) class=(if label == here { "here" } else { "" }) { (label) }
                        }
                    }
                    @if let Some(v) = viewer {
                        form.who method="post" action="/logout" {
                            span { (v.caller.name) " (" (v.caller.scope.as_str()) ")" }
                            input type="hidden" name="csrf" value=(v.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A refusal or failure, said plainly; a follower's names the leader.
pub(crate) fn error_page(code: StatusCode, message: &str, leader: Option<&str>) -> Markup {
    let body = html! {
        h1 { (code.as_u16()) " " (code.canonical_reason().unwrap_or("")) }
        p.error { (message) }
        @if let Some(leader) = leader {
            p {
                "This coordinator is a follower; the leader serves the dashboard. Its API is at "
                code { (leader) } "; open the dashboard on that host's HTTP port."
            }
        }
        p { a href="/" { "Back to the runs" } }
    };
    page("Error", "", None, body)
}

pub(crate) fn login_page(next: &str, nonce: &str, why: Option<&str>) -> Markup {
    let body = html! {
        h1 { "Log in" }
        @if let Some(why) = why { p.error #why { (why) } }
        form.login method="post" action="/login" {
            label for="token" { "API token" }
            input #token type="password" name="token" autocomplete="off" required
                placeholder="capstan_...";
            input type="hidden" name="nonce" value=(nonce);
            input type="hidden" name="next" value=(next);
            button #login type="submit" { "Log in" }
        }
        p.hint {
            "The same token the CLI uses (" code { "capstan token create" } "); "
            "read scope to look, submit to cancel your runs, admin to drain runners."
        }
    };
    page("Log in", "", None, body)
}

/// A state as a coloured badge (`class="state running"`).
pub(crate) fn badge(state: &str) -> Markup {
    html! { span class=(format!("state {state}")) data-state=(state) { (state) } }
}

/// `2025-01-02T03:04:05Z`, or a dash.
pub(crate) fn time(ms: i64) -> Markup {
    html! {
        @if ms > 0 { time datetime=(format_time(ms)) { (format_time(ms)) } } @else { "–" }
    }
}

/// How long from `start` to `end`. Still running (`end` 0): the start
/// time, which the browser turns into a ticking duration (`data-since`).
/// Nothing here depends on the clock, so a live refresh of an unchanged
/// page renders the same bytes and sends nothing.
pub(crate) fn duration(start: i64, end: i64) -> Markup {
    html! {
        @if start <= 0 { "–" }
        @else if end >= start { span.dur { (format_duration_ms(end - start)) } }
        @else { span.dur data-since=(start) { "since " (clock(start)) } }
    }
}

/// `HH:MM:SSZ` of a time.
pub(crate) fn clock(ms: i64) -> String {
    let t = format_time(ms);
    t.get(11..).unwrap_or(&t).to_string()
}

/// A button that POSTs to `action` with the session's CSRF token.
pub(crate) fn post_button(viewer: &Viewer, action: &str, label: &str, id: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            input type="hidden" name="csrf" value=(viewer.csrf);
            button type="submit" id=(id) { (label) }
        }
    }
}
