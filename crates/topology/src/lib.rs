//! Topology files: the wiring of Sluice as data.
//!
//! A topology file (YAML, see `topologies/default.yaml`) names every topic and every
//! processor. This crate is the model of that file ([`Topology`]), the checks that report
//! every mistake in it at once with where it is ([`load`], [`parse`], [`Topology::validate`]),
//! and its rendering as a Mermaid or Graphviz graph.
//!
//! It must never do I/O beyond reading the file in [`load`]: no broker, no database, no
//! schema registry (the caller passes the known Avro subjects to [`Topology::validate`], or
//! their latest schemas to [`Topology::validate_with_schemas`]), no environment variables
//! (executor secrets are only *named* here). And it must never stop at
//! the first mistake: a user fixing a file wants the whole list.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod check;
mod config;
mod decode;
mod graph;
mod parse;
mod suggest;

pub use config::{
    ActionRouterConfig, Endpoint, ExecutorConfig, FieldRange, HttpIngestConfig, InferencerConfig,
    IngestValidatorConfig, KindConfig, ModelConfig, MqttBridgeConfig, OutboxRelayConfig,
    ProjectorConfig, Rule, RuleAction, TopicMapping,
};

/// A whole topology file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Topology {
    /// Name of the topology, e.g. `default`.
    pub name: String,
    /// What this topology is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Every topic, in file order.
    pub topics: Vec<Topic>,
    /// Every processor, in file order.
    pub processors: Vec<Processor>,
}

/// A topic on the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topic {
    /// Topic name on the log, e.g. `events.sensor-reading`.
    pub name: String,
    /// Number of partitions, the unit of parallelism. Default: `6`.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// How long the log keeps messages. Default: `24h`.
    #[serde(with = "humantime_serde", default = "default_retention")]
    pub retention: Duration,
    /// What the message key is, which decides what stays in order. Default: `aggregate_id`.
    #[serde(default)]
    pub key: KeyField,
    /// Avro schema subject of the values, e.g. `sensor.reading`. None means raw bytes, which
    /// only `ingest.raw` should carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Produced by something outside this topology, so no processor has to write it.
    /// Default: `false`.
    #[serde(default)]
    pub external: bool,
    /// What the topic carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn default_partitions() -> u32 {
    6
}

fn default_retention() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// The field a topic's messages are keyed by.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum KeyField {
    /// The aggregate (device) id: each device's events stay in order. The default.
    #[default]
    AggregateId,
    /// The event id: spreads load evenly, with no ordering between a device's events.
    EventId,
}

impl KeyField {
    /// The name used in topology files.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyField::AggregateId => "aggregate_id",
            KeyField::EventId => "event_id",
        }
    }
}

/// A processor: one kind of work, wired to topics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Processor {
    /// Unique name; `sluice run <name>` runs it and it names its consumer group.
    pub name: String,
    /// What it does.
    pub kind: Kind,
    /// Topics it consumes.
    pub inputs: Vec<String>,
    /// Topics it produces, by port. Most kinds have fixed ports (e.g. `raw`); the outbox
    /// relay's ports are event types.
    pub outputs: BTreeMap<String, String>,
    /// Poison messages go to the DLQ table (and the partition moves on). Default: `true`.
    pub dlq: bool,
    /// Processes to run, at most one per input partition. Default: `1`.
    pub replicas: u32,
    /// The kind's own settings.
    pub config: KindConfig,
}

/// Every kind of processor Sluice has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Subscribes to an MQTT broker and writes raw messages to the log.
    MqttBridge,
    /// The HTTP ingest API; writes raw events to the log.
    HttpIngest,
    /// Validates raw events and appends them to the event store and outbox.
    IngestValidator,
    /// Publishes the outbox to event topics.
    OutboxRelay,
    /// Maintains the projections.
    Projector,
    /// Scores readings (ONNX model or statistical fallback).
    Inferencer,
    /// Turns findings into action requests by rules.
    ActionRouter,
    /// Delivers actions as signed webhooks.
    Executor,
}

impl Kind {
    /// Every kind, in pipeline order.
    pub const ALL: [Kind; 8] = [
        Kind::MqttBridge,
        Kind::HttpIngest,
        Kind::IngestValidator,
        Kind::OutboxRelay,
        Kind::Projector,
        Kind::Inferencer,
        Kind::ActionRouter,
        Kind::Executor,
    ];

