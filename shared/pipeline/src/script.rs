//! Substitutions inside `run` scripts, made so that no value can change the
//! script's syntax (script injection, in GitHub Actions' words).
//!
//! A value never enters the script's text. Each `${{ ... }}` becomes a
//! reference to an environment variable (`${{ params.tag }}` becomes
//! `${CAPSTAN_PARAM_tag}`) and the value travels in the step's environment.
//! A shell never parses the result of a parameter expansion again, so the
//! script the shell parses is the one the pipeline's author wrote, whatever
//! the values are.
//!
//! The reference is quoted for where it stands, so that the value arrives
//! verbatim, as one word, exactly where textual substitution would have put
//! it (a [`Lexer`] follows POSIX sh's quoting as far as that needs):
//!
//! | where | becomes |
//! |---|---|
//! | unquoted | `"${V}"` |
//! | inside `"..."`, a here-document, `` `...` `` or `$((...))` | `${V}` |
//! | inside `'...'` | `'"${V}"'` (closes the quote, the value, reopens) |
//! | inside a here-document with a quoted delimiter (`<<'EOF'`) | refused: it expands nothing |
//!
//! Whatever the lexer gets wrong (it is not a full shell parser) can only
//! cost verbatim-ness, never safety: every insertion above is balanced in
//! every quoting context, and holds no value.

use super::expr::{Expr, Piece, Rendered};
use std::collections::BTreeMap;

/// A `run` script with every substitution made a reference, and the
/// variables the step must get.
pub(crate) fn render<'v>(
    pieces: Vec<Piece<'_>>,
    lookup: impl Fn(&Expr) -> Option<&'v str>,
) -> Rendered {
    let mut out = Rendered::default();
    let mut lexer = Lexer::default();
    // Which substitution each variable stands for, to catch two params
    // whose names differ only by `-` and `_`.
    let mut meaning: BTreeMap<String, Expr> = BTreeMap::new();
    for piece in pieces {
        let e = match piece {
            Piece::Lit(s) => {
                lexer.feed(s);
                out.text.push_str(s);
                continue;
            }
            Piece::Expr(e) => e,
        };
        let var = var_name(&e);
        match meaning.get(&var) {
            Some(other) if *other != e => {
                out.problems.push(format!(
                    "`{}` and `{}` would both be `${var}` in this script: rename one of them",
                    other.text(),
                    e.text()
                ));
                continue;
            }
            _ => {}
        }
        // A task's output is known at dispatch: the variable holds its
        // placeholder until the coordinator fills it in.
        let value = match (&e, lookup(&e)) {
            (Expr::TaskOutput { .. }, _) => e.text(),
            (_, Some(value)) => value.to_owned(),
            (_, None) => {
                out.missing.push(e);
                continue;
            }
        };
        let Some(reference) = reference(&var, lexer.context()) else {
            out.problems.push(format!(
                "`{}` inside a here-document with a quoted delimiter (<<'EOF') cannot expand: \
                 unquote the delimiter, or write `${var}` where it may expand",
                e.text()
            ));
            continue;
        };
        out.text.push_str(&reference);
        lexer.reference_written();
        out.vars.insert(var.clone(), value);
        meaning.insert(var, e);
    }
    out
}

/// The environment variable a substitution in a script refers to.
///
/// `-` in a param name becomes `_` (two params that then collide are
/// refused by [`super::resolve`]).
pub(crate) fn var_name(e: &Expr) -> String {
    match e {
        Expr::Param(p) => format!("CAPSTAN_PARAM_{}", p.replace('-', "_")),
        Expr::GitSha => "CAPSTAN_GIT_SHA".to_owned(),
        Expr::GitRepo => "CAPSTAN_GIT_REPO".to_owned(),
        Expr::GitRef => "CAPSTAN_GIT_REF".to_owned(),
        Expr::RunId => "CAPSTAN_RUN_ID".to_owned(),
        Expr::Matrix(k) => format!("CAPSTAN_MATRIX_{}", k.replace('-', "_")),
        Expr::TaskOutput { task, key } => {
            let safe = |s: &str| s.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
            format!("CAPSTAN_OUTPUT_{}_{}", safe(task), safe(key))
        }
    }
}

