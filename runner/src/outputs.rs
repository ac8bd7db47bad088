//! A task's own outputs: what its `run` steps write to the file
//! `$CAPSTAN_OUTPUT` (GitHub Actions' `$GITHUB_OUTPUT` format), read once
//! after the last step succeeded and recorded beside the runner's own
//! outputs (`image`, `digest`, `commit`, ...), which they may not replace.
//!
//! ```text
//! version=1.4.2
//! notes<<EOF
//! two
//! lines
//! EOF
//! ```

use std::collections::BTreeMap;

use capstan_proto::outputs::{MAX_OUTPUTS, is_runners_own as reserved, within_budget};

use crate::step::MAX_OUTPUT_BYTES;

/// Keeps `outputs` (the runner's own and the file's) to the budget the
/// coordinator keeps to as well ([`capstan_proto::outputs`]: 100 outputs
/// and 64 KiB of keys and values, the runner's own first), and a line for
/// the log about each one it drops. The file's own bounds keep its outputs
/// within it; the runner's own outputs can push the last of them out.
pub(crate) fn fit(outputs: &mut BTreeMap<String, String>) -> Vec<String> {
    let (kept, dropped) = within_budget(std::mem::take(outputs));
    *outputs = kept;
    dropped
        .into_iter()
        .map(|key| {
            format!(
                "$CAPSTAN_OUTPUT: `{key}` ignored: a task keeps at most {MAX_OUTPUTS} outputs and {} KiB \
                 of their keys and values, the runner's own outputs first",
                capstan_proto::outputs::MAX_OUTPUT_BYTES / 1024
            )
        })
        .collect()
}

/// Takes out of `outputs` each one whose value holds a value the log masks
/// (`mask`, [`crate::logs::mask::patterns`]: the runner's secrets in every
/// spelling it masks), and a warning for the log naming each: an output
/// travels to the coordinator, its API and every later task of the run,
/// where no mask applies (GitHub Actions skips such an output too).
pub(crate) fn withhold_secrets(
    outputs: &mut BTreeMap<String, String>,
    mask: &[Vec<u8>],
) -> Vec<String> {
    let secret = |value: &str| {
        let value = value.as_bytes();
        mask.iter()
            .any(|p| !p.is_empty() && value.windows(p.len()).any(|w| w == p.as_slice()))
    };
    let withheld: Vec<String> = (outputs.iter())
        .filter(|(_, v)| secret(v))
        .map(|(k, _)| k.clone())
        .collect();
    withheld
        .into_iter()
        .map(|key| {
            outputs.remove(&key);
            format!(
                "warning: skip output `{key}` since it may contain a secret (its value holds a value \
                 this log masks): it is not passed on"
            )
        })
        .collect()
}

/// The outputs of the file from what the executor read of it (at most one
/// byte more than [`MAX_OUTPUT_BYTES`]: that byte says the file is over
/// the limit), and the lines for the log, as [`parse`]. Of a file over the
/// limit only the lines that end within it are read (the line the limit
/// cuts would give a cut value), and the log says so first.
pub(crate) fn read(bytes: &[u8]) -> (BTreeMap<String, String>, Vec<String>) {
    if bytes.len() <= MAX_OUTPUT_BYTES {
        return parse(&String::from_utf8_lossy(bytes));
    }
    let kept = &bytes[..MAX_OUTPUT_BYTES];
    let end = kept.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let (outputs, notes) = parse(&String::from_utf8_lossy(&kept[..end]));
    let over = format!(
        "$CAPSTAN_OUTPUT is larger than its limit of {} KiB: only the lines within its first {} KiB were read, \
         the rest is ignored (outputs travel with every later task of the run: write a big result to a file)",
        MAX_OUTPUT_BYTES / 1024,
        MAX_OUTPUT_BYTES / 1024,
    );
    (outputs, std::iter::once(over).chain(notes).collect())
}

/// The file's outputs (the last value of a key wins), and a line for the
/// log about each one that was not taken.
pub(crate) fn parse(text: &str) -> (BTreeMap<String, String>, Vec<String>) {
    let mut outputs = BTreeMap::new();
    let mut notes = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        // `k=a<<b` is a value with `<<` in it: a block only when its `<<`
        // comes before any `=`.
        let block = line.split_once("<<").filter(|(key, _)| !key.contains('='));
        let (key, value) = if let Some((key, delim)) = block {
            let mut value: Vec<&str> = Vec::new();
            let mut closed = false;
            for (_, l) in lines.by_ref() {
                if l == delim {
                    closed = true;
                    break;
                }
                value.push(l);
            }
            if !closed || delim.is_empty() {
                notes.push(format!(
                    "$CAPSTAN_OUTPUT line {n}: `{key}<<{delim}` is never closed by a line `{delim}`: ignored"
                ));
                continue;
            }
            (key, value.join("\n"))
        } else if let Some((key, value)) = line.split_once('=') {
            (key, value.to_owned())
        } else {
            notes.push(format!(
                "$CAPSTAN_OUTPUT line {n}: expected KEY=VALUE or KEY<<DELIMITER: ignored"
            ));
            continue;
        };
        if !is_output_key(key) {
            notes.push(format!(
                "$CAPSTAN_OUTPUT line {n}: `{key}` is not an output name (letters, digits, `_`, `.`, `-`): ignored"
            ));
        } else if reserved(key) {
            notes.push(format!(
                "$CAPSTAN_OUTPUT line {n}: `{key}` is an output the runner records itself: ignored"
            ));
        } else if outputs.len() >= MAX_OUTPUTS && !outputs.contains_key(key) {
            notes.push(format!(
                "$CAPSTAN_OUTPUT line {n}: more than {MAX_OUTPUTS} outputs: `{key}` ignored"
            ));
        } else {
            outputs.insert(key.to_owned(), value);
        }
    }
    (outputs, notes)
}

