//! Cross-reference and semantic checks.
//!
//! They run on a [`Model`], a view that a complete [`Topology`] gives but that a file with
//! structural problems can give in part too, so that `load` can report both kinds of problem
//! in one run. Checks that would only report consequences of a part that could not be read
//! are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use sluice_rules::Fields;

use crate::config::{
    ActionRouterConfig, ExecutorConfig, HttpIngestConfig, InferencerConfig, IngestValidatorConfig,
    KindConfig, MqttBridgeConfig, OutboxRelayConfig, ProjectorConfig, Rule,
};
use crate::suggest::did_you_mean;
use crate::{Issue, Kind, Topic, Topology};

/// What the checks see of a topology.
pub(crate) struct Model<'a> {
    /// The topics that could be read, with their index in the file.
    pub topics: Vec<(usize, &'a Topic)>,
    pub processors: Vec<ProcView<'a>>,
    /// Every topic in the file could be read, so a name not among them is unknown.
    pub topics_complete: bool,
    /// Every processor's inputs and outputs could be read, so a topic nobody lists as an
    /// output has no producer.
    pub ports_complete: bool,
}

/// What the checks see of a processor.
pub(crate) struct ProcView<'a> {
    pub index: usize,
    pub name: &'a str,
    pub kind: Option<Kind>,
    pub inputs: &'a [String],
    pub outputs: &'a BTreeMap<String, String>,
    pub ports_known: bool,
    pub replicas: u32,
    pub config: Option<&'a KindConfig>,
}

impl<'a> Model<'a> {
    pub(crate) fn of(t: &'a Topology) -> Model<'a> {
        Model {
            topics: t.topics.iter().enumerate().collect(),
            processors: t
                .processors
                .iter()
                .enumerate()
                .map(|(index, p)| ProcView {
                    index,
                    name: &p.name,
                    kind: Some(p.kind),
                    inputs: &p.inputs,
                    outputs: &p.outputs,
                    ports_known: true,
                    replicas: p.replicas,
                    config: Some(&p.config),
                })
                .collect(),
            topics_complete: true,
            ports_complete: true,
        }
    }

    fn topic(&self, name: &str) -> Option<&'a Topic> {
        self.topics.iter().map(|(_, t)| *t).find(|t| t.name == name)
    }

    fn topic_names(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.topics.iter().map(|(_, t)| t.name.as_str())
    }
}

/// `topics[2] (events.x)`.
pub(crate) fn topic_loc(index: usize, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("topics[{index}] ({name})"),
        None => format!("topics[{index}]"),
    }
}

/// `processors[3] (projector)`.
pub(crate) fn processor_loc(index: usize, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("processors[{index}] ({name})"),
        None => format!("processors[{index}]"),
    }
}

/// Issues in file order: top level, then each topic, then each processor. The sort is
/// stable, so within one entry the order the checks found them in is kept.
pub(crate) fn sorted(mut issues: Vec<Issue>) -> Vec<Issue> {
    fn entry(location: &str) -> (u8, usize) {
        let index = |rest: &str| {
            rest.split(']')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(usize::MAX)
        };
        if let Some(rest) = location.strip_prefix("topics[") {
            (1, index(rest))
        } else if let Some(rest) = location.strip_prefix("processors[") {
            (2, index(rest))
        } else {
            (0, 0)
        }
    }
    issues.sort_by_key(|i| entry(&i.location));
    issues
}

/// Every subject's latest Avro schema (JSON), by subject name.
pub(crate) type Schemas = BTreeMap<String, serde_json::Value>;

/// Every check; `subjects` is `None` when the known subjects were not given, `schemas` when
/// their schemas were not.
pub(crate) fn check(
    m: &Model<'_>,
    subjects: Option<&BTreeSet<String>>,
    schemas: Option<&Schemas>,
) -> Vec<Issue> {
    let mut out = Vec::new();
    check_topics(m, subjects, &mut out);
    check_processors(m, schemas, &mut out);
    sorted(out)
}

