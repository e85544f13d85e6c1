//! The `config` block of each processor kind.
//!
//! The doc comment on every field is the user documentation of that setting. Every struct
//! denies unknown fields so that a misspelt setting is reported instead of silently ignored.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Kind;

/// The typed `config` of one processor, one variant per [`Kind`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum KindConfig {
    /// `mqtt-bridge`
    MqttBridge(MqttBridgeConfig),
    /// `http-ingest`
    HttpIngest(HttpIngestConfig),
    /// `ingest-validator`
    IngestValidator(IngestValidatorConfig),
    /// `outbox-relay`
    OutboxRelay(OutboxRelayConfig),
    /// `projector`
    Projector(ProjectorConfig),
    /// `inferencer`
    Inferencer(InferencerConfig),
    /// `action-router`
    ActionRouter(ActionRouterConfig),
    /// `executor`
    Executor(ExecutorConfig),
}

impl KindConfig {
    /// The kind this config belongs to.
    pub fn kind(&self) -> Kind {
        match self {
            KindConfig::MqttBridge(_) => Kind::MqttBridge,
            KindConfig::HttpIngest(_) => Kind::HttpIngest,
            KindConfig::IngestValidator(_) => Kind::IngestValidator,
            KindConfig::OutboxRelay(_) => Kind::OutboxRelay,
            KindConfig::Projector(_) => Kind::Projector,
            KindConfig::Inferencer(_) => Kind::Inferencer,
            KindConfig::ActionRouter(_) => Kind::ActionRouter,
            KindConfig::Executor(_) => Kind::Executor,
        }
    }

    /// The config a processor of `kind` gets when its file has no `config` block.
    pub fn default_for(kind: Kind) -> KindConfig {
        match kind {
            Kind::MqttBridge => KindConfig::MqttBridge(MqttBridgeConfig::default()),
            Kind::HttpIngest => KindConfig::HttpIngest(HttpIngestConfig::default()),
            Kind::IngestValidator => KindConfig::IngestValidator(IngestValidatorConfig::default()),
            Kind::OutboxRelay => KindConfig::OutboxRelay(OutboxRelayConfig::default()),
            Kind::Projector => KindConfig::Projector(ProjectorConfig::default()),
            Kind::Inferencer => KindConfig::Inferencer(InferencerConfig::default()),
            Kind::ActionRouter => KindConfig::ActionRouter(ActionRouterConfig::default()),
            Kind::Executor => KindConfig::Executor(ExecutorConfig::default()),
        }
    }
}

/// `Vec<Duration>` as a list of human strings (`["1s", "2s"]`); humantime-serde only covers
/// single values.
mod duration_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(list: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        let wrapped: Vec<humantime_serde::Serde<Duration>> =
            list.iter().copied().map(Into::into).collect();
        wrapped.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let wrapped = Vec::<humantime_serde::Serde<Duration>>::deserialize(d)?;
        Ok(wrapped.into_iter().map(|w| w.into_inner()).collect())
    }
}

// ---------------------------------------------------------------------------------------------
// mqtt-bridge

