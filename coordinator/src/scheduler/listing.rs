//! `ListRuns`: a page of runs, newest first (by submission order, `seq`),
//! that match a [`RunQuery`]'s filters, with the cursor of the next page.
//! The cursor is the `seq` of the last run listed, so a page never repeats
//! or skips a run however many are submitted between two pages (new runs
//! are newer than every cursor).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use capstan_proto::api::v1::ListRunsRequest;
use capstan_proto::pipeline::v1::RunState;

use super::history::keys::Summary;
use crate::model::{RunRecord, StoredRunState};
use capstan_proto::redact::redact_url;

/// The default page, and the largest.
pub(crate) const DEFAULT_LIMIT: usize = 50;
pub(crate) const MAX_LIMIT: usize = 1000;
/// The shortest commit prefix a filter takes.
const MIN_REV_PREFIX: usize = 4;

/// What `ListRuns` asks for, checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RunQuery {
    pub(crate) limit: usize,
    /// Only runs submitted before the run with this `seq`.
    pub(crate) before_seq: Option<u64>,
    pub(crate) state: Option<StoredRunState>,
    pub(crate) pipeline: Option<String>,
    pub(crate) submitted_by: Option<String>,
    pub(crate) repo: Option<String>,
    pub(crate) rev: Option<String>,
    pub(crate) created_after_ms: Option<i64>,
    pub(crate) created_before_ms: Option<i64>,
}

impl RunQuery {
    /// The query of a request; the error says what to fix.
    pub(crate) fn from_request(r: &ListRunsRequest) -> Result<Self, String> {
        let limit = match r.limit as usize {
            0 => DEFAULT_LIMIT,
            n if n > MAX_LIMIT => {
                return Err(format!(
                    "limit {n} is over {MAX_LIMIT}: ask for pages of at most {MAX_LIMIT} and follow next_cursor"
                ));
            }
            n => n,
        };
        let before_seq = match r.cursor.as_str() {
            "" => None,
            c => Some(parse_cursor(c).ok_or_else(|| {
                format!("cursor `{c}` is not one ListRuns gave: pass the next_cursor of the previous page")
            })?),
        };
        let state = match RunState::try_from(r.state) {
            Ok(RunState::Unspecified) => None,
            Ok(RunState::Queued) => Some(StoredRunState::Queued),
            Ok(RunState::Running) => Some(StoredRunState::Running),
            Ok(RunState::Succeeded) => Some(StoredRunState::Succeeded),
            Ok(RunState::Failed) => Some(StoredRunState::Failed),
            Ok(RunState::Cancelled) => Some(StoredRunState::Cancelled),
            Err(_) => return Err(format!("unknown run state {}", r.state)),
        };
        if !r.rev.is_empty() && r.rev.len() < MIN_REV_PREFIX {
            return Err(format!(
                "commit `{}` is too short a prefix: give at least {MIN_REV_PREFIX} characters",
                r.rev
            ));
        }
        let set = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Ok(Self {
            limit,
            before_seq,
            state,
            pipeline: set(&r.pipeline),
            submitted_by: set(&r.submitted_by),
            repo: set(&r.repo),
            rev: set(&r.rev),
            created_after_ms: (r.created_after_ms > 0).then_some(r.created_after_ms),
            created_before_ms: (r.created_before_ms > 0).then_some(r.created_before_ms),
        })
    }

    /// Does held run `r` match? Judged on its fields in place: the loop
    /// asks this of every run it holds, for every page.
    fn matches(&self, r: &RunRecord) -> bool {
        self.matches_fields(Fields {
            seq: r.seq,
            state: r.state,
            pipeline: &r.pipeline,
            submitted_by: &r.submitted_by,
            repo: &r.repo,
            rev: &r.rev,
            created_at_ms: r.created_at_ms,
        })
    }

    /// Does a finished run with this index summary match?
    pub(crate) fn matches_summary(&self, r: &Summary) -> bool {
        self.matches_fields(Fields {
            seq: r.seq,
            state: r.state,
            pipeline: &r.pipeline,
            submitted_by: &r.submitted_by,
            repo: &r.repo,
            rev: &r.rev,
            created_at_ms: r.created_at_ms,
        })
    }

