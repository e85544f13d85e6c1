//! What an event's fields are, and the type checker that holds a rule against them.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use crate::ast::{Expr, ExprKind, Literal, Path, write_path};
use crate::suggest::close;
use crate::{Error, ErrorKind, Result};

/// The type of a field or sub-expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Type {
    /// Avro `int`, `long`, `float` and `double`: rules see one kind of number.
    Number,
    /// Avro `string`, `enum` and `uuid`.
    String,
    /// Avro `boolean`.
    Bool,
    /// The type of the `null` literal.
    Null,
    /// An Avro map: its values are reached as `features.x` or `features["x.y"]`.
    Map(Box<Type>),
    /// The type, or null (Avro `["null", T]`).
    Nullable(Box<Type>),
    /// Not known (no schema, or an Avro union of several types): anything goes.
    Any,
}

impl Type {
    /// `Nullable(t)`, without nesting nullables.
    pub fn nullable(t: Type) -> Type {
        match t {
            Type::Nullable(_) | Type::Null | Type::Any => t,
            other => Type::Nullable(Box::new(other)),
        }
    }

    /// The type without its nullability.
    pub fn non_null(&self) -> &Type {
        match self {
            Type::Nullable(t) => t,
            t => t,
        }
    }

    /// "a number", "a string or null", for messages.
    fn a(&self) -> String {
        match self {
            Type::Number => "a number".to_owned(),
            Type::String => "a string".to_owned(),
            Type::Bool => "true or false".to_owned(),
            Type::Null => "null".to_owned(),
            Type::Map(_) => "a map".to_owned(),
            Type::Nullable(t) => format!("{} or null", t.a()),
            Type::Any => "of any type".to_owned(),
        }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Number => f.write_str("number"),
            Type::String => f.write_str("string"),
            Type::Bool => f.write_str("bool"),
            Type::Null => f.write_str("null"),
            Type::Map(v) => write!(f, "map of {v}"),
            Type::Nullable(t) => write!(f, "{t} or null"),
            Type::Any => f.write_str("any"),
        }
    }
}

/// The fields an event has, as a rule sees them: field path → type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    fields: BTreeMap<Vec<String>, Type>,
    allow_unknown: bool,
}

impl Fields {
    /// No fields, and unknown fields are errors.
    pub fn new() -> Fields {
        Fields::default()
    }

    /// For events without a known schema: every field is allowed, as [`Type::Any`].
    pub fn any() -> Fields {
        Fields {
            fields: BTreeMap::new(),
            allow_unknown: true,
        }
    }

    /// Adds the field at a dotted path, e.g. `payload.score`.
    pub fn insert(&mut self, path: &str, ty: Type) {
        self.insert_path(path.split('.').map(str::to_owned).collect(), ty);
    }

    /// Adds the field at a path of keys (for keys that hold a dot).
    pub fn insert_path(&mut self, path: Vec<String>, ty: Type) {
        self.fields.insert(path, ty);
    }

    /// [`Fields::insert`], by value.
    pub fn with(mut self, path: &str, ty: Type) -> Fields {
        self.insert(path, ty);
        self
    }

    /// Whether fields not listed are allowed (as [`Type::Any`]) instead of errors.
    pub fn allow_unknown(mut self, allow: bool) -> Fields {
        self.allow_unknown = allow;
        self
    }

    /// The type of the field at exactly this path.
    pub fn get(&self, path: &[String]) -> Option<&Type> {
        self.fields.get(path)
    }

    /// Every field, by path.
    pub fn iter(&self) -> impl Iterator<Item = (&[String], &Type)> {
        self.fields.iter().map(|(p, t)| (p.as_slice(), t))
    }