/// `mqtt-bridge`: subscribes to an MQTT broker and writes every message, unchanged, to its
/// `raw` output. It acknowledges (PUBACK) only after the log acknowledged the write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttBridgeConfig {
    /// Broker URL, `mqtt://host:port` or `mqtts://host:port` for TLS.
    /// Default: `mqtt://127.0.0.1:1883` (the broker `sluice dev` embeds).
    pub broker: String,
    /// Topic filters to subscribe to, with `+` and `#` wildcards.
    /// Default: `["devices/+/telemetry", "devices/+/status"]`.
    pub topics: Vec<String>,
    /// How an MQTT topic becomes an event: the first mapping whose filter matches wins.
    /// Default: `devices/+/telemetry` is `sensor.reading`, `devices/+/status` is
    /// `device.status`, both with the device id at level 1.
    pub mapping: Vec<TopicMapping>,
    /// Subscription QoS, 0, 1 or 2. Anything below 1 gives up at-least-once delivery.
    /// Default: `1`.
    pub qos: u8,
    /// MQTT client id, also settable with `SLUICE__MQTT_CLIENT_ID`. The bridge keeps a
    /// persistent session under it (clean session off), so the broker queues what arrives
    /// while the bridge is down and redelivers what it had not acknowledged; replicas need one
    /// each. Default: `sluice-<processor name>`.
    pub client_id: Option<String>,
    /// Shared-subscription group (MQTT 5): subscribes to `$share/<group>/<filter>` so that
    /// several replicas split the load. Default: none (a plain subscription).
    pub shared_group: Option<String>,
    /// User name for the broker. Default: none.
    pub username: Option<String>,
    /// Environment variable holding the broker password (never the password itself).
    /// Default: none.
    pub password_env: Option<String>,
    /// CA certificate (PEM) to trust for `mqtts://`; the system's roots when absent.
    pub tls_ca: Option<String>,
    /// Client certificate and key as PKCS#12 (DER) for brokers that authenticate clients by
    /// certificate. Default: none.
    pub tls_client_pkcs12: Option<String>,
    /// Environment variable holding the PKCS#12 password. Default: none (empty password).
    pub tls_client_pkcs12_password_env: Option<String>,
    /// Most messages written to the log in one produce call. Default: `1000`.
    pub max_batch: usize,
}

impl Default for MqttBridgeConfig {
    fn default() -> Self {
        MqttBridgeConfig {
            broker: "mqtt://127.0.0.1:1883".to_owned(),
            topics: vec![
                "devices/+/telemetry".to_owned(),
                "devices/+/status".to_owned(),
            ],
            mapping: vec![
                TopicMapping {
                    filter: "devices/+/telemetry".to_owned(),
                    event_type: "sensor.reading".to_owned(),
                    aggregate_level: 1,
                },
                TopicMapping {
                    filter: "devices/+/status".to_owned(),
                    event_type: "device.status".to_owned(),
                    aggregate_level: 1,
                },
            ],
            qos: 1,
            client_id: None,
            shared_group: None,
            username: None,
            password_env: None,
            tls_ca: None,
            tls_client_pkcs12: None,
            tls_client_pkcs12_password_env: None,
            max_batch: 1000,
        }
    }
}

/// Maps the MQTT topics matching `filter` to one event type and says where the device id is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicMapping {
    /// MQTT topic filter, e.g. `devices/+/telemetry`.
    pub filter: String,
    /// Event type given to the matching messages, e.g. `sensor.reading`.
    pub event_type: String,
    /// Zero-based topic level that holds the device id (the aggregate id); it must be a `+`
    /// level of `filter`. Default: `1`.
    #[serde(default = "default_aggregate_level")]
    pub aggregate_level: usize,
}

fn default_aggregate_level() -> usize {
    1
}

// ---------------------------------------------------------------------------------------------
// http-ingest

/// `http-ingest`: the `POST /v1/events` API. It answers 202 only after the log acknowledged
/// the write, and rejects a bad request with a reason instead of dead-lettering it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpIngestConfig {
    /// Address to listen on. Default: `127.0.0.1:8080`.
    pub listen: String,
    /// Most events accepted in one batch request. Default: `500`.
    pub max_batch: usize,
    /// Largest request body accepted, in bytes. Default: `1048576` (1 MiB).
    pub max_body_bytes: usize,
    /// Events per second accepted per API key; more are answered 429. Default: `1000`.
    pub rate_limit_per_key: u32,
    /// Largest single event (its JSON or Avro bytes). Default: `65536`.
    pub max_event_bytes: usize,
    /// How long a request waits for the log to acknowledge before it is answered 503.
    /// Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub persist_timeout: Duration,
}

