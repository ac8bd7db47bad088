//! What one caller may ask of the coordinator: the size of a request, of a
//! pipeline file, the tasks of a run, its params, the log of a task. Each
//! has a flag (`--max-...`) and a default; exceeding one is refused with a
//! message that names the limit, the size found and the flag.

use capstan_proto::api::v1::SubmitRunRequest;
use tonic::Status;

/// The limits in force (flags in [`crate::config::Args`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest gRPC message decoded (`--max-request`).
    pub request_bytes: usize,
    /// Largest pipeline file (`--max-pipeline`), at most
    /// [`capstan_pipeline::MAX_FILE_BYTES`] (the parser's own bound).
    pub pipeline_bytes: usize,
    /// Most tasks in one run (`--max-tasks`).
    pub tasks: usize,
    /// Most `--param`s in one submit (`--max-params`).
    pub params: usize,
    /// Longest `--param` value (`--max-param-value`).
    pub param_value_bytes: usize,
    /// Most log bytes one attempt of a task may store (`--max-task-log`).
    pub task_log_bytes: u64,
    /// What one API token may have queued.
    pub quota: Quota,
    /// A connection whose peer sends nothing for this long is closed
    /// (`--idle-timeout`; [`crate::idle`]).
    pub idle: std::time::Duration,
}

/// What one API token may have submitted and not yet finished (queued or
/// running): runs (`--max-queued-runs-per-token`) and their tasks
/// (`--max-queued-tasks-per-token`). Checked by the scheduler in the same
/// turn as the submit, against counts it derives from the runs it holds,
/// so they drop as runs finish or are cancelled and are right again after
/// a restart or a failover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub runs: usize,
    pub tasks: usize,
}

impl Quota {
    /// No bound (the scheduler's own tests).
    pub const UNLIMITED: Quota = Quota {
        runs: usize::MAX,
        tasks: usize::MAX,
    };

    /// Whether `token`, with `open_runs` unfinished runs of `open_tasks`
    /// tasks, may submit a run of `tasks` tasks; the refusal names the
    /// limit, the token and the flag.
    pub(crate) fn admits(
        &self,
        token: &str,
        (open_runs, open_tasks): (usize, usize),
        tasks: usize,
    ) -> Result<(), String> {
        if open_runs >= self.runs {
            return Err(format!(
                "token `{token}` has {} unfinished runs, its limit (--max-queued-runs-per-token \
                 {} on the coordinator): wait for one to finish or cancel one (`capstan cancel RUN`)",
                open_runs, self.runs
            ));
        }
        let after = open_tasks.saturating_add(tasks);
        if after > self.tasks {
            return Err(format!(
                "this run's {tasks} tasks would give token `{token}` {after} unfinished tasks; the \
                 limit is {} (--max-queued-tasks-per-token on the coordinator): wait for runs to \
                 finish or cancel some (`capstan cancel RUN`)",
                self.tasks
            ));
        }
        Ok(())
    }
}

impl Default for Quota {
    fn default() -> Self {
        // Far above what people queue by hand and above the bench's 20,000
        // queued one-task runs; a runaway script stops here instead of at
        // the coordinator's memory (a run with its tasks is a few KB).
        Quota {
            runs: 50_000,
            tasks: 200_000,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Pipeline files are capped at 1 MiB and log chunks at 1 MiB.
            request_bytes: 4 * 1024 * 1024,
            pipeline_bytes: capstan_pipeline::MAX_FILE_BYTES,
            tasks: 1000,
            params: 100,
            param_value_bytes: 64 * 1024,
            // Past the runner's per-step cap (256 MiB by default) with room
            // for steps that raise theirs; the bench ships 1 GiB logs.
            task_log_bytes: 16 * 1024 * 1024 * 1024,
            quota: Quota::default(),
            idle: crate::idle::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// How much of a refused submit's problems its message lists: a gRPC
/// status travels as an HTTP/2 header, and 14 MB of problems in one made
/// the coordinator hold 80 MB and the CLI refuse the answer.
pub(crate) const MAX_ERROR_MESSAGE_BYTES: usize = 8 * 1024;

impl Limits {
    /// The checks that need no parsing, made before anything is parsed.
    pub(crate) fn check_submit(&self, req: &SubmitRunRequest) -> Result<(), Status> {
        let too_big = |what: &str, size: usize, limit: usize, flag: &str| {
            Err(Status::invalid_argument(format!(
                "{what} is {size} bytes; the limit is {limit} (--{flag} on the coordinator)"
            )))
        };
        if req.pipeline_yaml.len() > self.pipeline_bytes {
            return too_big(
                "the pipeline file",
                req.pipeline_yaml.len(),
                self.pipeline_bytes,
                "max-pipeline",
            );
        }
        if req.params.len() > self.params {
            return Err(Status::invalid_argument(format!(
                "{} params given; the limit is {} (--max-params on the coordinator)",
                req.params.len(),
                self.params
            )));
        }
        // In name order, so the message is the same for the same request.
        let mut params: Vec<(&String, &String)> = req.params.iter().collect();
        params.sort();
        for (name, value) in params {
            if value.len() > self.param_value_bytes {
                return too_big(
                    &format!("the value of param `{name}`"),
                    value.len(),
                    self.param_value_bytes,
                    "max-param-value",
                );
            }
        }
        Ok(())
    }

    /// A parsed pipeline's task count.
    pub(crate) fn check_tasks(&self, file: &str, tasks: usize) -> Result<(), Status> {
        if tasks > self.tasks {
            return Err(Status::invalid_argument(format!(
                "{file} has {tasks} tasks; the limit is {} (--max-tasks on the coordinator)",
                self.tasks
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_is_refused_with_its_flag() {
        let limits = Limits {
            pipeline_bytes: 10,
            params: 2,
            param_value_bytes: 3,
            tasks: 1,
            ..Limits::default()
        };
        let req = |yaml: &str, params: &[(&str, &str)]| SubmitRunRequest {
            pipeline_yaml: yaml.into(),
            params: params
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            ..Default::default()
        };
        let message = |r: Result<(), Status>| {
            let e = r.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            e.message().to_owned()
        };
        assert_eq!(
            message(limits.check_submit(&req("01234567890", &[]))),
            "the pipeline file is 11 bytes; the limit is 10 (--max-pipeline on the coordinator)"
        );
        assert_eq!(
            message(limits.check_submit(&req("", &[("a", ""), ("b", ""), ("c", "")]))),
            "3 params given; the limit is 2 (--max-params on the coordinator)"
        );
        assert_eq!(
            message(limits.check_submit(&req("", &[("a", "1234"), ("b", "")]))),
            "the value of param `a` is 4 bytes; the limit is 3 (--max-param-value on the coordinator)"
        );
        assert!(
            limits
                .check_submit(&req("0123456789", &[("a", "123")]))
                .is_ok()
        );
        assert_eq!(
            message(limits.check_tasks("p.yaml", 2)),
            "p.yaml has 2 tasks; the limit is 1 (--max-tasks on the coordinator)"
        );
        assert!(limits.check_tasks("p.yaml", 1).is_ok());
    }
}
