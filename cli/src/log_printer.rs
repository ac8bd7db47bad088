//! Turns `LogData` chunks into output: raw bytes, lines prefixed with
//! `[task] `, or JSON lines.
//!
//! Chunks split lines anywhere, so each task's unfinished line is held until
//! its newline arrives (or the task ends). Chunks carry their byte offset in
//! their attempt's log; anything already printed is skipped, so a stream that
//! is reopened after a coordinator failover prints each byte once.

use std::collections::{BTreeMap, HashMap};

use capstan_proto::api::v1::LogData;
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogMode {
    /// The bytes as they came (one task's log).
    Raw,
    /// `[task] line`.
    Prefixed,
    /// `{"task", "attempt", "line"}` per line.
    Json,
}

#[derive(Default)]
struct TaskLog {
    attempt_id: String,
    partial: Vec<u8>,
}

pub(crate) struct LogPrinter {
    mode: LogMode,
    tasks: BTreeMap<String, TaskLog>,
    /// Bytes printed so far of each attempt's log.
    printed: HashMap<String, u64>,
    attempt_numbers: HashMap<String, u32>,
}

impl LogPrinter {
    pub(crate) fn new(mode: LogMode) -> Self {
        Self {
            mode,
            tasks: BTreeMap::new(),
            printed: HashMap::new(),
            attempt_numbers: HashMap::new(),
        }
    }

    /// Appends the output for one chunk to `out`.
    pub(crate) fn push(&mut self, chunk: &LogData, out: &mut Vec<u8>) {
        let printed = self.printed.entry(chunk.attempt_id.clone()).or_default();
        let end = chunk.offset + chunk.data.len() as u64;
        if end <= *printed {
            return;
        }
        // A chunk overlapping what was printed: keep only its new part. A
        // gap (the coordinator dropped bytes over its cap) is printed as is;
        // the coordinator says so in the log itself.
        let skip = usize::try_from(printed.saturating_sub(chunk.offset)).unwrap_or(usize::MAX);
        let data = chunk.data.get(skip..).unwrap_or_default();
        let is_new_attempt = *printed == 0;
        *printed = end.max(*printed);
        self.attempt_numbers
            .insert(chunk.attempt_id.clone(), chunk.attempt_number);

        if self.mode == LogMode::Raw {
            out.extend_from_slice(data);
            return;
        }
        let switched = self
            .tasks
            .get(&chunk.task)
            .is_some_and(|t| t.attempt_id != chunk.attempt_id);
        if switched {
            self.finish_task(&chunk.task, out);
        }
        let log = self.tasks.entry(chunk.task.clone()).or_default();
        log.attempt_id.clone_from(&chunk.attempt_id);
        if is_new_attempt && chunk.attempt_number > 1 && self.mode == LogMode::Prefixed {
            out.extend_from_slice(
                format!("[{}] ── attempt {} ──\n", chunk.task, chunk.attempt_number).as_bytes(),
            );
        }
        log.partial.extend_from_slice(data);
        let Some(last_newline) = log.partial.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let rest = log.partial.split_off(last_newline + 1);
        let complete = std::mem::replace(&mut log.partial, rest);
        let attempt = chunk.attempt_number;
        for line in complete[..complete.len() - 1].split(|&b| b == b'\n') {
            write_line(self.mode, &chunk.task, attempt, line, out);
        }
    }

    /// Prints a task's unfinished line, if any (the task ended, or its
    /// attempt changed).
    pub(crate) fn finish_task(&mut self, task: &str, out: &mut Vec<u8>) {
        let Some(log) = self.tasks.get_mut(task) else {
            return;
        };
        if log.partial.is_empty() {
            return;
        }
        let line = std::mem::take(&mut log.partial);
        let attempt = self
            .attempt_numbers
            .get(&log.attempt_id)
            .copied()
            .unwrap_or_default();
        write_line(self.mode, task, attempt, &line, out);
    }

    /// Prints every unfinished line.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        let tasks: Vec<String> = self.tasks.keys().cloned().collect();
        for task in tasks {
            self.finish_task(&task, out);
        }
    }
}

fn write_line(mode: LogMode, task: &str, attempt: u32, line: &[u8], out: &mut Vec<u8>) {
    match mode {
        LogMode::Raw => {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        LogMode::Prefixed => {
            out.push(b'[');
            out.extend_from_slice(task.as_bytes());
            out.extend_from_slice(b"] ");
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        LogMode::Json => {
            let value = json!({
                "event": "log",
                "task": task,
                "attempt": attempt,
                "line": String::from_utf8_lossy(line),
            });
            out.extend_from_slice(value.to_string().as_bytes());
            out.push(b'\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(task: &str, attempt: u32, offset: u64, data: &str) -> LogData {
        LogData {
            task: task.into(),
            attempt_id: format!("att-{task}-{attempt}"),
            attempt_number: attempt,
            offset,
            data: data.as_bytes().to_vec().into(),
        }
    }

    fn run(mode: LogMode, chunks: &[LogData]) -> String {
        let mut p = LogPrinter::new(mode);
        let mut out = Vec::new();
        for c in chunks {
            p.push(c, &mut out);
        }
        p.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn prefixes_lines_split_across_chunks() {
        let out = run(
            LogMode::Prefixed,
            &[
                chunk("a", 1, 0, "hel"),
                chunk("b", 1, 0, "one\ntw"),
                chunk("a", 1, 3, "lo\nwor"),
                chunk("a", 1, 9, "ld\n"),
                chunk("b", 1, 6, "o"),
            ],
        );
        assert_eq!(out, "[b] one\n[a] hello\n[a] world\n[b] two\n");
    }

    #[test]
    fn skips_bytes_already_printed() {
        let out = run(
            LogMode::Prefixed,
            &[
                chunk("a", 1, 0, "x\ny"),
                // The stream was reopened: everything again from the start.
                chunk("a", 1, 0, "x\nyz\n"),
                chunk("a", 1, 5, "w\n"),
            ],
        );
        assert_eq!(out, "[a] x\n[a] yz\n[a] w\n");
    }

    #[test]
    fn marks_a_new_attempt_and_flushes_the_old_one() {
        let out = run(
            LogMode::Prefixed,
            &[chunk("a", 1, 0, "first"), chunk("a", 2, 0, "second\n")],
        );
        assert_eq!(out, "[a] first\n[a] ── attempt 2 ──\n[a] second\n");
    }

    #[test]
    fn raw_and_json_modes() {
        let chunks = [chunk("a", 1, 0, "x\ny"), chunk("a", 1, 3, "z")];
        assert_eq!(run(LogMode::Raw, &chunks), "x\nyz");
        let lines: Vec<serde_json::Value> = run(LogMode::Json, &chunks)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                json!({"event": "log", "task": "a", "attempt": 1, "line": "x"}),
                json!({"event": "log", "task": "a", "attempt": 1, "line": "yz"}),
            ]
        );
    }
}