/// `(did you mean "x"? known: a, b)`, for a name that is not among `known`.
fn known_hint<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> String {
    let list: Vec<&str> = known.into_iter().collect();
    if list.is_empty() {
        return "(none are defined)".to_owned();
    }
    let guess = did_you_mean(name, list.iter().copied())
        .map(|g| format!("did you mean \"{g}\"? "))
        .unwrap_or_default();
    format!("({guess}known: {})", list.join(", "))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn check_topics(m: &Model<'_>, subjects: Option<&BTreeSet<String>>, out: &mut Vec<Issue>) {
    let mut first: BTreeMap<&str, usize> = BTreeMap::new();
    for &(index, topic) in &m.topics {
        let loc = topic_loc(index, Some(&topic.name));
        if !valid_name(&topic.name) {
            out.push(Issue::new(
                format!("{loc}.name"),
                format!(
                    "\"{}\" is not a valid topic name (use letters, digits, '.', '_' and '-', \
                     at most 249 characters)",
                    topic.name
                ),
            ));
        }
        if let Some(earlier) = first.get(topic.name.as_str()) {
            out.push(Issue::new(
                format!("{loc}.name"),
                format!(
                    "duplicate topic name \"{}\" (already defined at topics[{earlier}])",
                    topic.name
                ),
            ));
        } else {
            first.insert(&topic.name, index);
        }
        if topic.partitions < 1 {
            out.push(Issue::new(
                format!("{loc}.partitions"),
                "must be at least 1",
            ));
        }
        if topic.retention.is_zero() {
            out.push(Issue::new(
                format!("{loc}.retention"),
                "must be longer than 0 (e.g. \"24h\")",
            ));
        }
        if let (Some(subject), Some(known)) = (&topic.subject, subjects)
            && !known.contains(subject)
        {
            out.push(Issue::new(
                format!("{loc}.subject"),
                format!(
                    "unknown subject \"{subject}\" {}; a subject needs \
                         schemas/<subject>/<version>.avsc",
                    known_hint(subject, known.iter().map(String::as_str))
                ),
            ));
        }
        if m.ports_complete
            && !topic.external
            && !m
                .processors
                .iter()
                .any(|p| p.outputs.values().any(|t| *t == topic.name))
        {
            out.push(Issue::new(
                loc,
                "no processor writes to this topic (add it to a processor's outputs, or set \
                 `external: true` if something outside this topology produces it)",
            ));
        }
    }
}

fn check_processors(m: &Model<'_>, schemas: Option<&Schemas>, out: &mut Vec<Issue>) {
    let mut first: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &m.processors {
        let loc = processor_loc(p.index, Some(p.name));
        if !valid_name(p.name) {
            out.push(Issue::new(
                format!("{loc}.name"),
                format!(
                    "\"{}\" is not a valid processor name (use letters, digits, '.', '_' and '-')",
                    p.name
                ),
            ));
        }
        if let Some(earlier) = first.get(p.name) {
            out.push(Issue::new(
                format!("{loc}.name"),
                format!(
                    "duplicate processor name \"{}\" (already defined at processors[{earlier}])",
                    p.name
                ),
            ));
        } else {
            first.insert(p.name, p.index);
        }
        if p.replicas < 1 {
            out.push(Issue::new(format!("{loc}.replicas"), "must be at least 1"));
        }

        let mut seen = BTreeSet::new();
        for (j, input) in p.inputs.iter().enumerate() {
            let at = format!("{loc}.inputs[{j}]");
            if !seen.insert(input.as_str()) {
                out.push(Issue::new(at, format!("topic \"{input}\" is listed twice")));
            } else if m.topics_complete && m.topic(input).is_none() {
                out.push(unknown_topic(m, at, input));
            }
        }
        for (port, topic) in p.outputs {
            if m.topics_complete && m.topic(topic).is_none() {
                out.push(unknown_topic(m, format!("{loc}.outputs.{port}"), topic));
            }
        }

        if let (Some(kind), true) = (p.kind, p.ports_known) {
            check_ports(m, p, kind, &loc, out);
        }
        if let Some(config) = p.config {
            let at = format!("{loc}.config");
            match config {
                KindConfig::MqttBridge(c) => check_mqtt(c, &at, out),
                KindConfig::HttpIngest(c) => check_http(c, &at, out),
                KindConfig::IngestValidator(c) => check_validator(c, &at, out),
                KindConfig::OutboxRelay(c) => check_relay(c, &at, out),
                KindConfig::Projector(c) => check_projector(c, &at, out),
                KindConfig::Inferencer(c) => check_inferencer(m, p, c, &at, out),
                KindConfig::ActionRouter(c) => check_router(m, p, c, schemas, &at, out),
                KindConfig::Executor(c) => check_executor(c, &at, out),
            }
        }
    }
}

fn unknown_topic(m: &Model<'_>, at: String, name: &str) -> Issue {
    Issue::new(
        at,
        format!(
            "unknown topic \"{name}\" {}",
            known_hint(name, m.topic_names())
        ),
    )
}

/// The one output port of kinds that have a fixed one, with an example topic.
fn fixed_port(kind: Kind) -> Option<(&'static str, &'static str)> {
    match kind {
        Kind::MqttBridge | Kind::HttpIngest => Some(("raw", "ingest.raw")),
        Kind::Inferencer => Some(("inferences", "inferences")),
        Kind::ActionRouter => Some(("requested", "actions.requested")),
        Kind::Executor => Some(("results", "actions.results")),
        Kind::IngestValidator | Kind::OutboxRelay | Kind::Projector => None,
    }
}

/// "a projector", "an executor".
fn a(kind: Kind) -> String {
    let article = if kind.as_str().starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {kind}")
}

fn check_ports(m: &Model<'_>, p: &ProcView<'_>, kind: Kind, loc: &str, out: &mut Vec<Issue>) {
    // Where a kind's work comes from when it is not a topic.
    let reads_outside = match kind {
        Kind::MqttBridge => Some("an MQTT broker"),
        Kind::HttpIngest => Some("HTTP clients"),
        Kind::OutboxRelay => Some("the outbox"),
        _ => None,
    };
    match reads_outside {
        Some(source) if !p.inputs.is_empty() => out.push(Issue::new(
            format!("{loc}.inputs"),
            format!(
                "{} reads from {source}, not from topics, so it has no inputs",
                a(kind)
            ),
        )),
        None if p.inputs.is_empty() => out.push(Issue::new(
            format!("{loc}.inputs"),
            format!("{} needs at least one input topic", a(kind)),
        )),
        _ => {}
    }

    match (kind, fixed_port(kind)) {
        (_, Some((port, example))) => {
            if !p.outputs.contains_key(port) {
                out.push(Issue::new(
                    format!("{loc}.outputs"),
                    format!(
                        "{} needs the output port \"{port}\" (e.g. `{port}: {example}`)",
                        a(kind)
                    ),
                ));
            }
            for extra in p.outputs.keys().filter(|k| k.as_str() != port) {
                out.push(Issue::new(
                    format!("{loc}.outputs.{extra}"),
                    format!(
                        "unknown port \"{extra}\" for {} (its only port is \"{port}\")",
                        a(kind)
                    ),
                ));
            }
        }
        (Kind::OutboxRelay, None) => {
            if p.outputs.is_empty() {
                out.push(Issue::new(
                    format!("{loc}.outputs"),
                    "an outbox-relay needs at least one output: map each event type to its \
                     topic (e.g. `sensor.reading: events.sensor-reading`)",
                ));
            }
            // The relay publishes an event with its type's schema, so the topic must carry it.
            for (event_type, topic_name) in p.outputs {
                let Some(topic) = m.topic(topic_name) else {
                    continue;
                };
                let problem = match &topic.subject {
                    Some(subject) if subject == event_type => continue,
                    Some(subject) => format!("it carries subject \"{subject}\""),
                    None => "it has no subject (raw bytes)".to_owned(),
                };
                out.push(Issue::new(
                    format!("{loc}.outputs.{event_type}"),
                    format!(
                        "routes \"{event_type}\" events to topic \"{topic_name}\", but {problem}; \
                         the topic's subject must be \"{event_type}\""
                    ),
                ));
            }
        }
        (_, None) => {
            let writes = match kind {
                Kind::IngestValidator => {
                    "the event store and the outbox (the outbox-relay publishes)"
                }
                _ => "projections",
            };
            for port in p.outputs.keys() {
                out.push(Issue::new(
                    format!("{loc}.outputs.{port}"),
                    format!("{} has no output ports: it writes to {writes}", a(kind)),
                ));
            }
        }
    }
}

fn at_least_one(value: u64, at: String, out: &mut Vec<Issue>) {
    if value < 1 {
        out.push(Issue::new(at, "must be at least 1"));
    }
}

fn positive(value: Duration, at: String, out: &mut Vec<Issue>) {
    if value.is_zero() {
        out.push(Issue::new(at, "must be longer than 0"));
    }
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Why an MQTT topic filter is malformed, if it is.
fn filter_problem(filter: &str) -> Option<&'static str> {
    if filter.is_empty() {
        return Some("is empty");
    }
    if filter.starts_with("$share/") {
        return Some("names a shared subscription; set `shared_group` instead");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Some("has \"#\" somewhere other than as the whole last level");
        }
        if level.contains('+') && *level != "+" {
            return Some("has \"+\" as part of a level; it must be a whole level");
        }
    }
    None
}