/// An output's name as `${{ tasks.X.outputs.KEY }}` can name it:
/// `[A-Za-z0-9_][A-Za-z0-9_.-]*`, at most 128 chars (the pipeline
/// crate's `is_output_key`, which the runner does not depend on).
fn is_output_key(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 128
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_blocks_last_one_wins() {
        let (out, notes) = parse(
            "version=1\nurl=http://x/?a=b\n\nnotes<<EOF\ntwo\nlines\nEOF\nversion=2\nempty=\n",
        );
        assert!(notes.is_empty(), "{notes:?}");
        let want: BTreeMap<String, String> = [
            ("empty", ""),
            ("notes", "two\nlines"),
            ("url", "http://x/?a=b"),
            ("version", "2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn what_is_not_taken_is_said() {
        let (out, notes) =
            parse("digest=mine\nsteps.1.image=x\nno equals\nbad key=1\nopen<<END\nnever closed\n");
        assert!(out.is_empty(), "{out:?}");
        let all = notes.join("\n");
        for want in [
            "line 1: `digest` is an output the runner records itself",
            "line 2: `steps.1.image` is an output the runner records itself",
            "line 3: expected KEY=VALUE",
            "line 4: `bad key` is not an output name",
            "line 5: `open<<END` is never closed",
        ] {
            assert!(all.contains(want), "{want}\n{all}");
        }
    }

    #[test]
    fn an_equals_sign_before_the_angle_brackets_is_a_value() {
        let (out, notes) = parse("k=a<<b\nurl=x?q=<<y\nblock<<E=F\none\nE=F\n");
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(out["k"], "a<<b");
        assert_eq!(out["url"], "x?q=<<y");
        assert_eq!(out["block"], "one", "`<<` before `=`: a block");
        assert_eq!(out.len(), 3, "{out:?}");
    }

    #[test]
    fn a_file_over_the_limit_is_said_and_cut_at_a_line() {
        // What an executor reads: one byte past the limit.
        let read_of = |text: &str| read(&text.as_bytes()[..text.len().min(MAX_OUTPUT_BYTES + 1)]);
        let big = "x".repeat(MAX_OUTPUT_BYTES);
        let (out, notes) = read_of(&format!("first=1\nbig={big}\nlast=2\n"));
        // The line the limit cuts gives no cut value; none beyond it.
        assert_eq!(out.keys().collect::<Vec<_>>(), ["first"], "{out:?}");
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("$CAPSTAN_OUTPUT is larger than its limit of 64 KiB"),
            "{notes:?}"
        );
        // A block the limit cuts is never closed, and said so too.
        let (out, notes) = read_of(&format!("first=1\nnotes<<EOF\n{big}\nEOF\n"));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[1].contains("never closed"), "{notes:?}");
        // A file of just the limit is whole, the last line without its
        // line end too.
        let exact = format!("v={}", "x".repeat(MAX_OUTPUT_BYTES - 2));
        let (out, notes) = read_of(&exact);
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(out["v"].len(), MAX_OUTPUT_BYTES - 2);
    }

    #[test]
    fn the_runners_own_outputs_count_in_the_budget() {
        let mut outputs: BTreeMap<String, String> = (0..MAX_OUTPUTS)
            .map(|i| (format!("k{i:03}"), "v".to_owned()))
            .collect();
        outputs.insert("steps.1.image".into(), "r/app@sha256:ab".into());
        let notes = fit(&mut outputs);
        assert_eq!(outputs.len(), MAX_OUTPUTS);
        assert!(outputs.contains_key("steps.1.image"));
        assert!(!outputs.contains_key("k099"));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0]
                .starts_with("$CAPSTAN_OUTPUT: `k099` ignored: a task keeps at most 100 outputs"),
            "{notes:?}"
        );
    }

    #[test]
    fn an_output_holding_a_secret_is_withheld_and_named() {
        let mask = crate::logs::mask::patterns(&["hunter22".to_owned()]);
        let mut outputs: BTreeMap<String, String> = [
            ("token", "Bearer hunter22!"),
            ("encoded", "aHVudGVyMjI="),
            ("fine", "hunter2"),
            ("digest", "x-hunter22"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let notes = withhold_secrets(&mut outputs, &mask);
        assert_eq!(outputs.keys().collect::<Vec<_>>(), ["fine"], "{outputs:?}");
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert_eq!(
            notes[2],
            "warning: skip output `token` since it may contain a secret (its value holds a value \
             this log masks): it is not passed on"
        );
        for (note, key) in notes.iter().zip(["digest", "encoded", "token"]) {
            assert!(note.contains(&format!("`{key}`")), "{note}");
            assert!(!note.contains("hunter22"), "{note}");
        }
        // Nothing to mask, nothing withheld.
        let mut outputs: BTreeMap<String, String> = [("k".to_owned(), "v".to_owned())].into();
        assert!(withhold_secrets(&mut outputs, &[]).is_empty());
        assert_eq!(outputs.len(), 1);
    }

    #[test]
    fn at_most_a_hundred() {
        let text: String = (0..=MAX_OUTPUTS).map(|i| format!("k{i}=v\n")).collect();
        let (out, notes) = parse(&text);
        assert_eq!(out.len(), MAX_OUTPUTS);
        assert_eq!(notes.len(), 1, "{notes:?}");
    }
}
