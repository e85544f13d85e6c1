//! Lenient decoding of YAML values into `deny_unknown_fields` structs.
//!
//! Serde stops at the first error, but a topology file must report every mistake at once. So
//! each struct is decoded from its own `Value`, every unknown key is reported (the known keys
//! come from the struct's own `Deserialize` impl, so they cannot drift), and after a field
//! fails, that field is dropped and decoding is retried so the next bad field shows too.

use std::collections::BTreeSet;
use std::fmt;

use serde::de::{self, DeserializeOwned, Visitor};
use serde_yaml_ng::Value;

use crate::Issue;
use crate::suggest::did_you_mean;

/// Checks one element of a nested list, pushing its issues; returns whether it was clean.
pub(crate) type ElementCheck = fn(&Value, &str, &mut Vec<Issue>) -> bool;

/// The result of decoding one struct.
pub(crate) struct Decoded<T> {
    /// The value, if it could be built at all (possibly after dropping bad fields).
    pub value: Option<T>,
    /// Whether no issue was found.
    pub clean: bool,
}

/// Decodes `value` as `T`, pushing one issue per problem, located under `loc`.
pub(crate) fn decode<T: DeserializeOwned>(
    value: &Value,
    loc: &str,
    issues: &mut Vec<Issue>,
) -> Decoded<T> {
    decode_with(value, loc, &[], issues)
}

/// Like [`decode`], and also checks each element of the listed sequence fields on its own, so
/// that two bad rules give two issues.
pub(crate) fn decode_with<T: DeserializeOwned>(
    value: &Value,
    loc: &str,
    lists: &[(&str, ElementCheck)],
    issues: &mut Vec<Issue>,
) -> Decoded<T> {
    let failed = Decoded {
        value: None,
        clean: false,
    };
    let Value::Mapping(map) = value else {
        issues.push(Issue::new(
            loc,
            format!("expected a mapping, found {}", describe(value)),
        ));
        return failed;
    };
    let mut map = map.clone();
    let mut clean = true;
    let fields = struct_fields::<T>();

    let keys: Vec<Value> = map.keys().cloned().collect();
    for key in keys {
        match key.as_str() {
            Some(k) if fields.contains(&k) => {}
            Some(k) => {
                issues.push(Issue::new(loc, unknown_field(k, fields)));
                map.shift_remove(k);
                clean = false;
            }
            None => {
                issues.push(Issue::new(
                    loc,
                    format!("keys must be strings, found {}", describe(&key)),
                ));
                map.shift_remove(&key);
                clean = false;
            }
        }
    }

    // Fields we dropped; a later "missing field" about them is not a new problem.
    let mut dropped: BTreeSet<String> = BTreeSet::new();

    for (field, check) in lists {
        if let Some(Value::Sequence(items)) = map.get(*field) {
            let mut all_clean = true;
            for (i, item) in items.iter().enumerate() {
                let item_loc = format!("{loc}.{field}[{i}]{}", label_of(item));
                all_clean &= check(item, &item_loc, issues);
            }
            if !all_clean {
                map.shift_remove(*field);
                dropped.insert((*field).to_owned());
                clean = false;
            }
        }
    }

    loop {
        let text = match serde_yaml_ng::to_string(&Value::Mapping(map.clone())) {
            Ok(text) => text,
            Err(e) => {
                issues.push(Issue::new(loc, e.to_string()));
                return failed;
            }
        };
        // Decoding from text (not from the Value) makes serde_yaml_ng name the failing path.
        let err = match serde_yaml_ng::from_str::<T>(&text) {
            Ok(v) => {
                return Decoded {
                    value: Some(v),
                    clean,
                };
            }
            Err(err) => err,
        };
        let (path, message) = split_error(&err);
        let Some(path) = path else {
            let about_dropped = dropped
                .iter()
                .any(|f| message == format!("missing field \"{f}\""));
            if !about_dropped {
                issues.push(Issue::new(loc, message));
            }
            return failed;
        };
        issues.push(Issue::new(format!("{loc}.{path}"), message));
        clean = false;
        let head = path
            .split(['.', '['])
            .next()
            .unwrap_or(path.as_str())
            .to_owned();
        if map.shift_remove(head.as_str()).is_none() {
            // Dropping nothing would loop forever; one issue for this struct is enough.
            return failed;
        }
        dropped.insert(head);
    }
}

/// ` (name)` for an element that has a `name` or `id`, to make locations readable.
pub(crate) fn label_of(item: &Value) -> String {
    ["name", "id"]
        .iter()
        .find_map(|k| item.get(k).and_then(Value::as_str))
        .map(|n| format!(" ({n})"))
        .unwrap_or_default()
}

