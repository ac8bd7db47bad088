//! A task: its fields, resources, capabilities, `runs-on`, `needs`,
//! `services` and how its images are pulled.

use std::collections::{BTreeMap, HashMap};

use capstan_proto::units::parse_memory;

use super::{Fields, MAX_RETRIES, Parser};
use crate::cond::Ref;
use crate::expr::OPEN;
use crate::model::{Approval, ServiceDef, TaskDef};
use crate::names::{MAX_NAME_LEN, is_dns_label, is_label_key, is_label_value, is_secret_name};
use crate::yaml::{Node, Pos, Value};

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
    "matrix",
    "approval",
    "if",
    "finally",
    "services",
    "pull",
    "pull-credentials",
];

const SERVICE_KEYS: &[&str] = &["image", "command", "env", "ready", "ready-timeout"];
/// Most services of one task.
const MAX_SERVICES: usize = 16;
/// The values of `pull`.
const PULL: &[&str] = &["always", "if-not-present", "never"];

const APPROVAL_KEYS: &[&str] = &["prompt", "by", "timeout"];
/// The scopes an `approval.by` may name.
const SCOPES: &[&str] = &["read", "submit", "admin"];

const RESOURCE_KEYS: &[&str] = &["cpus", "memory"];

impl Parser<'_> {
    pub(super) fn task(
        &mut self,
        name: &str,
        key_pos: Pos,
        node: &Node,
    ) -> (TaskDef, Vec<(String, Pos)>) {
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
            task.retries = self.retries(v, &what);
        }
        if let Some(v) = f.get("capabilities") {
            task.capabilities = self.capabilities(v, &what);
        }
        if let Some(v) = f.get("resources") {
            (task.cpus, task.memory_bytes) = self.resources(v, &what);
        }
        self.images(&f, &what, &base, &mut task);
        match f.get("steps") {
            None => self.missing(key_pos, "steps", &what),
            Some(v) => task.steps = self.steps(v, &what, &base),
        }
        let matrix = f.get("matrix").filter(|v| !v.is_null());
        if let Some(v) = matrix {
            task.matrix = self.matrix(v, &what);
        }
        if let Some(v) = f.get("approval").filter(|v| !v.is_null()) {
            task.approval = self.approval(v, &what, &base);
        }
        if let Some(v) = f.get("if").filter(|v| !v.is_null()) {
            task.condition = self.condition(v, &what, &task);
            self.positions
                .insert(format!("{base}.if"), (v.pos.line, v.pos.column));
        }
        task.finally = self.flag(&f, "finally", &what, false);
        // A matrix that did not parse has its own errors already.
        if matrix.is_none() || task.matrix.is_some() {
            self.check_matrix_refs(&mut task, key_pos);
        }
        (task, needs)
    }
    /// `retries:` (0 when it is not a whole number in range, which is
    /// reported).
    fn retries(&mut self, v: &Node, what: &str) -> u32 {
        match &v.value {
            Value::Null => {}
            Value::Int(n) if (0..=i128::from(MAX_RETRIES)).contains(n) => {
                return u32::try_from(*n).unwrap_or_default();
            }
            Value::Int(n) => self.err(v.pos, format!("`retries` of {what} must be between 0 and {MAX_RETRIES}, found {n}")),
            _ => self.err(v.pos, format!("`retries` of {what} must be a whole number between 0 and {MAX_RETRIES}, found {}", v.kind())),
        }
        0
    }

    /// The task's containers beyond its steps and how their images are
    /// got: `services`, `pull`, `pull-credentials`.
    fn images(&mut self, f: &Fields, what: &str, base: &str, task: &mut TaskDef) {
        if let Some(v) = f.get("services") {
            task.services = self.services(v, what, base);
        }
        task.pull = self
            .choice(f, "pull", what, PULL)
            .flatten()
            .map(str::to_owned);
        if let Some(v) = f.get("pull-credentials").filter(|v| !v.is_null()) {
            task.pull_credentials = self.secret_name(v, &format!("`pull-credentials` of {what}"));
            if task.image.is_none() {
                self.err(
                    v.pos,
                    format!("`pull-credentials` of {what} is sent to the registry of the task's `image:`, and it has none: set `image:`, or map the registry to a secret with the runner's --docker-pull-credentials"),
                );
            }
        }
    }

    /// `if:` checked: it parses, and names declared params, keys of the
    /// task's matrix and tasks it needs.
    fn condition(&mut self, node: &Node, what: &str, task: &TaskDef) -> Option<String> {
        let text = self.text(node, &format!("`if` of {what}"))?;
        let c = match crate::cond::parse(&text) {
            Ok(c) => c,
            Err(e) => {
                self.err(node.pos, format!("`if` of {what} does not parse: {e}"));
                return None;
            }
        };
        let keys = task.matrix.as_ref().map(|m| &m.axes);
        for r in c.refs() {
            let problem = match r {
                Ref::Param(p) if !self.params.contains_key(p) => {
                    format!("`{r}` in `if` of {what}: no param `{p}` is declared")
                }
                Ref::Matrix(k) if !keys.is_some_and(|a| a.contains_key(k)) => {
                    format!("`{r}` in `if` of {what}: the task's matrix has no key `{k}`")
                }
                Ref::TaskState(t) if !task.needs.contains(t) => format!(
                    "`{r}` in `if` of {what}: a condition may read the state of a task it needs; add `{t}` to its `needs`"
                ),
                _ => continue,
            };
            self.err(node.pos, problem);
        }
        Some(text)
    }

    /// `approval: { prompt, by: [scopes], timeout }`; `by` defaults to
    /// `[admin]`, the prompt to a question naming the task.
    fn approval(&mut self, node: &Node, what: &str, base: &str) -> Option<Approval> {
        let aw = format!("`approval` of {what}");
        let f = self.fields(node, &aw, APPROVAL_KEYS)?;
        let prompt = self
            .opt_subst(
                &f,
                "prompt",
                &format!("`prompt` of {aw}"),
                format!("{base}.approval.prompt"),
            )
            .unwrap_or_else(|| format!("run {what}?"));
        let mut by = Vec::new();
        match f.get("by").map(|n| (n, &n.value)) {
            None | Some((_, Value::Null)) => by.push("admin".to_owned()),
            Some((n, Value::Seq(items))) => {
                if items.is_empty() {
                    self.err(n.pos, format!("`by` of {aw} is empty: no token could approve the task; name scopes such as [admin]"));
                }
                for item in items {
                    match item.scalar_text() {
                        Some(s) if SCOPES.contains(&s.as_str()) => by.push(s),
                        _ => self.err(
                            item.pos,
                            format!(
                                "`by` of {aw} names scopes: read, submit or admin, found {}",
                                item.scalar_text().unwrap_or_else(|| item.kind().to_owned())
                            ),
                        ),
                    }
                }
            }
            Some((n, _)) => self.err(
                n.pos,
                format!(
                    "`by` of {aw} must be a list of scopes such as [admin], found {}",
                    n.kind()
                ),
            ),
        }
        let timeout = f
            .get("timeout")
            .and_then(|v| self.timeout(v, &format!("`timeout` of {aw}")));
        Some(Approval {
            prompt,
            by,
            timeout,
        })
    }

    /// `services: { NAME: { image, command, env, ready, ready-timeout } }`,
    /// in file order.
    fn services(&mut self, node: &Node, what: &str, base: &str) -> Vec<ServiceDef> {
        let sw = format!("`services` of {what}");
        if node.is_null() {
            return Vec::new();
        }
        if !matches!(node.value, Value::Map(_)) {
            self.err(
                node.pos,
                format!(
                    "{sw} must be a mapping of service names to services such as `db: {{image: postgres:16}}`, found {}",
                    node.kind()
                ),
            );
            return Vec::new();
        }
        let Some(fields) = self.entries(node, &sw) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, (name, k, v)) in fields.entries.into_iter().enumerate() {
            if i == MAX_SERVICES {
                let n = i + 1;
                self.err(k.pos, format!("service `{name}` is number {n} in {sw}; at most {MAX_SERVICES} services per task: drop some or split the task"));
            }
            if !is_dns_label(&name) {
                self.err(k.pos, format!("bad service name `{name}` in {sw}: it is the service's host name, a DNS label of 1 to {MAX_NAME_LEN} lower-case letters, digits and `-`, starting and ending with a letter or digit"));
            }
            let sw = format!("service `{name}` of {what}");
            if let Some(s) = self.service(&name, k.pos, v, &sw, &format!("{base}.services.{name}"))
            {
                out.push(s);
            }
        }
        out
    }

    /// One service; `path` is its field path (`tasks.T.services.NAME`).
    fn service(
        &mut self,
        name: &str,
        key_pos: Pos,
        node: &Node,
        what: &str,
        path: &str,
    ) -> Option<ServiceDef> {
        if !matches!(node.value, Value::Map(_)) {
            let pos = if node.is_null() { key_pos } else { node.pos };
            self.err(
                pos,
                format!(
                    "{what} must be a mapping with at least `image`, such as `{{image: postgres:16}}`, found {}",
                    node.kind()
                ),
            );
            return None;
        }
        let f = self.fields(node, what, SERVICE_KEYS)?;
        let image = self.required(&f, "image", what, path);
        let command = match f.get("command") {
            Some(v) => self.command(
                v,
                &format!("`command` of {what}"),
                &format!("{path}.command"),
            ),
            None => Some(Vec::new()),
        };
        let env = match f.get("env") {
            Some(v) => self.string_map(v, &format!("`env` of {what}"), &format!("{path}.env")),
            None => BTreeMap::new(),
        };
        let ready = self.opt_subst(
            &f,
            "ready",
            &format!("`ready` of {what}"),
            format!("{path}.ready"),
        );
        let ready_timeout = f
            .get("ready-timeout")
            .and_then(|v| self.timeout(v, &format!("`ready-timeout` of {what}")));
        if ready.is_none()
            && let Some(v) = f.get("ready-timeout").filter(|v| !v.is_null())
        {
            self.err(
                v.pos,
                format!("`ready-timeout` of {what} bounds its `ready` command, which it has none of: add `ready:` or remove `ready-timeout`"),
            );
        }
        Some(ServiceDef {
            name: name.to_owned(),
            image: image?,
            command: command?,
            env,
            ready,
            ready_timeout,
        })
    }

    /// A service's `command`: a list of arguments, each substitutable.
    fn command(&mut self, node: &Node, what: &str, path: &str) -> Option<Vec<String>> {
        let items = match &node.value {
            Value::Null => return Some(Vec::new()),
            Value::Seq(items) => items,
            _ => {
                self.err(
                    node.pos,
                    format!(
                        "{what} must be a list of arguments such as [\"postgres\", \"-c\", \"fsync=off\"], found {}",
                        node.kind()
                    ),
                );
                return None;
            }
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (j, item) in items.iter().enumerate() {
            let Some(arg) = self.text(item, &format!("an entry of {what}")) else {
                ok = false;
                continue;
            };
            self.check_subst(item.pos, &arg, format!("{path}[{j}]"));
            out.push(arg);
        }
        ok.then_some(out)
    }

    /// The name of a runner-side secret, as written (no substitutions).
    fn secret_name(&mut self, node: &Node, what: &str) -> Option<String> {
        let name = self.text(node, what)?;
        if name.contains(OPEN) {
            self.err(
                node.pos,
                format!("substitutions are not allowed in {what}: name a runner-side secret"),
            );
            return None;
        }
        if !is_secret_name(&name) {
            self.err(node.pos, format!("bad secret name `{name}` in {what}: name a runner-side secret with letters, digits, `_`, `.` and `-`"));
            return None;
        }
        Some(name)
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
}
