//! A YAML stream as a tree of nodes that remember where they are in the
//! text, for edits that splice the source instead of re-serialising it.
//! Built from `saphyr-parser-bw`'s events (which carry spans); aliases stay
//! nodes of their own, resolved on demand.

use std::collections::HashMap;

use saphyr_parser_bw::{Event, Parser, ScalarStyle, ScanError, Span};

use crate::EditError;

/// Nesting deeper than this is refused (guards the recursive walk).
const MAX_DEPTH: usize = 512;

/// A position as the parser reports it. The parser's character index and
/// column drift on lines with non-ASCII text (some paths count bytes, others
/// characters), so only the line is trusted; the column is a hint that
/// [`crate::plan`] checks against the text when it locates a scalar.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pos {
    /// 1-based line.
    pub(crate) line: usize,
    /// 0-based column (a hint).
    pub(crate) col: usize,
}

#[derive(Debug)]
pub(crate) enum NodeKind {
    Scalar {
        value: String,
        style: ScalarStyle,
    },
    Sequence(Vec<usize>),
    Mapping {
        pairs: Vec<(usize, usize)>,
        flow: bool,
    },
    Alias(usize),
}

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) kind: NodeKind,
    pub(crate) start: Pos,
    pub(crate) end: Pos,
}

/// Every node of a YAML stream, by index; documents, aliases and children
/// refer to nodes by their index.
pub(crate) struct Tree {
    pub(crate) nodes: Vec<Node>,
    /// Byte offset of the start of each line.
    pub(crate) line_starts: Vec<usize>,
    /// The root node of each document.
    pub(crate) documents: Vec<usize>,
    /// Anchor id -> the node it names.
    anchors: HashMap<usize, usize>,
}

/// Byte offsets of the start of each line; YAML breaks lines at CRLF, LF
/// and a lone CR.
fn line_starts(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut starts = vec![0];
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => starts.push(i + 1),
            b'\r' if bytes.get(i + 1) != Some(&b'\n') => starts.push(i + 1),
            _ => {}
        }
        i += 1;
    }
    starts
}

fn yaml_error(e: &ScanError) -> EditError {
    EditError::Yaml {
        line: e.marker().line(),
        column: e.marker().col() + 1,
        message: e.info().to_owned(),
    }
}

struct Builder<'t> {
    parser: Parser<'t, saphyr_parser_bw::StrInput<'t>>,
    tree: Tree,
}

impl<'t> Builder<'t> {
    fn pos(&self, span: &Span, end: bool) -> Pos {
        let m = if end { span.end } else { span.start };
        Pos {
            line: m.line(),
            col: m.col(),
        }
    }

    fn next(&mut self) -> Result<(Event<'t>, Span), EditError> {
        match self.parser.next_event() {
            Some(Ok(ev)) => Ok(ev),
            Some(Err(e)) => Err(yaml_error(&e)),
            None => Err(EditError::Yaml {
                line: 0,
                column: 0,
                message: "unexpected end of input".to_owned(),
            }),
        }
    }

    fn build(mut self) -> Result<Tree, EditError> {
        loop {
            let (ev, span) = self.next()?;
            match ev {
                Event::StreamEnd => return Ok(self.tree),
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::DocumentStart(_) => {
                    let (ev, span) = self.next()?;
                    if matches!(ev, Event::DocumentEnd) {
                        continue;
                    }
                    let root = self.node(ev, span, 0)?;
                    self.tree.documents.push(root);
                }
                other => {
                    return Err(EditError::Yaml {
                        line: span.start.line(),
                        column: span.start.col() + 1,
                        message: format!("unexpected {other:?} outside a document"),
                    });
                }
            }
        }
    }

    fn push(&mut self, kind: NodeKind, start: Pos, end: Pos, anchor: usize) -> usize {
        let id = self.tree.nodes.len();
        self.tree.nodes.push(Node { kind, start, end });
        if anchor != 0 {
            self.tree.anchors.insert(anchor, id);
        }
        id
    }