fn check_mqtt(c: &MqttBridgeConfig, at: &str, out: &mut Vec<Issue>) {
    if !(c.broker.starts_with("mqtt://") || c.broker.starts_with("mqtts://")) {
        out.push(Issue::new(
            format!("{at}.broker"),
            format!(
                "\"{}\" is not an mqtt:// or mqtts:// URL (e.g. \"mqtt://127.0.0.1:1883\")",
                c.broker
            ),
        ));
    }
    if c.topics.is_empty() {
        out.push(Issue::new(
            format!("{at}.topics"),
            "subscribes to nothing; list at least one topic filter",
        ));
    }
    for (i, filter) in c.topics.iter().enumerate() {
        if let Some(problem) = filter_problem(filter) {
            out.push(Issue::new(
                format!("{at}.topics[{i}]"),
                format!("topic filter \"{filter}\" {problem}"),
            ));
        }
    }
    for (i, map) in c.mapping.iter().enumerate() {
        let mat = format!("{at}.mapping[{i}]");
        if let Some(problem) = filter_problem(&map.filter) {
            out.push(Issue::new(
                format!("{mat}.filter"),
                format!("topic filter \"{}\" {problem}", map.filter),
            ));
            continue;
        }
        if map.event_type.trim().is_empty() {
            out.push(Issue::new(format!("{mat}.event_type"), "must not be empty"));
        }
        let levels: Vec<&str> = map.filter.split('/').collect();
        match levels.get(map.aggregate_level) {
            None => out.push(Issue::new(
                format!("{mat}.aggregate_level"),
                format!(
                    "\"{}\" has levels 0 to {}, so there is no level {}",
                    map.filter,
                    levels.len() - 1,
                    map.aggregate_level
                ),
            )),
            Some(&"+") => {}
            Some(level) => out.push(Issue::new(
                format!("{mat}.aggregate_level"),
                format!(
                    "level {} of \"{}\" is \"{level}\", not a \"+\" wildcard, so it cannot hold \
                     the device id",
                    map.aggregate_level, map.filter
                ),
            )),
        }
    }
    if c.qos > 2 {
        out.push(Issue::new(format!("{at}.qos"), "must be 0, 1 or 2"));
    }
    if let Some(id) = &c.client_id
        && id.trim().is_empty()
    {
        out.push(Issue::new(
            format!("{at}.client_id"),
            "must not be empty; leave it out for the default sluice-<processor name>",
        ));
    }
    if let Some(group) = &c.shared_group
        && (group.is_empty() || group.contains(['/', '+', '#']))
    {
        out.push(Issue::new(
            format!("{at}.shared_group"),
            format!("\"{group}\" must be non-empty and contain no '/', '+' or '#'"),
        ));
    }
    at_least_one(as_u64(c.max_batch), format!("{at}.max_batch"), out);
    if c.username.is_none() && c.password_env.is_some() {
        out.push(Issue::new(
            format!("{at}.password_env"),
            "a password needs a username; set username too",
        ));
    }
    if (c.tls_ca.is_some() || c.tls_client_pkcs12.is_some()) && !c.broker.starts_with("mqtts://") {
        out.push(Issue::new(
            format!("{at}.broker"),
            "TLS files are set but the broker URL is not mqtts://",
        ));
    }
}

