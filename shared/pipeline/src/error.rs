//! Validation errors: every problem found in a pipeline file, each with its location.

use std::fmt;

/// One problem in a pipeline file.
///
/// `Display` is `FILE:LINE:COLUMN: MESSAGE` with a 1-based line and column.
/// Line and column are 0 when the problem has no place in the file (for
/// example a `--param` override of a param the file does not declare); the
/// location is then left out of the `Display` output (`FILE: MESSAGE`, or
/// just `MESSAGE` when it starts with the file's name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl ValidationError {
    pub fn new(file: &str, line: usize, column: usize, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            // Messages about the file as a whole usually start with its name.
            if self.message.starts_with(&self.file) {
                f.write_str(&self.message)
            } else {
                write!(f, "{}: {}", self.file, self.message)
            }
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

impl std::error::Error for ValidationError {}

/// Every problem found in a pipeline file (never just the first), in file order.
///
/// `Display` prints one error per line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl ValidationErrors {
    /// The errors, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, ValidationError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The errors one per line, as many whole lines as fit in `max_bytes`,
    /// then a line that says how many more there are. For messages that
    /// travel (a gRPC status is an HTTP/2 header: 14 MB of problems in one
    /// made the coordinator hold 80 MB and the client refuse the answer).
    pub fn summary(&self, max_bytes: usize) -> String {
        // The longest "... and N more" line.
        const TAIL_ROOM: usize = 80;
        let mut out = String::new();
        for (i, e) in self.0.iter().enumerate() {
            let line = e.to_string();
            let reserve = if i + 1 < self.0.len() { TAIL_ROOM } else { 0 };
            if out.len() + 1 + line.len() + reserve > max_bytes {
                let more = self.0.len() - i;
                if !out.is_empty() {
                    out.push('\n');
                }
                let s = if more == 1 { "" } else { "s" };
                out.push_str(&format!(
                    "... and {more} more problem{s} (`capstan validate FILE` lists them all)"
                ));
                return out;
            }
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&line);
        }
        out
    }

    /// Sorts by position (stable: errors at the same place keep their order).
    /// In file order, each once (a matrix's expansions share their
    /// fields' places, so they would repeat one error).
    pub(crate) fn sorted(mut errors: Vec<ValidationError>) -> Self {
        errors.sort_by_key(|e| (e.line, e.column));
        let mut seen = std::collections::HashSet::new();
        errors.retain(|e| seen.insert((e.line, e.column, e.message.clone())));
        Self(errors)
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

impl IntoIterator for ValidationErrors {
    type Item = ValidationError;
    type IntoIter = std::vec::IntoIter<ValidationError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ValidationErrors {
    type Item = &'a ValidationError;
    type IntoIter = std::slice::Iter<'a, ValidationError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
