//! From the YAML tree to the model, collecting every problem on the way.

use super::MAX_FILE_BYTES;
use super::error::{ValidationError, ValidationErrors};
use super::model::{Pipeline, SourceMap, StepDef, StepKind, TaskDef};
use super::substitute::{self, OPEN};
use super::validate::{self, TaskRef, closest};
use super::yaml::{self, Node, Pos, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Longest task, pipeline and param name.
pub const MAX_NAME_LEN: usize = 63;
/// Most script-failure retries a task may ask for.
pub const MAX_RETRIES: u32 = 10;
/// Longest task or step timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

const TOP_KEYS: &[&str] = &["version", "name", "params", "tasks"];
const TASK_KEYS: &[&str] = &[
    "image",
    "runs-on",
    "env",
    "needs",
    "timeout",
    "retries",
    "capabilities",
    "resources",
    "steps",
];
const RESOURCE_KEYS: &[&str] = &["cpus", "memory"];
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
const BUILD_KEYS: &[&str] = &["context", "dockerfile", "tag"];
const PUSH_KEYS: &[&str] = &["image", "credentials"];
const SET_IMAGE_KEYS: &[&str] = &["repo", "files", "image", "allow-no-match"];
const GIT_PUSH_KEYS: &[&str] = &["message", "credentials"];

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
        positions: BTreeMap::new(),
        params: BTreeMap::new(),
    };
    let pipeline = p.pipeline(&root);
    if p.errors.is_empty() {
        Ok(pipeline)
    } else {
        Err(ValidationErrors::sorted(p.errors))
    }
}

/// `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 63 chars.
pub fn is_task_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= MAX_NAME_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
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

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A runner label key: `[A-Za-z0-9][A-Za-z0-9_./-]*`, at most 63 chars.
fn is_label_key(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= MAX_NAME_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
}

/// A runner label value: non-empty, no whitespace, `,` or `=`.
fn is_label_value(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && !s.chars().any(|c| c.is_whitespace() || c == ',' || c == '=')
}

/// Parses `30s`, `5m`, `1h30m`, `90` (seconds): whole seconds, 1s to 7 days.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "bad timeout `{s}`: use a duration such as `30s`, `5m` or `1h30m`, or a whole number of seconds"
        )
    };
    let t = s.trim();
    let secs: u64 = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse().map_err(|_| bad())?
    } else {
        let mut total: u64 = 0;
        let mut last_unit = u64::MAX;
        let mut rest = t;
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit = match rest.as_bytes().first() {
                Some(b'h') => 3600,
                Some(b'm') => 60,
                Some(b's') => 1,
                _ => return Err(bad()),
            };
            rest = &rest[1..];
            // Units in decreasing order, each at most once: `1h30m`, not `30m1h`.
            if unit >= last_unit {
                return Err(bad());
            }
            last_unit = unit;
            total = n
                .checked_mul(unit)
                .and_then(|x| total.checked_add(x))
                .ok_or_else(bad)?;
        }
        total
    };
    let d = Duration::from_secs(secs);
    if secs == 0 {
        Err(format!("timeout `{s}` must be at least 1 second"))
    } else if d > MAX_TIMEOUT {
        Err(format!(
            "timeout `{s}` is longer than the limit of 7 days (168h)"
        ))
    } else {
        Ok(d)
    }
}

