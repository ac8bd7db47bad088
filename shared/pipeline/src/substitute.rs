//! `${{ ... }}` substitutions: scanning (checked by `parse`) and resolving.

use super::error::{ValidationError, ValidationErrors};
use super::expr::{Expr, OPEN, Piece, Rendered, scan};
use super::model::{Pipeline, StepKind, TaskDef};
use super::script;
use super::validate::closest;
use std::collections::{BTreeMap, BTreeSet};

/// Values for substitutions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// Param overrides (`--param k=v`); each must be declared in the file.
    pub params: BTreeMap<String, String>,
    /// `${{ git.sha }}`: the revision the run builds.
    pub git_sha: Option<String>,
    /// `${{ git.repo }}`: the repository the run builds.
    pub git_repo: Option<String>,
    /// `${{ git.ref }}`: the ref whose push started the run (`refs/heads/main`).
    pub git_ref: Option<String>,
    /// `${{ run.id }}`: the run's id.
    pub run_id: Option<String>,
}

/// Checks the substitutions of one string against the declared params;
/// returns the problems (empty when fine).
pub(crate) fn check(s: &str, params: &BTreeMap<String, String>) -> Vec<String> {
    match scan(s) {
        Err(problems) => problems,
        Ok(pieces) => pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Expr(Expr::Param(name)) if !params.contains_key(name) => {
                    Some(unknown_param_in_expr(name, params))
                }
                _ => None,
            })
            .collect(),
    }
}

fn unknown_param_in_expr(name: &str, params: &BTreeMap<String, String>) -> String {
    let mut msg = format!("unknown param `{name}` in `${{{{ params.{name} }}}}`");
    if let Some(c) = closest(name, params.keys().map(String::as_str)) {
        msg.push_str(&format!(" (did you mean `{c}`?)"));
    }
    if params.is_empty() {
        msg.push_str(": declare it under `params:`");
    } else {
        let names: Vec<&str> = params.keys().map(String::as_str).collect();
        msg.push_str(&format!(
            ": declare it under `params:` (declared: {})",
            names.join(", ")
        ));
    }
    msg
}

/// What a string of a task is, for its substitutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Field {
    /// Plain text: the value goes in as it is.
    Plain,
    /// The `run` script of the step with this index: shell (see [`script`]).
    ///
    /// [`script`]: super::script
    Script(usize),
    /// The `ready` command of the service with this index: shell too, its
    /// variables go into the service's env.
    Ready(usize),
}

/// Calls `f` with the field path, kind and value of every string of a task
/// that substitutions apply to, in file order. The paths are the keys of
/// [`super::SourceMap`].
pub(crate) fn for_each_string(task: &mut TaskDef, f: &mut impl FnMut(&str, Field, &mut String)) {
    // An expansion's fields stand where its matrix task's do.
    let base = format!(
        "tasks.{}",
        task.expanded_from.as_ref().unwrap_or(&task.name)
    );
    if let Some(image) = &mut task.image {
        f(&format!("{base}.image"), Field::Plain, image);
    }
    for (k, v) in &mut task.env {
        f(&format!("{base}.env.{k}"), Field::Plain, v);
    }
    for (i, s) in task.services.iter_mut().enumerate() {
        let sb = format!("{base}.services.{}", s.name);
        f(&format!("{sb}.image"), Field::Plain, &mut s.image);
        for (j, arg) in s.command.iter_mut().enumerate() {
            f(&format!("{sb}.command[{j}]"), Field::Plain, arg);
        }
        for (k, v) in &mut s.env {
            f(&format!("{sb}.env.{k}"), Field::Plain, v);
        }
        if let Some(ready) = &mut s.ready {
            f(&format!("{sb}.ready"), Field::Ready(i), ready);
        }
    }
    if let Some(a) = &mut task.approval {
        f(
            &format!("{base}.approval.prompt"),
            Field::Plain,
            &mut a.prompt,
        );
    }
    for (i, step) in task.steps.iter_mut().enumerate() {
        let sb = format!("{base}.steps[{i}]");
        if let Some(name) = &mut step.name {
            f(&format!("{sb}.name"), Field::Plain, name);
        }
        for (k, v) in &mut step.env {
            f(&format!("{sb}.env.{k}"), Field::Plain, v);
        }
        kind_strings(&sb, i, &mut step.kind, f);
    }
}

