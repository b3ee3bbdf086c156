//! Turns YAML or JSON text into JSON values that remember where each field came from.
//!
//! Every later error (unknown field, wrong type, invalid policy) must name the file, line and
//! field path, so the parser keeps a side table from field path (`spec.rules[0].from`) to the
//! line it was written on. JSON is parsed by the same YAML 1.2 parser: JSON is valid YAML 1.2.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Upper bound on nodes per file: aliases can expand exponentially ("billion laughs"), and a
/// configuration loader must never hang or exhaust memory on hostile input.
const MAX_NODES: usize = 1_000_000;
/// Nesting deeper than this is not a Kubernetes resource; refuse it before recursion hurts.
const MAX_DEPTH: usize = 128;

/// One YAML document of a file, as JSON, with a line for every field path in it.
#[derive(Debug, Clone)]
pub struct Document {
    pub file: Arc<str>,
    /// Line of the document's first node (1-based).
    pub line: usize,
    pub value: Value,
    /// Shared: a document's value-less copy (what configurations keep for their messages)
    /// and the control plane's cache point at the same table.
    lines: Arc<LineMap>,
}

/// Field path → line, compact: every path in one string, and a table sorted by path for
/// binary search. A HashMap of owned Strings took about three times the memory, and a
/// control plane keeps one of these for every document of its configuration.
#[derive(Debug, Default)]
pub struct LineMap {
    paths: Box<str>,
    /// (start, end) of the path in `paths`, and its line; sorted by path.
    entries: Box<[(u32, u32, u32)]>,
}

impl LineMap {
    fn from_map(map: HashMap<String, usize>) -> LineMap {
        let mut pairs: Vec<(String, usize)> = map.into_iter().collect();
        pairs.sort_unstable();
        let mut paths = String::with_capacity(pairs.iter().map(|(p, _)| p.len()).sum());
        let mut entries = Vec::with_capacity(pairs.len());
        for (p, line) in pairs {
            let start = paths.len();
            paths.push_str(&p);
            // Documents are bounded far below 4 GiB (MAX_NODES); saturate rather than wrap.
            let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
            entries.push((to_u32(start), to_u32(paths.len()), to_u32(line)));
        }
        LineMap {
            paths: paths.into_boxed_str(),
            entries: entries.into_boxed_slice(),
        }
    }

    fn path(&self, e: &(u32, u32, u32)) -> &str {
        self.paths.get(e.0 as usize..e.1 as usize).unwrap_or("")
    }

    fn get(&self, path: &str) -> Option<usize> {
        self.entries
            .binary_search_by(|e| self.path(e).cmp(path))
            .ok()
            .map(|i| self.entries[i].2 as usize)
    }

    fn iter(&self) -> impl Iterator<Item = (&str, usize)> + '_ {
        self.entries.iter().map(|e| (self.path(e), e.2 as usize))
    }
}

impl Document {
    /// The line a field path was written on, falling back to the closest enclosing field.
    pub fn line_of(&self, path: &str) -> usize {
        let mut p = path;
        loop {
            if let Some(l) = self.lines.get(p) {
                return l;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.line,
            }
        }
    }

    /// A document for a value that did not come from text (tests, `kind: List` items keep
    /// their parent's table, see [`Document::child`]).
    pub fn synthetic(file: &str, value: Value) -> Self {
        Document {
            file: file.into(),
            line: 1,
            value,
            lines: Arc::default(),
        }
    }

    /// The same document without its value: file, line and field lines only, for what must
    /// name places in it after loading (diagnostics) without keeping its whole JSON tree.
    pub fn without_value(&self) -> Document {
        Document {
            file: self.file.clone(),
            line: self.line,
            value: Value::Null,
            lines: self.lines.clone(),
        }
    }

    /// This document's place (file, line, field lines) with another value: the control plane
    /// rebuilds documents from their JSON between reloads instead of keeping their trees.
    pub fn with_value(&self, value: Value) -> Document {
        Document {
            file: self.file.clone(),
            line: self.line,
            value,
            lines: self.lines.clone(),
        }
    }