struct Parser<'f> {
    file: &'f str,
    errors: Vec<ValidationError>,
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
        pipeline.source_map = SourceMap {
            positions: std::mem::take(&mut self.positions),
        };
        pipeline
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

    fn task(&mut self, name: &str, key_pos: Pos, node: &Node) -> (TaskDef, Vec<(String, Pos)>) {
        let what = format!("task `{name}`");
        let base = format!("tasks.{name}");
        let mut task = TaskDef {
            name: name.to_owned(),
            ..TaskDef::default()
        };
        let mut needs = Vec::new();
        let Some(f) = self.fields(node, &what, TASK_KEYS) else {
            return (task, needs);
        };

        task.image = self.opt_subst(
            &f,
            "image",
            &format!("`image` of {what}"),
            format!("{base}.image"),
        );
        if let Some(v) = f.get("runs-on") {
            task.runs_on = self.runs_on(v, &what);
        }
        if let Some(v) = f.get("env") {
            task.env = self.string_map(v, &format!("`env` of {what}"), &format!("{base}.env"));
        }
        if let Some(v) = f.get("needs") {
            needs = self.needs(v, &what);
            task.needs = needs.iter().map(|(n, _)| n.clone()).collect();
        }
        if let Some(v) = f.get("timeout") {
            task.timeout = self.timeout(v, &format!("`timeout` of {what}"));
        }
        if let Some(v) = f.get("retries") {
            match &v.value {
                Value::Null => {}
                Value::Int(n) if (0..=i128::from(MAX_RETRIES)).contains(n) => {
                    task.retries = u32::try_from(*n).unwrap_or_default();
                }
                Value::Int(n) => self.err(v.pos, format!("`retries` of {what} must be between 0 and {MAX_RETRIES}, found {n}")),
                _ => self.err(v.pos, format!("`retries` of {what} must be a whole number between 0 and {MAX_RETRIES}, found {}", v.kind())),
            }
        }
        if let Some(v) = f.get("capabilities") {
            task.capabilities = self.capabilities(v, &what);
        }
        if let Some(v) = f.get("resources") {
            (task.cpus, task.memory_bytes) = self.resources(v, &what);
        }
        match f.get("steps") {
            None => self.missing(key_pos, "steps", &what),
            Some(v) => task.steps = self.steps(v, &what, &base),
        }
        (task, needs)
    }

    /// `capabilities: [NET_ADMIN, chown]`: names normalised to upper case
    /// without a `CAP_` prefix.
    fn capabilities(&mut self, node: &Node, what: &str) -> Vec<String> {
        let what = format!("`capabilities` of {what}");
        let Value::Seq(items) = &node.value else {
            if !node.is_null() {
                self.err(
                    node.pos,
                    format!(
                        "{what} must be a list such as [NET_BIND_SERVICE], found {}",
                        node.kind()
                    ),
                );
            }
            return Vec::new();
        };
        let mut out: Vec<String> = Vec::new();
        for item in items {
            let Value::Str(s) = &item.value else {
                self.err(
                    item.pos,
                    format!(
                        "each entry of {what} must be a capability name, found {}",
                        item.kind()
                    ),
                );
                continue;
            };
            let upper = s.trim().to_ascii_uppercase();
            let name = upper.strip_prefix("CAP_").unwrap_or(&upper).to_string();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            {
                self.err(item.pos, format!("bad capability `{s}` in {what}: use a Linux capability name such as NET_BIND_SERVICE"));
            } else if name == "ALL" || name == "SYS_ADMIN" {
                self.err(item.pos, format!("{what} may not ask for `{name}`: it amounts to a privileged container, which Capstan never runs"));
            } else if !out.contains(&name) {
                out.push(name);
            }
        }
        out
    }

    /// `resources: { cpus: 1.5, memory: 512m }`.
    fn resources(&mut self, node: &Node, what: &str) -> (Option<f64>, Option<u64>) {
        let what = format!("`resources` of {what}");
        let Some(f) = self.fields(node, &what, RESOURCE_KEYS) else {
            return (None, None);
        };
        let cpus = f.get("cpus").and_then(|v| match &v.value {
            Value::Int(n) if *n > 0 && *n <= 1024 => Some(*n as f64),
            Value::Float(x) if *x > 0.0 && *x <= 1024.0 => Some(*x),
            _ => {
                self.err(
                    v.pos,
                    format!("`cpus` in {what} must be a positive number such as 1.5"),
                );
                None
            }
        });
        let memory = f.get("memory").and_then(|v| {
            let text = match &v.value {
                Value::Int(n) => n.to_string(),
                Value::Str(s) => s.clone(),
                _ => String::new(),
            };
            match parse_memory(&text) {
                Some(bytes) if bytes >= 4 * 1024 * 1024 => Some(bytes),
                _ => {
                    self.err(v.pos, format!("`memory` in {what} must be a size of at least 4m such as 512m or 2g (bytes, or a number with k, m or g)"));
                    None
                }
            }
        });
        (cpus, memory)
    }

    fn runs_on(&mut self, node: &Node, what: &str) -> BTreeMap<String, String> {
        let what = format!("`runs-on` of {what}");
        let mut out = BTreeMap::new();
        let mut seen: HashMap<String, Pos> = HashMap::new();
        let mut label = |p: &mut Self, pos: Pos, key: String, value: String| {
            if !is_label_key(&key) {
                p.err(pos, format!("bad label `{key}={value}` in {what}: the key must be letters, digits, `_`, `.`, `/` and `-`, at most {MAX_NAME_LEN} characters"));
            } else if value.contains(OPEN) {
                p.err(pos, format!("substitutions are not allowed in {what}"));
            } else if !is_label_value(&value) {
                p.err(pos, format!("bad label `{key}={value}` in {what}: the value must be non-empty, without spaces, `,` or `=`"));
            } else if let Some(first) = seen.get(&key) {
                p.err(
                    pos,
                    format!(
                        "label `{key}` appears twice in {what} (first at line {}, column {})",
                        first.line, first.column
                    ),
                );
            } else {
                seen.insert(key.clone(), pos);
                out.insert(key, value);
            }
        };
        match &node.value {
            Value::Null => {}
            Value::Seq(items) => {
                for item in items {
                    let Some(s) = self.text(item, &format!("an entry of {what}")) else {
                        continue;
                    };
                    match s.split_once('=') {
                        Some((k, v)) => {
                            label(self, item.pos, k.trim().to_owned(), v.trim().to_owned())
                        }
                        None => self.err(
                            item.pos,
                            format!("bad entry `{s}` in {what}: use `key=value`, e.g. `os=linux`"),
                        ),
                    }
                }
            }
            Value::Map(_) => {
                if let Some(fields) = self.entries(node, &what) {
                    for (key, k, v) in fields.entries {
                        if let Some(value) = self.text(v, &format!("label `{key}` in {what}")) {
                            label(self, k.pos, key, value);
                        }
                    }
                }
            }
            _ => self.err(
                node.pos,
                format!(
                    "{what} must be a list of `key=value` labels or a mapping, found {}",
                    node.kind()
                ),
            ),
        }
        out
    }

    fn needs(&mut self, node: &Node, what: &str) -> Vec<(String, Pos)> {
        let what = format!("`needs` of {what}");
        match &node.value {
            Value::Null => Vec::new(),
            Value::Str(s) => vec![(s.clone(), node.pos)],
            Value::Seq(items) => items
                .iter()
                .filter_map(|item| match &item.value {
                    Value::Str(s) => Some((s.clone(), item.pos)),
                    _ => {
                        self.err(
                            item.pos,
                            format!(
                                "entries of {what} must be task names, found {}",
                                item.kind()
                            ),
                        );
                        None
                    }
                })
                .collect(),
            _ => {
                self.err(
                    node.pos,
                    format!("{what} must be a list of task names, found {}", node.kind()),
                );
                Vec::new()
            }
        }
    }

    fn steps(&mut self, node: &Node, what: &str, base: &str) -> Vec<StepDef> {
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
            "run" => {
                let script = self.subst(value, &format!("{what} (the script)"), path.clone());
                let base = path.strip_suffix(".run").unwrap_or(&path);
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
            "build" => {
                let f = self.fields(value, &what, BUILD_KEYS)?;
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
                let tag = self.required(&f, "tag", &what, &path);
                Some(StepKind::Build {
                    context: context?,
                    dockerfile: dockerfile?,
                    tag: tag?,
                })
            }
            "push" => {
                let f = self.fields(value, &what, PUSH_KEYS)?;
                let image = self.required(&f, "image", &what, &path);
                let credentials = self.opt_subst(
                    &f,
                    "credentials",
                    &format!("`credentials` of {what}"),
                    format!("{path}.credentials"),
                );
                Some(StepKind::Push {
                    image: image?,
                    credentials,
                })
            }
            "set-image" => {
                let f = self.fields(value, &what, SET_IMAGE_KEYS)?;
                // No `repo`: the run's own repository (its checkout is edited).
                let repo = match f.get("repo").filter(|n| !n.is_null()) {
                    None => Some(String::new()),
                    Some(v) => self.subst(v, &format!("`repo` of {what}"), format!("{path}.repo")),
                };
                let files = match f.get("files") {
                    None => {
                        self.missing(f.pos, "files", &what);
                        None
                    }
                    Some(v) => self.files(v, &what, &path),
                };
                let image = self.required(&f, "image", &what, &path);
                let allow_no_match = match f.get("allow-no-match").map(|v| &v.value) {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        let v = f.get("allow-no-match").expect("matched above");
                        self.err(
                            v.pos,
                            format!(
                                "`allow-no-match` of {what} must be true or false, found {}",
                                v.kind()
                            ),
                        );
                        false
                    }
                };
                Some(StepKind::SetImage {
                    repo: repo?,
                    files: files?,
                    image: image?,
                    allow_no_match,
                })
            }
            "git-push" => {
                let f = self.fields(value, &what, GIT_PUSH_KEYS)?;
                let message = self.required(&f, "message", &what, &path);
                let credentials = self.opt_subst(
                    &f,
                    "credentials",
                    &format!("`credentials` of {what}"),
                    format!("{path}.credentials"),
                );
                Some(StepKind::GitPush {
                    message: message?,
                    credentials,
                })
            }
            _ => None,
        }
    }

    fn required(&mut self, f: &Fields, key: &str, what: &str, path: &str) -> Option<String> {
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

/// A memory size: bytes, or a number with `k`, `m` or `g` (powers of 1024).
pub fn parse_memory(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.char_indices().last()? {
        (i, 'k') => (&t[..i], 1u64 << 10),
        (i, 'm') => (&t[..i], 1 << 20),
        (i, 'g') => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().ok()?;
    (n.is_finite() && n > 0.0).then_some((n * mult as f64) as u64)
}