/// [`for_each_string`] for the strings of one step's kind; `sb` is the
/// step's field path, `i` its index.
fn kind_strings(
    sb: &str,
    i: usize,
    kind: &mut StepKind,
    f: &mut impl FnMut(&str, Field, &mut String),
) {
    match kind {
        StepKind::Run { script, image } => {
            f(&format!("{sb}.run"), Field::Script(i), script);
            if let Some(image) = image {
                f(&format!("{sb}.image"), Field::Plain, image);
            }
        }
        StepKind::Build {
            context,
            dockerfile,
            tag,
            credentials,
            args,
            ..
        } => {
            for (k, v) in args.iter_mut() {
                f(&format!("{sb}.build.args.{k}"), Field::Plain, v);
            }
            f(&format!("{sb}.build.context"), Field::Plain, context);
            f(&format!("{sb}.build.dockerfile"), Field::Plain, dockerfile);
            f(&format!("{sb}.build.tag"), Field::Plain, tag);
            if let Some(c) = credentials {
                f(&format!("{sb}.build.credentials"), Field::Plain, c);
            }
        }
        StepKind::Push {
            image, credentials, ..
        } => {
            f(&format!("{sb}.push.image"), Field::Plain, image);
            if let Some(c) = credentials {
                f(&format!("{sb}.push.credentials"), Field::Plain, c);
            }
        }
        StepKind::SetImage {
            repo,
            files,
            image,
            digest,
            ..
        } => {
            f(&format!("{sb}.set-image.repo"), Field::Plain, repo);
            for (j, file) in files.iter_mut().enumerate() {
                f(&format!("{sb}.set-image.files[{j}]"), Field::Plain, file);
            }
            f(&format!("{sb}.set-image.image"), Field::Plain, image);
            if let Some(d) = digest {
                f(&format!("{sb}.set-image.digest"), Field::Plain, d);
            }
        }
        StepKind::GitPush {
            message,
            credentials,
            branch,
            ..
        } => {
            f(&format!("{sb}.git-push.message"), Field::Plain, message);
            for (key, v) in [("credentials", credentials), ("branch", branch)] {
                if let Some(v) = v {
                    f(&format!("{sb}.git-push.{key}"), Field::Plain, v);
                }
            }
        }
    }
}

/// Applies every `${{ ... }}` substitution of a parsed pipeline.
///
/// `ctx.params` overrides the file's param defaults; an override of a param
/// the file does not declare is an error (line and column 0). A substitution
/// whose value the context lacks (`git.sha` without a revision, ...) is an
/// error at the place of its first use. The result holds no `${{`.
pub fn resolve(
    file: &str,
    pipeline: &Pipeline,
    ctx: &Context,
) -> Result<Pipeline, ValidationErrors> {
    // First and alone: every use of a bad value would repeat its error.
    check_context(file, ctx)?;
    let mut errors = Vec::new();
    let params = effective_params(file, pipeline, ctx, &mut errors);

    let mut out = pipeline.clone();
    out.tasks = crate::matrix::expand(&pipeline.tasks);
    // Report a missing value once, where it is first used.
    let mut reported: BTreeSet<Expr> = BTreeSet::new();
    for task in &mut out.tasks {
        if let Some(problem) = fold_condition(task, &params, ctx) {
            errors.push(at_field(file, pipeline, task, "if", problem));
        }
        let base = task
            .expanded_from
            .clone()
            .unwrap_or_else(|| task.name.clone());
        let r = Resolving {
            file,
            pipeline,
            params: &params,
            ctx,
            matrix: task.matrix_values.clone(),
            needed: ancestors(pipeline, &base),
            base: &base,
        };
        // The variables each shell field (a `run` script, a `ready`) refers to.
        let mut shell_vars: Vec<(Field, BTreeMap<String, String>)> = Vec::new();
        for_each_string(task, &mut |path, field, value| {
            if let Some(vars) = r.string(path, field, value, &mut errors, &mut reported) {
                shell_vars.push((field, vars));
            }
        });
        for (field, vars) in shell_vars {
            give_vars(task, field, vars);
        }
    }
    let (c, e) = (&mut out.concurrency, &mut errors);
    resolve_group(file, pipeline, c, &params, ctx, e);
    out.source_map = Default::default();
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ValidationErrors::sorted(errors))
    }
}

