//! `if:` conditions: a small expression language over `git.*`, `run.id`,
//! `params.*`, `matrix.*` and `tasks.NAME.state`, with `==`, `!=`, `&&`,
//! `||`, `!`, parentheses, `startsWith(a, b)`, `true`, `false` and string
//! literals in single or double quotes (`\` escapes the next character).
//! Written bare or inside `${{ }}`.
//!
//! `resolve` folds every value known at submit into the condition
//! ([`Cond::fold`]), so what the coordinator stores and evaluates when the
//! task is ready ([`Cond::eval`]) refers to task states only.

use std::fmt;

/// What a condition refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ref {
    GitSha,
    GitRef,
    GitRepo,
    RunId,
    Param(String),
    Matrix(String),
    /// `tasks.NAME.state`: succeeded, failed, cancelled or skipped.
    TaskState(String),
}

/// A parsed condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cond {
    Str(String),
    Bool(bool),
    Ref(Ref),
    /// `a == b` (`false`: `a != b`).
    Eq(Box<Cond>, Box<Cond>, bool),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
    StartsWith(Box<Cond>, Box<Cond>),
}

/// Longest condition text.
const MAX_LEN: usize = 4096;
/// Deepest nesting (parentheses, `!`).
const MAX_DEPTH: usize = 64;

/// Parses `text` (bare, or the whole of it in `${{ }}`).
pub fn parse(text: &str) -> Result<Cond, String> {
    if text.len() > MAX_LEN {
        return Err(format!("longer than {MAX_LEN} characters"));
    }
    let t = text.trim();
    let inner = match t.strip_prefix("${{").and_then(|r| r.strip_suffix("}}")) {
        Some(i) => i,
        None => t,
    };
    let tokens = lex(inner)?;
    if tokens.is_empty() {
        return Err("empty: write a condition such as `git.ref == 'refs/heads/main'`".into());
    }
    let mut p = P { t: &tokens, at: 0 };
    let c = p.or(0)?;
    match p.t.get(p.at) {
        None => Ok(c),
        Some(tok) => Err(format!("unexpected {tok} after a complete condition")),
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Op(&'static str),
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Str(s) => write!(f, "'{s}'"),
            Tok::Op(o) => write!(f, "`{o}`"),
        }
    }
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '\'' | '"' => {
                let mut lit = String::new();
                loop {
                    match chars.next() {
                        Some((_, q)) if q == c => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, e)) => lit.push(e),
                            None => return Err("a string ends in `\\`".into()),
                        },
                        Some((_, ch)) => lit.push(ch),
                        None => return Err(format!("a string opened with {c} is not closed")),
                    }
                }
                out.push(Tok::Str(lit));
            }
            '(' | ')' | ',' => out.push(Tok::Op(match c {
                '(' => "(",
                ')' => ")",
                _ => ",",
            })),
            '=' | '!' | '&' | '|' => {
                let two = chars.peek().map(|&(_, n)| n);
                let op = match (c, two) {
                    ('=', Some('=')) => "==",
                    ('!', Some('=')) => "!=",
                    ('&', Some('&')) => "&&",
                    ('|', Some('|')) => "||",
                    ('!', _) => "!",
                    _ => return Err(format!("unknown operator `{c}` (use ==, !=, &&, || or !)")),
                };
                if op.len() == 2 {
                    chars.next();
                }
                out.push(Tok::Op(op));
            }
            c if c.is_ascii_alphanumeric() || c == '_' => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, n)) = chars.peek() {
                    if n.is_ascii_alphanumeric() || "_.-".contains(n) {
                        end = j + n.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Ident(s[i..end].to_owned()));
            }
            other => return Err(format!("unexpected character `{other}`")),
        }
    }
    Ok(out)
}

struct P<'a> {
    t: &'a [Tok],
    at: usize,
}

