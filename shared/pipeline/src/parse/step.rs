//! A step: its common fields and the fields of each kind.

use std::collections::BTreeMap;

use super::{Fields, Parser, quoted_list};
use crate::model::{StepDef, StepKind};
use crate::yaml::{Node, Value};

const STEP_KINDS: &[&str] = &["run", "build", "push", "set-image", "git-push"];

const STEP_KEYS: &[&str] = &[
    "run",
    "build",
    "push",
    "set-image",
    "git-push",
    "name",
    "env",
    "timeout",
    "image",
];

const BUILD_KEYS: &[&str] = &[
    "context",
    "dockerfile",
    "tag",
    "skip-if-exists",
    "credentials",
    "args",
];

const PUSH_KEYS: &[&str] = &["image", "credentials", "skip-if-exists"];

const SET_IMAGE_KEYS: &[&str] = &[
    "repo",
    "files",
    "image",
    "allow-no-match",
    "pin",
    "digest",
    "order",
];

const GIT_PUSH_KEYS: &[&str] = &["message", "credentials", "branch", "mode"];

impl Parser<'_> {
    pub(super) fn steps(&mut self, node: &Node, what: &str, base: &str) -> Vec<StepDef> {
        let Value::Seq(items) = &node.value else {
            self.err(
                node.pos,
                format!(
                    "`steps` of {what} must be a non-empty list of steps, found {}",
                    node.kind()
                ),
            );
            return Vec::new();
        };
        if items.is_empty() {
            self.err(
                node.pos,
                format!("`steps` of {what} is empty: a task needs at least one step"),
            );
        }
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                self.step(
                    item,
                    &format!("step {} of {what}", i + 1),
                    &format!("{base}.steps[{i}]"),
                )
            })
            .collect()
    }
    fn step(&mut self, node: &Node, what: &str, path: &str) -> Option<StepDef> {
        let f = self.fields(node, what, STEP_KEYS)?;
        let kinds: Vec<(&str, &Node, &Node)> = f
            .entries
            .iter()
            .filter(|(k, _, _)| STEP_KINDS.contains(&k.as_str()))
            .map(|(k, kn, v)| (k.as_str(), *kn, *v))
            .collect();
        let name = self.opt_subst(
            &f,
            "name",
            &format!("`name` of {what}"),
            format!("{path}.name"),
        );
        let env = match f.get("env") {
            Some(v) => self.string_map(v, &format!("`env` of {what}"), &format!("{path}.env")),
            None => BTreeMap::new(),
        };
        let timeout = f
            .get("timeout")
            .and_then(|v| self.timeout(v, &format!("`timeout` of {what}")));

        let kind = match kinds.as_slice() {
            [] => {
                self.err(
                    f.pos,
                    format!(
                        "{what} has no kind: it needs exactly one of {}",
                        quoted_list(STEP_KINDS)
                    ),
                );
                None
            }
            [(kind, _, value), rest @ ..] => {
                for (other, kn, _) in rest {
                    self.err(kn.pos, format!("{what} has more than one kind (`{kind}` and `{other}`): use exactly one of {} per step", quoted_list(STEP_KINDS)));
                }
                self.step_kind(kind, value, &f, what, path)
            }
        };
        let first_kind = kinds.first().map(|&(k, _, _)| k);
        if first_kind.is_some_and(|k| k != "run")
            && let Some(k) = f.key("image")
        {
            self.err(k.pos, format!("`image` is only allowed on `run` steps ({what}); set the image inside the step's own fields"));
        }
        Some(StepDef {
            name,
            env,
            timeout,
            kind: kind?,
        })
    }
    fn step_kind(
        &mut self,
        kind: &str,
        value: &Node,
        step: &Fields,
        what: &str,
        path: &str,
    ) -> Option<StepKind> {
        let what = format!("`{kind}` of {what}");
        let path = format!("{path}.{kind}");
        match kind {
            "run" => self.run_kind(value, step, &what, &path),
            "build" => self.build_kind(value, &what, &path),
            "push" => self.push_kind(value, &what, &path),
            "set-image" => self.set_image_kind(value, &what, &path),
            "git-push" => self.git_push_kind(value, &what, &path),
            _ => None,
        }
    }

    fn run_kind(
        &mut self,
        value: &Node,
        step: &Fields,
        what: &str,
        path: &str,
    ) -> Option<StepKind> {
        let script = self.subst(value, &format!("{what} (the script)"), path.to_owned());
        let base = path.strip_suffix(".run").unwrap_or(path);
        let image = self.opt_subst(
            step,
            "image",
            &format!("`image` of {what}"),
            format!("{base}.image"),
        );
        Some(StepKind::Run {
            script: script?,
            image,
        })
    }

    fn build_kind(&mut self, value: &Node, what: &str, path: &str) -> Option<StepKind> {
        let f = self.fields(value, what, BUILD_KEYS)?;
        let context = match f.get("context") {
            Some(v) => self.subst(
                v,
                &format!("`context` of {what}"),
                format!("{path}.context"),
            ),
            None => Some(".".to_owned()),
        };
        let dockerfile = match f.get("dockerfile") {
            Some(v) => self.subst(
                v,
                &format!("`dockerfile` of {what}"),
                format!("{path}.dockerfile"),
            ),
            None => Some("Dockerfile".to_owned()),
        };
        let tag = self.required(&f, "tag", what, path);
        let skip_if_exists = self.opt_flag(&f, "skip-if-exists", what);
        let credentials = self.opt_subst(
            &f,
            "credentials",
            &format!("`credentials` of {what}"),
            format!("{path}.credentials"),
        );
        let args = match f.get("args") {
            Some(v) => self.string_map(v, &format!("`args` of {what}"), &format!("{path}.args")),
            None => BTreeMap::new(),
        };
        Some(StepKind::Build {
            context: context?,
            dockerfile: dockerfile?,
            tag: tag?,
            skip_if_exists,
            credentials,
            args,
        })
    }

    fn push_kind(&mut self, value: &Node, what: &str, path: &str) -> Option<StepKind> {
        let f = self.fields(value, what, PUSH_KEYS)?;
        let image = self.required(&f, "image", what, path);
        let credentials = self.opt_subst(
            &f,
            "credentials",
            &format!("`credentials` of {what}"),
            format!("{path}.credentials"),
        );
        let skip_if_exists = self.opt_flag(&f, "skip-if-exists", what);
        Some(StepKind::Push {
            image: image?,
            credentials,
            skip_if_exists,
        })
    }

    fn set_image_kind(&mut self, value: &Node, what: &str, path: &str) -> Option<StepKind> {
        let f = self.fields(value, what, SET_IMAGE_KEYS)?;
        // No `repo`: the run's own repository (its checkout is edited).
        let repo = match f.get("repo").filter(|n| !n.is_null()) {
            None => Some(String::new()),
            Some(v) => self.subst(v, &format!("`repo` of {what}"), format!("{path}.repo")),
        };
        let files = match f.get("files") {
            None => {
                self.missing(f.pos, "files", what);
                None
            }
            Some(v) => self.files(v, what, path),
        };
        let image = self.required(&f, "image", what, path);
        let allow_no_match = self.flag(&f, "allow-no-match", what, false);
        let pin = self.choice(&f, "pin", what, &["tag", "digest"])? == Some("digest");
        let monotonic = self.choice(&f, "order", what, &["any", "monotonic"])? == Some("monotonic");
        let digest = self.opt_subst(
            &f,
            "digest",
            &format!("`digest` of {what}"),
            format!("{path}.digest"),
        );
        if digest.is_some() && !pin {
            let v = f.get("digest").expect("digest is set");
            self.err(
                v.pos,
                format!("`digest` of {what} needs `pin: digest` (it is what gets pinned)"),
            );
        }
        Some(StepKind::SetImage {
            repo: repo?,
            files: files?,
            image: image?,
            allow_no_match,
            pin_digest: pin,
            digest,
            monotonic,
        })
    }

    fn git_push_kind(&mut self, value: &Node, what: &str, path: &str) -> Option<StepKind> {
        let f = self.fields(value, what, GIT_PUSH_KEYS)?;
        let message = self.required(&f, "message", what, path);
        let credentials = self.opt_subst(
            &f,
            "credentials",
            &format!("`credentials` of {what}"),
            format!("{path}.credentials"),
        );
        let branch = self.opt_subst(
            &f,
            "branch",
            &format!("`branch` of {what}"),
            format!("{path}.branch"),
        );
        let mode = self.choice(&f, "mode", what, &["direct", "pull-request"]);
        Some(StepKind::GitPush {
            message: message?,
            credentials,
            branch,
            pull_request: mode? == Some("pull-request"),
        })
    }
    /// A field that is one of `values` (None when absent or null); the
    /// outer None after an error.
    pub(super) fn choice(
        &mut self,
        f: &Fields,
        key: &str,
        what: &str,
        values: &[&'static str],
    ) -> Option<Option<&'static str>> {
        let Some(v) = f.get(key).filter(|n| !n.is_null()) else {
            return Some(None);
        };
        if let Value::Str(s) = &v.value
            && let Some(hit) = values.iter().find(|&&x| x == s)
        {
            return Some(Some(hit));
        }
        let found = match &v.value {
            Value::Str(s) => format!("`{s}`"),
            _ => v.kind().to_owned(),
        };
        let quoted: Vec<String> = values.iter().map(|x| format!("`{x}`")).collect();
        let one_of = match quoted.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        self.err(
            v.pos,
            format!("`{key}` of {what} must be {one_of}, found {found}"),
        );
        None
    }

    /// A true/false field; `default` when absent or null.
    pub(super) fn flag(&mut self, f: &Fields, key: &str, what: &str, default: bool) -> bool {
        self.opt_flag(f, key, what).unwrap_or(default)
    }

    /// A true/false field; None when absent, null or not a boolean (an
    /// error then).
    fn opt_flag(&mut self, f: &Fields, key: &str, what: &str) -> Option<bool> {
        match f.get(key).map(|v| &v.value) {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                let v = f.get(key).expect("matched above");
                self.err(
                    v.pos,
                    format!(
                        "`{key}` of {what} must be true or false, found {}",
                        v.kind()
                    ),
                );
                None
            }
        }
    }

    pub(super) fn required(
        &mut self,
        f: &Fields,
        key: &str,
        what: &str,
        path: &str,
    ) -> Option<String> {
        match f.get(key) {
            None => {
                self.missing(f.pos, key, what);
                None
            }
            Some(v) => self.subst(v, &format!("`{key}` of {what}"), format!("{path}.{key}")),
        }
    }
    fn files(&mut self, node: &Node, what: &str, path: &str) -> Option<Vec<String>> {
        let Value::Seq(items) = &node.value else {
            self.err(
                node.pos,
                format!(
                    "`files` of {what} must be a non-empty list of paths, found {}",
                    node.kind()
                ),
            );
            return None;
        };
        if items.is_empty() {
            self.err(
                node.pos,
                format!("`files` of {what} is empty: list at least one file"),
            );
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        for (j, item) in items.iter().enumerate() {
            match self.subst(
                item,
                &format!("an entry of `files` of {what}"),
                format!("{path}.files[{j}]"),
            ) {
                Some(s) => out.push(s),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }
}
