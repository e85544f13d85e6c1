//! From text to [`Topology`], collecting every structural problem.
//!
//! The file is parsed into a YAML value first, then the top level, each topic and each
//! processor (and each processor's config) are decoded separately, so that one bad entry does
//! not hide the next.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::check::{self, Model, ProcView};
use crate::config::{
    ActionRouterConfig, Endpoint, ExecutorConfig, HttpIngestConfig, InferencerConfig,
    IngestValidatorConfig, KindConfig, MqttBridgeConfig, OutboxRelayConfig, ProjectorConfig, Rule,
    TopicMapping,
};
use crate::decode::{self, ElementCheck, decode, decode_with};
use crate::{Issue, Kind, Processor, Topic, Topology};

/// The top level, with topics and processors left as values to decode one by one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    // Optional here so that a missing name does not stop the rest from being checked.
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    topics: Vec<Value>,
    #[serde(default)]
    processors: Vec<Value>,
}

/// A processor's fields that do not depend on its kind.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcessor {
    name: String,
    kind: String,
    #[serde(default)]
    inputs: Vec<String>,
    #[serde(default)]
    outputs: BTreeMap<String, String>,
    #[serde(default = "default_dlq")]
    dlq: bool,
    #[serde(default = "default_replicas")]
    replicas: u32,
    #[serde(default)]
    config: Value,
}

fn default_dlq() -> bool {
    true
}

fn default_replicas() -> u32 {
    1
}

/// A processor as far as it could be decoded.
struct Partial {
    index: usize,
    raw: RawProcessor,
    ports_known: bool,
    kind: Option<Kind>,
    config: Option<KindConfig>,
}

pub(crate) fn parse(text: &str) -> Result<Topology, Vec<Issue>> {
    let doc: Value = serde_yaml_ng::from_str(text).map_err(|e| vec![syntax_issue(text, &e)])?;
    let mut issues = Vec::new();

    let map = match &doc {
        Value::Mapping(map) => map,
        Value::Null => {
            return Err(vec![Issue::new(
                "top level",
                "the file is empty; expected a mapping with name, topics and processors",
            )]);
        }
        other => {
            return Err(vec![Issue::new(
                "top level",
                format!(
                    "expected a mapping with name, topics and processors, found {}",
                    decode::describe(other)
                ),
            )]);
        }
    };
    // A `topics` or `processors` that is not a list is dropped by the decoder; then the
    // checks that need all of them must not run, or they would report consequences.
    let topics_listed = map.get("topics").is_none_or(Value::is_sequence);
    let processors_listed = map.get("processors").is_none_or(Value::is_sequence);

    let top = decode::<RawTopology>(&doc, "top level", &mut issues);
    // An unknown key at the top may be a misspelt `topics` or `processors`.
    let topics_listed = topics_listed && (top.clean || map.contains_key("topics"));
    let processors_listed = processors_listed && (top.clean || map.contains_key("processors"));
    let top = top.value.unwrap_or(RawTopology {
        name: None,
        description: None,
        topics: Vec::new(),
        processors: Vec::new(),
    });
    if top.name.is_none() && map.get("name").is_none() {
        issues.push(Issue::new(
            "top level",
            "missing field \"name\" (the topology's name, e.g. `name: default`)",
        ));
    }

    let mut topics_complete = topics_listed;
    let mut topics = Vec::new();
    for (index, value) in top.topics.iter().enumerate() {
        let loc = check::topic_loc(index, value.get("name").and_then(Value::as_str));
        match decode::<Topic>(value, &loc, &mut issues).value {
            Some(topic) => topics.push((index, topic)),
            None => topics_complete = false,
        }
    }

    let mut ports_complete = processors_listed;
    let mut partials = Vec::new();
    for (index, value) in top.processors.iter().enumerate() {
        match decode_processor(index, value, &mut issues) {
            Some(p) => {
                ports_complete &= p.ports_known;
                partials.push(p);
            }
            None => ports_complete = false,
        }
    }

    if issues.is_empty() {
        let mut processors = Vec::with_capacity(partials.len());
        for p in partials {
            // Without issues every processor has its kind and config.
            if let (Some(kind), Some(config)) = (p.kind, p.config) {
                processors.push(Processor {
                    name: p.raw.name,
                    kind,
                    inputs: p.raw.inputs,
                    outputs: p.raw.outputs,
                    dlq: p.raw.dlq,
                    replicas: p.raw.replicas,
                    config,
                });
            }
        }
        return Ok(Topology {
            name: top.name.unwrap_or_default(),
            description: top.description,
            topics: topics.into_iter().map(|(_, t)| t).collect(),
            processors,
        });
    }

    // Report what can be cross-checked despite the structural problems, so that one run
    // shows every mistake.
    let model = Model {
        topics: topics.iter().map(|(i, t)| (*i, t)).collect(),
        processors: partials
            .iter()
            .map(|p| ProcView {
                index: p.index,
                name: &p.raw.name,
                kind: p.kind,
                inputs: &p.raw.inputs,
                outputs: &p.raw.outputs,
                ports_known: p.ports_known,
                replicas: p.raw.replicas,
                config: p.config.as_ref(),
            })
            .collect(),
        topics_complete,
        ports_complete,
    };
    issues.extend(check::check(&model, None, None));
    Err(check::sorted(issues))
}

