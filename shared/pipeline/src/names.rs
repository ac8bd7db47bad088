//! What a name may look like: tasks, pipelines, params, env variables,
//! runner labels, services and secrets. The parser and the substitutions
//! both ask here.

/// Longest task, pipeline and param name.
pub const MAX_NAME_LEN: usize = 63;

/// `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 63 chars.
pub fn is_task_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= MAX_NAME_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A task name that `${{ tasks.NAME.outputs.KEY }}` could not name
/// unambiguously: one holding `.outputs.` or ending in `.outputs` (in
/// `tasks.a.outputs.b.outputs.c`, is the task `a` or `a.outputs.b`?). The
/// parser refuses such names, so a reference's task is what comes before
/// its first `.outputs.` ([`crate::expr`]).
pub(crate) fn hides_outputs(task: &str) -> bool {
    task.contains(".outputs.") || task.ends_with(".outputs")
}

/// `[a-z0-9][a-z0-9_.-]*`, at most 63 chars.
pub fn is_pipeline_name(s: &str) -> bool {
    is_task_name(s) && !s.chars().any(|c| c.is_ascii_uppercase())
}

/// `[A-Za-z_][A-Za-z0-9_-]*`, at most 63 chars.
pub fn is_param_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= MAX_NAME_LEN
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// Longest key of a task output.
pub const MAX_OUTPUT_KEY_LEN: usize = 128;

/// A task output's key: `[A-Za-z0-9_][A-Za-z0-9_.-]*`, at most 128 chars
/// (`digest`, `steps.1.image`, a `run` step's `version`).
pub fn is_output_key(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= MAX_OUTPUT_KEY_LEN
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A runner label key: `[A-Za-z0-9][A-Za-z0-9_./-]*`, at most 63 chars.
pub(crate) fn is_label_key(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= MAX_NAME_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
}

/// A runner label value: non-empty, no whitespace, `,` or `=`.
pub(crate) fn is_label_value(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && !s.chars().any(|c| c.is_whitespace() || c == ',' || c == '=')
}

/// A service name, its host name on the task's network: a DNS label,
/// 1-63 of `[a-z0-9-]`, starting and ending with a letter or digit.
pub(crate) fn is_dns_label(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=MAX_NAME_LEN).contains(&s.len())
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || c == '-')
}

/// The name of a runner-side secret: `[A-Za-z0-9_.-]+`.
pub(crate) fn is_secret_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}