/// How a reference must be written at a point of the script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Context {
    Unquoted,
    /// Inside double quotes, an unquoted here-document, backquotes or
    /// arithmetic: expands, does not split.
    Bare,
    Single,
    /// A here-document whose delimiter was quoted: nothing expands.
    LiteralHeredoc,
}

/// The reference to `var` at a point in `context`; `None` where no
/// reference can expand.
pub(crate) fn reference(var: &str, context: Context) -> Option<String> {
    match context {
        Context::Unquoted => Some(format!("\"${{{var}}}\"")),
        Context::Bare => Some(format!("${{{var}}}")),
        Context::Single => Some(format!("'\"${{{var}}}\"'")),
        Context::LiteralHeredoc => None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    /// A command list: the script itself or `$(...)` (with its open parens).
    Commands {
        parens: usize,
    },
    Double,
    Single,
    Backquote,
    /// `$((...))` with its open parens; `closing` after its first `)`.
    Arith {
        parens: usize,
        closing: bool,
    },
    Comment,
}

/// A here-document announced on the current line, its body to come.
#[derive(Clone, Debug)]
struct Pending {
    delimiter: String,
    expands: bool,
    strip_tabs: bool,
}

/// Follows the quoting of a script as literal text is fed to it.
#[derive(Debug)]
pub(crate) struct Lexer {
    stack: Vec<Frame>,
    /// The previous character was an unquoted or double-quoted backslash.
    escaped: bool,
    /// The last character fed, for `$(`, `((`, `<<` and word starts.
    prev: Option<char>,
    /// A `<<` seen; its delimiter word is being read.
    reading_delimiter: Option<(String, bool, bool)>,
    pending: Vec<Pending>,
    /// Inside a here-document body: the one being read, and the current line.
    heredoc: Option<(Pending, String)>,
}

impl Default for Lexer {
    fn default() -> Self {
        Self {
            stack: vec![Frame::Commands { parens: 0 }],
            escaped: false,
            prev: None,
            reading_delimiter: None,
            pending: Vec::new(),
            heredoc: None,
        }
    }
}

impl Lexer {
    /// The context at the current point.
    pub(crate) fn context(&self) -> Context {
        if let Some((doc, _)) = &self.heredoc {
            return if doc.expands {
                Context::Bare
            } else {
                Context::LiteralHeredoc
            };
        }
        match self.top() {
            Frame::Commands { .. } | Frame::Comment => Context::Unquoted,
            Frame::Single => Context::Single,
            Frame::Double | Frame::Backquote | Frame::Arith { .. } => Context::Bare,
        }
    }

    /// Records that a reference was written here: it is part of a word.
    pub(crate) fn reference_written(&mut self) {
        if let Some((_, line)) = &mut self.heredoc {
            line.push('$');
        } else if let Some((word, _, _)) = &mut self.reading_delimiter {
            word.push('$');
        }
        self.prev = Some('}');
        self.escaped = false;
    }

    pub(crate) fn feed(&mut self, text: &str) {
        for c in text.chars() {
            self.char(c);
        }
    }

    fn top(&self) -> Frame {
        *self.stack.last().unwrap_or(&Frame::Commands { parens: 0 })
    }

    fn char(&mut self, c: char) {
        if let Some((doc, line)) = &mut self.heredoc {
            if c == '\n' {
                let text = if doc.strip_tabs {
                    line.trim_start_matches('\t')
                } else {
                    line.as_str()
                };
                if text == doc.delimiter {
                    self.heredoc = None;
                    self.next_heredoc();
                } else {
                    line.clear();
                }
            } else {
                line.push(c);
            }
            self.prev = Some(c);
            return;
        }
        let prev = self.prev.replace(c);
        if self.escaped {
            self.escaped = false;
            if let Some((word, _, _)) = &mut self.reading_delimiter {
                word.push(c);
            }
            return;
        }
        match self.top() {
            Frame::Single => {
                if c == '\'' {
                    self.stack.pop();
                } else if let Some((word, _, _)) = &mut self.reading_delimiter {
                    word.push(c);
                }
            }
            Frame::Comment => {
                if c == '\n' {
                    self.stack.pop();
                    self.line_end();
                }
            }
            Frame::Commands { parens } => self.command_char(c, prev, parens),
            frame => self.nested_char(frame, c, prev),
        }
    }

    /// A character inside double quotes, backquotes or arithmetic.
    fn nested_char(&mut self, frame: Frame, c: char, prev: Option<char>) {
        match frame {
            Frame::Double if self.reading_delimiter.is_some() => {
                if c == '"' {
                    self.stack.pop();
                } else if let Some((word, _, _)) = &mut self.reading_delimiter {
                    word.push(c);
                }
            }
            Frame::Double => match c {
                '\\' => self.escaped = true,
                '"' => {
                    self.stack.pop();
                }
                '`' => self.stack.push(Frame::Backquote),
                '(' if prev == Some('$') => self.stack.push(Frame::Commands { parens: 0 }),
                _ => {}
            },
            Frame::Backquote => match c {
                '\\' => self.escaped = true,
                '`' => {
                    self.stack.pop();
                }
                _ => {}
            },
            Frame::Arith { parens, closing } => match c {
                '(' => self.set_top(Frame::Arith {
                    parens: parens + 1,
                    closing: false,
                }),
                // `))` ends it.
                ')' if parens == 0 && closing => {
                    self.stack.pop();
                }
                ')' if parens == 0 => self.set_top(Frame::Arith {
                    parens,
                    closing: true,
                }),
                ')' => self.set_top(Frame::Arith {
                    parens: parens - 1,
                    closing: false,
                }),
                _ => self.set_top(Frame::Arith {
                    parens,
                    closing: false,
                }),
            },
            _ => {}
        }
    }

    fn set_top(&mut self, frame: Frame) {
        if let Some(top) = self.stack.last_mut() {
            *top = frame;
        }
    }

    fn command_char(&mut self, c: char, prev: Option<char>, parens: usize) {
        if let Some((word, quoted, strip)) = &mut self.reading_delimiter {
            match c {
                '-' if word.is_empty() && !*quoted && prev == Some('<') => *strip = true,
                ' ' | '\t' if word.is_empty() && !*quoted => {}
                '\'' | '"' | '\\' => {
                    *quoted = true;
                    // The quote chars are not part of the delimiter.
                    if c == '\\' {
                        self.escaped = true;
                    } else {
                        self.stack.push(if c == '\'' {
                            Frame::Single
                        } else {
                            Frame::Double
                        });
                    }
                    return;
                }
                c if c.is_whitespace() || matches!(c, ';' | '&' | '|' | '<' | '>' | ')') => {
                    let (word, quoted, strip) = self.reading_delimiter.take().unwrap_or_default();
                    self.pending.push(Pending {
                        delimiter: word,
                        expands: !quoted,
                        strip_tabs: strip,
                    });
                }
                c => {
                    word.push(c);
                    return;
                }
            }
            if self.reading_delimiter.is_some() {
                return;
            }
        }
        match c {
            '\\' => self.escaped = true,
            '\'' => self.stack.push(Frame::Single),
            '"' => self.stack.push(Frame::Double),
            '`' => self.stack.push(Frame::Backquote),
            '#' if prev.is_none_or(|p| p.is_whitespace() || matches!(p, ';' | '&' | '|' | '(')) => {
                self.stack.push(Frame::Comment)
            }
            '(' if prev == Some('$') => self.stack.push(Frame::Commands { parens: 0 }),
            '(' if parens == 0 && self.stack.len() > 1 && prev == Some('(') => {
                // `$((`: the `$(` pushed a command list; it is arithmetic.
                self.set_top(Frame::Arith {
                    parens: 0,
                    closing: false,
                });
            }
            '(' => self.set_top(Frame::Commands { parens: parens + 1 }),
            ')' if parens == 0 && self.stack.len() > 1 => {
                self.stack.pop();
            }
            ')' => self.set_top(Frame::Commands {
                parens: parens.saturating_sub(1),
            }),
            '<' if prev == Some('<') => self.reading_delimiter = Some(Default::default()),
            '\n' => self.line_end(),
            _ => {}
        }
    }

    /// A line of commands ended: the here-documents it announced begin.
    fn line_end(&mut self) {
        if let Some((word, quoted, strip)) = self.reading_delimiter.take() {
            self.pending.push(Pending {
                delimiter: word,
                expands: !quoted,
                strip_tabs: strip,
            });
        }
        self.pending.reverse();
        self.next_heredoc();
    }

    fn next_heredoc(&mut self) {
        // `pending` is reversed at the line's end: pop takes them in order.
        if let Some(doc) = self.pending.pop() {
            self.heredoc = Some((doc, String::new()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The context at the end of `text`.
    fn at_end(text: &str) -> Context {
        let mut l = Lexer::default();
        l.feed(text);
        l.context()
    }

    #[test]
    fn the_context_follows_the_quoting() {
        for (text, want) in [
            ("echo ", Context::Unquoted),
            ("echo \"a ", Context::Bare),
            ("echo 'a ", Context::Single),
            ("echo 'a' ", Context::Unquoted),
            ("echo \"it's ", Context::Bare),
            ("echo 'say \"", Context::Single),
            ("echo \\' ", Context::Unquoted),
            ("echo \"a \\\" ", Context::Bare),
            ("echo \"$(printf ", Context::Unquoted),
            ("echo \"$(printf '%s' \"x\") ", Context::Bare),
            ("echo $( (cd x; ls) ) ", Context::Unquoted),
            ("echo `ls ", Context::Bare),
            ("echo $(( 1 + ", Context::Bare),
            ("echo $(( (1 + 2) * 3 )) ", Context::Unquoted),
            ("# it's a comment\necho ", Context::Unquoted),
            ("echo a#b 'x ", Context::Single),
            ("cat <<EOF\nit's ", Context::Bare),
            ("cat <<EOF\nit's\nEOF\necho ", Context::Unquoted),
            ("cat <<'EOF'\n", Context::LiteralHeredoc),
            ("cat <<\"EOF\" > f\nx\nEOF\necho '", Context::Single),
            ("cat <<-\\EOF\n\tx\n\tEOF\necho ", Context::Unquoted),
            ("cat <<A <<B\na\nA\n", Context::Bare),
            ("cat <<A <<'B'\na\nA\n", Context::LiteralHeredoc),
            ("cat <<A <<'B'\na\nA\nb\nB\necho 'x", Context::Single),
        ] {
            assert_eq!(at_end(text), want, "{text:?}");
        }
    }

    #[test]
    fn references_are_quoted_for_their_place() {
        assert_eq!(
            reference("V", Context::Unquoted).as_deref(),
            Some("\"${V}\"")
        );
        assert_eq!(reference("V", Context::Bare).as_deref(), Some("${V}"));
        assert_eq!(
            reference("V", Context::Single).as_deref(),
            Some("'\"${V}\"'")
        );
        assert_eq!(reference("V", Context::LiteralHeredoc), None);
        assert_eq!(
            var_name(&Expr::Param("image-tag".into())),
            "CAPSTAN_PARAM_image_tag"
        );
        assert_eq!(var_name(&Expr::GitSha), "CAPSTAN_GIT_SHA");
        assert_eq!(var_name(&Expr::GitRepo), "CAPSTAN_GIT_REPO");
        assert_eq!(var_name(&Expr::RunId), "CAPSTAN_RUN_ID");
    }
}