fn check_http(c: &HttpIngestConfig, at: &str, out: &mut Vec<Issue>) {
    if c.listen.parse::<std::net::SocketAddr>().is_err() {
        out.push(Issue::new(
            format!("{at}.listen"),
            format!(
                "\"{}\" is not an address and port (e.g. \"127.0.0.1:8080\")",
                c.listen
            ),
        ));
    }
    at_least_one(as_u64(c.max_batch), format!("{at}.max_batch"), out);
    at_least_one(
        as_u64(c.max_body_bytes),
        format!("{at}.max_body_bytes"),
        out,
    );
    at_least_one(
        u64::from(c.rate_limit_per_key),
        format!("{at}.rate_limit_per_key"),
        out,
    );
    at_least_one(
        as_u64(c.max_event_bytes),
        format!("{at}.max_event_bytes"),
        out,
    );
    positive(c.persist_timeout, format!("{at}.persist_timeout"), out);
}

fn check_validator(c: &IngestValidatorConfig, at: &str, out: &mut Vec<Issue>) {
    at_least_one(as_u64(c.batch_size), format!("{at}.batch_size"), out);
    at_least_one(
        as_u64(c.max_payload_bytes),
        format!("{at}.max_payload_bytes"),
        out,
    );
    at_least_one(as_u64(c.appenders), format!("{at}.appenders"), out);
    for (event_type, fields) in &c.ranges {
        for (field, range) in fields {
            if let (Some(min), Some(max)) = (range.min, range.max)
                && min > max
            {
                out.push(Issue::new(
                    format!("{at}.ranges.{event_type}.{field}"),
                    format!("min {min} is above max {max}"),
                ));
            }
        }
    }
}