    /// The name used in topology files, e.g. `mqtt-bridge`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::MqttBridge => "mqtt-bridge",
            Kind::HttpIngest => "http-ingest",
            Kind::IngestValidator => "ingest-validator",
            Kind::OutboxRelay => "outbox-relay",
            Kind::Projector => "projector",
            Kind::Inferencer => "inferencer",
            Kind::ActionRouter => "action-router",
            Kind::Executor => "executor",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Kind, UnknownKind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// A kind name that is not one of [`Kind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind \"{0}\" ({hint}known: {known})", hint = kind_hint(.0), known = known_kinds())]
pub struct UnknownKind(pub String);

fn kind_hint(name: &str) -> String {
    suggest::did_you_mean(name, Kind::ALL.iter().map(|k| k.as_str()))
        .map(|k| format!("did you mean \"{k}\"? "))
        .unwrap_or_default()
}

fn known_kinds() -> String {
    Kind::ALL.map(Kind::as_str).join(", ")
}

/// One problem in a topology file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{location}: {message}")]
pub struct Issue {
    /// Where: a path such as `processors[4] (action-router).inputs[1]`, or `line 12 column 3`
    /// for a YAML syntax error.
    pub location: String,
    /// What is wrong and, when it can tell, what would be right.
    pub message: String,
}

impl Issue {
    /// An issue at `location`.
    pub fn new(location: impl Into<String>, message: impl Into<String>) -> Issue {
        Issue {
            location: location.into(),
            message: message.into(),
        }
    }
}

/// Reads, parses and structurally checks a topology file, reporting every problem at once.
///
/// When the file has structural problems, the cross-reference problems that can be seen
/// despite them are reported too (all but the subject check, which needs the known subjects);
/// on success, call [`Topology::validate`] for the cross-reference checks.
pub fn load(path: &Path) -> Result<Topology, Vec<Issue>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Issue::new(
            path.display().to_string(),
            format!("cannot read the topology file: {e}"),
        )]
    })?;
    parse(&text)
}

/// Parses and structurally checks topology text; see [`load`].
pub fn parse(text: &str) -> Result<Topology, Vec<Issue>> {
    parse::parse(text)
}

impl Topology {
    /// Cross-reference checks: unique names, every input and output is a declared topic,
    /// every topic has a producer or is external, every subject exists, ports fit their kinds,
    /// and the kinds' configs make sense, alone and together (rule endpoints exist).
    ///
    /// `subjects` are the Avro subjects that exist. Action-router rule predicates are parsed
    /// and checked for type errors that do not depend on fields (e.g. `score > 1 and 2`);
    /// [`Topology::validate_with_schemas`] also checks them against their event's fields.
    /// Returns every issue found; empty means the topology is valid.
    pub fn validate(&self, subjects: &BTreeSet<String>) -> Vec<Issue> {
        check::check(&check::Model::of(self), Some(subjects), None)
    }

    /// [`Topology::validate`], with each existing subject's latest Avro schema (as JSON) by
    /// subject name, so that every rule predicate is also type-checked against the fields of
    /// the event type it matches: unknown fields and mismatched types are reported.
    ///
    /// The CLI passes the latest version of each subject in `schemas/`.
    pub fn validate_with_schemas(
        &self,
        schemas: &BTreeMap<String, serde_json::Value>,
    ) -> Vec<Issue> {
        let subjects: BTreeSet<String> = schemas.keys().cloned().collect();
        check::check(&check::Model::of(self), Some(&subjects), Some(schemas))
    }

    /// The topology as a Mermaid `flowchart LR`.
    pub fn to_mermaid(&self) -> String {
        graph::mermaid(self)
    }

    /// The topology as a Graphviz `digraph`.
    pub fn to_dot(&self) -> String {
        graph::dot(self)
    }

    /// The processors that write `topic`, in file order.
    pub fn producers_of(&self, topic: &str) -> Vec<&Processor> {
        self.processors
            .iter()
            .filter(|p| p.outputs.values().any(|t| t == topic))
            .collect()
    }

    /// The processors that read `topic`, in file order.
    pub fn consumers_of(&self, topic: &str) -> Vec<&Processor> {
        self.processors
            .iter()
            .filter(|p| p.inputs.iter().any(|t| t == topic))
            .collect()
    }

    /// The topic named `name`.
    pub fn topic(&self, name: &str) -> Option<&Topic> {
        self.topics.iter().find(|t| t.name == name)
    }

    /// The processor named `name`.
    pub fn processor(&self, name: &str) -> Option<&Processor> {
        self.processors.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for kind in Kind::ALL {
            assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
            let yaml = serde_yaml_ng::to_string(&kind).expect("serialize kind");
            assert_eq!(yaml.trim(), kind.as_str());
        }
    }

    #[test]
    fn unknown_kind_lists_the_known_ones() {
        let err = "projecter".parse::<Kind>().expect_err("not a kind");
        assert_eq!(
            err.to_string(),
            "unknown kind \"projecter\" (did you mean \"projector\"? known: mqtt-bridge, \
             http-ingest, ingest-validator, outbox-relay, projector, inferencer, \
             action-router, executor)"
        );
    }

    #[test]
    fn default_config_matches_its_kind() {
        for kind in Kind::ALL {
            assert_eq!(KindConfig::default_for(kind).kind(), kind);
        }
    }

    #[test]
    fn issue_display() {
        let issue = Issue::new("topics[0] (a)", "bad");
        assert_eq!(issue.to_string(), "topics[0] (a): bad");
    }
}
