//! `${{ ... }}` expressions: what one means, and scanning a string into
//! literal text and expressions. Both kinds of field use it: plain ones
//! ([`super::substitute`]) and `run` scripts ([`super::script`]).

use std::collections::BTreeMap;

/// One `${{ ... }}` expression.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Expr {
    Param(String),
    GitSha,
    GitRepo,
    GitRef,
    RunId,
    /// `${{ matrix.KEY }}`: the task's matrix value (a task of a matrix only).
    Matrix(String),
    /// `${{ tasks.NAME.outputs.KEY }}`: an output of a task this one needs,
    /// known only when this one is dispatched: resolving keeps it as its
    /// text ([`Expr::text`]) and the coordinator fills it in
    /// ([`crate::outputs`]).
    TaskOutput {
        task: String,
        key: String,
    },
}

impl Expr {
    pub(crate) fn text(&self) -> String {
        match self {
            Expr::Param(p) => format!("${{{{ params.{p} }}}}"),
            Expr::GitSha => "${{ git.sha }}".to_owned(),
            Expr::GitRepo => "${{ git.repo }}".to_owned(),
            Expr::GitRef => "${{ git.ref }}".to_owned(),
            Expr::RunId => "${{ run.id }}".to_owned(),
            Expr::Matrix(k) => format!("${{{{ matrix.{k} }}}}"),
            Expr::TaskOutput { task, key } => format!("${{{{ tasks.{task}.outputs.{key} }}}}"),
        }
    }
}

#[derive(Debug)]
pub(crate) enum Piece<'a> {
    Lit(&'a str),
    Expr(Expr),
}

pub(crate) const OPEN: &str = "${{";
const CLOSE: &str = "}}";
const EXPECTED: &str = "expected `params.NAME`, `matrix.KEY`, `tasks.NAME.outputs.KEY`, `git.sha`, `git.repo`, `git.ref` or `run.id`";

/// Splits a string into literal text and expressions. Every problem in the
/// string is returned (an unterminated `${{` ends the scan).
pub(crate) fn scan(s: &str) -> Result<Vec<Piece<'_>>, Vec<String>> {
    let mut pieces = Vec::new();
    let mut problems = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find(OPEN) {
        if start > 0 {
            pieces.push(Piece::Lit(&rest[..start]));
        }
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find(CLOSE) else {
            problems.push(format!(
                "unterminated `{OPEN}`: close the substitution with `{CLOSE}`"
            ));
            rest = "";
            break;
        };
        let inner = after[..end].trim();
        match parse_expr(inner) {
            Some(e) => pieces.push(Piece::Expr(e)),
            None => problems.push(format!(
                "unknown substitution `${{{{ {inner} }}}}`: {EXPECTED}"
            )),
        }
        rest = &after[end + CLOSE.len()..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Lit(rest));
    }
    if problems.is_empty() {
        Ok(pieces)
    } else {
        Err(problems)
    }
}

fn parse_expr(inner: &str) -> Option<Expr> {
    match inner {
        "git.sha" => Some(Expr::GitSha),
        "git.repo" => Some(Expr::GitRepo),
        "git.ref" => Some(Expr::GitRef),
        "run.id" => Some(Expr::RunId),
        _ => {
            if let Some(key) = inner.strip_prefix("matrix.") {
                return crate::names::is_param_name(key).then(|| Expr::Matrix(key.to_owned()));
            }
            if let Some(rest) = inner.strip_prefix("tasks.") {
                // The first `.outputs.`: no task name holds one, nor ends
                // in `.outputs` (`names::hides_outputs`, refused by the
                // parser), so the split is the only one.
                let (task, key) = rest.split_once(".outputs.")?;
                let names = crate::names::is_task_name(task) && crate::names::is_output_key(key);
                return names.then(|| Expr::TaskOutput {
                    task: task.to_owned(),
                    key: key.to_owned(),
                });
            }
            let name = inner.strip_prefix("params.")?;
            crate::names::is_param_name(name).then(|| Expr::Param(name.to_owned()))
        }
    }
}

/// One string with its substitutions made.
#[derive(Debug, Default)]
pub(crate) struct Rendered {
    pub(crate) text: String,
    /// The environment the text needs (scripts only).
    pub(crate) vars: BTreeMap<String, String>,
    /// Substitutions the context has no value for.
    pub(crate) missing: Vec<Expr>,
    /// Anything else wrong.
    pub(crate) problems: Vec<String>,
}