    /// The document of `items[i]` of a `kind: List`, with paths re-rooted at the item.
    pub fn child(&self, prefix: &str, value: Value) -> Self {
        let mut lines = HashMap::new();
        for (k, v) in self.lines.iter() {
            if let Some(rest) = k.strip_prefix(prefix) {
                let rest = rest.strip_prefix('.').unwrap_or(rest);
                lines.insert(rest.to_string(), v);
            }
        }
        Document {
            file: self.file.clone(),
            line: self.lines.get(prefix).unwrap_or(self.line),
            value,
            lines: Arc::new(LineMap::from_map(lines)),
        }
    }
}

/// Text that is not YAML at all.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct SyntaxError {
    pub file: Arc<str>,
    pub line: usize,
    pub message: String,
}

enum Frame {
    Seq {
        items: Vec<Value>,
        anchor: usize,
        path: String,
    },
    Map {
        map: Map<String, Value>,
        key: Option<String>,
        anchor: usize,
        path: String,
    },
}

struct Builder {
    file: Arc<str>,
    stack: Vec<Frame>,
    docs: Vec<Document>,
    doc_line: usize,
    lines: HashMap<String, usize>,
    anchors: HashMap<usize, Value>,
    nodes: usize,
    error: Option<(usize, String)>,
}

impl Builder {
    fn child_path(&self) -> Option<String> {
        match self.stack.last() {
            None => Some(String::new()),
            Some(Frame::Seq { items, path, .. }) => Some(format!("{path}[{}]", items.len())),
            Some(Frame::Map {
                key: Some(k), path, ..
            }) => Some(if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            }),
            // A node in key position: keys get no path of their own.
            Some(Frame::Map { key: None, .. }) => None,
        }
    }

    fn fail(&mut self, line: usize, msg: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some((line, msg.into()));
        }
    }

    fn count(&mut self, line: usize, n: usize) {
        self.nodes += n;
        if self.nodes > MAX_NODES {
            self.fail(
                line,
                format!("document expands to more than {MAX_NODES} nodes"),
            );
        }
    }

    fn push_value(&mut self, v: Value, line: usize) {
        match self.stack.last_mut() {
            None => {
                let lines = Arc::new(LineMap::from_map(std::mem::take(&mut self.lines)));
                self.docs.push(Document {
                    file: self.file.clone(),
                    line: self.doc_line.max(1),
                    value: v,
                    lines,
                });
            }
            Some(Frame::Seq { items, .. }) => items.push(v),
            Some(Frame::Map { map, key, .. }) => match key.take() {
                None => match v {
                    Value::String(s) => *key = Some(s),
                    Value::Number(n) => *key = Some(n.to_string()),
                    Value::Bool(b) => *key = Some(b.to_string()),
                    Value::Null => *key = Some(String::new()),
                    _ => self.fail(line, "mapping keys must be scalars"),
                },
                Some(k) => {
                    if map.insert(k.clone(), v).is_some() {
                        self.fail(line, format!("duplicate key \"{k}\""));
                    }
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let line = mark.line();
        match ev {
            Event::DocumentStart => self.doc_line = line,
            Event::Scalar(text, style, anchor, _tag) => {
                if self.stack.is_empty() {
                    self.doc_line = line;
                }
                self.count(line, 1);
                match self.stack.last() {
                    // A key: its field path is written on this line, whatever the value spans.
                    Some(Frame::Map {
                        key: None, path, ..
                    }) => {
                        let p = if path.is_empty() {
                            text.clone()
                        } else {
                            format!("{path}.{text}")
                        };
                        self.lines.insert(p, line);
                    }
                    _ => {
                        if let Some(p) = self.child_path() {
                            self.lines.entry(p).or_insert(line);
                        }
                    }
                }
                let v = resolve_scalar(text, style);
                if anchor > 0 {
                    self.anchors.insert(anchor, v.clone());
                }
                self.push_value(v, line);
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(v) => {
                    let n = count_nodes(&v);
                    self.count(line, n);
                    if let Some(p) = self.child_path() {
                        self.lines.insert(p, line);
                    }
                    self.push_value(v, line);
                }
                None => self.fail(line, "alias to an unknown anchor"),
            },
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if self.stack.len() >= MAX_DEPTH {
                    self.fail(line, format!("nesting deeper than {MAX_DEPTH} levels"));
                    return;
                }
                if self.stack.is_empty() {
                    self.doc_line = line;
                }
                self.count(line, 1);
                let path = self.child_path().unwrap_or_else(|| "?".into());
                self.lines.entry(path.clone()).or_insert(line);
                let frame = if matches!(ev, Event::SequenceStart(..)) {
                    Frame::Seq {
                        items: Vec::new(),
                        anchor,
                        path,
                    }
                } else {
                    Frame::Map {
                        map: Map::new(),
                        key: None,
                        anchor,
                        path,
                    }
                };
                self.stack.push(frame);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (v, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { items, anchor, .. }) => (Value::Array(items), anchor),
                    Some(Frame::Map { map, anchor, .. }) => (Value::Object(map), anchor),
                    None => return,
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, v.clone());
                }
                self.push_value(v, line);
            }
            _ => {}
        }
    }
}