fn check_relay(c: &OutboxRelayConfig, at: &str, out: &mut Vec<Issue>) {
    at_least_one(as_u64(c.batch_size), format!("{at}.batch_size"), out);
    positive(c.poll_interval, format!("{at}.poll_interval"), out);
}

fn check_projector(c: &ProjectorConfig, at: &str, out: &mut Vec<Issue>) {
    let mut seen = BTreeSet::new();
    for (i, rollup) in c.rollups.iter().enumerate() {
        positive(*rollup, format!("{at}.rollups[{i}]"), out);
        if !seen.insert(rollup) {
            out.push(Issue::new(
                format!("{at}.rollups[{i}]"),
                format!(
                    "rollup {} is listed twice",
                    humantime_serde::re::humantime::format_duration(*rollup)
                ),
            ));
        }
    }
    positive(c.retention, format!("{at}.retention"), out);
}

fn check_inferencer(
    m: &Model<'_>,
    p: &ProcView<'_>,
    c: &InferencerConfig,
    at: &str,
    out: &mut Vec<Issue>,
) {
    let input_subjects = input_subjects(m, p);
    for (event_type, model) in &c.models {
        let at = format!("{at}.models.{event_type}");
        if let Some(types) = &input_subjects
            && !types.contains(event_type.as_str())
        {
            out.push(Issue::new(
                at.clone(),
                format!(
                    "no input of this inferencer carries \"{event_type}\" events {}",
                    known_hint(event_type, types.iter().copied())
                ),
            ));
        }
        if model.path.trim().is_empty() {
            out.push(Issue::new(
                format!("{at}.path"),
                "must not be empty; leave the model out to use the statistical fallback",
            ));
        }
        if model.version.trim().is_empty() {
            out.push(Issue::new(
                format!("{at}.version"),
                "must be a version folder name or `latest`",
            ));
        }
        if let Some(t) = model.threshold
            && !t.is_finite()
        {
            out.push(Issue::new(format!("{at}.threshold"), "must be a number"));
        }
    }
    if !(c.fallback_z_threshold.is_finite() && c.fallback_z_threshold > 0.0) {
        out.push(Issue::new(
            format!("{at}.fallback_z_threshold"),
            "must be a positive number (e.g. 3.0)",
        ));
    }
    at_least_one(as_u64(c.max_batch), format!("{at}.max_batch"), out);
    positive(c.reload_interval, format!("{at}.reload_interval"), out);
    if c.window < 2 {
        out.push(Issue::new(
            format!("{at}.window"),
            "must be at least 2: a z-score needs a spread",
        ));
    }
}

