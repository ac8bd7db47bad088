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

/// Most outputs one task may write.
pub(crate) const MAX_OUTPUTS: usize = 100;

/// The outputs the runner records itself: a task's file cannot set them.
fn reserved(key: &str) -> bool {
    matches!(
        key,
        "image" | "digest" | "commit" | "repo" | "branch" | "pull-request"
    ) || key.starts_with("steps.")
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
        let (key, value) = if let Some((key, delim)) = line.split_once("<<") {
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
    fn at_most_a_hundred() {
        let text: String = (0..=MAX_OUTPUTS).map(|i| format!("k{i}=v\n")).collect();
        let (out, notes) = parse(&text);
        assert_eq!(out.len(), MAX_OUTPUTS);
        assert_eq!(notes.len(), 1, "{notes:?}");
    }
}
