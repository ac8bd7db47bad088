//! A task's `matrix:` (axes, `exclude`, `include`) and the check that
//! every `${{ matrix.KEY }}` of a task names one of its keys.

use std::collections::{BTreeMap, BTreeSet};

use super::Parser;
use crate::expr::{Expr, Piece, scan};
use crate::matrix::MAX_MATRIX;
use crate::model::{Matrix, TaskDef};
use crate::names::is_param_name;
use crate::yaml::{Node, Pos, Value};

/// Longest matrix value (it goes into the task's name).
const MAX_VALUE: usize = 64;
/// Most keys, and most `exclude` or `include` entries, of one matrix.
const MAX_KEYS: usize = 16;
const MAX_ENTRIES: usize = MAX_MATRIX;
/// Most combinations of the axes before `exclude` (they are built).
const MAX_PRODUCT: usize = 16 * MAX_MATRIX;

impl Parser<'_> {
    /// `matrix: { KEY: [values...], exclude: [...], include: [...] }`.
    pub(super) fn matrix(&mut self, node: &Node, what: &str) -> Option<Matrix> {
        let what = format!("`matrix` of {what}");
        let fields = self.entries(node, &what)?;
        let mut m = Matrix::default();
        let mut lists = Vec::new();
        let mut vars = BTreeSet::new();
        for (key, k, v) in &fields.entries {
            match key.as_str() {
                "exclude" | "include" => lists.push((key.as_str(), *v)),
                _ if !is_param_name(key) => self.err(k.pos, format!("bad matrix key `{key}` in {what}: use letters, digits, `_` and `-`, starting with a letter")),
                _ if !vars.insert(key.replace('-', "_")) => self.err(k.pos, format!("matrix key `{key}` in {what} is another key's environment variable (`-` and `_` are one): rename one")),
                _ => {
                    if let Some(values) = self.axis(v, &format!("`{key}` of {what}")) {
                        m.axes.insert(key.clone(), values);
                    }
                }
            }
        }
        let declared = fields.entries.len() > lists.len();
        if m.axes.is_empty() {
            if declared {
                // Each bad axis has its own error.
                return None;
            }
            self.err(
                node.pos,
                format!("{what} has no keys: give at least one, such as `shard: [1, 2]`"),
            );
            return None;
        }
        if m.axes.len() > MAX_KEYS {
            let n = m.axes.len();
            self.err(node.pos, format!("{what} has {n} keys; at most {MAX_KEYS}"));
            return None;
        }
        let product = (m.axes.values())
            .try_fold(1usize, |n, v| n.checked_mul(v.len()))
            .filter(|&n| n <= MAX_PRODUCT);
        if product.is_none() {
            self.err(node.pos, format!("{what} has more than {MAX_PRODUCT} combinations before `exclude`; at most {MAX_MATRIX} tasks: use fewer values"));
            return None;
        }
        for (list, v) in lists {
            let entries = self.combos(v, &format!("`{list}` of {what}"), &m, list == "include");
            match list {
                "exclude" => m.exclude = entries,
                _ => m.include = entries,
            }
        }
        let n = m.combinations().len();
        if n == 0 {
            self.err(
                node.pos,
                format!("{what} excludes every combination: the task would never run"),
            );
            return None;
        }
        if n > MAX_MATRIX {
            self.err(
                node.pos,
                format!("{what} makes {n} tasks; at most {MAX_MATRIX}: use fewer values"),
            );
            return None;
        }
        Some(m)
    }

    /// One axis: a non-empty list of distinct scalars, as text.
    fn axis(&mut self, node: &Node, what: &str) -> Option<Vec<String>> {
        let Value::Seq(items) = &node.value else {
            self.err(
                node.pos,
                format!(
                    "{what} must be a list of values such as [1, 2], found {}",
                    node.kind()
                ),
            );
            return None;
        };
        if items.is_empty() {
            self.err(
                node.pos,
                format!("{what} is empty: give at least one value"),
            );
            return None;
        }
        let mut out: Vec<String> = Vec::new();
        for item in items {
            let v = self.value(item, what)?;
            if out.contains(&v) {
                self.err(item.pos, format!("value `{v}` appears twice in {what}"));
                return None;
            }
            out.push(v);
        }
        Some(out)
    }

    /// A matrix value: a scalar that fits in a task name.
    fn value(&mut self, node: &Node, what: &str) -> Option<String> {
        let Some(v) = node.scalar_text() else {
            self.err(
                node.pos,
                format!(
                    "each value of {what} must be a string or number, found {}",
                    node.kind()
                ),
            );
            return None;
        };
        let good = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
        if v.is_empty() || v.len() > MAX_VALUE || !v.chars().all(good) || v.starts_with('.') {
            self.err(node.pos, format!("bad matrix value `{v}` in {what}: 1 to {MAX_VALUE} of the characters a-z A-Z 0-9 . _ -, not starting with `.` (it becomes part of the task's name and branch names)"));
            return None;
        }
        Some(v)
    }

    /// `exclude`/`include`: a list of `{KEY: value}` mappings over the
    /// axes' keys (an `include` entry names every key).
    fn combos(
        &mut self,
        node: &Node,
        what: &str,
        m: &Matrix,
        all: bool,
    ) -> Vec<BTreeMap<String, String>> {
        let Value::Seq(items) = &node.value else {
            self.err(
                node.pos,
                format!(
                    "{what} must be a list of mappings such as [{{shard: 1}}], found {}",
                    node.kind()
                ),
            );
            return Vec::new();
        };
        if items.len() > MAX_ENTRIES {
            let n = items.len();
            self.err(
                node.pos,
                format!("{what} has {n} entries; at most {MAX_ENTRIES}"),
            );
            return Vec::new();
        }
        let mut out = Vec::new();
        for item in items {
            let Some(f) = self.entries(item, what) else {
                continue;
            };
            if f.entries.is_empty() {
                let msg = format!("an entry of {what} is empty: name a key and its value");
                self.err(item.pos, msg);
                continue;
            }
            let mut c = BTreeMap::new();
            for (key, k, v) in &f.entries {
                if !m.axes.contains_key(key) {
                    let keys: Vec<&str> = m.axes.keys().map(String::as_str).collect();
                    self.err(
                        k.pos,
                        format!(
                            "unknown matrix key `{key}` in {what} (the keys: {})",
                            keys.join(", ")
                        ),
                    );
                } else if let Some(value) = self.value(v, what) {
                    // An exclude of a value no axis has removes nothing: a typo.
                    if !all && !m.axes[key].contains(&value) {
                        let values = m.axes[key].join(", ");
                        let msg =
                            format!("`{value}` in {what} is not a value of `{key}` ({values})");
                        self.err(v.pos, msg);
                    }
                    c.insert(key.clone(), value);
                }
            }
            if all
                && c.len() < m.axes.len()
                && f.entries.iter().all(|(k, _, _)| m.axes.contains_key(k))
            {
                let missing: Vec<&str> = m
                    .axes
                    .keys()
                    .filter(|k| !c.contains_key(*k))
                    .map(String::as_str)
                    .collect();
                self.err(
                    item.pos,
                    format!(
                        "an entry of {what} must name every matrix key; it lacks {}",
                        missing.join(", ")
                    ),
                );
            } else if !c.is_empty() {
                out.push(c);
            }
        }
        out
    }

    /// Every `${{ matrix.KEY }}` of `task` must name a key of its matrix.
    pub(super) fn check_matrix_refs(&mut self, task: &mut TaskDef, key_pos: Pos) {
        let keys: Vec<String> = task
            .matrix
            .as_ref()
            .map(|m| m.axes.keys().cloned().collect())
            .unwrap_or_default();
        let name = task.name.clone();
        let mut problems = Vec::new();
        crate::substitute::for_each_string(task, &mut |path, _, value| {
            let Ok(pieces) = scan(value) else { return };
            for p in pieces {
                let Piece::Expr(Expr::Matrix(k)) = p else {
                    continue;
                };
                if keys.contains(&k) {
                    continue;
                }
                let msg = if keys.is_empty() {
                    format!("`${{{{ matrix.{k} }}}}` in task `{name}`, which has no `matrix`")
                } else {
                    format!(
                        "unknown matrix key `{k}` in `${{{{ matrix.{k} }}}}` (task `{name}` has {})",
                        keys.join(", ")
                    )
                };
                problems.push((path.to_owned(), msg));
            }
        });
        for (path, msg) in problems {
            let pos = self
                .positions
                .get(&path)
                .map_or(key_pos, |&(line, column)| Pos { line, column });
            self.err(pos, msg);
        }
    }
}