/// Splits a serde_yaml_ng error into the path it names (if any) and a message without the
/// position, which would be the position in re-serialized text and so meaningless.
fn split_error(err: &serde_yaml_ng::Error) -> (Option<String>, String) {
    let mut text = err.to_string();
    if let Some(at) = text.rfind(" at line ") {
        let tail = &text[at + " at line ".len()..];
        if tail
            .split(" column ")
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            text.truncate(at);
        }
    }
    let text = text.replace('`', "\"");
    // A path has no spaces; serde's own messages ("invalid type: ...") do.
    match text.split_once(": ") {
        Some((path, message)) if !path.contains(char::is_whitespace) => {
            (Some(path.to_owned()), message.to_owned())
        }
        _ => (None, text),
    }
}

/// `unknown field "x" (did you mean "y"?; known: a, b, c)`.
pub(crate) fn unknown_field(key: &str, fields: &[&str]) -> String {
    let known = fields.join(", ");
    match did_you_mean(key, fields.iter().copied()) {
        Some(guess) => {
            format!("unknown field \"{key}\" (did you mean \"{guess}\"? known: {known})")
        }
        None => format!("unknown field \"{key}\" (known: {known})"),
    }
}

/// A short description of a value's type for messages.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing".to_owned(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string \"{s}\""),
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a mapping".to_owned(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// The field names `T`'s derived `Deserialize` accepts, read by asking it to deserialize from
/// a probe that records the `fields` argument of `deserialize_struct`.
pub(crate) fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields = None;
    // The probe always errors after recording; the error itself carries nothing.
    let _ = T::deserialize(FieldProbe(&mut fields));
    fields.unwrap_or(&[])
}

struct FieldProbe<'a>(&'a mut Option<&'static [&'static str]>);

#[derive(Debug)]
struct ProbeDone;

impl fmt::Display for ProbeDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field probe")
    }
}

impl std::error::Error for ProbeDone {}

impl de::Error for ProbeDone {
    fn custom<M: fmt::Display>(_msg: M) -> Self {
        ProbeDone
    }
}

impl<'de> de::Deserializer<'de> for FieldProbe<'_> {
    type Error = ProbeDone;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, ProbeDone> {
        Err(ProbeDone)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, ProbeDone> {
        *self.0 = Some(fields);
        Err(ProbeDone)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        a: u32,
        #[serde(default)]
        b: bool,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        #[serde(default)]
        count: u32,
        #[serde(default)]
        flag: bool,
        #[serde(default)]
        items: Vec<Inner>,
    }

    fn yaml(text: &str) -> Value {
        serde_yaml_ng::from_str(text).expect("test yaml")
    }

    #[test]
    fn probe_reads_field_names() {
        assert_eq!(
            struct_fields::<Outer>(),
            &["name", "count", "flag", "items"]
        );
        assert_eq!(struct_fields::<Inner>(), &["a", "b"]);
    }

    #[test]
    fn clean_value_decodes() {
        let mut issues = Vec::new();
        let d = decode::<Outer>(&yaml("name: x\ncount: 3\n"), "here", &mut issues);
        assert!(d.clean);
        assert!(issues.is_empty());
        assert_eq!(d.value.map(|o| o.count), Some(3));
    }

    #[test]
    fn reports_every_unknown_key_and_every_bad_field() {
        let mut issues = Vec::new();
        let d = decode::<Outer>(
            &yaml("name: x\ncont: 3\nflag: maybe\ncount: six\nextra: 1\n"),
            "here",
            &mut issues,
        );
        let lines: Vec<String> = issues.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[0].starts_with("here: unknown field \"cont\" (did you mean \"count\"?"));
        assert!(lines[1].starts_with("here: unknown field \"extra\""));
        assert!(
            lines[2].starts_with("here.flag: invalid type"),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].starts_with("here.count: invalid type"),
            "{}",
            lines[3]
        );
        assert!(!d.clean);
        // After dropping the bad fields the rest still decodes, with defaults.
        assert_eq!(d.value.map(|o| o.name), Some("x".to_owned()));
    }

    #[test]
    fn nested_list_elements_are_checked_one_by_one() {
        fn check_inner(v: &Value, loc: &str, issues: &mut Vec<Issue>) -> bool {
            decode::<Inner>(v, loc, issues).clean
        }
        let mut issues = Vec::new();
        let d = decode_with::<Outer>(
            &yaml("name: x\nitems:\n  - {a: 1, c: 2}\n  - {a: 1}\n  - {b: true}\n"),
            "here",
            &[("items", check_inner)],
            &mut issues,
        );
        let lines: Vec<String> = issues.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines[0].starts_with("here.items[0]: unknown field \"c\""));
        assert_eq!(lines[1], "here.items[2]: missing field \"a\"");
        assert!(!d.clean);
    }

    #[test]
    fn missing_required_field_is_one_issue() {
        let mut issues = Vec::new();
        let d = decode::<Outer>(&yaml("count: 1\n"), "here", &mut issues);
        assert!(d.value.is_none());
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].to_string(), "here: missing field \"name\"");
    }

    #[test]
    fn non_mapping_is_reported() {
        let mut issues = Vec::new();
        let d = decode::<Outer>(&yaml("[1, 2]"), "here", &mut issues);
        assert!(d.value.is_none());
        assert_eq!(
            issues[0].to_string(),
            "here: expected a mapping, found a list"
        );
    }
}
