//! Matrix tasks: a task with `matrix:` becomes one task per combination of
//! its axes' values at submit ([`expand`], called by `resolve`), named
//! `NAME[k=v,...]` with the keys in sorted order. A task that needs `NAME`
//! needs every expansion of it.

use std::collections::{BTreeMap, HashMap};

use crate::model::{Matrix, TaskDef};

/// Most tasks one matrix may make.
pub const MAX_MATRIX: usize = 256;

impl Matrix {
    /// Every combination, in axis order, without the excluded ones, then
    /// the included ones not already there.
    pub fn combinations(&self) -> Vec<BTreeMap<String, String>> {
        let mut out: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
        for (key, values) in &self.axes {
            out = out
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.insert(key.clone(), v.clone());
                        c
                    })
                })
                .collect();
        }
        out.retain(|c| !self.exclude.iter().any(|x| matches(c, x)));
        let mut seen: std::collections::BTreeSet<_> = out.iter().cloned().collect();
        for extra in &self.include {
            if seen.insert(extra.clone()) {
                out.push(extra.clone());
            }
        }
        out
    }
}

/// Does combination `c` have every value `pattern` names?
fn matches(c: &BTreeMap<String, String>, pattern: &BTreeMap<String, String>) -> bool {
    pattern.iter().all(|(k, v)| c.get(k) == Some(v))
}

/// `NAME[k=v,...]`.
pub fn expanded_name(name: &str, values: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{name}[{}]", pairs.join(","))
}

/// The tasks with every matrix expanded, in file order (a matrix's
/// expansions where it stood), and every `needs` of a matrix task turned
/// into its expansions.
pub(crate) fn expand(tasks: &[TaskDef]) -> Vec<TaskDef> {
    let mut names: HashMap<&str, Vec<String>> = HashMap::new();
    let mut out = Vec::new();
    for task in tasks {
        let Some(matrix) = &task.matrix else {
            out.push(task.clone());
            continue;
        };
        let mut made = Vec::new();
        for values in matrix.combinations() {
            let mut t = task.clone();
            t.name = expanded_name(&task.name, &values);
            t.matrix = None;
            t.expanded_from = Some(task.name.clone());
            t.matrix_values = values;
            made.push(t.name.clone());
            out.push(t);
        }
        names.insert(&task.name, made);
    }
    for t in &mut out {
        t.needs = t
            .needs
            .iter()
            .flat_map(|n| {
                names
                    .get(n.as_str())
                    .cloned()
                    .unwrap_or_else(|| vec![n.clone()])
            })
            .collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn combinations_exclude_and_include() {
        let m = Matrix {
            axes: [
                (
                    "shard".to_string(),
                    vec!["1".into(), "2".into(), "3".into()],
                ),
                ("db".to_string(), vec!["pg15".into(), "pg16".into()]),
            ]
            .into_iter()
            .collect(),
            exclude: vec![
                map(&[("shard", "1"), ("db", "pg15")]),
                map(&[("shard", "3")]),
            ],
            include: vec![
                map(&[("shard", "9"), ("db", "pg16")]),
                map(&[("shard", "2"), ("db", "pg16")]),
            ],
        };
        let names: Vec<String> = m
            .combinations()
            .iter()
            .map(|c| expanded_name("t", c))
            .collect();
        assert_eq!(
            names,
            [
                "t[db=pg15,shard=2]",
                "t[db=pg16,shard=1]",
                "t[db=pg16,shard=2]",
                "t[db=pg16,shard=9]"
            ]
        );
    }

    #[test]
    fn dependents_need_every_expansion() {
        let test = TaskDef {
            name: "test".into(),
            matrix: Some(Matrix {
                axes: [("n".to_string(), vec!["1".into(), "2".into()])]
                    .into_iter()
                    .collect(),
                ..Matrix::default()
            }),
            ..TaskDef::default()
        };
        let report = TaskDef {
            name: "report".into(),
            needs: vec!["test".into()],
            ..TaskDef::default()
        };
        let out = expand(&[test, report]);
        let names: Vec<&str> = out.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["test[n=1]", "test[n=2]", "report"]);
        assert_eq!(out[2].needs, ["test[n=1]", "test[n=2]"]);
        assert_eq!(out[1].matrix_values, map(&[("n", "2")]));
        assert_eq!(out[1].expanded_from.as_deref(), Some("test"));
        assert!(out[0].matrix.is_none());
    }
}