impl P<'_> {
    fn eat(&mut self, op: &str) -> bool {
        let hit = matches!(self.t.get(self.at), Some(Tok::Op(o)) if *o == op);
        if hit {
            self.at += 1;
        }
        hit
    }

    fn expect(&mut self, op: &str) -> Result<(), String> {
        if self.eat(op) {
            return Ok(());
        }
        Err(match self.t.get(self.at) {
            Some(t) => format!("expected `{op}`, found {t}"),
            None => format!("expected `{op}` at the end"),
        })
    }

    fn or(&mut self, depth: usize) -> Result<Cond, String> {
        let mut c = self.and(depth)?;
        while self.eat("||") {
            c = Cond::Or(Box::new(c), Box::new(self.and(depth)?));
        }
        Ok(c)
    }

    fn and(&mut self, depth: usize) -> Result<Cond, String> {
        let mut c = self.unary(depth)?;
        while self.eat("&&") {
            c = Cond::And(Box::new(c), Box::new(self.unary(depth)?));
        }
        Ok(c)
    }

    fn unary(&mut self, depth: usize) -> Result<Cond, String> {
        if depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH}"));
        }
        if self.eat("!") {
            return Ok(Cond::Not(Box::new(self.unary(depth + 1)?)));
        }
        let left = self.primary(depth)?;
        let negate = if self.eat("==") {
            false
        } else if self.eat("!=") {
            true
        } else {
            return Ok(left);
        };
        let right = self.primary(depth)?;
        Ok(Cond::Eq(Box::new(left), Box::new(right), !negate))
    }

    fn primary(&mut self, depth: usize) -> Result<Cond, String> {
        if self.eat("(") {
            let c = self.or(depth + 1)?;
            self.expect(")")?;
            return Ok(c);
        }
        let tok = self.t.get(self.at).cloned();
        self.at += 1;
        match tok {
            Some(Tok::Str(s)) => Ok(Cond::Str(s)),
            Some(Tok::Ident(id)) if id == "true" || id == "false" => Ok(Cond::Bool(id == "true")),
            Some(Tok::Ident(id)) if id == "startsWith" => {
                self.expect("(")?;
                let a = self.or(depth + 1)?;
                self.expect(",")?;
                let b = self.or(depth + 1)?;
                self.expect(")")?;
                Ok(Cond::StartsWith(Box::new(a), Box::new(b)))
            }
            Some(Tok::Ident(id)) => reference(&id).map(Cond::Ref),
            Some(other) => Err(format!("expected a value, found {other}")),
            None => Err("a condition ends where a value is expected".into()),
        }
    }
}

fn reference(id: &str) -> Result<Ref, String> {
    let known = "expected `git.sha`, `git.ref`, `git.repo`, `run.id`, `params.NAME`, \
                 `matrix.KEY`, `tasks.NAME.state`, a 'string', true or false";
    Ok(match id {
        "git.sha" => Ref::GitSha,
        "git.ref" => Ref::GitRef,
        "git.repo" => Ref::GitRepo,
        "run.id" => Ref::RunId,
        _ => {
            if let Some(p) = id.strip_prefix("params.") {
                Ref::Param(p.to_owned())
            } else if let Some(k) = id.strip_prefix("matrix.") {
                Ref::Matrix(k.to_owned())
            } else if let Some(t) = id
                .strip_prefix("tasks.")
                .and_then(|r| r.strip_suffix(".state"))
            {
                Ref::TaskState(t.to_owned())
            } else {
                return Err(format!("unknown value `{id}`: {known}"));
            }
        }
    })
}

impl Cond {
    /// Every reference, in order.
    pub fn refs(&self) -> Vec<&Ref> {
        let mut out = Vec::new();
        self.walk(&mut |c| {
            if let Cond::Ref(r) = c {
                out.push(r);
            }
        });
        out
    }

    fn walk<'a>(&'a self, f: &mut impl FnMut(&'a Cond)) {
        f(self);
        match self {
            Cond::Eq(a, b, _) | Cond::And(a, b) | Cond::Or(a, b) | Cond::StartsWith(a, b) => {
                a.walk(f);
                b.walk(f);
            }
            Cond::Not(a) => a.walk(f),
            Cond::Str(_) | Cond::Bool(_) | Cond::Ref(_) => {}
        }
    }

    /// The condition with each reference `value` knows replaced by its
    /// value.
    pub fn fold(&self, value: &impl Fn(&Ref) -> Option<String>) -> Cond {
        let b = |c: &Cond| Box::new(c.fold(value));
        match self {
            Cond::Ref(r) => value(r).map_or_else(|| self.clone(), Cond::Str),
            Cond::Eq(x, y, eq) => Cond::Eq(b(x), b(y), *eq),
            Cond::And(x, y) => Cond::And(b(x), b(y)),
            Cond::Or(x, y) => Cond::Or(b(x), b(y)),
            Cond::StartsWith(x, y) => Cond::StartsWith(b(x), b(y)),
            Cond::Not(x) => Cond::Not(b(x)),
            Cond::Str(_) | Cond::Bool(_) => self.clone(),
        }
    }

