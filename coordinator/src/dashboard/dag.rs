//! A run's DAG as SVG, drawn on the server: tasks in columns by depth (a
//! task sits one column right of the deepest task it needs), ordered in a
//! column by the mean row of what they need (fewer crossings), `needs` as
//! curves left to right, each node coloured by its state (CSS classes) and
//! linking to its log. Pure: a `Run` in, markup out.

use capstan_proto::api::v1::Run;
use capstan_proto::render::task_state_name;
use maud::{Markup, html};
use std::collections::HashMap;

const NODE_W: i64 = 180;
const NODE_H: i64 = 34;
const COL_GAP: i64 = 60;
const ROW_GAP: i64 = 14;
const MARGIN: i64 = 8;

/// Each task's index in `run.tasks`, by name.
fn by_name(run: &Run) -> HashMap<&str, usize> {
    run.tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect()
}

/// Where each task's box goes: (column, row), indexed like `run.tasks`.
pub(crate) fn layout(run: &Run) -> Vec<(usize, usize)> {
    let index = by_name(run);
    let needs: Vec<Vec<usize>> = run
        .tasks
        .iter()
        .map(|t| {
            t.needs
                .iter()
                .filter_map(|n| index.get(n.as_str()).copied())
                .collect()
        })
        .collect();
    // Depth by repeated relaxation: `needs` is acyclic (checked at submit),
    // so this settles within as many rounds as there are tasks.
    let mut depth = vec![0usize; run.tasks.len()];
    for _ in 0..run.tasks.len() {
        let mut moved = false;
        for (i, ns) in needs.iter().enumerate() {
            let d = ns.iter().map(|&n| depth[n] + 1).max().unwrap_or(0);
            if d > depth[i] {
                depth[i] = d;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    let columns = depth.iter().copied().max().map_or(0, |d| d + 1);
    let mut row = vec![0usize; run.tasks.len()];
    for col in 0..columns {
        let mut members: Vec<usize> = (0..run.tasks.len()).filter(|&i| depth[i] == col).collect();
        let key = |i: usize| -> f64 {
            let ns = &needs[i];
            if ns.is_empty() {
                i as f64
            } else {
                ns.iter().map(|&n| row[n] as f64).sum::<f64>() / ns.len() as f64
            }
        };
        members.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
        for (r, &i) in members.iter().enumerate() {
            row[i] = r;
        }
    }
    depth.into_iter().zip(row).collect()
}

fn origin((col, row): (usize, usize)) -> (i64, i64) {
    (
        MARGIN + col as i64 * (NODE_W + COL_GAP),
        MARGIN + row as i64 * (NODE_H + ROW_GAP),
    )
}

/// The SVG of the run's DAG.
pub(crate) fn svg(run: &Run) -> Markup {
    let places = layout(run);
    let index = by_name(run);
    let cols = places.iter().map(|p| p.0 + 1).max().unwrap_or(0) as i64;
    let rows = places.iter().map(|p| p.1 + 1).max().unwrap_or(0) as i64;
    let width = 2 * MARGIN + cols * NODE_W + (cols - 1).max(0) * COL_GAP;
    let height = 2 * MARGIN + rows * NODE_H + (rows - 1).max(0) * ROW_GAP;
    html! {
        svg.dag xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
            viewBox=(format!("0 0 {width} {height}")) role="img" aria-label="task graph" {
            @for (i, task) in run.tasks.iter().enumerate() {
                @for need in &task.needs {
                    @if let Some(&from) = index.get(need.as_str()) {
                        @let (x1, y1) = origin(places[from]);
                        @let (x2, y2) = origin(places[i]);
                        @let (x1, y1, y2) = (x1 + NODE_W, y1 + NODE_H / 2, y2 + NODE_H / 2);
                        @let mid = (x1 + x2) / 2;
                        path.edge data-from=(need) data-to=(task.name)
                            d=(format!("M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}")) {}
                    }
                }
            }
            @for (i, task) in run.tasks.iter().enumerate() {
                @let (x, y) = origin(places[i]);
                @let state = task_state_name(task.state);
                a href=(format!("/runs/{}/tasks/{}", run.id, url_path(&task.name))) {
                    g class=(format!("node {state}")) data-task=(task.name) data-state=(state) {
                        rect x=(x) y=(y) width=(NODE_W) height=(NODE_H) rx="6" {}
                        text x=(x + 10) y=(y + NODE_H / 2 + 5) { (clip(&task.name)) }
                        title { (task.name) ": " (state) }
                    }
                }
            }
        }
    }
}

/// A task name as one path segment.
pub(crate) fn url_path(name: &str) -> String {
    url::form_urlencoded::byte_serialize(name.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// What fits in a box (the full name is in its tooltip).
fn clip(name: &str) -> String {
    const MAX: usize = 22;
    if name.chars().count() <= MAX {
        name.to_string()
    } else {
        let cut: String = name.chars().take(MAX - 1).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::api::v1::Task;

    fn run(tasks: &[(&str, &[&str])]) -> Run {
        Run {
            id: "r".into(),
            tasks: tasks
                .iter()
                .map(|(name, needs)| Task {
                    name: name.to_string(),
                    needs: needs.iter().map(|s| s.to_string()).collect(),
                    ..Task::default()
                })
                .collect(),
            ..Run::default()
        }
    }

    #[test]
    fn columns_follow_the_longest_path_and_boxes_never_overlap() {
        let r = run(&[
            ("deploy", &["image", "lint"]),
            ("test", &[]),
            ("lint", &[]),
            ("image", &["test"]),
            ("notify", &["deploy", "test"]),
        ]);
        let places = layout(&r);
        assert_eq!(places[1].0, 0); // test
        assert_eq!(places[2].0, 0); // lint
        assert_eq!(places[3].0, 1); // image
        assert_eq!(places[0].0, 2); // deploy: after image
        assert_eq!(places[4].0, 3); // notify: after deploy
        let mut seen = std::collections::HashSet::new();
        assert!(places.iter().all(|p| seen.insert(*p)), "{places:?}");
    }

    #[test]
    fn the_svg_has_a_node_per_task_and_an_edge_per_need() {
        let r = run(&[
            ("a", &[]),
            ("b <script>", &["a"]),
            ("c", &["a", "b <script>"]),
        ]);
        let svg = svg(&r).into_string();
        assert_eq!(svg.matches("<g class=\"node ").count(), 3);
        assert_eq!(svg.matches("<path class=\"edge\"").count(), 3);
        assert!(!svg.contains("<script>"), "names are escaped: {svg}");
        assert!(
            svg.contains("href=\"/runs/r/tasks/b%20%3Cscript%3E\""),
            "{svg}"
        );
    }
}