    /// The fields of a Sluice event schema (an envelope record whose `payload` is a record)
    /// as a rule sees them: every payload field by its own name and under `payload.`, and
    /// the envelope's `event_type`, `event_id` and `aggregate_id` (also as `device`).
    ///
    /// Avro numbers are [`Type::Number`]; `string`, `enum` and `uuid` are [`Type::String`];
    /// `boolean` is [`Type::Bool`]; `["null", T]` is nullable `T`; a map is [`Type::Map`];
    /// nested records give dotted paths (`payload.location.lat`). Arrays, bytes and fixed are
    /// not visible to rules. A record without a `payload` record has its own fields by name.
    pub fn from_avro(schema: &Value) -> Result<Fields> {
        let schema_error = |m: &str| Error::new(ErrorKind::Schema, m, None);
        let record = schema
            .as_object()
            .filter(|o| o.get("type").and_then(Value::as_str) == Some("record"))
            .ok_or_else(|| schema_error("the schema is not an Avro record"))?;
        let fields = record
            .get("fields")
            .and_then(Value::as_array)
            .ok_or_else(|| schema_error("the schema's record has no \"fields\" list"))?;
        let mut named = BTreeMap::new();
        collect_named(schema, &mut named, 0);
        let avro = Avro { named: &named };

        let field_type = |name: &str| {
            fields
                .iter()
                .find(|f| f.get("name").and_then(Value::as_str) == Some(name))
                .and_then(|f| f.get("type"))
        };
        let mut out = Fields::new();
        match field_type("payload").filter(|t| avro.is_record(t)) {
            Some(payload) => {
                for name in ["event_id", "event_type", "aggregate_id"] {
                    if let Some(t) = field_type(name) {
                        avro.flatten(t, vec![name.to_owned()], false, 0, &mut out);
                    }
                }
                if let Some(t) = out.get(&["aggregate_id".to_owned()]).cloned() {
                    out.insert("device", t);
                }
                let mut inside = Fields::new();
                avro.flatten(payload, Vec::new(), false, 0, &mut inside);
                // Bare names after the envelope's: a payload field shadows an envelope field
                // of the same name, as in evaluation.
                for (path, t) in inside.fields {
                    let mut under = vec!["payload".to_owned()];
                    under.extend(path.iter().cloned());
                    out.insert_path(under, t.clone());
                    out.insert_path(path, t);
                }
            }
            None => {
                for f in fields {
                    if let (Some(name), Some(t)) =
                        (f.get("name").and_then(Value::as_str), f.get("type"))
                    {
                        avro.flatten(t, vec![name.to_owned()], false, 0, &mut out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The type at `path`, descending into maps; errors name the field and suggest close
    /// known ones.
    fn resolve(&self, e: &Expr, path: &Path) -> Result<Type> {
        let segments = path.segments();
        for known in (1..=segments.len()).rev() {
            let Some(found) = self.fields.get(&segments[..known]) else {
                continue;
            };
            let mut t = found.clone();
            for (i, key) in segments.iter().enumerate().skip(known) {
                t = match t.non_null() {
                    // A key the map lacks is missing, which comparisons treat as null.
                    Type::Map(values) => Type::nullable((**values).clone()),
                    Type::Any => Type::Any,
                    other => {
                        let mut prefix = String::new();
                        let _ = write_path(&mut prefix, &segments[..i]);
                        return Err(Error::at(
                            ErrorKind::Type,
                            e.span,
                            format!("{prefix} is {} and has no field \"{key}\"", other.a()),
                        ));
                    }
                };
            }
            return Ok(t);
        }
        if self.allow_unknown {
            return Ok(Type::Any);
        }
        Err(Error::at(
            ErrorKind::UnknownField,
            e.span,
            self.unknown(path),
        ))
    }

    fn unknown(&self, path: &Path) -> String {
        let wanted = path.to_string();
        let names: Vec<String> = self
            .fields
            .keys()
            .map(|p| Path::new(p.clone()).to_string())
            .collect();
        // A record is not a field itself, but its fields are.
        let prefix = format!("{wanted}.");
        let inner: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| n.starts_with(&prefix))
            .collect();
        if !inner.is_empty() {
            return format!(
                "\"{wanted}\" is a record; compare one of its fields: {}",
                inner.join(", ")
            );
        }
        let near = close(&wanted, names.iter().map(String::as_str), 3);
        if !near.is_empty() {
            let quoted: Vec<String> = near.iter().map(|n| format!("\"{n}\"")).collect();
            let list = match quoted.split_last() {
                Some((last, [])) => last.clone(),
                Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                None => String::new(),
            };
            return format!("unknown field \"{wanted}\"; did you mean {list}?");
        }
        // Payload fields are listed once, by their bare names.
        let bare: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| !n.starts_with("payload.") && !n.starts_with("payload["))
            .collect();
        if bare.is_empty() {
            format!("unknown field \"{wanted}\" (this event has no fields)")
        } else {
            format!(
                "unknown field \"{wanted}\" (this event has: {})",
                bare.join(", ")
            )
        }
    }
}

/// The named Avro types of a schema (records, enums, fixed), by full and by short name.
fn collect_named<'a>(v: &'a Value, out: &mut BTreeMap<String, &'a Value>, depth: usize) {
    if depth > 64 {
        return;
    }
    match v {
        Value::Array(members) => {
            for m in members {
                collect_named(m, out, depth + 1);
            }
        }
        Value::Object(o) => {
            let kind = o.get("type").and_then(Value::as_str);
            if matches!(kind, Some("record" | "enum" | "fixed" | "error"))
                && let Some(name) = o.get("name").and_then(Value::as_str)
            {
                let short = name.rsplit('.').next().unwrap_or(name);
                out.entry(short.to_owned()).or_insert(v);
                let full = match o.get("namespace").and_then(Value::as_str) {
                    Some(ns) if !name.contains('.') => format!("{ns}.{name}"),
                    _ => name.to_owned(),
                };
                out.entry(full).or_insert(v);
            }
            if let Some(fields) = o.get("fields").and_then(Value::as_array) {
                for f in fields {
                    if let Some(t) = f.get("type") {
                        collect_named(t, out, depth + 1);
                    }
                }
            }
            for key in ["type", "items", "values"] {
                if let Some(inner) = o.get(key).filter(|i| !i.is_string()) {
                    collect_named(inner, out, depth + 1);
                }
            }
        }
        _ => {}
    }
}

struct Avro<'a> {
    named: &'a BTreeMap<String, &'a Value>,
}

impl Avro<'_> {
    /// A type given by name, e.g. `io.sluice.payload.Label` or `Label`.
    fn lookup(&self, name: &str) -> Option<&Value> {
        self.named
            .get(name)
            .or_else(|| self.named.get(name.rsplit('.').next().unwrap_or(name)))
            .copied()
    }

    fn is_record(&self, t: &Value) -> bool {
        match t {
            Value::Object(o) => o.get("type").and_then(Value::as_str) == Some("record"),
            Value::String(name) => self.lookup(name).is_some_and(|d| self.is_record(d)),
            _ => false,
        }
    }

    /// Adds the field(s) of Avro type `t` at `path`: one for a scalar or map, one per leaf
    /// for a record.
    fn flatten(
        &self,
        t: &Value,
        path: Vec<String>,
        nullable: bool,
        depth: usize,
        out: &mut Fields,
    ) {
        // Recursive records end here.
        if depth > 16 {
            return;
        }
        let is_record = match t {
            Value::Object(o) => o.get("type").and_then(Value::as_str) == Some("record"),
            _ => false,
        };
        if is_record {
            let fields = t.get("fields").and_then(Value::as_array);
            for f in fields.into_iter().flatten() {
                if let (Some(name), Some(ft)) =
                    (f.get("name").and_then(Value::as_str), f.get("type"))
                {
                    let mut inner = path.clone();
                    inner.push(name.to_owned());
                    self.flatten(ft, inner, nullable, depth + 1, out);
                }
            }
            return;
        }
        match t {
            Value::Array(members) => {
                let present: Vec<&Value> = members
                    .iter()
                    .filter(|m| m.as_str() != Some("null"))
                    .collect();
                let nullable = nullable || present.len() < members.len();
                match present[..] {
                    [] => {}
                    [one] => self.flatten(one, path, nullable, depth + 1, out),
                    _ => out.insert_path(path, Type::Any),
                }
            }
            Value::String(name) if self.scalar(t, 0).is_none() => {
                if let Some(def) = self.lookup(name) {
                    self.flatten(def, path, nullable, depth + 1, out);
                }
            }
            _ => {
                if let Some(ty) = self.scalar(t, 0) {
                    out.insert_path(path, if nullable { Type::nullable(ty) } else { ty });
                }
            }
        }
    }

    /// The type of a non-record Avro type: primitives, enums, maps, unions; `None` for what
    /// rules cannot see (arrays, bytes, fixed) and for records.
    fn scalar(&self, t: &Value, depth: usize) -> Option<Type> {
        if depth > 16 {
            return None;
        }
        match t {
            Value::String(name) => match name.as_str() {
                "int" | "long" | "float" | "double" => Some(Type::Number),
                "string" => Some(Type::String),
                "boolean" => Some(Type::Bool),
                "null" | "bytes" => None,
                other => {
                    let def = self.lookup(other)?;
                    // Only enums are scalars among named types.
                    (def.get("type").and_then(Value::as_str) == Some("enum"))
                        .then_some(Type::String)
                }
            },
            Value::Array(members) => {
                let present: Vec<&Value> = members
                    .iter()
                    .filter(|m| m.as_str() != Some("null"))
                    .collect();
                let t = match present[..] {
                    [one] => self.scalar(one, depth + 1)?,
                    _ => Type::Any,
                };
                Some(if present.len() < members.len() {
                    Type::nullable(t)
                } else {
                    t
                })
            }
            Value::Object(o) => match o.get("type")? {
                Value::String(kind) => match kind.as_str() {
                    "enum" => Some(Type::String),
                    "map" => {
                        let values = o.get("values")?;
                        // Map values that are records: their keys are not checked.
                        let v = self.scalar(values, depth + 1).unwrap_or(Type::Any);
                        Some(Type::Map(Box::new(v)))
                    }
                    "record" | "error" | "array" | "fixed" => None,
                    // A primitive with a logical type (uuid, timestamp-micros, ...).
                    _ => self.scalar(&Value::String(kind.clone()), depth + 1),
                },
                inner => self.scalar(inner, depth + 1),
            },
            _ => None,
        }
    }
}

/// Type-checks a predicate against the fields of the events it will see, returning its type
/// ([`Type::Bool`], or [`Type::Any`] when that depends on fields of unknown type).
///
/// A comparison needs both sides of the same type (numbers, strings, or with `==` and `!=`
/// also booleans); either side may be `null` with `==` and `!=`. `<`, `<=`, `>` and `>=`
/// take numbers or strings, arithmetic numbers, `and`, `or` and `not` true or false. Every
/// item of an `in` list must have the type of the value looked for. Errors point at the
/// sub-expression at fault.
pub fn check(expr: &Expr, fields: &Fields) -> Result<Type> {
    let t = type_of(expr, fields)?;
    match t.non_null() {
        Type::Bool | Type::Any => Ok(t),
        other => Err(type_error(
            expr,
            format!("a rule must be true or false, but this is {}", other.a()),
        )),
    }
}

fn type_error(at: &Expr, message: String) -> Error {
    Error::at(ErrorKind::Type, at.span, message)
}

fn is_null_literal(e: &Expr) -> bool {
    matches!(e.kind, ExprKind::Literal(Literal::Null))
}

/// `score (a number)`.
fn described(e: &Expr, t: &Type) -> String {
    format!("{e} ({})", t.a())
}

fn no_maps(e: &Expr, t: &Type) -> Result<()> {
    if let Type::Map(_) = t.non_null() {
        return Err(type_error(
            e,
            format!("{e} is a map; compare one of its values, as in {e}[\"name\"]"),
        ));
    }
    Ok(())
}

fn type_of(e: &Expr, fields: &Fields) -> Result<Type> {
    let boolean = |x: &Expr, op: &str| -> Result<()> {
        let t = type_of(x, fields)?;
        match t.non_null() {
            Type::Bool | Type::Any => Ok(()),
            other => Err(type_error(
                x,
                format!("\"{op}\" needs true or false, but {x} is {}", other.a()),
            )),
        }
    };
    let number = |x: &Expr, op: &str| -> Result<()> {
        let t = type_of(x, fields)?;
        match t.non_null() {
            Type::Number | Type::Any => Ok(()),
            other => Err(type_error(
                x,
                format!("\"{op}\" needs numbers, but {x} is {}", other.a()),
            )),
        }
    };
    Ok(match &e.kind {
        ExprKind::Literal(l) => match l {
            Literal::Number(_) => Type::Number,
            Literal::String(_) => Type::String,
            Literal::Bool(_) => Type::Bool,
            Literal::Null => Type::Null,
        },
        ExprKind::Field(path) => fields.resolve(e, path)?,
        ExprKind::Not(x) => {
            boolean(x, "not")?;
            Type::Bool
        }
        ExprKind::And(items) | ExprKind::Or(items) => {
            let op = if matches!(e.kind, ExprKind::And(_)) {
                "and"
            } else {
                "or"
            };
            for item in items {
                boolean(item, op)?;
            }
            Type::Bool
        }
        ExprKind::Neg(x) => {
            number(x, "-")?;
            Type::Number
        }
        ExprKind::Arith(op, l, r) => {
            number(l, op.as_str())?;
            number(r, op.as_str())?;
            Type::Number
        }
        ExprKind::Compare(op, l, r) => {
            let (lt, rt) = (type_of(l, fields)?, type_of(r, fields)?);
            no_maps(l, &lt)?;
            no_maps(r, &rt)?;
            if is_null_literal(l) || is_null_literal(r) {
                if !op.is_equality() {
                    return Err(type_error(
                        e,
                        format!(
                            "null can only be compared with == or !=, not {}",
                            op.as_str()
                        ),
                    ));
                }
                return Ok(Type::Bool);
            }
            let (a, b) = (lt.non_null(), rt.non_null());
            for (x, t) in [(l, a), (r, b)] {
                if !op.is_equality() && *t == Type::Bool {
                    return Err(type_error(
                        e,
                        format!(
                            "\"{}\" needs numbers or strings, but {x} is {}",
                            op.as_str(),
                            t.a()
                        ),
                    ));
                }
            }
            if *a != Type::Any && *b != Type::Any && a != b {
                return Err(type_error(
                    e,
                    format!(
                        "cannot compare {} with {}",
                        described(l, a),
                        described(r, b)
                    ),
                ));
            }
            Type::Bool
        }
        ExprKind::In { value, list, .. } => {
            let vt = type_of(value, fields)?;
            no_maps(value, &vt)?;
            let mut want = vt.non_null().clone();
            if want == Type::Null {
                return Err(type_error(value, "null is never in a list".to_owned()));
            }
            let known = want != Type::Any;
            for item in list {
                let t = match item.value {
                    Literal::Number(_) => Type::Number,
                    Literal::String(_) => Type::String,
                    Literal::Bool(_) => Type::Bool,
                    Literal::Null => Type::Null,
                };
                if want == Type::Any {
                    want = t;
                } else if t != want {
                    let message = if known {
                        format!(
                            "{value} is {}, but the list holds {} ({})",
                            want.a(),
                            item.value,
                            t.a()
                        )
                    } else {
                        format!(
                            "the list mixes types: {} is {} where the first item is {}",
                            item.value,
                            t.a(),
                            want.a()
                        )
                    };
                    return Err(Error::at(ErrorKind::Type, item.span, message));
                }
            }
            Type::Bool
        }
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::parse;

    fn schema(text: &str) -> Fields {
        let value: Value = serde_json::from_str(text).expect("schema is JSON");
        Fields::from_avro(&value).expect("schema is a record")
    }

    fn inference() -> Fields {
        schema(include_str!("../../../schemas/inference.result/1.avsc"))
    }

    fn checked(rule: &str, fields: &Fields) -> Result<Type> {
        check(
            &parse(rule).unwrap_or_else(|e| panic!("{rule}: {e}")),
            fields,
        )
    }

    fn error(rule: &str, fields: &Fields) -> (ErrorKind, String) {
        let e = checked(rule, fields).expect_err(rule);
        (e.kind, e.to_string())
    }

    #[test]
    fn an_event_schema_as_rules_see_it() {
        let f = inference();
        let get = |p: &str| {
            f.get(&p.split('.').map(str::to_owned).collect::<Vec<_>>())
                .cloned()
        };
        assert_eq!(get("score"), Some(Type::Number));
        assert_eq!(get("payload.score"), Some(Type::Number));
        assert_eq!(get("label"), Some(Type::String), "an enum is a string");
        assert_eq!(
            get("input_event_id"),
            Some(Type::String),
            "a uuid is a string"
        );
        assert_eq!(get("site"), Some(Type::nullable(Type::String)));
        assert_eq!(get("features"), Some(Type::Map(Box::new(Type::Number))));
        assert_eq!(get("event_type"), Some(Type::String));
        assert_eq!(get("aggregate_id"), Some(Type::String));
        assert_eq!(get("device"), Some(Type::String));
        assert_eq!(get("event_id"), Some(Type::String));
        assert_eq!(get("occurred_at"), None, "only the envelope's ids and type");
        assert_eq!(get("metadata.source"), None);

        let readings = schema(include_str!("../../../schemas/sensor.reading/2.avsc"));
        assert_eq!(
            readings.get(&["temperature_c".to_owned()]),
            Some(&Type::nullable(Type::Number))
        );
        assert_eq!(
            readings.get(&["seq".to_owned()]),
            Some(&Type::nullable(Type::Number)),
            "a long is a number"
        );
    }

    #[test]
    fn nested_records_named_types_and_unions() {
        let f = schema(
            r#"{"type": "record", "name": "E", "namespace": "x", "fields": [
                {"name": "aggregate_id", "type": "string"},
                {"name": "payload", "type": {"type": "record", "name": "P", "fields": [
                    {"name": "location", "type": ["null", {"type": "record", "name": "Loc",
                        "fields": [{"name": "lat", "type": "double"},
                                   {"name": "zone", "type": {"type": "enum", "name": "Zone",
                                                             "symbols": ["a", "b"]}}]}]},
                    {"name": "home_zone", "type": "x.Zone"},
                    {"name": "previous", "type": ["null", "Loc"]},
                    {"name": "ok", "type": "boolean"},
                    {"name": "either", "type": ["null", "string", "long"]},
                    {"name": "tags", "type": {"type": "array", "items": "string"}},
                    {"name": "raw", "type": "bytes"},
                    {"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
                    {"name": "labels", "type": {"type": "map", "values": ["null", "string"]}}
                ]}}
            ]}"#,
        );
        let mut names: Vec<String> = f
            .iter()
            .map(|(p, t)| format!("{}: {t}", p.join(".")))
            .collect();
        names.retain(|n| !n.starts_with("payload."));
        assert_eq!(
            names,
            [
                "aggregate_id: string",
                "at: number",
                "device: string",
                "either: any",
                "home_zone: string",
                "labels: map of string or null",
                "location.lat: number or null",
                "location.zone: string or null",
                "ok: bool",
                "previous.lat: number or null",
                "previous.zone: string or null",
            ]
        );
        assert!(checked("location.lat > 1 and previous.zone == home_zone", &f).is_ok());
        assert!(checked("either > 1 and either == 'x'", &f).is_ok());
        assert!(checked("ok and labels.env == 'prod'", &f).is_ok());
        assert_eq!(
            error("location == 1", &f),
            (
                ErrorKind::UnknownField,
                "\"location\" is a record; compare one of its fields: location.lat, \
                 location.zone at column 1"
                    .to_owned()
            )
        );
    }

    #[test]
    fn not_a_record() {
        let e = Fields::from_avro(&json!("string")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Schema);
        assert_eq!(e.to_string(), "the schema is not an Avro record");
    }

    #[test]
    fn the_default_rules_check() {
        assert_eq!(
            checked("label == \"anomaly\" and score > 0.8", &inference()),
            Ok(Type::Bool)
        );
        let status = schema(include_str!("../../../schemas/device.status/1.avsc"));
        assert_eq!(checked("state == \"offline\"", &status), Ok(Type::Bool));
        assert_eq!(
            error("status == \"offline\"", &status),
            (
                ErrorKind::UnknownField,
                "unknown field \"status\"; did you mean \"state\"? at column 1".to_owned()
            )
        );
    }

    #[test]
    fn well_typed_rules() {
        let f = inference();
        for rule in [
            "score > 0.8 and site == \"plant-3\"",
            "payload.score >= threshold",
            "features[\"vibration_mm_s.z\"] > 5 or not (site in [\"plant-1\", \"plant-2\"])",
            "features.x * 2 - 1 < score / 4",
            "site == null or site != 'plant-3'",
            "null != site",
            "device == 'd-1' and event_type == 'inference.result'",
            "label not in ['normal']",
            "-score < 0",
            "site < 'plant-5'",
            "(score > 1) == true",
        ] {
            assert_eq!(checked(rule, &f), Ok(Type::Bool), "{rule}");
        }
    }

    #[test]
    fn type_errors_point_at_their_sub_expression() {
        let f = inference();
        let cases = [
            (
                "score > \"high\"",
                "cannot compare score (a number) with \"high\" (a string) at column 7",
            ),
            (
                "label == 'anomaly' and site == 3",
                "cannot compare site (a string) with 3 (a number) at column 29",
            ),
            (
                "score + 1",
                "a rule must be true or false, but this is a number at column 7",
            ),
            (
                "site and score > 1",
                "\"and\" needs true or false, but site is a string at column 1",
            ),
            (
                "not score",
                "\"not\" needs true or false, but score is a number at column 5",
            ),
            (
                "-label == 1",
                "\"-\" needs numbers, but label is a string at column 2",
            ),
            (
                "score * site > 1",
                "\"*\" needs numbers, but site is a string at column 9",
            ),
            (
                "(score > 1) < true",
                "\"<\" needs numbers or strings, but score > 1 is true or false at column 13",
            ),
            (
                "site > null",
                "null can only be compared with == or !=, not > at column 6",
            ),
            (
                "features > 1",
                "features is a map; compare one of its values, as in features[\"name\"] at \
                 column 1",
            ),
            (
                "label in ['anomaly', 1]",
                "label is a string, but the list holds 1 (a number) at column 22",
            ),
            (
                "score.x > 1",
                "score is a number and has no field \"x\" at column 1",
            ),
            (
                "features.x == 'a'",
                "cannot compare features.x (a number) with \"a\" (a string) at column 12",
            ),
        ];
        for (rule, want) in cases {
            let (kind, message) = error(rule, &f);
            assert_eq!(kind, ErrorKind::Type, "{rule}");
            assert_eq!(message, want, "{rule}");
        }
    }

    #[test]
    fn unknown_fields_suggest_close_names() {
        let f = inference();
        let cases = [
            (
                "scroe > 1",
                "unknown field \"scroe\"; did you mean \"score\"? at column 1",
            ),
            (
                "label == 'x' and payload.sire == 'y'",
                "unknown field \"payload.sire\"; did you mean \"payload.site\"? at column 18",
            ),
            (
                "temperature > 1",
                "unknown field \"temperature\" (this event has: aggregate_id, device, \
                 event_id, event_type, features, input_event_id, label, model_name, \
                 model_version, score, site, threshold) at column 1",
            ),
        ];
        for (rule, want) in cases {
            assert_eq!(
                error(rule, &f),
                (ErrorKind::UnknownField, want.to_owned()),
                "{rule}"
            );
        }
        let two = Fields::new()
            .with("score", Type::Number)
            .with("scope", Type::String);
        assert_eq!(
            error("scote > 1", &two).1,
            "unknown field \"scote\"; did you mean \"scope\" or \"score\"? at column 1"
        );
    }

    #[test]
    fn without_a_schema_fields_are_any_but_literals_still_count() {
        let f = Fields::any();
        assert_eq!(checked("x > 1 and y == 'a' and z", &f), Ok(Type::Bool));
        assert_eq!(checked("x", &f), Ok(Type::Any));
        assert_eq!(checked("x.y['z'] in [1, 2]", &f), Ok(Type::Bool));
        let cases = [
            (
                "x > 1 and 2",
                "\"and\" needs true or false, but 2 is a number at column 11",
            ),
            (
                "'a' + 1 > x",
                "\"+\" needs numbers, but \"a\" is a string at column 1",
            ),
            (
                "true < x",
                "\"<\" needs numbers or strings, but true is true or false at column 6",
            ),
            (
                "x in [1, 'a']",
                "the list mixes types: \"a\" is a string where the first item is a number at \
                 column 10",
            ),
            (
                "1 == 'a'",
                "cannot compare 1 (a number) with \"a\" (a string) at column 3",
            ),
        ];
        for (rule, want) in cases {
            assert_eq!(
                error(rule, &f),
                (ErrorKind::Type, want.to_owned()),
                "{rule}"
            );
        }
    }
}
