//! JSON ↔ Avro values, guided by a schema.
//!
//! Devices send JSON; Kafka carries Avro. Converting a JSON payload with its subject's schema is
//! also how the payload is validated: a missing required field, a field the schema does not know,
//! a string where a number belongs, an integer that does not fit, all fail here with the path of
//! the offending value.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::schema::{Name, RecordSchema, UnionSchema, UuidSchema};
use apache_avro::types::Value;
use chrono::{DateTime, SecondsFormat};
use serde_json::{Map, Number, Value as Json};

use crate::{Error, Result};

/// Named types of a schema, for resolving `Ref`s while walking it. Resolving them costs more
/// than encoding an event, so a codec keeps them per schema.
#[derive(Debug)]
pub(crate) struct Names(HashMap<Name, Schema>);

impl Names {
    pub(crate) fn of(schema: &Schema) -> Result<Self> {
        let resolved = apache_avro::schema::ResolvedSchema::try_from(schema)
            .map_err(|e| Error::InvalidSchema(e.to_string()))?;
        Ok(Self(
            resolved
                .get_names()
                .iter()
                .map(|(name, schema)| (name.clone(), (*schema).clone()))
                .collect(),
        ))
    }

    fn resolve<'a>(&'a self, schema: &'a Schema) -> Result<&'a Schema> {
        match schema {
            Schema::Ref { name } => self
                .0
                .get(name)
                .ok_or_else(|| Error::InvalidSchema(format!("unknown named type {name}"))),
            other => Ok(other),
        }
    }
}

/// Converts a JSON value to the Avro value `schema` describes. `path` names the value in errors.
pub fn json_to_avro(json: &Json, schema: &Schema) -> Result<Value> {
    let names = Names::of(schema)?;
    to_avro(json, schema, &names, &mut String::from("$"))
}

/// Converts an Avro value (as decoded) to JSON: records and maps become objects, unions their
/// branch, enums and uuids strings, timestamps RFC 3339 strings, bytes arrays of numbers.
pub fn avro_to_json(value: &Value) -> Result<Json> {
    to_json(value, &mut String::from("$"))
}

pub(crate) fn to_avro(
    json: &Json,
    schema: &Schema,
    names: &Names,
    path: &mut String,
) -> Result<Value> {
    let schema = names.resolve(schema)?;
    let mismatch = |expected: &str| Error::Payload {
        path: path.clone(),
        message: format!("expected {expected}, found {}", kind_of(json)),
    };
    Ok(match schema {
        Schema::Null => match json {
            Json::Null => Value::Null,
            _ => return Err(mismatch("null")),
        },
        Schema::Boolean => Value::Boolean(json.as_bool().ok_or_else(|| mismatch("a boolean"))?),
        Schema::Int => {
            let n = json.as_i64().ok_or_else(|| mismatch("an integer"))?;
            Value::Int(i32::try_from(n).map_err(|_| Error::Payload {
                path: path.clone(),
                message: format!("{n} does not fit a 32-bit int"),
            })?)
        }
        Schema::Long => Value::Long(json.as_i64().ok_or_else(|| mismatch("an integer"))?),
        Schema::Float => Value::Float(json.as_f64().ok_or_else(|| mismatch("a number"))? as f32),
        Schema::Double => Value::Double(json.as_f64().ok_or_else(|| mismatch("a number"))?),
        Schema::String => Value::String(
            json.as_str()
                .ok_or_else(|| mismatch("a string"))?
                .to_owned(),
        ),
        Schema::Bytes => {
            Value::Bytes(json_bytes(json).ok_or_else(|| mismatch("an array of bytes"))?)
        }
        Schema::Uuid(_) => {
            let s = json.as_str().ok_or_else(|| mismatch("a UUID string"))?;
            Value::Uuid(uuid::Uuid::parse_str(s).map_err(|e| Error::Payload {
                path: path.clone(),
                message: format!("invalid UUID {s:?}: {e}"),
            })?)
        }
        Schema::TimestampMicros | Schema::TimestampMillis => {
            let micros = match json {
                Json::String(s) => DateTime::parse_from_rfc3339(s)
                    .map_err(|e| Error::Payload {
                        path: path.clone(),
                        message: format!("invalid RFC 3339 timestamp {s:?}: {e}"),
                    })?
                    .timestamp_micros(),
                Json::Number(n) => n.as_i64().ok_or_else(|| mismatch("an integer timestamp"))?,
                _ => return Err(mismatch("an RFC 3339 timestamp")),
            };
            if matches!(schema, Schema::TimestampMillis) {
                Value::TimestampMillis(micros.div_euclid(1000))
            } else {
                Value::TimestampMicros(micros)
            }
        }
        Schema::Enum(e) => {
            let s = json.as_str().ok_or_else(|| mismatch("a string"))?;
            let index =
                e.symbols
                    .iter()
                    .position(|sym| sym == s)
                    .ok_or_else(|| Error::Payload {
                        path: path.clone(),
                        message: format!("{s:?} is not one of {}", e.symbols.join(", ")),
                    })?;
            Value::Enum(index as u32, s.to_owned())
        }
        Schema::Array(a) => {
            let items = json.as_array().ok_or_else(|| mismatch("an array"))?;
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(to_avro(item, &a.items, names, path)?);
                path.truncate(len);
            }
            Value::Array(out)
        }
        Schema::Map(m) => {
            let obj = json.as_object().ok_or_else(|| mismatch("an object"))?;
            let mut out = HashMap::with_capacity(obj.len());
            for (k, v) in obj {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                out.insert(k.clone(), to_avro(v, &m.types, names, path)?);
                path.truncate(len);
            }
            Value::Map(out)
        }
        Schema::Union(u) => union_to_avro(json, u, names, path)?,
        Schema::Record(r) => record_to_avro(json, r, names, path)?,
        other => {
            return Err(Error::InvalidSchema(format!(
                "{path}: Avro type {other:?} is not supported in Sluice payloads"
            )));
        }
    })
}

