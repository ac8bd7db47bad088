//! A YAML document as a tree of located nodes.
//!
//! The file is read with serde-saphyr into this generic tree first, so the
//! validator can walk it, collect every problem, and point at the exact node.
//! serde-saphyr's budget and alias limits bound the work done on hostile input
//! (alias bombs, huge or deeply nested documents) before our code sees it.

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Budget, Options, Spanned, options::AliasLimits, options::DuplicateKeyPolicy};
use std::fmt;

/// 1-based line and column of a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub const START: Pos = Pos { line: 1, column: 1 };
}

/// A scalar or collection, as YAML typed it.
#[derive(Debug)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// A value with where it is used in the file and, for plain scalars YAML read
/// as bool/number, the text as written (`1.10`, `yes`, `0x1f`).
#[derive(Debug)]
pub(crate) struct Node {
    pub value: Value,
    pub pos: Pos,
    /// Source text of a non-string scalar, filled in after parsing.
    pub raw: Option<String>,
    /// Where the value is defined (differs from `pos` for aliases).
    defined: Pos,
}

impl Node {
    /// What kind of value this is, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "nothing (null)",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }

    /// The scalar as text: strings as they are, other scalars as written in the
    /// file. `None` for null, lists and mappings.
    pub fn scalar_text(&self) -> Option<String> {
        match &self.value {
            Value::Str(s) => Some(s.clone()),
            Value::Bool(b) => Some(self.raw.clone().unwrap_or_else(|| b.to_string())),
            Value::Int(i) => Some(self.raw.clone().unwrap_or_else(|| i.to_string())),
            Value::Float(x) => Some(self.raw.clone().unwrap_or_else(|| x.to_string())),
            Value::Null | Value::Seq(_) | Value::Map(_) => None,
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<Value>::deserialize(d)?;
        let pos = Pos {
            line: s.referenced.line() as usize,
            column: s.referenced.column() as usize,
        };
        let defined = Pos {
            line: s.defined.line() as usize,
            column: s.defined.column() as usize,
        };
        Ok(Node {
            value: s.value,
            pos,
            raw: None,
            defined,
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i128::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Str(String::from_utf8_lossy(v).into_owned()))
    }
    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Str(String::from_utf8_lossy(&v).into_owned()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = seq.next_element::<Node>()? {
            items.push(n);
        }
        // See `visit_map`.
        items.shrink_to_fit();
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(k) = map.next_key::<Node>()? {
            let v = map.next_value::<Node>()?;
            entries.push((k, v));
        }
        // A pair of nodes is ~200 bytes and the first push makes room for
        // four: a 900 KB file of one-key steps took 35 MB of slack (of 55)
        // and kept it (glibc keeps a worker thread's freed memory).
        entries.shrink_to_fit();
        Ok(Value::Map(entries))
    }
}

/// Nesting deeper than this is refused by the parser (a pipeline file needs ~6).
pub(crate) const MAX_DEPTH: usize = 64;

fn options() -> Options {
    Options {
        budget: Some(Budget {
            max_events: 500_000,
            max_aliases: 10_000,
            max_anchors: 10_000,
            max_depth: MAX_DEPTH,
            max_documents: 2,
            max_nodes: 250_000,
            max_total_scalar_bytes: 4 * 1024 * 1024,
            max_merge_keys: 1_000,
            ..Budget::default()
        }),
        // Every pair reaches us, so duplicate keys are reported with both places.
        duplicate_keys: DuplicateKeyPolicy::LastWins,
        alias_limits: AliasLimits {
            max_total_replayed_events: 20_000,
            max_replay_stack_depth: 16,
            max_alias_expansions_per_anchor: 200,
        },
        strict_booleans: true,
        with_snippet: false,
        crop_radius: 0,
        ..Options::default()
    }
}

/// A YAML-level failure: the message and where it happened, when known.
#[derive(Debug)]
pub(crate) struct YamlError {
    pub pos: Pos,
    pub message: String,
}

/// Reads one YAML document into a tree. `text` must not start with a BOM.
pub(crate) fn load(text: &str) -> Result<Node, YamlError> {
    let to_error = |e: serde_saphyr::Error| {
        let e = e.without_snippet();
        let pos = e
            .location()
            .map(|l| Pos {
                line: l.line() as usize,
                column: l.column() as usize,
            })
            .filter(|p| p.line > 0)
            .map_or(Pos::START, |p| Lines::new(text).char_pos(p));
        YamlError {
            pos,
            message: describe(e),
        }
    };
    // Read as a stream so a second document is noticed (the budget stops a
    // stream of many), then insist on exactly one.
    let mut docs: Vec<Node> =
        serde_saphyr::from_multiple_with_options(text, options()).map_err(to_error)?;
    if docs.len() > 1 {
        return Err(YamlError {
            pos: docs[1].pos,
            message: MULTIPLE_DOCUMENTS.to_owned(),
        });
    }
    let mut node = docs.pop().unwrap_or(Node {
        value: Value::Null,
        pos: Pos::START,
        raw: None,
        defined: Pos::START,
    });
    finish(&mut node, &Lines::new(text));
    Ok(node)
}

const MULTIPLE_DOCUMENTS: &str =
    "the file holds more than one YAML document (`---`); a pipeline file has exactly one";

fn describe(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::Error as E;
    use serde_saphyr::budget::BudgetBreach as B;
    match e {
        E::Budget { breach, .. } => match breach {
            B::Depth { .. } => format!("YAML nesting is deeper than {MAX_DEPTH} levels"),
            B::Aliases { .. } | B::AliasAnchorRatio { .. } | B::Anchors { .. } => {
                "too many YAML aliases or anchors (refusing a possible alias bomb)".to_owned()
            }
            B::Documents { .. } => MULTIPLE_DOCUMENTS.to_owned(),
            other => format!("the YAML document is too large ({other:?})"),
        },
        E::Message { msg, .. } if msg.contains("alias") && msg.contains("limit") => {
            format!("YAML aliases expand to too much data (refusing a possible alias bomb): {msg}")
        }
        E::Message { msg, .. } if msg.contains("recursion limit") => {
            format!("YAML nesting is deeper than {MAX_DEPTH} levels")
        }
        E::Message { msg, .. } | E::HookError { msg, .. } => format!("invalid YAML: {msg}"),
        E::Eof { .. } => "invalid YAML: unexpected end of input".to_owned(),
        E::UnknownAnchor { .. } => "invalid YAML: alias to an undefined anchor".to_owned(),
        other => {
            // Display appends " at line L, column C"; we print the location ourselves.
            let s = other.to_string();
            let s = match s.rfind(" at line ") {
                Some(i) => s[..i].to_owned(),
                None => s,
            };
            format!("invalid YAML: {s}")
        }
    }
}

/// Line starts, to turn the parser's positions into text.
///
/// The parser (saphyr-parser-bw) counts columns in bytes; people count
/// characters, so every reported column is converted.
struct Lines<'t> {
    text: &'t str,
    starts: Vec<usize>,
}

impl<'t> Lines<'t> {
    fn new(text: &'t str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self { text, starts }
    }

