//! From the YAML tree to the model, collecting every problem on the way.
//!
//! [`Parser`] holds what a pass collects (errors, positions, params) and the
//! helpers every part uses; the pipeline and its params are read here, a
//! task in [`task`], its steps in [`step`].

use crate::MAX_FILE_BYTES;
use crate::error::{ValidationError, ValidationErrors};
use crate::expr::OPEN;
use crate::model::{Concurrency, Pipeline, SourceMap, TaskDef};
use crate::names::{
    MAX_NAME_LEN, hides_outputs, is_env_name, is_param_name, is_pipeline_name, is_task_name,
};
use crate::substitute;
use crate::validate::{self, TaskRef, closest};
use crate::yaml::{self, Node, Pos, Value};
use capstan_proto::units::parse_timeout;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Most script-failure retries a task may ask for.
pub const MAX_RETRIES: u32 = 10;

const TOP_KEYS: &[&str] = &[
    "version",
    "name",
    "params",
    "tasks",
    "concurrency",
    "schedules",
];

mod matrix;
mod step;
mod task;

/// Parses and validates a pipeline file. `file` is the name used in messages.
///
/// Every problem is reported (never just the first), each with its line and
/// column, in file order.
pub fn parse(file: &str, text: &str) -> Result<Pipeline, ValidationErrors> {
    if text.len() > MAX_FILE_BYTES {
        return Err(ValidationErrors(vec![ValidationError::new(
            file,
            0,
            0,
            format!(
                "{file} is {} bytes; the limit is {MAX_FILE_BYTES} bytes",
                text.len()
            ),
        )]));
    }
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let root = match yaml::load(text) {
        Ok(root) => root,
        Err(e) => {
            return Err(ValidationErrors(vec![ValidationError::new(
                file,
                e.pos.line,
                e.pos.column,
                e.message,
            )]));
        }
    };
    let mut p = Parser {
        file,
        errors: Vec::new(),
        unlisted: 0,
        positions: BTreeMap::new(),
        params: BTreeMap::new(),
    };
    let pipeline = p.pipeline(&root);
    if p.errors.is_empty() {
        return Ok(pipeline);
    }
    let mut errors = ValidationErrors::sorted(p.errors);
    if p.unlisted > 0 {
        errors.0.push(ValidationError::new(
            file,
            0,
            0,
            format!(
                "... and {} more problems, not listed: fix these first",
                p.unlisted
            ),
        ));
    }
    Err(errors)
}

/// Most problems one parse lists. A file can hold one per line: 90,000
/// of them (900 KB of bad keys) took 80 MB to hold and 14 MB to print.
pub const MAX_LISTED_ERRORS: usize = 1000;

struct Parser<'f> {
    file: &'f str,
    errors: Vec<ValidationError>,
    /// Problems found past [`MAX_LISTED_ERRORS`].
    unlisted: usize,
    /// Positions of strings holding substitutions, by field path.
    positions: BTreeMap<String, (usize, usize)>,
    /// Declared params, for checking `${{ params.X }}`.
    params: BTreeMap<String, String>,
}

/// The entries of a mapping, keys as text, duplicates removed.
struct Fields<'n> {
    pos: Pos,
    entries: Vec<(String, &'n Node, &'n Node)>,
}

impl<'n> Fields<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|&(_, _, v)| v)
    }
    fn key(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|&(_, k, _)| k)
    }
}