fn count_nodes(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(count_nodes).sum::<usize>(),
        Value::Object(m) => 1 + m.values().map(count_nodes).sum::<usize>(),
        _ => 1,
    }
}

/// YAML 1.2 core schema for plain scalars; quoted scalars are always strings.
fn resolve_scalar(text: String, style: TScalarStyle) -> Value {
    if style != TScalarStyle::Plain {
        return Value::String(text);
    }
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let t = text.as_str();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = t.parse::<i64>() {
            return Value::Number(n.into());
        }
        if let Ok(n) = digits.parse::<u64>() {
            if !neg {
                return Value::Number(n.into());
            }
        }
    }
    if let Some(h) = t.strip_prefix("0x") {
        if let Ok(n) = i64::from_str_radix(h, 16) {
            return Value::Number(n.into());
        }
    }
    if let Some(o) = t.strip_prefix("0o") {
        if let Ok(n) = i64::from_str_radix(o, 8) {
            return Value::Number(n.into());
        }
    }
    let looks_float = t.bytes().any(|b| b.is_ascii_digit())
        && t.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if looks_float {
        if let Some(n) = t.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(text)
}

/// Parses every document of a YAML or JSON text. Empty documents (`---` with nothing after
/// it, comments only) are dropped, as kubectl does.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Document>, SyntaxError> {
    let file: Arc<str> = file.into();
    let mut b = Builder {
        file: file.clone(),
        stack: Vec::new(),
        docs: Vec::new(),
        doc_line: 1,
        lines: HashMap::new(),
        anchors: HashMap::new(),
        nodes: 0,
        error: None,
    };
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut b, true) {
        return Err(SyntaxError {
            file,
            line: e.marker().line(),
            message: e.info().to_string(),
        });
    }
    if let Some((line, message)) = b.error {
        return Err(SyntaxError {
            file,
            line,
            message,
        });
    }
    b.docs.retain(|d| !d.value.is_null());
    Ok(b.docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_types() {
        let text = "a: 1\nb:\n  - x\n  - 'true'\n  - true\nc:\n  80:\n    mode: STRICT\n---\n---\n{\"k\": [1, 2.5]}\n";
        let docs = parse_documents("t.yaml", text).unwrap();
        assert_eq!(docs.len(), 2);
        let d = &docs[0];
        assert_eq!(d.value["b"][1], Value::String("true".into()));
        assert_eq!(d.value["b"][2], Value::Bool(true));
        assert_eq!(d.value["c"]["80"]["mode"], "STRICT");
        assert_eq!(d.line_of("b[1]"), 4);
        assert_eq!(d.line_of("c.80.mode"), 8);
        assert_eq!(d.line_of("c.80.mode.nothing[3]"), 8);
        assert_eq!(docs[1].value["k"][1], serde_json::json!(2.5));
        assert_eq!(docs[1].line, 11);
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = parse_documents("bad.yaml", "a: 1\nb: [1, 2\n").unwrap_err();
        assert_eq!(&*e.file, "bad.yaml");
        assert!(e.line >= 2, "{e}");
        let e = parse_documents("dup.yaml", "a: 1\na: 2\n").unwrap_err();
        assert!(e.message.contains("duplicate key"), "{e}");
    }

    #[test]
    fn alias_bomb_is_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let e = parse_documents("bomb.yaml", &text).unwrap_err();
        assert!(e.message.contains("more than"), "{e}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = "[".repeat(10_000);
        assert!(parse_documents("deep.yaml", &text).is_err());
    }
}