impl Default for HttpIngestConfig {
    fn default() -> Self {
        HttpIngestConfig {
            listen: "127.0.0.1:8080".to_owned(),
            max_batch: 500,
            max_body_bytes: 1_048_576,
            rate_limit_per_key: 1000,
            max_event_bytes: 65_536,
            persist_timeout: Duration::from_secs(10),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ingest-validator

/// `ingest-validator`: validates raw events against their Avro schema and appends them to the
/// event store and the outbox in one transaction; rejects go to the DLQ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestValidatorConfig {
    /// Most events appended in one store transaction. Default: `500`.
    pub batch_size: usize,
    /// Largest raw message accepted, in bytes; larger ones are rejected to the DLQ.
    /// Default: `65536`.
    pub max_payload_bytes: usize,
    /// Store transactions in flight at once, each for its own partitions. Default: `2`.
    pub appenders: usize,
    /// How far ahead of the validator's clock a device time may be. Default: `5m`.
    #[serde(with = "humantime_serde")]
    pub max_future: Duration,
    /// How far behind the validator's clock a device time may be. Default: `7d`.
    #[serde(with = "humantime_serde")]
    pub max_past: Duration,
    /// Allowed ranges of numeric payload fields, per event type:
    /// `{sensor.reading: {temperature_c: {min: -60, max: 150}}}`. Default: none.
    pub ranges: BTreeMap<String, BTreeMap<String, FieldRange>>,
}

impl Default for IngestValidatorConfig {
    fn default() -> Self {
        IngestValidatorConfig {
            batch_size: 500,
            max_payload_bytes: 65_536,
            appenders: 2,
            max_future: Duration::from_secs(5 * 60),
            max_past: Duration::from_secs(7 * 24 * 3600),
            ranges: BTreeMap::new(),
        }
    }
}

/// Bounds of a numeric field, both inclusive; either may be left out.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldRange {
    /// Smallest allowed value.
    #[serde(default)]
    pub min: Option<f64>,
    /// Largest allowed value.
    #[serde(default)]
    pub max: Option<f64>,
}

// ---------------------------------------------------------------------------------------------
// outbox-relay

/// `outbox-relay`: publishes outbox entries to topics. The processor's `outputs` route them:
/// each port is an event type and its topic is where events of that type go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxRelayConfig {
    /// Most outbox entries published in one batch. Default: `500`.
    pub batch_size: usize,
    /// Fallback poll interval for when a LISTEN/NOTIFY wake-up is missed. Default: `1s`.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for OutboxRelayConfig {
    fn default() -> Self {
        OutboxRelayConfig {
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// projector

/// `projector`: maintains the read models (latest state, time series, rollups, inference and
/// action-ledger views) that the SQL endpoint serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorConfig {
    /// Per-device rollup bucket sizes, maintained incrementally. Default: `["1m", "1h"]`.
    #[serde(with = "duration_list")]
    pub rollups: Vec<Duration>,
    /// How long projections keep data. Default: `7d`.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        ProjectorConfig {
            rollups: vec![Duration::from_secs(60), Duration::from_secs(3600)],
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// inferencer

/// `inferencer`: scores readings with an ONNX model, or with a per-device EWMA z-score when no
/// model is configured or ONNX Runtime cannot be loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferencerConfig {
    /// Models by the event type they score, e.g. `sensor.reading`. Default: none, which uses
    /// the statistical fallback.
    pub models: BTreeMap<String, ModelConfig>,
    /// Z-score above which the statistical fallback labels a reading an anomaly. Default: `3.0`.
    pub fallback_z_threshold: f64,
    /// Most readings scored in one model call. Default: `64`.
    pub max_batch: usize,
    /// Longest a reading waits for its micro-batch to fill. Default: `5ms`.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Readings per device in the fallback's rolling window. Default: `30`.
    pub window: usize,
    /// How often a model folder is checked for a new version. Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for InferencerConfig {
    fn default() -> Self {
        InferencerConfig {
            models: BTreeMap::new(),
            fallback_z_threshold: 3.0,
            max_batch: 64,
            max_wait: Duration::from_millis(5),
            window: 30,
            reload_interval: Duration::from_secs(10),
        }
    }
}

/// One ONNX model of the inferencer: a folder of versions, `<path>/<version>/model.onnx` each
/// with its `metadata.json` (features, threshold, reference outputs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The model's folder, relative to the working directory or absolute.
    pub path: String,
    /// The version to run, or `latest`: the highest version in the folder, and any newer one
    /// that appears while running. Default: `latest`.
    #[serde(default = "latest")]
    pub version: String,
    /// Score at or above which the label is `anomaly`. Default: the model's metadata.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// The model's metric → the payload field that carries it, for fields named otherwise
    /// (`extra.<name>` for a metric in the payload's `extra` map). Default: the same names.
    #[serde(default)]
    pub features: BTreeMap<String, String>,
}

fn latest() -> String {
    "latest".to_owned()
}

// ---------------------------------------------------------------------------------------------
// action-router

/// `action-router`: turns findings into action requests by rules.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActionRouterConfig {
    /// The rules, evaluated in order; every matching rule requests its action. Default: none.
    pub rules: Vec<Rule>,
}

