//! A tiny JSON writer that reproduces Go's `encoding/json` bytes: object keys in
//! the order given, `MarshalIndent(v, "", "\t")` layout (empty arrays and objects
//! stay `[]`/`{}`), and Go's string escaping (`<`, `>`, `&`, U+2028, U+2029 as
//! `\u....`). serde_json is only used to *read* JSON.

use std::collections::BTreeMap;

pub enum J {
    Bool(bool),
    Int(i64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    pub fn s(value: impl Into<String>) -> J {
        J::Str(value.into())
    }

    pub fn o(pairs: Vec<(&str, J)>) -> J {
        J::Obj(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    /// An object with sorted keys, like a Go `map[string]string`.
    pub fn map(map: &BTreeMap<String, String>) -> J {
        J::Obj(map.iter().map(|(k, v)| (k.clone(), J::s(v))).collect())
    }

    pub fn strs<S: AsRef<str>>(items: &[S]) -> J {
        J::Arr(items.iter().map(|s| J::s(s.as_ref())).collect())
    }

    /// `json.Marshal` output.
    pub fn compact(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, false, 0);
        out
    }

    /// `json.MarshalIndent(v, "", "\t")` output, without a trailing newline.
    pub fn indented(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, true, 0);
        out
    }

    fn write(&self, out: &mut String, indent: bool, depth: usize) {
        match self {
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Int(n) => out.push_str(&n.to_string()),
            J::Str(s) => write_string(out, s),
            J::Arr(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, indent, depth + 1);
                    item.write(out, indent, depth + 1);
                }
                newline(out, indent, depth);
                out.push(']');
            }
            J::Obj(pairs) => {
                if pairs.is_empty() {
                    out.push_str("{}");
                    return;
                }
                out.push('{');
                for (i, (key, value)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, indent, depth + 1);
                    write_string(out, key);
                    out.push(':');
                    if indent {
                        out.push(' ');
                    }
                    value.write(out, indent, depth + 1);
                }
                newline(out, indent, depth);
                out.push('}');
            }
        }
    }
}

fn newline(out: &mut String, indent: bool, depth: usize) {
    if indent {
        out.push('\n');
        for _ in 0..depth {
            out.push('\t');
        }
    }
}

/// Go's string encoder with HTML escaping on (the default of json.Marshal and Encoder).
fn write_string(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{0}'..='\u{1f}' => {
                let b = c as u32;
                out.push_str("\\u00");
                out.push(HEX[(b >> 4) as usize & 0xf] as char);
                out.push(HEX[b as usize & 0xf] as char);
            }
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            _ => out.push(c),
        }
    }
    out.push('"');
}