fn decode_processor(index: usize, value: &Value, issues: &mut Vec<Issue>) -> Option<Partial> {
    let loc = check::processor_loc(index, value.get("name").and_then(Value::as_str));
    let before = issues.len();
    let raw = decode::<RawProcessor>(value, &loc, issues).value?;
    // An unknown key may be a misspelt `inputs`/`outputs`, and a dropped one is missing:
    // either way the ports are not all known, and rules about them would report consequences.
    let ports_known = issues[before..].iter().all(|i| {
        i.location != loc
            && !i.location.starts_with(&format!("{loc}.inputs"))
            && !i.location.starts_with(&format!("{loc}.outputs"))
    });
    let kind = match raw.kind.parse::<Kind>() {
        Ok(kind) => Some(kind),
        Err(e) => {
            issues.push(Issue::new(format!("{loc}.kind"), e.to_string()));
            None
        }
    };
    let config =
        kind.and_then(|kind| decode_config(kind, &raw.config, &format!("{loc}.config"), issues));
    Some(Partial {
        index,
        raw,
        ports_known,
        kind,
        config,
    })
}

/// Decodes a processor's `config` as its kind's config struct; a missing config is all
/// defaults.
fn decode_config(
    kind: Kind,
    value: &Value,
    loc: &str,
    issues: &mut Vec<Issue>,
) -> Option<KindConfig> {
    if value.is_null() {
        return Some(KindConfig::default_for(kind));
    }
    fn clean<T>(d: decode::Decoded<T>) -> Option<T> {
        if d.clean { d.value } else { None }
    }
    let rules: &[(&str, ElementCheck)] = &[("rules", check_element::<Rule>)];
    let endpoints: &[(&str, ElementCheck)] = &[("endpoints", check_element::<Endpoint>)];
    let mapping: &[(&str, ElementCheck)] = &[("mapping", check_element::<TopicMapping>)];
    Some(match kind {
        Kind::MqttBridge => KindConfig::MqttBridge(clean(decode_with::<MqttBridgeConfig>(
            value, loc, mapping, issues,
        ))?),
        Kind::HttpIngest => {
            KindConfig::HttpIngest(clean(decode::<HttpIngestConfig>(value, loc, issues))?)
        }
        Kind::IngestValidator => {
            KindConfig::IngestValidator(clean(decode::<IngestValidatorConfig>(value, loc, issues))?)
        }
        Kind::OutboxRelay => {
            KindConfig::OutboxRelay(clean(decode::<OutboxRelayConfig>(value, loc, issues))?)
        }
        Kind::Projector => {
            KindConfig::Projector(clean(decode::<ProjectorConfig>(value, loc, issues))?)
        }
        Kind::Inferencer => {
            KindConfig::Inferencer(clean(decode::<InferencerConfig>(value, loc, issues))?)
        }
        Kind::ActionRouter => KindConfig::ActionRouter(clean(decode_with::<ActionRouterConfig>(
            value, loc, rules, issues,
        ))?),
        Kind::Executor => KindConfig::Executor(clean(decode_with::<ExecutorConfig>(
            value, loc, endpoints, issues,
        ))?),
    })
}