    fn line(&self, line: usize) -> Option<&'t str> {
        let start = *self.starts.get(line.checked_sub(1)?)?;
        self.text[start..].split('\n').next()
    }

    /// The rest of the line from a (byte) position.
    fn from(&self, at: Pos) -> Option<&'t str> {
        self.line(at.line)?.get(at.column.checked_sub(1)?..)
    }

    /// `at` with its byte column turned into a character column.
    fn char_pos(&self, at: Pos) -> Pos {
        let column = self
            .line(at.line)
            .filter(|l| !l.is_ascii())
            .and_then(|l| l.get(..at.column.checked_sub(1)?))
            .map_or(at.column, |before| before.chars().count() + 1);
        Pos { column, ..at }
    }

    /// The plain scalar token at a position.
    fn token(&self, at: Pos) -> Option<&'t str> {
        let rest = self.from(at)?;
        let ends = |c: char| c.is_whitespace() || matches!(c, ',' | ']' | '}' | '#');
        // A key's token stops before its `:` (`0: x` is the key `0`).
        let end = rest
            .char_indices()
            .find(|&(i, c)| ends(c) || (c == ':' && rest[i + 1..].chars().next().is_none_or(ends)))
            .map_or(rest.len(), |(i, _)| i);
        // An anchor or tag in front means the location is not the scalar's own.
        Some(&rest[..end]).filter(|t| !t.is_empty() && !t.starts_with(['&', '*', '!']))
    }
}

/// Records the source text of every non-string scalar, converts columns to
/// characters, and places null mapping values at their key (a missing value
/// has no place of its own). Iterative: the parser already bounded the depth,
/// but stay cheap regardless.
fn finish(root: &mut Node, lines: &Lines) {
    let mut stack: Vec<&mut Node> = vec![root];
    while let Some(node) = stack.pop() {
        if matches!(node.value, Value::Bool(_) | Value::Int(_) | Value::Float(_)) {
            node.raw = lines.token(node.defined).map(str::to_owned);
        }
        node.pos = lines.char_pos(node.pos);
        node.defined = lines.char_pos(node.defined);
        match &mut node.value {
            Value::Seq(items) => stack.extend(items.iter_mut()),
            Value::Map(entries) => {
                for (k, v) in entries.iter_mut() {
                    stack.push(k);
                    stack.push(v);
                }
            }
            _ => {}
        }
    }
    fix_null_positions(root);
}

fn fix_null_positions(root: &mut Node) {
    let mut stack: Vec<&mut Node> = vec![root];
    while let Some(node) = stack.pop() {
        match &mut node.value {
            Value::Seq(items) => stack.extend(items.iter_mut()),
            Value::Map(entries) => {
                for (k, v) in entries.iter_mut() {
                    if v.is_null() {
                        v.pos = k.pos;
                    }
                    stack.push(v);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_count_characters() {
        let text = "a: \"é✓\"\nb: [\"ü\", 1.50, x]\n";
        let root = load(text).unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("{root:?}")
        };
        let Value::Seq(items) = &entries[1].1.value else {
            panic!("{root:?}")
        };
        assert_eq!(
            items[1].pos,
            Pos {
                line: 2,
                column: 10
            }
        );
        assert_eq!(items[1].raw.as_deref(), Some("1.50"));
        assert_eq!(
            items[2].pos,
            Pos {
                line: 2,
                column: 16
            }
        );

        let err = load("a: \"é✓\", b: [\n").unwrap_err();
        assert_eq!(err.pos.line, 1);
    }

    #[test]
    fn a_number_key_keeps_its_text_without_the_colon() {
        let root = load("0: a\n1.50:\n{2: b}: c\nd: {3: e}\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("{root:?}")
        };
        let keys: Vec<Option<String>> = entries.iter().map(|(k, _)| k.scalar_text()).collect();
        assert_eq!(keys[..2], [Some("0".into()), Some("1.50".into())]);
        let Value::Map(inner) = &entries[3].1.value else {
            panic!("{root:?}")
        };
        assert_eq!(inner[0].0.scalar_text().as_deref(), Some("3"));
    }

    #[test]
    fn null_values_sit_at_their_key() {
        let root = load("a:\nb: 1\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("{root:?}")
        };
        assert!(entries[0].1.is_null());
        assert_eq!(entries[0].1.pos, Pos::START);
    }
}