/// What the strings of one task are resolved against.
struct Resolving<'a> {
    file: &'a str,
    pipeline: &'a Pipeline,
    params: &'a BTreeMap<String, String>,
    ctx: &'a Context,
    /// The task's `${{ matrix.KEY }}` values.
    matrix: BTreeMap<String, String>,
    /// The tasks it needs, directly or through their needs: whose outputs
    /// it may use.
    needed: BTreeSet<String>,
    /// The task's name in the file (of an expansion: its matrix task's),
    /// which its field paths start with (`tasks.BASE.`).
    base: &'a str,
}

impl Resolving<'_> {
    /// Makes the substitutions of the field at `path`: the variables a
    /// shell field needs (none for a plain one); problems go to `errors`.
    fn string(
        &self,
        path: &str,
        field: Field,
        value: &mut String,
        errors: &mut Vec<ValidationError>,
        reported: &mut BTreeSet<Expr>,
    ) -> Option<BTreeMap<String, String>> {
        if !value.contains(OPEN) {
            return None;
        }
        let (line, column) = self.pipeline.source_map.position(path).unwrap_or((0, 0));
        let mut problem = |msg: String| {
            errors.push(ValidationError::new(self.file, line, column, msg));
        };
        let pieces = match scan(value) {
            Ok(p) => p,
            Err(problems) => {
                problems.into_iter().for_each(&mut problem);
                value.clear();
                return None;
            }
        };
        let outputs = pieces
            .iter()
            .filter(|p| matches!(p, Piece::Expr(Expr::TaskOutput { .. })))
            .count();
        for p in &pieces {
            if let Piece::Expr(e @ Expr::TaskOutput { task, .. }) = p {
                self.check_output(path, e, task).map(&mut problem);
            }
        }
        let (params, ctx, matrix) = (self.params, self.ctx, &self.matrix);
        let lookup = |e: &Expr| match e {
            Expr::Param(p) => params.get(p).map(String::as_str),
            Expr::GitSha => ctx.git_sha.as_deref(),
            Expr::GitRepo => ctx.git_repo.as_deref(),
            Expr::GitRef => ctx.git_ref.as_deref(),
            Expr::RunId => ctx.run_id.as_deref(),
            Expr::Matrix(k) => matrix.get(k).map(String::as_str),
            Expr::TaskOutput { .. } => None,
        };
        let rendered = match field {
            Field::Plain => plain(pieces, lookup, true),
            Field::Script(_) | Field::Ready(_) => script::render(pieces, lookup),
        };
        for e in &rendered.missing {
            if reported.insert(e.clone()) {
                problem(missing(e, params));
            }
        }
        rendered.problems.into_iter().for_each(&mut problem);
        // What is left of the opening marker must be the outputs'
        // placeholders, as many as were written (no value may spell
        // another one).
        let left = match field {
            Field::Plain => outputs,
            _ => 0,
        };
        if rendered.text.contains(OPEN) && placeholders(&rendered.text) != Some(left) {
            problem(respelled_open());
        }
        *value = rendered.text;
        (field != Field::Plain).then_some(rendered.vars)
    }

    /// Why the task may not use `e`, an output of `task`, in the field at
    /// `path`, if it may not.
    fn check_output(&self, path: &str, e: &Expr, task: &str) -> Option<String> {
        let field = path
            .strip_prefix("tasks.")
            .and_then(|p| p.strip_prefix(self.base))
            .and_then(|p| p.strip_prefix('.'));
        if let Some(why) = field.and_then(no_outputs_in) {
            return Some(format!("`{}`: {why}", e.text()));
        }
        let Some(def) = self.pipeline.tasks.iter().find(|t| t.name == task) else {
            let names: Vec<String> = (self.pipeline.tasks.iter())
                .map(|t| format!("`{}`", t.name))
                .collect();
            return Some(format!(
                "`{}`: no task `{task}` in this pipeline (its tasks: {})",
                e.text(),
                names.join(", ")
            ));
        };
        if def.matrix.is_some() {
            return Some(format!(
                "`{}`: task `{task}` has a `matrix:`, and its expansions' outputs cannot be told apart; \
                 give the output to a task that needs them all",
                e.text()
            ));
        }
        (!self.needed.contains(task)).then(|| {
            format!(
                "`{}`: a task may use the outputs of the tasks it needs (directly or through their needs); add `{task}` to its `needs`",
                e.text()
            )
        })
    }
}

