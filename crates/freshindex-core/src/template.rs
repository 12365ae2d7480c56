//! Field references and text templates over an item's fields (multi-input flows).
//!
//! An item's fields are a JSON object: `key`, `text`, the metadata a source gives (a
//! PostgreSQL source's `metadata_columns`, a pushed item's metadata), and what the steps add
//! (a looked-up item under its `as` name, a group's aggregates). A **template** is text with
//! `{path}` placeholders, `path` being dot-separated field names (`{company.name}`); `{{` and
//! `}}` write braces. A **key expression** (`lookup.key`, `merge_key`, `group.by`) is a
//! template when it holds a `{`, and otherwise the path of one field (`company_id` is short
//! for `{company_id}`).
//!
//! Rendering: a string as it is, a number or boolean as written in JSON, a missing field or
//! `null` as nothing, a list as its rendered elements joined by `, `, an object as compact
//! JSON.

use std::fmt;

use serde_json::Value;

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Lit(String),
    Field(Vec<String>),
}

impl Template {
    /// Parses `{path}` placeholders; the error names the position and what is wrong.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|p| p.1) == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().map(|p| p.1) == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for (_, c) in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(format!(
                            "`{{` at byte {i} is not closed; write `{{{{` for a brace"
                        ));
                    }
                    let path = parse_path(name.trim())
                        .map_err(|e| format!("placeholder at byte {i}: {e}"))?;
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Field(path));
                }
                '}' => {
                    return Err(format!(
                        "`}}` at byte {i} closes nothing; write `}}}}` for a brace"
                    ));
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template { parts })
    }

    /// A key expression: a template when `text` holds a `{`, else one field's path.
    pub fn key_expr(text: &str) -> Result<Template, String> {
        if text.contains('{') {
            Template::parse(text)
        } else {
            Ok(Template {
                parts: vec![Part::Field(parse_path(text.trim())?)],
            })
        }
    }

    /// The text with every placeholder replaced by its field's rendering.
    pub fn render(&self, fields: &Value) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Field(path) => render_value(lookup(fields, path), &mut out),
            }
        }
        out
    }

    /// The first name of every path the template reads.
    pub fn roots(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(path) => path.first().map(String::as_str),
            Part::Lit(_) => None,
        })
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.parts {
            match p {
                Part::Lit(s) => f.write_str(&s.replace('{', "{{").replace('}', "}}"))?,
                Part::Field(path) => write!(f, "{{{}}}", path.join("."))?,
            }
        }
        Ok(())
    }
}

fn parse_path(text: &str) -> Result<Vec<String>, String> {
    if text.is_empty() {
        return Err("empty field name".into());
    }
    text.split('.')
        .map(|seg| {
            let ok = !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-'));
            if ok {
                Ok(seg.to_string())
            } else {
                Err(format!(
                    "`{text}` is not a field path (names of letters, digits, `_`, `-`, joined by `.`)"
                ))
            }
        })
        .collect()
}

/// The value at `path` in `fields`, if any.
pub fn lookup<'v>(fields: &'v Value, path: &[String]) -> Option<&'v Value> {
    let mut v = fields;
    for seg in path {
        v = v.as_object()?.get(seg)?;
    }
    Some(v)
}

/// Whether a value counts as empty for merges: missing, `null`, `""`, `[]` or `{}`.
pub fn is_empty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(Value::Bool(_) | Value::Number(_)) => false,
    }
}

fn render_value(v: Option<&Value>, out: &mut String) {
    match v {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Array(a)) => {
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                render_value(Some(e), out);
            }
        }
        Some(v @ (Value::Bool(_) | Value::Number(_) | Value::Object(_))) => {
            out.push_str(&v.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_fields_paths_lists_and_escapes() {
        let t = Template::parse("{name} by {company.name} ({tags}) {{x}} {missing}|").unwrap();
        let f = json!({"name": "Drill", "company": {"name": "Acme"}, "tags": ["a", 2]});
        assert_eq!(t.render(&f), "Drill by Acme (a, 2) {x} |");
        assert_eq!(
            t.roots().collect::<Vec<_>>(),
            ["name", "company", "tags", "missing"]
        );
    }

    #[test]
    fn key_expressions_are_a_field_or_a_template() {
        let f = json!({"id": 7, "region": "eu"});
        assert_eq!(Template::key_expr("id").unwrap().render(&f), "7");
        assert_eq!(
            Template::key_expr("{region}-{id}").unwrap().render(&f),
            "eu-7"
        );
        assert!(Template::key_expr("a b").is_err());
    }

    #[test]
    fn malformed_templates_are_refused_with_the_position() {
        assert!(Template::parse("{name").unwrap_err().contains("byte 0"));
        assert!(Template::parse("x }").unwrap_err().contains("byte 2"));
        assert!(Template::parse("{}").unwrap_err().contains("empty"));
        assert!(Template::parse("{a..b}").is_err());
    }
}