fn union_to_avro(json: &Json, u: &UnionSchema, names: &Names, path: &mut String) -> Result<Value> {
    let variants = u.variants();
    if json.is_null()
        && let Some(i) = variants.iter().position(|v| matches!(v, Schema::Null))
    {
        return Ok(Value::Union(i as u32, Box::new(Value::Null)));
    }
    // First branch that accepts the value wins, as in Avro's JSON encoding of unions by type.
    let mut reasons = Vec::new();
    for (i, variant) in variants.iter().enumerate() {
        if matches!(variant, Schema::Null) {
            continue;
        }
        match to_avro(json, variant, names, path) {
            Ok(v) => return Ok(Value::Union(i as u32, Box::new(v))),
            Err(e) => reasons.push(e.to_string()),
        }
    }
    Err(Error::Payload {
        path: path.clone(),
        message: format!(
            "no branch of the union accepts {}: {}",
            kind_of(json),
            reasons.join("; ")
        ),
    })
}

fn record_to_avro(
    json: &Json,
    r: &RecordSchema,
    names: &Names,
    path: &mut String,
) -> Result<Value> {
    let obj = json.as_object().ok_or_else(|| Error::Payload {
        path: path.clone(),
        message: format!(
            "expected an object ({}), found {}",
            r.name.name(),
            kind_of(json)
        ),
    })?;
    if let Some(unknown) = obj.keys().find(|k| !r.lookup.contains_key(k.as_str())) {
        let known: Vec<&str> = r.fields.iter().map(|f| f.name.as_str()).collect();
        return Err(Error::Payload {
            path: format!("{path}.{unknown}"),
            message: format!("unknown field (known: {})", known.join(", ")),
        });
    }
    let mut fields = Vec::with_capacity(r.fields.len());
    for field in &r.fields {
        let len = path.len();
        path.push('.');
        path.push_str(&field.name);
        let value = match (obj.get(&field.name), &field.default) {
            (Some(v), _) => to_avro(v, &field.schema, names, path)?,
            (None, Some(default)) => default_to_avro(default, &field.schema, names, path)?,
            (None, None) => {
                return Err(Error::Payload {
                    path: path.clone(),
                    message: "required field is missing".into(),
                });
            }
        };
        path.truncate(len);
        fields.push((field.name.clone(), value));
    }
    Ok(Value::Record(fields))
}

/// A field default is written in Avro's JSON encoding, where a union default is the value of its
/// first branch.
fn default_to_avro(
    default: &Json,
    schema: &Schema,
    names: &Names,
    path: &mut String,
) -> Result<Value> {
    match names.resolve(schema)? {
        Schema::Union(u) => {
            let first = u
                .variants()
                .first()
                .ok_or_else(|| Error::InvalidSchema(format!("{path}: empty union")))?;
            Ok(Value::Union(
                0,
                Box::new(to_avro(default, first, names, path)?),
            ))
        }
        other => to_avro(default, other, names, path),
    }
}

