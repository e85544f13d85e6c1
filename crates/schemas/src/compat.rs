//! Schema evolution rules, the Confluent compatibility levels checked with apache-avro's
//! `SchemaCompatibility`.

use std::fmt;
use std::str::FromStr;

use apache_avro::Schema;
use apache_avro::schema_compatibility::{Compatibility as Resolution, SchemaCompatibility};
use serde::{Deserialize, Serialize};

/// How a new version of a subject must relate to the earlier ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Compatibility {
    /// No check.
    None,
    /// The new version reads data written with the previous one (the default: consumers
    /// upgrade first).
    #[default]
    Backward,
    /// As `Backward`, against every earlier version.
    BackwardTransitive,
    /// The previous version reads data written with the new one.
    Forward,
    /// As `Forward`, against every earlier version.
    ForwardTransitive,
    /// Both `Backward` and `Forward`.
    Full,
    /// Both, against every earlier version.
    FullTransitive,
}

impl Compatibility {
    /// Every level, for messages.
    pub const ALL: [Compatibility; 7] = [
        Self::None,
        Self::Backward,
        Self::BackwardTransitive,
        Self::Forward,
        Self::ForwardTransitive,
        Self::Full,
        Self::FullTransitive,
    ];

    /// The Confluent name, e.g. `BACKWARD_TRANSITIVE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Backward => "BACKWARD",
            Self::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Self::Forward => "FORWARD",
            Self::ForwardTransitive => "FORWARD_TRANSITIVE",
            Self::Full => "FULL",
            Self::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    fn transitive(self) -> bool {
        matches!(
            self,
            Self::BackwardTransitive | Self::ForwardTransitive | Self::FullTransitive
        )
    }

    fn backward(self) -> bool {
        matches!(
            self,
            Self::Backward | Self::BackwardTransitive | Self::Full | Self::FullTransitive
        )
    }

    fn forward(self) -> bool {
        matches!(
            self,
            Self::Forward | Self::ForwardTransitive | Self::Full | Self::FullTransitive
        )
    }

    /// Checks `new` against the earlier versions (oldest first) under this level. Returns one
    /// message per violation; empty means compatible.
    pub fn check(self, new: &Schema, earlier: &[Schema]) -> Vec<Violation> {
        let against: &[Schema] = match (self, earlier) {
            (Self::None, _) | (_, []) => return Vec::new(),
            (level, all) if level.transitive() => all,
            (_, all) => &all[all.len() - 1..],
        };
        let first_version = earlier.len() - against.len() + 1;
        let mut out = Vec::new();
        for (i, old) in against.iter().enumerate() {
            let version = (first_version + i) as u32;
            if self.backward()
                && let Err(reason) = can_read(old, new)
            {
                out.push(Violation {
                    version,
                    direction: "the new version cannot read data written with",
                    reason,
                });
            }
            if self.forward()
                && let Err(reason) = can_read(new, old)
            {
                out.push(Violation {
                    version,
                    direction: "data written with the new version cannot be read by",
                    reason,
                });
            }
        }
        out
    }
}

/// One broken compatibility rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The earlier version (1-based position among the earlier ones) that is broken.
    pub version: u32,
    /// Which way the break goes.
    pub direction: &'static str,
    /// What apache-avro found.
    pub reason: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} version {}: {}",
            self.direction, self.version, self.reason
        )
    }
}

fn can_read(writer: &Schema, reader: &Schema) -> Result<(), String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Resolution::Full) => Ok(()),
        // Partial means some values fail to resolve (an enum symbol or a union branch the reader
        // lacks): a consumer would hit it at run time, so the registry refuses it.
        Ok(Resolution::Partial) => Err("only partially compatible: some values of the writer's \
                                        enums or unions have no counterpart in the reader"
            .into()),
        Err(e) => Err(locate(writer, reader, "").unwrap_or_else(|| e.to_string())),
    }
}

/// apache-avro names only the top-level field that fails; walk matching records down to the
/// field that breaks, so the message says `payload.site` rather than `payload`.
fn locate(writer: &Schema, reader: &Schema, path: &str) -> Option<String> {
    let (Schema::Record(w), Schema::Record(r)) = (writer, reader) else {
        return None;
    };
    for field in &r.fields {
        let here = if path.is_empty() {
            field.name.clone()
        } else {
            format!("{path}.{}", field.name)
        };
        match w.fields.iter().find(|f| f.name == field.name) {
            None if field.default.is_none() => {
                return Some(format!(
                    "field `{here}` was added without a default, so data written without it \
                     cannot be read"
                ));
            }
            None => {}
            Some(wf) => {
                if let Err(e) = SchemaCompatibility::can_read(&wf.schema, &field.schema) {
                    return Some(
                        locate(&wf.schema, &field.schema, &here)
                            .unwrap_or_else(|| format!("field `{here}`: {e}")),
                    );
                }
            }
        }
    }
    None
}

impl fmt::Display for Compatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compatibility {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|c| c.as_str()).collect();
                format!(
                    "unknown compatibility level {s:?} (known: {})",
                    names.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"R","fields":[{fields}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn adding_a_field_without_default_breaks_backward() {
        let v1 = record(r#"{"name":"a","type":"int"}"#);
        let v2 = record(r#"{"name":"a","type":"int"},{"name":"b","type":"int"}"#);
        let broken = Compatibility::Backward.check(&v2, std::slice::from_ref(&v1));
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert!(broken[0].reason.contains('b'), "{}", broken[0]);
        // Forward still holds: the old reader ignores the new field.
        assert!(Compatibility::Forward.check(&v2, &[v1]).is_empty());
    }

    #[test]
    fn adding_a_field_with_default_keeps_full() {
        let v1 = record(r#"{"name":"a","type":"int"}"#);
        let v2 = record(r#"{"name":"a","type":"int"},{"name":"b","type":"int","default":0}"#);
        assert!(Compatibility::Full.check(&v2, &[v1]).is_empty());
    }

    #[test]
    fn transitive_levels_check_every_earlier_version() {
        let v1 = record(r#"{"name":"a","type":"int"}"#);
        let v2 = record(r#"{"name":"a","type":"int","default":1}"#);
        // v3 adds `c` without a default: it breaks against v1 and v2; the plain level only
        // looks at v2.
        let v3 = record(r#"{"name":"c","type":"string"}"#);
        let plain = Compatibility::Backward.check(&v3, &[v1.clone(), v2.clone()]);
        let transitive = Compatibility::BackwardTransitive.check(&v3, &[v1, v2]);
        assert_eq!(plain.len(), 1);
        assert_eq!(plain[0].version, 2);
        assert_eq!(transitive.len(), 2);
        assert_eq!(transitive[0].version, 1);
    }

    #[test]
    fn none_checks_nothing() {
        let v1 = record(r#"{"name":"a","type":"int"}"#);
        let v2 = record(r#"{"name":"a","type":"string"}"#);
        assert!(
            Compatibility::None
                .check(&v2, std::slice::from_ref(&v1))
                .is_empty()
        );
        assert!(!Compatibility::Backward.check(&v2, &[v1]).is_empty());
    }

    #[test]
    fn levels_parse_from_confluent_names() {
        for level in Compatibility::ALL {
            assert_eq!(level.as_str().parse::<Compatibility>().unwrap(), level);
        }
        assert!("SIDEWAYS".parse::<Compatibility>().is_err());
    }
}