    /// Repositories compare redacted (an index holds no password; a URL
    /// without one is not copied).
    fn matches_fields(&self, r: Fields<'_>) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        self.before_seq.is_none_or(|s| r.seq < s)
            && self.state.is_none_or(|s| r.state == s)
            && eq(&self.pipeline, r.pipeline)
            && eq(&self.submitted_by, r.submitted_by)
            && self
                .repo
                .as_deref()
                .is_none_or(|w| redact_url(w) == redact_url(r.repo))
            && self.rev.as_deref().is_none_or(|p| r.rev.starts_with(p))
            && self.created_after_ms.is_none_or(|t| r.created_at_ms >= t)
            && self.created_before_ms.is_none_or(|t| r.created_at_ms < t)
    }
}

/// What a filter reads of a run, held or summarized.
struct Fields<'a> {
    seq: u64,
    state: StoredRunState,
    pipeline: &'a str,
    submitted_by: &'a str,
    repo: &'a str,
    rev: &'a str,
    created_at_ms: i64,
}

/// The page of `q` out of the newest matches the loop holds (`live`) and
/// those of the history (`finished`), each newest first: newest first,
/// each run once (one that finished between the two reads is in both),
/// and the cursor of the next page.
pub(crate) fn merge(
    live: Vec<RunRecord>,
    finished: Vec<RunRecord>,
    finished_more: bool,
    q: &RunQuery,
) -> (Vec<RunRecord>, Option<String>) {
    let mut all: Vec<RunRecord> = finished;
    let held: std::collections::HashSet<_> = all.iter().map(|r| r.id.clone()).collect();
    all.extend(live.into_iter().filter(|r| !held.contains(&r.id)));
    all.sort_unstable_by_key(|r| Reverse(r.seq));
    // `finished_more`: the history had more matches than a page, though
    // some records went (retention) between its index and its reads.
    let more = all.len() > q.limit || finished_more;
    all.truncate(q.limit);
    let next = more.then(|| all.last().map(|r| cursor(r.seq))).flatten();
    (all, next)
}

/// The newest `q.limit + 1` runs of `runs` that match `q` (one more than a
/// page tells whether a next page exists), newest first.
pub(crate) fn newest<'a>(
    runs: impl Iterator<Item = &'a RunRecord>,
    q: &RunQuery,
) -> Vec<&'a RunRecord> {
    // Kept in a min-heap by `seq`: no sort of every run.
    let mut newest: BinaryHeap<Reverse<Newest<'a>>> = BinaryHeap::with_capacity(q.limit + 2);
    for r in runs.filter(|r| q.matches(r)) {
        newest.push(Reverse(Newest(r)));
        if newest.len() > q.limit + 1 {
            newest.pop();
        }
    }
    let mut found: Vec<&RunRecord> = newest.into_iter().map(|Reverse(Newest(r))| r).collect();
    found.sort_unstable_by_key(|r| Reverse(r.seq));
    found
}

/// A run ordered by its submission order alone.
struct Newest<'a>(&'a RunRecord);

impl PartialEq for Newest<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.seq == other.0.seq
    }
}
impl Eq for Newest<'_> {}
impl PartialOrd for Newest<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Newest<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.seq.cmp(&other.0.seq)
    }
}

fn cursor(seq: u64) -> String {
    format!("s{seq}")
}