    fn node(&mut self, ev: Event<'t>, span: Span, depth: usize) -> Result<usize, EditError> {
        if depth > MAX_DEPTH {
            return Err(EditError::Yaml {
                line: span.start.line(),
                column: span.start.col() + 1,
                message: format!("nesting deeper than {MAX_DEPTH} levels"),
            });
        }
        let start = self.pos(&span, false);
        match ev {
            Event::Scalar(value, style, anchor, _tag) => {
                let end = self.pos(&span, true);
                Ok(self.push(
                    NodeKind::Scalar {
                        value: value.into_owned(),
                        style,
                    },
                    start,
                    end,
                    anchor,
                ))
            }
            Event::Alias(anchor) => {
                let end = self.pos(&span, true);
                Ok(self.push(NodeKind::Alias(anchor), start, end, 0))
            }
            Event::SequenceStart(anchor, _tag) => {
                // Register the anchor before the children so a (self-)alias
                // inside resolves; the node is filled in at the end.
                let id = self.push(NodeKind::Sequence(Vec::new()), start, start, anchor);
                let mut items = Vec::new();
                loop {
                    let (ev, span) = self.next()?;
                    if matches!(ev, Event::SequenceEnd) {
                        self.tree.nodes[id].end = self.pos(&span, true);
                        break;
                    }
                    items.push(self.node(ev, span, depth + 1)?);
                }
                self.tree.nodes[id].kind = NodeKind::Sequence(items);
                Ok(id)
            }
            Event::MappingStart(anchor, _tag) => {
                let flow = !span.is_empty();
                let id = self.push(
                    NodeKind::Mapping {
                        pairs: Vec::new(),
                        flow,
                    },
                    start,
                    start,
                    anchor,
                );
                let mut pairs = Vec::new();
                loop {
                    let (ev, span) = self.next()?;
                    if matches!(ev, Event::MappingEnd) {
                        self.tree.nodes[id].end = self.pos(&span, true);
                        break;
                    }
                    let key = self.node(ev, span, depth + 1)?;
                    let (ev, span) = self.next()?;
                    let value = self.node(ev, span, depth + 1)?;
                    pairs.push((key, value));
                }
                self.tree.nodes[id].kind = NodeKind::Mapping { pairs, flow };
                Ok(id)
            }
            other => Err(EditError::Yaml {
                line: span.start.line(),
                column: span.start.col() + 1,
                message: format!("unexpected {other:?}"),
            }),
        }
    }
}

/// Parses `text` into a [`Tree`]; a YAML error says where.
pub(crate) fn parse_tree(text: &str) -> Result<Tree, EditError> {
    Builder {
        parser: Parser::new_from_str(text),
        tree: Tree {
            nodes: Vec::new(),
            line_starts: line_starts(text),
            documents: Vec::new(),
            anchors: HashMap::new(),
        },
    }
    .build()
}

impl Tree {
    /// Follow aliases (bounded, in case of a cycle).
    pub(crate) fn resolve(&self, mut id: usize) -> usize {
        for _ in 0..64 {
            match self.nodes[id].kind {
                NodeKind::Alias(anchor) => match self.anchors.get(&anchor) {
                    Some(&target) => id = target,
                    None => return id,
                },
                _ => return id,
            }
        }
        id
    }

    pub(crate) fn scalar(&self, id: usize) -> Option<&str> {
        match &self.nodes[self.resolve(id)].kind {
            NodeKind::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    pub(crate) fn pairs(&self, id: usize) -> &[(usize, usize)] {
        match &self.nodes[self.resolve(id)].kind {
            NodeKind::Mapping { pairs, .. } => pairs,
            _ => &[],
        }
    }

    pub(crate) fn items(&self, id: usize) -> &[usize] {
        match &self.nodes[self.resolve(id)].kind {
            NodeKind::Sequence(items) => items,
            _ => &[],
        }
    }

    /// The last pair whose key is the scalar `key` (YAML forbids duplicates;
    /// the last wins in most loaders).
    pub(crate) fn pair(&self, map: usize, key: &str) -> Option<(usize, usize)> {
        self.pairs(map)
            .iter()
            .rev()
            .find(|(k, _)| self.scalar(*k) == Some(key))
            .copied()
    }

    pub(crate) fn get(&self, map: usize, key: &str) -> Option<usize> {
        self.pair(map, key).map(|(_, v)| v)
    }

    pub(crate) fn path(&self, mut node: usize, keys: &[&str]) -> Option<usize> {
        for key in keys {
            node = self.get(node, key)?;
        }
        Some(node)
    }
}