fn quoted_list(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Parser<'_> {
    fn err(&mut self, pos: Pos, message: impl Into<String>) {
        if self.errors.len() >= MAX_LISTED_ERRORS {
            self.unlisted += 1;
            return;
        }
        self.errors.push(ValidationError::new(
            self.file, pos.line, pos.column, message,
        ));
    }

    /// The entries of a mapping; reports non-mappings, bad and duplicate keys.
    fn entries<'n>(&mut self, node: &'n Node, what: &str) -> Option<Fields<'n>> {
        let Value::Map(pairs) = &node.value else {
            self.err(
                node.pos,
                format!("{what} must be a mapping, found {}", node.kind()),
            );
            return None;
        };
        let mut first: HashMap<String, Pos> = HashMap::new();
        let mut entries = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            let Some(key) = k.scalar_text() else {
                self.err(
                    k.pos,
                    format!("keys in {what} must be strings, found {}", k.kind()),
                );
                continue;
            };
            if let Some(p) = first.get(&key) {
                let msg = format!(
                    "duplicate key `{key}` in {what} (first defined at line {}, column {})",
                    p.line, p.column
                );
                self.err(k.pos, msg);
                continue;
            }
            first.insert(key.clone(), k.pos);
            entries.push((key, k, v));
        }
        Some(Fields {
            pos: node.pos,
            entries,
        })
    }

    /// Like [`Self::entries`], and reports keys not in `allowed`.
    fn fields<'n>(&mut self, node: &'n Node, what: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        let fields = self.entries(node, what)?;
        for (key, k, _) in &fields.entries {
            if !allowed.contains(&key.as_str()) {
                let mut msg = format!("unknown key `{key}` in {what}");
                if let Some(c) = closest(key, allowed.iter().copied()) {
                    msg.push_str(&format!(" (did you mean `{c}`?)"));
                }
                msg.push_str(&format!("; allowed keys: {}", quoted_list(allowed)));
                self.err(k.pos, msg);
            }
        }
        Some(fields)
    }

    fn missing(&mut self, pos: Pos, key: &str, what: &str) {
        self.err(pos, format!("missing required key `{key}` in {what}"));
    }

    /// A scalar as text. Null and collections are reported.
    fn text(&mut self, node: &Node, what: &str) -> Option<String> {
        match node.scalar_text() {
            Some(s) => Some(s),
            None => {
                self.err(
                    node.pos,
                    format!("{what} must be a string, found {}", node.kind()),
                );
                None
            }
        }
    }

    /// A non-empty string whose substitutions are checked and recorded under `path`.
    fn subst(&mut self, node: &Node, what: &str, path: String) -> Option<String> {
        let s = self.text(node, what)?;
        if s.trim().is_empty() {
            self.err(node.pos, format!("{what} must not be empty"));
            return None;
        }
        self.check_subst(node.pos, &s, path);
        Some(s)
    }

    fn check_subst(&mut self, pos: Pos, s: &str, path: String) {
        if !s.contains(OPEN) {
            return;
        }
        for problem in substitute::check(s, &self.params) {
            self.err(pos, problem);
        }
        self.positions.insert(path, (pos.line, pos.column));
    }

    /// An optional field: absent or null is `None`.
    fn opt_subst(&mut self, f: &Fields, key: &str, what: &str, path: String) -> Option<String> {
        let node = f.get(key).filter(|n| !n.is_null())?;
        self.subst(node, what, path)
    }

    fn timeout(&mut self, node: &Node, what: &str) -> Option<Duration> {
        let result = match &node.value {
            Value::Null => return None,
            Value::Int(n) if *n >= 0 => parse_timeout(&n.to_string()),
            Value::Int(_) | Value::Float(_) => {
                parse_timeout(&node.scalar_text().unwrap_or_default())
            }
            Value::Str(s) => parse_timeout(s),
            _ => Err(format!(
                "{what} must be a duration such as `30s`, `5m` or `1h30m`, found {}",
                node.kind()
            )),
        };
        result
            .map_err(|e| self.err(node.pos, format!("{e} ({what})")))
            .ok()
    }

    /// A string -> string map (`env`), values stringified, null values empty.
    fn string_map(&mut self, node: &Node, what: &str, path: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if node.is_null() {
            return out;
        }
        let Some(fields) = self.entries(node, what) else {
            return out;
        };
        for (key, k, v) in fields.entries {
            if !is_env_name(&key) {
                self.err(
                    k.pos,
                    format!("bad environment variable name `{key}` in {what}: use letters, digits and `_`, not starting with a digit"),
                );
            }
            let value = if v.is_null() {
                Some(String::new())
            } else {
                self.text(v, &format!("the value of `{key}` in {what}"))
            };
            if let Some(value) = value {
                self.check_subst(v.pos, &value, format!("{path}.{key}"));
                out.insert(key, value);
            }
        }
        out
    }

    fn pipeline(&mut self, root: &Node) -> Pipeline {
        let mut pipeline = Pipeline::default();
        if root.is_null() {
            self.err(
                Pos::START,
                "the file is empty: a pipeline needs `version: 1`, a `name` and `tasks`",
            );
            return pipeline;
        }
        let Some(f) = self.fields(root, "the pipeline file", TOP_KEYS) else {
            return pipeline;
        };
        let top = f.pos;

        match f.get("version") {
            None => self.missing(
                top,
                "version",
                "the pipeline file (it must be `version: 1`)",
            ),
            Some(v) => {
                if !matches!(v.value, Value::Int(1)) {
                    let found = v
                        .scalar_text()
                        .map_or_else(|| v.kind().to_owned(), |s| format!("`{s}`"));
                    self.err(v.pos, format!("`version` must be 1, found {found}"));
                }
            }
        }

        match f.get("name") {
            None => self.missing(top, "name", "the pipeline file"),
            Some(v) => {
                if let Some(name) = self.text(v, "`name`") {
                    if is_pipeline_name(&name) {
                        pipeline.name = name;
                    } else {
                        self.err(v.pos, format!("bad pipeline name `{name}`: use lower-case letters, digits, `_`, `.` and `-`, starting with a letter or digit, at most {MAX_NAME_LEN} characters"));
                    }
                }
            }
        }

        if let Some(v) = f.get("params").filter(|v| !v.is_null()) {
            self.params = self.params(v);
        }
        pipeline.params = self.params.clone();

        match f.get("tasks") {
            None => self.missing(top, "tasks", "the pipeline file"),
            Some(v) => pipeline.tasks = self.tasks(v),
        }
        if let Some(v) = f.get("concurrency").filter(|v| !v.is_null()) {
            pipeline.concurrency = self.concurrency(v);
        }
        if let Some(v) = f.get("schedules").filter(|v| !v.is_null()) {
            pipeline.schedules = self.schedules(v);
        }
        pipeline.source_map = SourceMap {
            positions: std::mem::take(&mut self.positions),
        };
        pipeline
    }

    fn concurrency(&mut self, node: &Node) -> Option<Concurrency> {
        const KEYS: &[&str] = &["group", "cancel-in-progress"];
        let f = self.fields(node, "`concurrency`", KEYS)?;
        let Some(g) = f.get("group") else {
            self.missing(f.pos, "group", "`concurrency`");
            return None;
        };
        let group = self.subst(g, "`concurrency.group`", "concurrency.group".into())?;
        let cancel_in_progress = match f.get("cancel-in-progress").map(|n| &n.value) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                let n = f.get("cancel-in-progress").expect("just matched");
                self.err(
                    n.pos,
                    format!(
                        "`cancel-in-progress` must be true or false, found {}",
                        n.kind()
                    ),
                );
                false
            }
        };
        Some(Concurrency {
            group,
            cancel_in_progress,
        })
    }

    /// `schedules:`, a list of `{cron: EXPR}`; each expression's shape is
    /// checked here (its meaning by the coordinator's cron parser).
    fn schedules(&mut self, node: &Node) -> Vec<String> {
        let Value::Seq(items) = &node.value else {
            self.err(
                node.pos,
                format!(
                    "`schedules` must be a list of `{{cron: \"...\"}}`, found {}",
                    node.kind()
                ),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in items {
            let Some(f) = self.fields(item, "a schedule", &["cron"]) else {
                continue;
            };
            let Some(c) = f.get("cron") else {
                self.missing(f.pos, "cron", "a schedule");
                continue;
            };
            let Some(expr) = self.text(c, "`cron`") else {
                continue;
            };
            let fields = expr.split_whitespace().count();
            let chars_ok = expr
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || " */,-?#".contains(ch));
            if !(5..=7).contains(&fields) || !chars_ok {
                self.err(
                    c.pos,
                    format!("bad cron expression `{expr}`: write 5 fields (`0 3 * * *`: 03:00 every day) or 6 with seconds first"),
                );
                continue;
            }
            out.push(expr);
        }
        out
    }

    fn params(&mut self, node: &Node) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(fields) = self.entries(node, "`params`") else {
            return out;
        };
        for (key, k, v) in fields.entries {
            if !is_param_name(&key) {
                self.err(k.pos, format!("bad param name `{key}`: use letters, digits, `_` and `-`, starting with a letter or `_`, at most {MAX_NAME_LEN} characters"));
            }
            let value = match &v.value {
                Value::Null => Some(String::new()),
                _ => self.text(v, &format!("the default of param `{key}`")),
            };
            if let Some(value) = value {
                if value.contains(OPEN) {
                    self.err(v.pos, format!("the default of param `{key}` must not contain `{OPEN}`: params are plain values"));
                }
                out.insert(key, value);
            }
        }
        out
    }

    fn tasks(&mut self, node: &Node) -> Vec<TaskDef> {
        let mut tasks = Vec::new();
        if node.is_null() {
            self.err(
                node.pos,
                "`tasks` is empty: a pipeline needs at least one task",
            );
            return tasks;
        }
        let Some(fields) = self.entries(node, "`tasks`") else {
            return tasks;
        };
        if fields.entries.is_empty() {
            self.err(
                node.pos,
                "`tasks` is empty: a pipeline needs at least one task",
            );
        }
        let mut refs = Vec::new();
        for (name, k, v) in fields.entries {
            if !is_task_name(&name) {
                self.err(k.pos, format!("bad task name `{name}`: use letters, digits, `_`, `.` and `-`, starting with a letter or digit, at most {MAX_NAME_LEN} characters"));
            } else if hides_outputs(&name) {
                self.err(k.pos, format!("bad task name `{name}`: a task name may not contain `.outputs.` or end in `.outputs`, or `${{{{ tasks.{name}.outputs.KEY }}}}` could name another task's output; rename it"));
            }
            let (task, needs) = self.task(&name, k.pos, v);
            refs.push(TaskRef {
                name: name.clone(),
                pos: k.pos,
                needs,
            });
            tasks.push(task);
        }
        for (pos, msg) in validate::check_needs(&refs) {
            self.err(pos, msg);
        }
        tasks
    }
}