fn parse_cursor(c: &str) -> Option<u64> {
    c.strip_prefix('s')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seq: u64, pipeline: &str, state: StoredRunState, by: &str, rev: &str) -> RunRecord {
        let mut r = crate::api::pipeline::build_run(capstan_proto::api::v1::SubmitRunRequest {
            pipeline_yaml: "version: 1\nname: p\ntasks:\n  t:\n    steps: [ { run: 'true' } ]\n"
                .into(),
            ..Default::default()
        })
        .expect("valid pipeline");
        r.seq = seq;
        r.pipeline = pipeline.into();
        r.state = state;
        r.submitted_by = by.into();
        r.rev = rev.into();
        r.created_at_ms = 1000 * seq as i64;
        r
    }

    fn ids(page: &[RunRecord]) -> Vec<u64> {
        page.iter().map(|r| r.seq).collect()
    }

    /// A page of runs all held live.
    fn page<'a>(
        runs: impl Iterator<Item = &'a RunRecord>,
        q: &RunQuery,
    ) -> (Vec<RunRecord>, Option<String>) {
        merge(
            newest(runs, q).into_iter().cloned().collect(),
            Vec::new(),
            false,
            q,
        )
    }

    #[test]
    fn pages_cover_every_match_once_while_runs_arrive() {
        use StoredRunState::*;
        let mut runs: Vec<RunRecord> = (1..=7)
            .map(|s| {
                run(
                    s,
                    if s % 2 == 0 { "even" } else { "odd" },
                    Succeeded,
                    "ci",
                    "abcdef",
                )
            })
            .collect();
        let mut q = RunQuery {
            limit: 2,
            ..RunQuery::default()
        };
        let (p1, next) = page(runs.iter(), &q);
        assert_eq!(ids(&p1), [7, 6]);
        // Runs submitted between two pages are newer than the cursor.
        runs.push(run(8, "odd", Running, "ci", "abcdef"));
        q.before_seq = parse_cursor(&next.unwrap());
        let (p2, next) = page(runs.iter(), &q);
        assert_eq!(ids(&p2), [5, 4]);
        q.before_seq = parse_cursor(&next.unwrap());
        let (p3, next) = page(runs.iter(), &q);
        assert_eq!(ids(&p3), [3, 2]);
        q.before_seq = parse_cursor(&next.unwrap());
        let (p4, next) = page(runs.iter(), &q);
        assert_eq!(ids(&p4), [1]);
        assert_eq!(next, None, "the last page has no cursor");

        let q = RunQuery {
            limit: 10,
            pipeline: Some("odd".into()),
            state: Some(Succeeded),
            ..RunQuery::default()
        };
        assert_eq!(ids(&page(runs.iter(), &q).0), [7, 5, 3, 1]);
        let q = RunQuery {
            limit: 10,
            rev: Some("abcd".into()),
            created_after_ms: Some(3000),
            created_before_ms: Some(6000),
            ..RunQuery::default()
        };
        assert_eq!(ids(&page(runs.iter(), &q).0), [5, 4, 3]);
        let q = RunQuery {
            limit: 10,
            submitted_by: Some("someone".into()),
            ..RunQuery::default()
        };
        assert!(page(runs.iter(), &q).0.is_empty());
        // Exactly a page's worth left: no cursor to an empty page.
        let q = RunQuery {
            limit: 8,
            ..RunQuery::default()
        };
        assert_eq!(page(runs.iter(), &q).1, None);
    }

    #[test]
    fn bad_requests_say_what_to_fix() {
        let bad = |r: ListRunsRequest| RunQuery::from_request(&r).unwrap_err();
        let e = bad(ListRunsRequest {
            cursor: "x9".into(),
            ..Default::default()
        });
        assert!(
            e.contains("pass the next_cursor of the previous page"),
            "{e}"
        );
        let e = bad(ListRunsRequest {
            limit: 5000,
            ..Default::default()
        });
        assert!(e.contains("at most 1000"), "{e}");
        let e = bad(ListRunsRequest {
            rev: "ab".into(),
            ..Default::default()
        });
        assert!(e.contains("at least 4 characters"), "{e}");
        let e = bad(ListRunsRequest {
            state: 99,
            ..Default::default()
        });
        assert!(e.contains("unknown run state 99"), "{e}");
        let q = RunQuery::from_request(&ListRunsRequest {
            cursor: "s12".into(),
            state: RunState::Failed as i32,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(q.limit, DEFAULT_LIMIT);
        assert_eq!(q.before_seq, Some(12));
        assert_eq!(q.state, Some(StoredRunState::Failed));
    }
}