/// One action-router rule: when an event of type `match` satisfies `when`, request `action`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Rule id, unique within the router; recorded with every action it requests.
    pub id: String,
    /// Rule version; bump it when the rule changes, since the executor deduplicates actions
    /// per rule version. Default: `1`.
    #[serde(default = "default_rule_version")]
    pub version: u32,
    /// Event type the rule applies to, e.g. `inference.result`.
    #[serde(rename = "match")]
    pub match_type: String,
    /// Predicate over the event's fields, e.g. `score > 0.8 and site == "plant-3"`.
    pub when: String,
    /// What to request when the rule fires.
    pub action: RuleAction,
    /// At most one action per rule and device in this window. Default: `5m`.
    #[serde(with = "humantime_serde", default = "default_dedup_window")]
    pub dedup_window: Duration,
    /// Most actions this rule may request, as `<count>/<s|m|h>`, e.g. `10/m`.
    /// Default: none (no limit beyond the executor's).
    #[serde(default)]
    pub rate_limit: Option<String>,
    /// The action changes the world (e.g. shuts a device down). Destructive actions are denied
    /// unless `allow_destructive` is also set. Default: `false`.
    #[serde(default)]
    pub destructive: bool,
    /// Explicitly allows this rule's destructive action (deny by default). Default: `false`.
    #[serde(default)]
    pub allow_destructive: bool,
}

fn default_rule_version() -> u32 {
    1
}

fn default_dedup_window() -> Duration {
    Duration::from_secs(5 * 60)
}

/// The action a rule requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleAction {
    /// Name of the executor endpoint that carries the action out.
    pub endpoint: String,
    /// Payload template. Default: none (the executor sends the triggering event and rule).
    #[serde(default)]
    pub template: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// executor

/// `executor`: delivers requested actions as signed webhooks. The only processor that holds
/// endpoint secrets, and it reads them from the environment, never from this file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorConfig {
    /// Where actions can be delivered. Default: none.
    pub endpoints: Vec<Endpoint>,
    /// Delays between retries of a failed delivery; after the last one the action goes to the
    /// DLQ. Default: `["1s", "2s", "4s", "8s", "16s"]`.
    #[serde(with = "duration_list")]
    pub retry_backoff: Vec<Duration>,
    /// Consecutive failures that open an endpoint's circuit breaker. Default: `5`.
    pub breaker_failures: u32,
    /// How long an open breaker waits before a half-open probe. Default: `5m`.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Hosts that endpoints may point at. Default: empty, which allows any public host.
    pub allow_hosts: Vec<String>,
    /// Allows endpoints on loopback and private address ranges. Default: `false`.
    pub allow_private: bool,
    /// Most deliveries per second over all endpoints. Default: `10000`.
    pub rate_limit: u32,
    /// Most deliveries per second to any one endpoint. Default: `5000`.
    pub endpoint_rate_limit: u32,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            endpoints: Vec::new(),
            retry_backoff: [1, 2, 4, 8, 16].map(Duration::from_secs).to_vec(),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(5 * 60),
            allow_hosts: Vec::new(),
            allow_private: false,
            rate_limit: 10_000,
            endpoint_rate_limit: 5_000,
        }
    }
}

/// A webhook endpoint of the executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Endpoint name, referred to by action-router rules (`action.endpoint`).
    pub name: String,
    /// URL the signed request is POSTed to (`http://` or `https://`).
    pub url: String,
    /// Name of the environment variable that holds the `whsec_...` signing secret. The secret
    /// itself never goes in this file.
    pub secret_env: String,
    /// Per-request timeout. Default: `30s`.
    #[serde(with = "humantime_serde", default = "default_endpoint_timeout")]
    pub timeout: Duration,
}

fn default_endpoint_timeout() -> Duration {
    Duration::from_secs(30)
}
