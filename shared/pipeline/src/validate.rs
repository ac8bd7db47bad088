//! Checks across tasks: `needs` references and dependency cycles.

use super::yaml::Pos;
use std::collections::{BTreeSet, HashMap};

/// What the cross-task checks need to know about a task.
pub(crate) struct TaskRef {
    pub name: String,
    /// Position of the task's key under `tasks:`.
    pub pos: Pos,
    /// Each entry of `needs` with its position.
    pub needs: Vec<(String, Pos)>,
}

/// Checks `needs` (unknown, self, repeated) and finds dependency cycles.
/// Returns `(position, message)` for each problem.
pub(crate) fn check_needs(tasks: &[TaskRef]) -> Vec<(Pos, String)> {
    let mut problems = Vec::new();
    let index: HashMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .rev() // the first of duplicate names wins (duplicates are reported elsewhere)
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();

    // Edges, file order, without self-edges, unknown names and repeats.
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); tasks.len()];
    for (i, t) in tasks.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for (need, pos) in &t.needs {
            if !seen.insert(need.as_str()) {
                problems.push((
                    *pos,
                    format!("task `{}` lists `{need}` in needs twice", t.name),
                ));
                continue;
            }
            if *need == t.name {
                problems.push((*pos, format!("task `{need}` needs itself")));
                continue;
            }
            match index.get(need.as_str()) {
                Some(&j) => edges[i].push(j),
                None => {
                    let mut msg = format!(
                        "task `{}` needs `{need}`, which is not a task in this file",
                        t.name
                    );
                    if let Some(c) = closest(need, tasks.iter().map(|t| t.name.as_str())) {
                        msg.push_str(&format!(" (did you mean `{c}`?)"));
                    }
                    problems.push((*pos, msg));
                }
            }
        }
    }

    for cycle in find_cycles(&edges) {
        let names: Vec<&str> = cycle
            .iter()
            .chain(std::iter::once(&cycle[0]))
            .map(|&i| tasks[i].name.as_str())
            .collect();
        problems.push((
            tasks[cycle[0]].pos,
            format!(
                "dependency cycle: {} (each task needs the next)",
                names.join(" -> ")
            ),
        ));
    }
    problems
}

/// Finds cycles with an iterative depth-first search (no recursion, so a long
/// chain of tasks cannot overflow the stack). Each cycle is reported once,
/// rotated to start at its task that comes first in the file.
fn find_cycles(edges: &[Vec<usize>]) -> Vec<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let mut mark = vec![Mark::New; edges.len()];
    let mut cycles: Vec<Vec<usize>> = Vec::new();
    let mut seen: BTreeSet<Vec<usize>> = BTreeSet::new();
    for root in 0..edges.len() {
        if mark[root] != Mark::New {
            continue;
        }
        // Stack of (node, next edge to follow); `path` mirrors the active nodes.
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        mark[root] = Mark::Active;
        while let Some(top) = stack.last_mut() {
            let (node, next) = *top;
            if let Some(&to) = edges[node].get(next) {
                top.1 += 1;
                match mark[to] {
                    Mark::New => {
                        mark[to] = Mark::Active;
                        stack.push((to, 0));
                    }
                    Mark::Active => {
                        let start = stack.iter().position(|&(n, _)| n == to).unwrap_or(0);
                        let mut cycle: Vec<usize> =
                            stack[start..].iter().map(|&(n, _)| n).collect();
                        let first = cycle
                            .iter()
                            .enumerate()
                            .min_by_key(|&(_, &n)| n)
                            .map_or(0, |(i, _)| i);
                        cycle.rotate_left(first);
                        if seen.insert(cycle.clone()) {
                            cycles.push(cycle);
                        }
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                stack.pop();
            }
        }
    }
    cycles
}

/// The candidate closest to `name` within edit distance 2, if any.
pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .filter(|c| *c != name)
        .map(|c| (edit_distance(name, c), c))
        .filter(|&(d, _)| d <= 2)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over chars.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("lint", "lnit"), 2);
        assert_eq!(
            closest("unit-tst", ["lint", "unit-test"].into_iter()),
            Some("unit-test")
        );
        assert_eq!(closest("deploy", ["lint", "unit-test"].into_iter()), None);
    }

    #[test]
    fn finds_each_cycle_once() {
        // 0 -> 1 -> 2 -> 0, and 3 -> 3 excluded (self-edges are not passed in), 4 -> 2.
        let edges = vec![vec![1], vec![2], vec![0], vec![], vec![2]];
        assert_eq!(find_cycles(&edges), vec![vec![0, 1, 2]]);
        // Starting the search inside the cycle still reports it from its first task.
        let edges = vec![vec![], vec![2], vec![3], vec![1]];
        assert_eq!(find_cycles(&edges), vec![vec![1, 2, 3]]);
    }

    #[test]
    fn long_chain_does_not_overflow() {
        let n = 200_000;
        let edges: Vec<Vec<usize>> = (0..n)
            .map(|i| if i + 1 < n { vec![i + 1] } else { vec![0] })
            .collect();
        let cycles = find_cycles(&edges);
        assert_eq!(cycles.len(), 1);
        assert_eq!(cycles[0].len(), n);
    }
}