/// Why no output may stand in the field of a task at `field` (its path
/// after `tasks.NAME.`), if none may. A step's `credentials` name a
/// runner-side secret: an upstream task's scripts write its outputs, and
/// must never choose which secret a later task gets. An approval's prompt
/// is what an approver reads and decides on: the upstream scripts must not
/// write it (and the gate holds the task before its dispatch, where
/// outputs are filled in).
fn no_outputs_in(field: &str) -> Option<&'static str> {
    if field == "approval.prompt" {
        return Some(
            "outputs cannot be used in an approval prompt: an upstream task's scripts would \
             write what the approver reads; write the prompt in the file",
        );
    }
    let (index, rest) = field.strip_prefix("steps[")?.split_once("].")?;
    let secret = index.bytes().all(|b| b.is_ascii_digit())
        && matches!(
            rest,
            "build.credentials" | "push.credentials" | "git-push.credentials"
        );
    secret.then_some(
        "outputs cannot choose a secret: `credentials` names a runner-side secret, and an \
         upstream task's output must never choose which secret a later task gets; name the \
         secret in the file",
    )
}

/// The number of `${{ tasks.X.outputs.Y }}` placeholders in `text`, if
/// it holds no other substitution and scans.
fn placeholders(text: &str) -> Option<usize> {
    let pieces = scan(text).ok()?;
    let mut n = 0;
    for p in pieces {
        match p {
            Piece::Expr(Expr::TaskOutput { .. }) => n += 1,
            Piece::Expr(_) => return None,
            Piece::Lit(_) => {}
        }
    }
    Some(n)
}

/// The tasks `name` needs, directly or through their needs (by the names
/// the file gives them).
fn ancestors(pipeline: &Pipeline, name: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut todo = vec![name.to_owned()];
    while let Some(n) = todo.pop() {
        let Some(t) = pipeline.tasks.iter().find(|t| t.name == n) else {
            continue;
        };
        for need in &t.needs {
            if found.insert(need.clone()) {
                todo.push(need.clone());
            }
        }
    }
    found
}

/// Puts the variables a shell field refers to into the environment it runs
/// with: over its step's own env (the script's references must mean the
/// values; the `CAPSTAN_` prefix is the runner's), or its service's
/// (`ready` runs inside the service).
fn give_vars(task: &mut TaskDef, field: Field, vars: BTreeMap<String, String>) {
    match field {
        Field::Script(step) => task.steps[step].env.extend(vars),
        Field::Ready(service) => task.services[service].env.extend(vars),
        Field::Plain => {}
    }
}