    /// The condition with every part that reads no task state worked out:
    /// what `fold` left is then only task states and the literals they are
    /// compared with (no param value, however long, is kept).
    pub fn simplify(&self) -> Cond {
        if self.refs().is_empty() {
            return Cond::Bool(self.eval(&|_| None).unwrap_or(false));
        }
        let b = |c: &Cond| Box::new(c.simplify());
        let v = |c: &Cond| Box::new(c.simplify_value());
        match self {
            Cond::And(x, y) => match (x.simplify(), y.simplify()) {
                (Cond::Bool(false), _) | (_, Cond::Bool(false)) => Cond::Bool(false),
                (Cond::Bool(true), o) | (o, Cond::Bool(true)) => o,
                (x, y) => Cond::And(Box::new(x), Box::new(y)),
            },
            Cond::Or(x, y) => match (x.simplify(), y.simplify()) {
                (Cond::Bool(true), _) | (_, Cond::Bool(true)) => Cond::Bool(true),
                (Cond::Bool(false), o) | (o, Cond::Bool(false)) => o,
                (x, y) => Cond::Or(Box::new(x), Box::new(y)),
            },
            Cond::Not(x) => Cond::Not(b(x)),
            Cond::Eq(x, y, eq) => Cond::Eq(v(x), v(y), *eq),
            Cond::StartsWith(x, y) => Cond::StartsWith(v(x), v(y)),
            Cond::Str(_) | Cond::Bool(_) | Cond::Ref(_) => self.clone(),
        }
    }

    /// [`Cond::simplify`] of a part used as a value (compared, or an
    /// argument of `startsWith`): a constant one becomes its text.
    fn simplify_value(&self) -> Cond {
        if self.refs().is_empty() {
            return match self.text(&|_| None) {
                Ok(s) => Cond::Str(s),
                Err(_) => self.clone(),
            };
        }
        match self {
            Cond::Ref(_) => self.clone(),
            other => other.simplify(),
        }
    }

    /// True or false; a value alone is true unless empty or `false`. A
    /// reference `value` does not know is an error.
    pub fn eval(&self, value: &impl Fn(&Ref) -> Option<String>) -> Result<bool, String> {
        Ok(match self {
            Cond::Bool(b) => *b,
            Cond::Str(_) | Cond::Ref(_) => {
                let s = self.text(value)?;
                !s.is_empty() && s != "false"
            }
            Cond::Eq(a, b, eq) => (a.text(value)? == b.text(value)?) == *eq,
            Cond::And(a, b) => a.eval(value)? && b.eval(value)?,
            Cond::Or(a, b) => a.eval(value)? || b.eval(value)?,
            Cond::Not(a) => !a.eval(value)?,
            Cond::StartsWith(a, b) => a.text(value)?.starts_with(&b.text(value)?),
        })
    }

    /// The text of a value (a condition as a value: `true`/`false`).
    fn text(&self, value: &impl Fn(&Ref) -> Option<String>) -> Result<String, String> {
        match self {
            Cond::Str(s) => Ok(s.clone()),
            Cond::Ref(r) => value(r).ok_or_else(|| format!("no value for `{r}`")),
            other => other.eval(value).map(|b| b.to_string()),
        }
    }
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ref::GitSha => f.write_str("git.sha"),
            Ref::GitRef => f.write_str("git.ref"),
            Ref::GitRepo => f.write_str("git.repo"),
            Ref::RunId => f.write_str("run.id"),
            Ref::Param(p) => write!(f, "params.{p}"),
            Ref::Matrix(k) => write!(f, "matrix.{k}"),
            Ref::TaskState(t) => write!(f, "tasks.{t}.state"),
        }
    }
}

