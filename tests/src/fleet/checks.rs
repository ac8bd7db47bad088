//! What every fleet scenario asserts about the steps: how often each ran
//! (each step appends a line to files on the runners' shared volume), and
//! that its log holds exactly the bytes it printed.

use std::path::Path;

/// The lines a counting step prints: `<task>-line-1` .. `<task>-line-<n>`.
pub fn expected_lines(task: &str, n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("{task}-line-{i}")).collect()
}

/// A step that marks its start and its end in `/shared` (per run and task,
/// with the runner's host name) and prints `lines` numbered lines, one
/// every `every_ms`.
pub fn counting_step(task: &str, lines: u32, every_ms: u32) -> String {
    let sleep = format!("{}.{:03}", every_ms / 1000, every_ms % 1000);
    format!(
        "echo $(hostname) >> /shared/start-${{{{ run.id }}}}-{task}\n\
         for i in $(seq 1 {lines}); do echo {task}-line-$i; sleep {sleep}; done\n\
         echo $(hostname) >> /shared/done-${{{{ run.id }}}}-{task}\n"
    )
}

/// A pipeline of `tasks` independent counting tasks `t0`, `t1`, ...
pub fn counting_pipeline(name: &str, tasks: usize, lines: u32, every_ms: u32) -> String {
    let mut yaml = format!("version: 1\nname: {name}\ntasks:\n");
    for t in 0..tasks {
        let script = counting_step(&format!("t{t}"), lines, every_ms);
        yaml.push_str(&format!("  t{t}:\n    steps:\n      - run: |\n"));
        for line in script.lines() {
            yaml.push_str(&format!("          {line}\n"));
        }
    }
    yaml
}

/// The runner host names in `/shared/<kind>-<run>-<task>` (`start` or
/// `done`), one per execution; empty when the step never got there.
pub fn marks(shared: &Path, kind: &str, run: &str, task: &str) -> Vec<String> {
    std::fs::read_to_string(shared.join(format!("{kind}-{run}-{task}")))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Splits the step's lines in a task log into the attempts that printed
/// them: every attempt starts again at line 1 and must print a gapless
/// prefix of `expected`. Anything else (a duplicated chunk, a lost or
/// reordered line, a stray byte inside a line) is an error naming it.
pub fn attempts_in_log(log: &str, task: &str, expected: &[String]) -> Result<Vec<usize>, String> {
    let prefix = format!("{task}-line-");
    let mut attempts: Vec<usize> = Vec::new();
    for line in log.split_inclusive('\n') {
        let Some(rest) = line.find(&prefix).map(|at| &line[at..]) else {
            continue;
        };
        let text = rest
            .strip_suffix('\n')
            .ok_or_else(|| format!("unterminated line {line:?}"))?;
        if rest.len() != line.len() {
            return Err(format!("bytes before the step's line: {line:?}"));
        }
        match attempts.last_mut() {
            Some(n) if *n < expected.len() && expected[*n] == text => *n += 1,
            _ if expected.first().is_some_and(|first| first == text) => attempts.push(1),
            _ => {
                return Err(format!(
                    "line {text:?} out of order after attempts {attempts:?}"
                ));
            }
        }
    }
    Ok(attempts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_split_and_holes_found() {
        let e = expected_lines("t", 3);
        let log = "header\nt-line-1\nt-line-2\nt-line-1\nt-line-2\nt-line-3\n";
        assert_eq!(attempts_in_log(log, "t", &e), Ok(vec![2, 3]));
        assert!(attempts_in_log("t-line-1\nt-line-3\n", "t", &e).is_err());
        assert!(attempts_in_log("t-line-1\nt-line-1\nt-line-2\nt-line-2\n", "t", &e).is_err());
        assert!(attempts_in_log("xt-line-1\n", "t", &e).is_err());
        assert_eq!(attempts_in_log("", "t", &e), Ok(vec![]));
    }
}