/// Writes the Avro binary encoding of the JSON value `schema` describes to `out`: the same
/// checks and errors as [`to_avro`], without building the Avro value (the encoding of every
/// event goes through here). On an error, what was written of the value is left in `out`.
pub(crate) fn write_avro(
    json: &Json,
    schema: &Schema,
    names: &Names,
    path: &mut String,
    out: &mut Vec<u8>,
) -> Result<()> {
    let schema = names.resolve(schema)?;
    let mismatch = |expected: &str| Error::Payload {
        path: path.clone(),
        message: format!("expected {expected}, found {}", kind_of(json)),
    };
    match schema {
        Schema::Null => match json {
            Json::Null => {}
            _ => return Err(mismatch("null")),
        },
        Schema::Boolean => out.push(u8::from(
            json.as_bool().ok_or_else(|| mismatch("a boolean"))?,
        )),
        Schema::Int => {
            let n = json.as_i64().ok_or_else(|| mismatch("an integer"))?;
            let n = i32::try_from(n).map_err(|_| Error::Payload {
                path: path.clone(),
                message: format!("{n} does not fit a 32-bit int"),
            })?;
            long(i64::from(n), out);
        }
        Schema::Long => long(json.as_i64().ok_or_else(|| mismatch("an integer"))?, out),
        Schema::Float => {
            let f = json.as_f64().ok_or_else(|| mismatch("a number"))? as f32;
            out.extend_from_slice(&f.to_le_bytes());
        }
        Schema::Double => {
            let f = json.as_f64().ok_or_else(|| mismatch("a number"))?;
            out.extend_from_slice(&f.to_le_bytes());
        }
        Schema::String => bytes(
            json.as_str()
                .ok_or_else(|| mismatch("a string"))?
                .as_bytes(),
            out,
        ),
        Schema::Bytes => bytes(
            &json_bytes(json).ok_or_else(|| mismatch("an array of bytes"))?,
            out,
        ),
        Schema::Uuid(kind) => {
            let s = json.as_str().ok_or_else(|| mismatch("a UUID string"))?;
            let u = uuid::Uuid::parse_str(s).map_err(|e| Error::Payload {
                path: path.clone(),
                message: format!("invalid UUID {s:?}: {e}"),
            })?;
            match kind {
                UuidSchema::String => bytes(u.hyphenated().to_string().as_bytes(), out),
                UuidSchema::Bytes => bytes(u.as_bytes(), out),
                UuidSchema::Fixed(_) => out.extend_from_slice(u.as_bytes()),
            }
        }
        Schema::TimestampMicros | Schema::TimestampMillis => {
            let micros = match json {
                Json::String(s) => DateTime::parse_from_rfc3339(s)
                    .map_err(|e| Error::Payload {
                        path: path.clone(),
                        message: format!("invalid RFC 3339 timestamp {s:?}: {e}"),
                    })?
                    .timestamp_micros(),
                Json::Number(n) => n.as_i64().ok_or_else(|| mismatch("an integer timestamp"))?,
                _ => return Err(mismatch("an RFC 3339 timestamp")),
            };
            if matches!(schema, Schema::TimestampMillis) {
                long(micros.div_euclid(1000), out);
            } else {
                long(micros, out);
            }
        }
        Schema::Enum(e) => {
            let s = json.as_str().ok_or_else(|| mismatch("a string"))?;
            let index =
                e.symbols
                    .iter()
                    .position(|sym| sym == s)
                    .ok_or_else(|| Error::Payload {
                        path: path.clone(),
                        message: format!("{s:?} is not one of {}", e.symbols.join(", ")),
                    })?;
            long(index as i64, out);
        }
        Schema::Array(a) => {
            let items = json.as_array().ok_or_else(|| mismatch("an array"))?;
            if !items.is_empty() {
                long(items.len() as i64, out);
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    write_avro(item, &a.items, names, path, out)?;
                    path.truncate(len);
                }
            }
            out.push(0);
        }
        Schema::Map(m) => {
            let obj = json.as_object().ok_or_else(|| mismatch("an object"))?;
            if !obj.is_empty() {
                long(obj.len() as i64, out);
                for (k, v) in obj {
                    bytes(k.as_bytes(), out);
                    let len = path.len();
                    path.push('.');
                    path.push_str(k);
                    write_avro(v, &m.types, names, path, out)?;
                    path.truncate(len);
                }
            }
            out.push(0);
        }
        Schema::Union(u) => {
            let variants = u.variants();
            if json.is_null()
                && let Some(i) = variants.iter().position(|v| matches!(v, Schema::Null))
            {
                long(i as i64, out);
                return Ok(());
            }
            // First branch that accepts the value wins, as in `union_to_avro`.
            let mut reasons = Vec::new();
            let start = out.len();
            for (i, variant) in variants.iter().enumerate() {
                if matches!(variant, Schema::Null) {
                    continue;
                }
                long(i as i64, out);
                match write_avro(json, variant, names, path, out) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        out.truncate(start);
                        reasons.push(e.to_string());
                    }
                }
            }
            return Err(Error::Payload {
                path: path.clone(),
                message: format!(
                    "no branch of the union accepts {}: {}",
                    kind_of(json),
                    reasons.join("; ")
                ),
            });
        }
        Schema::Record(r) => {
            let obj = json.as_object().ok_or_else(|| Error::Payload {
                path: path.clone(),
                message: format!(
                    "expected an object ({}), found {}",
                    r.name.name(),
                    kind_of(json)
                ),
            })?;
            if let Some(unknown) = obj.keys().find(|k| !r.lookup.contains_key(k.as_str())) {
                let known: Vec<&str> = r.fields.iter().map(|f| f.name.as_str()).collect();
                return Err(Error::Payload {
                    path: format!("{path}.{unknown}"),
                    message: format!("unknown field (known: {})", known.join(", ")),
                });
            }
            for field in &r.fields {
                let len = path.len();
                path.push('.');
                path.push_str(&field.name);
                match (obj.get(&field.name), &field.default) {
                    (Some(v), _) => write_avro(v, &field.schema, names, path, out)?,
                    (None, Some(default)) => {
                        write_default(default, &field.schema, names, path, out)?;
                    }
                    (None, None) => {
                        return Err(Error::Payload {
                            path: path.clone(),
                            message: "required field is missing".into(),
                        });
                    }
                }
                path.truncate(len);
            }
        }
        other => {
            return Err(Error::InvalidSchema(format!(
                "{path}: Avro type {other:?} is not supported in Sluice payloads"
            )));
        }
    }
    Ok(())
}