/// `problem` at field `key` of `task` (of an expansion: of its matrix task).
fn at_field(
    file: &str,
    pipeline: &Pipeline,
    task: &TaskDef,
    key: &str,
    problem: String,
) -> ValidationError {
    let base = task.expanded_from.as_ref().unwrap_or(&task.name);
    let path = format!("tasks.{base}.{key}");
    let (line, column) = pipeline.source_map.position(&path).unwrap_or((0, 0));
    ValidationError::new(file, line, column, problem)
}

/// Folds every value known at submit into the task's `if:` (what is
/// unknown, no `--rev` or not a push, is empty) and works out what reads
/// no task state. The parser has checked it; the problem, if what is left
/// would not read back.
fn fold_condition(
    task: &mut TaskDef,
    params: &BTreeMap<String, String>,
    ctx: &Context,
) -> Option<String> {
    use crate::cond::Ref;
    let c = (task.condition.as_deref()).and_then(|t| crate::cond::parse(t).ok())?;
    let known = |v: &Option<String>| Some(v.clone().unwrap_or_default());
    let folded = c.fold(&|r| match r {
        Ref::GitSha => known(&ctx.git_sha),
        Ref::GitRef => known(&ctx.git_ref),
        Ref::GitRepo => known(&ctx.git_repo),
        Ref::RunId => known(&ctx.run_id),
        Ref::Param(p) => Some(params.get(p).cloned().unwrap_or_default()),
        Ref::Matrix(k) => Some(task.matrix_values.get(k).cloned().unwrap_or_default()),
        Ref::TaskState(_) => None,
    });
    let text = folded.simplify().to_string();
    if let Err(e) = crate::cond::parse(&text) {
        let name = &task.name;
        return Some(format!(
            "`if` of task `{name}` is too complex once its values are in ({e}): split it"
        ));
    }
    task.condition = Some(text);
    None
}

/// A value joined to the text beside it can spell a new OPEN (a `$` before
/// a substitution whose value starts with two braces): found by the
/// `pipeline` fuzz target. The result must hold none (see the docs).
fn respelled_open() -> String {
    format!(
        "after substitution this value contains `{OPEN}`: a substitution's value \
         and the text beside it spell it (a `$` right before `${{{{ ... }}}}`, or a \
         value ending in `$` right before a brace); put a space between them or \
         change the value"
    )
}

/// `concurrency.group` with its substitutions made (a plain field).
fn resolve_group(
    file: &str,
    pipeline: &Pipeline,
    concurrency: &mut Option<super::model::Concurrency>,
    params: &BTreeMap<String, String>,
    ctx: &Context,
    errors: &mut Vec<ValidationError>,
) {
    let Some(group) = concurrency.as_mut().map(|c| &mut c.group) else {
        return;
    };
    if !group.contains(OPEN) {
        return;
    }
    let (line, column) = pipeline
        .source_map
        .position("concurrency.group")
        .unwrap_or((0, 0));
    let pieces = match scan(group) {
        Ok(p) => p,
        Err(problems) => {
            for p in problems {
                errors.push(ValidationError::new(file, line, column, p));
            }
            return;
        }
    };
    let lookup = |e: &Expr| match e {
        Expr::Param(p) => params.get(p).map(String::as_str),
        Expr::GitSha => ctx.git_sha.as_deref(),
        Expr::GitRepo => ctx.git_repo.as_deref(),
        Expr::GitRef => ctx.git_ref.as_deref(),
        Expr::RunId => ctx.run_id.as_deref(),
        Expr::Matrix(_) | Expr::TaskOutput { .. } => None,
    };
    let rendered = plain(pieces, lookup, false);
    for e in &rendered.missing {
        errors.push(ValidationError::new(file, line, column, missing(e, params)));
    }
    *group = rendered.text;
}