/// Whether `limit` is `<count>/<s|m|h>` with a positive count.
fn valid_rate_limit(limit: &str) -> bool {
    limit.split_once('/').is_some_and(|(count, unit)| {
        count.trim().parse::<u32>().is_ok_and(|n| n > 0) && matches!(unit.trim(), "s" | "m" | "h")
    })
}

/// The event types reaching processor `p`, when every input is known and typed.
fn input_subjects<'a>(m: &'a Model<'_>, p: &ProcView<'_>) -> Option<BTreeSet<&'a str>> {
    if !m.topics_complete {
        return None;
    }
    p.inputs
        .iter()
        .map(|i| m.topic(i).and_then(|t| t.subject.as_deref()))
        .collect()
}

fn check_router(
    m: &Model<'_>,
    p: &ProcView<'_>,
    c: &ActionRouterConfig,
    schemas: Option<&Schemas>,
    at: &str,
    out: &mut Vec<Issue>,
) {
    let input_subjects = input_subjects(m, p);
    // The endpoints the executors define, when every executor's config could be read.
    let executors: Vec<&ProcView<'_>> = m
        .processors
        .iter()
        .filter(|q| q.kind == Some(Kind::Executor))
        .collect();
    let endpoints: Option<Vec<&str>> = executors
        .iter()
        .map(|q| match q.config {
            Some(KindConfig::Executor(e)) => Some(e.endpoints.iter().map(|e| e.name.as_str())),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .map(|lists| lists.into_iter().flatten().collect());

    let mut ids = BTreeMap::new();
    for (k, rule) in c.rules.iter().enumerate() {
        let rat = format!("{at}.rules[{k}] ({})", rule.id);
        if rule.id.trim().is_empty() {
            out.push(Issue::new(format!("{rat}.id"), "must not be empty"));
        } else if let Some(earlier) = ids.insert(rule.id.as_str(), k) {
            out.push(Issue::new(
                format!("{rat}.id"),
                format!(
                    "duplicate rule id \"{}\" (already used by rules[{earlier}])",
                    rule.id
                ),
            ));
        }
        if rule.version < 1 {
            out.push(Issue::new(format!("{rat}.version"), "must be at least 1"));
        }
        if rule.when.trim().is_empty() {
            out.push(Issue::new(
                format!("{rat}.when"),
                "must not be empty (e.g. `score > 0.8`)",
            ));
        } else if let Some(problem) = check_predicate(rule, schemas) {
            out.push(Issue::new(format!("{rat}.when"), problem));
        }
        if rule.match_type.trim().is_empty() {
            out.push(Issue::new(format!("{rat}.match"), "must not be empty"));
        } else if let Some(types) = &input_subjects
            && !types.contains(rule.match_type.as_str())
        {
            out.push(Issue::new(
                format!("{rat}.match"),
                format!(
                    "no input of this router carries \"{}\" events {}",
                    rule.match_type,
                    known_hint(&rule.match_type, types.iter().copied())
                ),
            ));
        }
        if let Some(limit) = &rule.rate_limit
            && !valid_rate_limit(limit)
        {
            out.push(Issue::new(
                format!("{rat}.rate_limit"),
                format!("\"{limit}\" is not <count>/<s|m|h> (e.g. \"10/m\")"),
            ));
        }
        let endpoint = &rule.action.endpoint;
        if endpoint.trim().is_empty() {
            out.push(Issue::new(
                format!("{rat}.action.endpoint"),
                "must not be empty",
            ));
        } else if let (false, Some(defined)) = (executors.is_empty(), &endpoints)
            && !defined.contains(&endpoint.as_str())
        {
            out.push(Issue::new(
                format!("{rat}.action.endpoint"),
                format!(
                    "endpoint \"{endpoint}\" is not defined by any executor {}",
                    known_hint(endpoint, defined.iter().copied())
                ),
            ));
        }
    }
}

/// What is wrong with a rule's `when`, if anything: it must parse, and type-check against
/// the fields of the event type it matches when that type's schema is known (without one,
/// fields may be anything but literals are still checked, e.g. `score > 1 and 2`).
fn check_predicate(rule: &Rule, schemas: Option<&Schemas>) -> Option<String> {
    let expr = match sluice_rules::parse(&rule.when) {
        Ok(expr) => expr,
        Err(e) => return Some(e.to_string()),
    };
    let fields = match schemas.and_then(|s| s.get(&rule.match_type)) {
        Some(schema) => match Fields::from_avro(schema) {
            Ok(fields) => fields,
            Err(e) => {
                return Some(format!(
                    "cannot check the rule against the schema of \"{}\": {e}",
                    rule.match_type
                ));
            }
        },
        None => Fields::any(),
    };
    sluice_rules::check(&expr, &fields)
        .err()
        .map(|e| e.to_string())
}

/// Scheme and host of an http(s) URL, without pulling in a URL parser for one check.
fn http_host(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// Loopback, private, link-local or unspecified: what `allow_private` guards.
fn is_private_host(host: &str) -> bool {
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => {
            ip.is_loopback() || ip.is_private() || ip.is_link_local() || ip.is_unspecified()
        }
        Ok(IpAddr::V6(ip)) => {
            let first = ip.segments()[0];
            ip.is_loopback()
                || ip.is_unspecified()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link local
                || ip.to_ipv4_mapped().is_some_and(|v4| {
                    v4.is_loopback() || v4.is_private() || v4.is_link_local()
                })
        }
        Err(_) => false,
    }
}

fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_executor(c: &ExecutorConfig, at: &str, out: &mut Vec<Issue>) {
    at_least_one(u64::from(c.rate_limit), format!("{at}.rate_limit"), out);
    at_least_one(
        u64::from(c.endpoint_rate_limit),
        format!("{at}.endpoint_rate_limit"),
        out,
    );
    let mut names = BTreeMap::new();
    for (i, endpoint) in c.endpoints.iter().enumerate() {
        let eat = format!("{at}.endpoints[{i}] ({})", endpoint.name);
        if endpoint.name.trim().is_empty() {
            out.push(Issue::new(format!("{eat}.name"), "must not be empty"));
        } else if let Some(earlier) = names.insert(endpoint.name.as_str(), i) {
            out.push(Issue::new(
                format!("{eat}.name"),
                format!(
                    "duplicate endpoint name \"{}\" (already used by endpoints[{earlier}])",
                    endpoint.name
                ),
            ));
        }
        match http_host(&endpoint.url) {
            None => out.push(Issue::new(
                format!("{eat}.url"),
                format!("\"{}\" is not an http:// or https:// URL", endpoint.url),
            )),
            Some(host) => {
                if !c.allow_hosts.is_empty()
                    && !c.allow_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host))
                {
                    out.push(Issue::new(
                        format!("{eat}.url"),
                        format!(
                            "host \"{host}\" is not in allow_hosts ({})",
                            c.allow_hosts.join(", ")
                        ),
                    ));
                }
                if !c.allow_private && is_private_host(&host) {
                    out.push(Issue::new(
                        format!("{eat}.url"),
                        format!(
                            "host \"{host}\" is a loopback or private address, which is refused \
                             unless `allow_private: true`"
                        ),
                    ));
                }
            }
        }
        // The secret itself must never be in the file; only the variable that holds it.
        if endpoint
            .secret_env
            .to_ascii_lowercase()
            .starts_with("whsec_")
        {
            out.push(Issue::new(
                format!("{eat}.secret_env"),
                "this looks like the secret itself; put the secret in an environment variable \
                 and name that variable here (e.g. SLUICE_OPS_WEBHOOK_SECRET)",
            ));
        } else if !valid_env_name(&endpoint.secret_env) {
            out.push(Issue::new(
                format!("{eat}.secret_env"),
                format!(
                    "\"{}\" is not an environment variable name (letters, digits and '_', not \
                     starting with a digit)",
                    endpoint.secret_env
                ),
            ));
        }
        positive(endpoint.timeout, format!("{eat}.timeout"), out);
    }
    for (i, delay) in c.retry_backoff.iter().enumerate() {
        positive(*delay, format!("{at}.retry_backoff[{i}]"), out);
    }
    at_least_one(
        u64::from(c.breaker_failures),
        format!("{at}.breaker_failures"),
        out,
    );
    positive(c.breaker_cooldown, format!("{at}.breaker_cooldown"), out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(
            http_host("http://127.0.0.1:9000/hooks").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(
            http_host("https://u:p@Example.com/x").as_deref(),
            Some("example.com")
        );
        assert_eq!(http_host("https://[::1]:8443/").as_deref(), Some("::1"));
        assert_eq!(http_host("ftp://example.com"), None);
        assert_eq!(http_host("https:///path"), None);
        assert!(is_private_host("127.0.0.1"));
        assert!(is_private_host("10.1.2.3"));
        assert!(is_private_host("localhost"));
        assert!(is_private_host("::1"));
        assert!(is_private_host("fd00::1"));
        assert!(!is_private_host("93.184.216.34"));
        assert!(!is_private_host("hooks.example.com"));
    }

    #[test]
    fn filters() {
        assert_eq!(filter_problem("devices/+/telemetry"), None);
        assert_eq!(filter_problem("devices/#"), None);
        assert!(filter_problem("devices/#/x").is_some());
        assert!(filter_problem("devices/a+/x").is_some());
        assert!(filter_problem("$share/g/devices/+").is_some());
        assert!(filter_problem("").is_some());
    }

    #[test]
    fn rate_limits() {
        assert!(valid_rate_limit("10/m"));
        assert!(valid_rate_limit("1/s"));
        assert!(!valid_rate_limit("0/m"));
        assert!(!valid_rate_limit("10/d"));
        assert!(!valid_rate_limit("ten/m"));
        assert!(!valid_rate_limit("10"));
    }

    #[test]
    fn env_names() {
        assert!(valid_env_name("SLUICE_OPS_WEBHOOK_SECRET"));
        assert!(valid_env_name("_X1"));
        assert!(!valid_env_name("1X"));
        assert!(!valid_env_name("A-B"));
        assert!(!valid_env_name(""));
    }

    #[test]
    fn issues_sort_by_entry_then_keep_order() {
        let issues = vec![
            Issue::new("processors[2] (b)", "x"),
            Issue::new("topics[10] (t)", "y"),
            Issue::new("processors[1] (a)", "z"),
            Issue::new("topics[9] (t)", "w"),
            Issue::new("processors[1] (a).kind", "v"),
            Issue::new("top level", "u"),
        ];
        let order: Vec<String> = sorted(issues).into_iter().map(|i| i.message).collect();
        assert_eq!(order, ["u", "w", "y", "z", "v", "x"]);
    }
}
