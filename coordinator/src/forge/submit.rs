//! A run of a repository's pipeline at one commit, queued on the leader
//! exactly as `SubmitRun` queues one (the same parser thread, limits and
//! idempotency keys), submitted by `hook:<repo>` or `schedule:<repo>`.

use crate::api::Shared;
use capstan_proto::api::v1::SubmitRunRequest;

/// What to run.
pub(crate) struct RunOf<'a> {
    pub(crate) repo: &'a super::repos::RepoRecord,
    pub(crate) yaml: String,
    pub(crate) sha: &'a str,
    pub(crate) git_ref: &'a str,
    /// Deduplicates: a second submit with the key queues nothing.
    pub(crate) key: String,
    /// `hook` or `schedule`.
    pub(crate) by: &'a str,
}

/// A queued run.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) run: String,
    /// The key was new: this submit queued the run (false: an earlier one did).
    pub(crate) new: bool,
    /// The pipeline's name (the status context is `capstan/<name>`).
    pub(crate) pipeline: String,
}

/// Queues `what`; `Err` is the status the scheduler or the parser gave
/// (INVALID_ARGUMENT: the pipeline file is not valid).
pub(crate) async fn submit(shared: &Shared, what: RunOf<'_>) -> Result<Queued, tonic::Status> {
    let leader = shared.leader().await?;
    let request = SubmitRunRequest {
        pipeline_yaml: what.yaml,
        file_name: what.repo.pipeline.clone(),
        repo: what.repo.url.clone(),
        rev: what.sha.to_string(),
        git_ref: what.git_ref.to_string(),
        idempotency_key: what.key,
        ..Default::default()
    };
    let mut run = crate::api::pipeline::build_on_parser_thread(request, shared.limits).await?;
    run.submitted_by = format!("{}:{}", what.by, what.repo.name);
    let fresh = run.id.clone();
    let pipeline = run.pipeline.clone();
    let id = crate::api::status::flatten(leader.scheduler.submit(run, shared.limits.quota).await)?;
    Ok(Queued {
        new: id == fresh,
        run: id.to_string(),
        pipeline,
    })
}