/// Writes a field default, which is in Avro's JSON encoding: a union's default is a value of
/// its first branch.
pub(crate) fn write_default(
    default: &Json,
    schema: &Schema,
    names: &Names,
    path: &mut String,
    out: &mut Vec<u8>,
) -> Result<()> {
    match names.resolve(schema)? {
        Schema::Union(u) => {
            let first = u
                .variants()
                .first()
                .ok_or_else(|| Error::InvalidSchema(format!("{path}: empty union")))?;
            long(0, out);
            write_avro(default, first, names, path, out)
        }
        other => write_avro(default, other, names, path, out),
    }
}

/// An Avro `long` (and `int`): zig-zag, then variable length.
fn long(n: i64, out: &mut Vec<u8>) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Avro `bytes` and `string`: the length, then the bytes.
fn bytes(b: &[u8], out: &mut Vec<u8>) {
    long(b.len() as i64, out);
    out.extend_from_slice(b);
}

fn json_bytes(json: &Json) -> Option<Vec<u8>> {
    json.as_array()?
        .iter()
        .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
        .collect()
}

fn kind_of(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(n) if n.is_f64() => "a number",
        Json::Number(_) => "an integer",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn to_json(value: &Value, path: &mut String) -> Result<Json> {
    let float = |f: f64, path: &str| {
        Number::from_f64(f)
            .map(Json::Number)
            .ok_or_else(|| Error::Payload {
                path: path.to_owned(),
                message: format!("{f} has no JSON representation"),
            })
    };
    let timestamp = |micros: i64, path: &str| {
        DateTime::from_timestamp_micros(micros)
            .map(|t| Json::String(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)))
            .ok_or_else(|| Error::Payload {
                path: path.to_owned(),
                message: format!("timestamp {micros} µs is out of range"),
            })
    };
    Ok(match value {
        Value::Null => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Int(i) | Value::Date(i) | Value::TimeMillis(i) => Json::from(*i),
        Value::Long(l) | Value::TimeMicros(l) => Json::from(*l),
        Value::Float(f) => float(f64::from(*f), path)?,
        Value::Double(d) => float(*d, path)?,
        Value::Bytes(b) | Value::Fixed(_, b) => {
            Json::Array(b.iter().map(|b| Json::from(*b)).collect())
        }
        Value::String(s) | Value::Enum(_, s) => Json::String(s.clone()),
        Value::Uuid(u) => Json::String(u.to_string()),
        Value::TimestampMicros(t) | Value::LocalTimestampMicros(t) => timestamp(*t, path)?,
        Value::TimestampMillis(t) | Value::LocalTimestampMillis(t) => {
            timestamp(t.saturating_mul(1000), path)?
        }
        Value::Union(_, v) => to_json(v, path)?,
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(to_json(item, path)?);
                path.truncate(len);
            }
            Json::Array(out)
        }
        Value::Map(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                out.insert(k.clone(), to_json(v, path)?);
                path.truncate(len);
            }
            Json::Object(out)
        }
        Value::Record(fields) => {
            let mut out = Map::new();
            for (k, v) in fields {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                out.insert(k.clone(), to_json(v, path)?);
                path.truncate(len);
            }
            Json::Object(out)
        }
        other => {
            return Err(Error::Payload {
                path: path.clone(),
                message: format!("Avro value {other:?} is not supported in Sluice payloads"),
            });
        }
    })
}