fn check_element<T: serde::de::DeserializeOwned>(
    value: &Value,
    loc: &str,
    issues: &mut Vec<Issue>,
) -> bool {
    decode::<T>(value, loc, issues).clean
}

/// A YAML syntax error, located by line and column.
fn syntax_issue(text: &str, err: &serde_yaml_ng::Error) -> Issue {
    let message = err.to_string();
    let Some(at) = err.location() else {
        return Issue::new("top level", message);
    };
    let (mut line, mut column) = (at.line(), at.column());
    let mark = format!(" at line {line} column {column}");
    let mut message = message.replacen(&mark, "", 1);
    // serde_yaml_ng places a duplicate key at the start of its mapping; find the second
    // occurrence so the location points at the line to fix.
    if let Some(key) = duplicate_key(&message) {
        if let Some((l, c)) = find_duplicate_key(text, line, column, &key) {
            (line, column) = (l, c);
        }
        message = message.replace("duplicate entry with key", "duplicate key");
    }
    Issue::new(format!("line {line} column {column}"), message)
}

/// The key named by a "duplicate entry with key \"k\"" message.
fn duplicate_key(message: &str) -> Option<String> {
    let (_, rest) = message.split_once("duplicate entry with key \"")?;
    let (key, _) = rest.split_once('"')?;
    Some(key.to_owned())
}

/// The line and column of the second `key:` of the block mapping that starts at
/// (`line`, `column`), both 1-based.
fn find_duplicate_key(text: &str, line: usize, column: usize, key: &str) -> Option<(usize, usize)> {
    let indent = column.checked_sub(1)?;
    let mut seen = 0;
    for (n, content) in text.lines().enumerate().skip(line.checked_sub(1)?) {
        let trimmed = content.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let first = n + 1 == line;
        let lead = content.len() - trimmed.len();
        if !first && lead < indent {
            break; // the mapping ended
        }
        if !first && lead > indent {
            continue; // nested content
        }
        let Some(at_key) = content.get(indent..) else {
            continue;
        };
        let is_key = [
            format!("{key}:"),
            format!("\"{key}\":"),
            format!("'{key}':"),
        ]
        .iter()
        .any(|k| {
            at_key
                .strip_prefix(k.as_str())
                .is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t']))
        });
        if is_key {
            seen += 1;
            if seen == 2 {
                return Some((n + 1, column));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_error_has_line_and_column() {
        let err = parse("name: x\ntopics: [\n  {name: a\n").expect_err("bad yaml");
        assert_eq!(err.len(), 1);
        assert!(err[0].location.starts_with("line "), "{}", err[0]);
        assert!(err[0].location.contains(" column "), "{}", err[0]);
        assert!(!err[0].message.contains(&format!(" at {}", err[0].location)));
    }

    #[test]
    fn duplicate_key_points_at_the_second_one() {
        let text = "name: x\nprocessors:\n  - name: a\n    kind: projector\n    inputs: []\n    kind: executor\n";
        let err = parse(text).expect_err("duplicate key");
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].location, "line 6 column 5");
        assert_eq!(err[0].message, "processors[0]: duplicate key \"kind\"");
    }

    #[test]
    fn top_level_duplicate_key() {
        let err = parse("# comment\nname: x\nname: y\n").expect_err("duplicate key");
        assert_eq!(err[0].location, "line 3 column 1", "{err:?}");
    }

    #[test]
    fn empty_file() {
        let err = parse("# nothing here\n").expect_err("empty");
        assert_eq!(err.len(), 1);
        assert!(err[0].message.contains("empty"));
    }

    #[test]
    fn missing_config_is_all_defaults() {
        let t = parse(
            "name: t\ntopics: [{name: a, subject: s}]\nprocessors:\n  - {name: p, kind: projector, inputs: [a]}\n",
        )
        .expect("valid");
        assert_eq!(
            t.processors[0].config,
            KindConfig::Projector(ProjectorConfig::default())
        );
        assert!(t.processors[0].dlq);
        assert_eq!(t.processors[0].replicas, 1);
        assert_eq!(t.topics[0].partitions, 6);
        assert_eq!(
            t.topics[0].retention,
            std::time::Duration::from_secs(86_400)
        );
    }
}