/// The condition as text that [`parse`] reads back to the same condition.
impl fmt::Display for Cond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cond::Str(s) => write!(f, "'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
            Cond::Bool(b) => write!(f, "{b}"),
            Cond::Ref(r) => write!(f, "{r}"),
            Cond::Eq(a, b, true) => write!(f, "({a} == {b})"),
            Cond::Eq(a, b, false) => write!(f, "({a} != {b})"),
            Cond::And(a, b) => write!(f, "({a} && {b})"),
            Cond::Or(a, b) => write!(f, "({a} || {b})"),
            Cond::Not(a) => write!(f, "(!{a})"),
            Cond::StartsWith(a, b) => write!(f, "startsWith({a}, {b})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(r: &Ref) -> Option<String> {
        match r {
            Ref::GitRef => Some("refs/heads/main".into()),
            Ref::Param(p) if p == "env" => Some("prod".into()),
            Ref::TaskState(t) if t == "test" => Some("failed".into()),
            _ => None,
        }
    }

    #[test]
    fn conditions_parse_evaluate_and_print_back() {
        let cases = [
            ("${{ git.ref == 'refs/heads/main' }}", true),
            ("git.ref != \"refs/heads/main\"", false),
            (
                "startsWith(git.ref, 'refs/heads/') && params.env == 'prod'",
                true,
            ),
            ("!(tasks.test.state == 'succeeded') || false", true),
            (
                "params.env == 'dev' || tasks.test.state == 'succeeded'",
                false,
            ),
            ("true && !false", true),
            ("params.env", true),
            ("'it\\'s' == \"it's\"", true),
            ("(!params.env) == 'true'", false),
            ("'false' == (!params.env)", true),
        ];
        for (text, want) in cases {
            let c = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(c.eval(&env), Ok(want), "{text}");
            assert_eq!(
                parse(&c.to_string()),
                Ok(c.clone()),
                "{text} printed as {c}"
            );
        }
    }

    #[test]
    fn any_folded_value_prints_back() {
        let c = parse("params.x == 'a'").unwrap();
        for v in ["a'b\"c", "back\\slash", "'", ""] {
            let folded = c.fold(&|_| Some(v.to_string()));
            assert_eq!(
                parse(&folded.to_string()),
                Ok(folded.clone()),
                "{v}: {folded}"
            );
        }
    }

    #[test]
    fn simplifying_keeps_only_task_states_and_their_literals() {
        let long = "x".repeat(10_000);
        let c = parse(
            "params.msg != '' && (git.ref == 'refs/heads/main' || tasks.t.state == 'failed')",
        )
        .unwrap();
        let folded = c.fold(&|r| match r {
            Ref::Param(_) => Some(long.clone()),
            Ref::GitRef => Some("refs/heads/dev".into()),
            _ => None,
        });
        let s = folded.simplify();
        assert_eq!(s.to_string(), "(tasks.t.state == 'failed')");
        // A long flat chain prints flat enough to read back.
        let chain = (0..200)
            .map(|i| format!("git.ref == 'b{i}'"))
            .collect::<Vec<_>>()
            .join(" || ");
        let chained = parse(&chain)
            .unwrap()
            .fold(&|_| Some("b7".into()))
            .simplify();
        assert_eq!(chained, Cond::Bool(true));
    }

    #[test]
    fn folding_leaves_only_what_is_unknown() {
        let c = parse("git.ref == 'refs/heads/main' && tasks.deploy.state == 'failed'").unwrap();
        let folded = c.fold(&|r| matches!(r, Ref::GitRef).then(|| "refs/heads/x".to_string()));
        assert_eq!(
            folded.to_string(),
            "(('refs/heads/x' == 'refs/heads/main') && (tasks.deploy.state == 'failed'))"
        );
        assert_eq!(folded.refs(), [&Ref::TaskState("deploy".into())]);
        // False already: the state is never needed.
        assert_eq!(folded.eval(&|_| None), Ok(false));
        let or = parse("git.ref == 'x' || tasks.deploy.state == 'failed'").unwrap();
        let e = (or.fold(&|r| matches!(r, Ref::GitRef).then(String::new)))
            .eval(&|_| None)
            .unwrap_err();
        assert!(e.contains("tasks.deploy.state"), "{e}");
    }

    #[test]
    fn bad_conditions_say_what_is_wrong() {
        for (text, says) in [
            ("", "empty"),
            ("git.ref = 'x'", "unknown operator `=`"),
            ("git.ref == ", "ends where a value is expected"),
            ("(git.ref == 'x'", "expected `)`"),
            ("git.branch == 'x'", "unknown value `git.branch`"),
            ("'x' 'y'", "unexpected 'y'"),
            ("'open", "not closed"),
            ("startsWith(git.ref)", "expected `,`"),
            ("git.ref == 'a' ; rm", "unexpected character `;`"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
        let deep = format!("{}true{}", "(".repeat(100), ")".repeat(100));
        assert!(parse(&deep).unwrap_err().contains("nested deeper"));
    }
}