/// A plain field: each value goes in as it is; with `outputs`, a task's
/// output stays as its placeholder, to be filled in at dispatch.
fn plain<'v>(
    pieces: Vec<Piece<'_>>,
    lookup: impl Fn(&Expr) -> Option<&'v str>,
    outputs: bool,
) -> Rendered {
    let mut out = Rendered::default();
    for piece in pieces {
        match piece {
            Piece::Lit(s) => out.text.push_str(s),
            Piece::Expr(e @ Expr::TaskOutput { .. }) if outputs => out.text.push_str(&e.text()),
            Piece::Expr(e) => match lookup(&e) {
                Some(v) => out.text.push_str(v),
                None => out.missing.push(e),
            },
        }
    }
    out
}

/// The file's param defaults with `ctx.params` over them; an unknown
/// override, or a `${{` in a value, is an error.
fn effective_params(
    file: &str,
    pipeline: &Pipeline,
    ctx: &Context,
    errors: &mut Vec<ValidationError>,
) -> BTreeMap<String, String> {
    for (name, value) in &ctx.params {
        if !pipeline.params.contains_key(name) {
            let mut msg = format!("unknown param `{name}`: declare it under `params:` in {file}");
            if let Some(c) = closest(name, pipeline.params.keys().map(String::as_str)) {
                msg.push_str(&format!(" (did you mean `{c}`?)"));
            }
            errors.push(ValidationError::new(file, 0, 0, msg));
        } else if value.contains(OPEN) {
            errors.push(ValidationError::new(
                file,
                0,
                0,
                format!("the value of param `{name}` must not contain `{OPEN}`"),
            ));
        }
    }
    let mut params = pipeline.params.clone();
    for (name, value) in &pipeline.params {
        if value.contains(OPEN) && !ctx.params.contains_key(name) {
            errors.push(ValidationError::new(
                file,
                0,
                0,
                format!("the default of param `{name}` must not contain `{OPEN}`"),
            ));
        }
    }
    for (name, value) in &ctx.params {
        if let Some(v) = params.get_mut(name) {
            v.clone_from(value);
        }
    }
    params
}

/// The run's own values go into scripts as environment variables, where
/// the check on the rendered text does not see them: each must hold no
/// `${{` either (found by the `pipeline` fuzz target).
fn check_context(file: &str, ctx: &Context) -> Result<(), ValidationErrors> {
    let mut errors = Vec::new();
    let values = [
        (Expr::GitSha, &ctx.git_sha),
        (Expr::GitRepo, &ctx.git_repo),
        (Expr::GitRef, &ctx.git_ref),
        (Expr::RunId, &ctx.run_id),
    ];
    for (expr, value) in values {
        if value.as_deref().is_some_and(|v| v.contains(OPEN)) {
            errors.push(ValidationError::new(
                file,
                0,
                0,
                format!("the value of `{}` must not contain `{OPEN}`", expr.text()),
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors::sorted(errors))
    }
}

fn missing(e: &Expr, params: &BTreeMap<String, String>) -> String {
    match e {
        Expr::GitSha => format!("`{}` needs a revision: submit with --rev", e.text()),
        Expr::GitRepo => format!("`{}` needs a repository: submit with --repo", e.text()),
        Expr::GitRef => format!(
            "`{}` needs the pushed ref: only runs started by a push or a schedule have one",
            e.text()
        ),
        Expr::RunId => format!(
            "`{}` needs the run's id, which this context lacks",
            e.text()
        ),
        Expr::Param(name) => unknown_param_in_expr(name, params),
        Expr::Matrix(k) => format!(
            "`{}` has no value here: only the fields of a task with `matrix:` (key `{k}`) may use it",
            e.text()
        ),
        Expr::TaskOutput { .. } => format!(
            "`{}` has no value here: a task's outputs are known when a task that needs it is dispatched, so only the fields of tasks may use them",
            e.text()
        ),
    }
}
