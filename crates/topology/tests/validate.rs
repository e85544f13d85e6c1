//! Loading and validating topology files: the shipped default, and every kind of mistake.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use sluice_topology::{Issue, Kind, KindConfig, Topology, load, parse};

const DEFAULT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../topologies/default.yaml");
const THREE_MISTAKES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/three-mistakes.yaml"
);

fn subjects() -> BTreeSet<String> {
    [
        "sensor.reading",
        "device.status",
        "inference.result",
        "action.requested",
        "action.result",
    ]
    .map(String::from)
    .into()
}

/// The latest schema of every subject in the repository's `schemas/`, as the CLI passes them.
fn schemas() -> BTreeMap<String, serde_json::Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    let mut latest = BTreeMap::new();
    for dir in std::fs::read_dir(&root).expect("schemas folder") {
        let dir = dir.expect("entry").path();
        if !dir.is_dir() {
            continue;
        }
        let newest = std::fs::read_dir(&dir)
            .expect("subject folder")
            .filter_map(|f| {
                let path = f.expect("entry").path();
                let version: u32 = path.file_stem()?.to_str()?.parse().ok()?;
                (path.extension()? == "avsc").then_some((version, path))
            })
            .max()
            .expect("a version");
        let text = std::fs::read_to_string(&newest.1).expect("schema file");
        let subject = dir
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        latest.insert(
            subject,
            serde_json::from_str(&text).expect("schema is JSON"),
        );
    }
    latest
}

fn lines(issues: &[Issue]) -> Vec<String> {
    issues.iter().map(ToString::to_string).collect()
}

/// Parses `text`, which must be structurally fine, and returns its validation issues.
fn validate(text: &str) -> Vec<String> {
    let topology = parse(text).unwrap_or_else(|e| panic!("parse failed: {:#?}", lines(&e)));
    lines(&topology.validate(&subjects()))
}

/// A valid topology to make one mistake in: two topics, a producer and a consumer.
const SMALL: &str = "\
name: small
topics:
  - name: events.sensor-reading
    subject: sensor.reading
  - name: inferences
    subject: inference.result
processors:
  - name: relay
    kind: outbox-relay
    outputs:
      sensor.reading: events.sensor-reading
  - name: inferencer
    kind: inferencer
    inputs: [events.sensor-reading]
    outputs:
      inferences: inferences
";

#[test]
fn small_fixture_is_valid() {
    assert_eq!(validate(SMALL), Vec::<String>::new());
}

#[test]
fn default_topology_is_valid() {
    let topology = load(Path::new(DEFAULT))
        .unwrap_or_else(|e| panic!("default.yaml does not load: {:#?}", lines(&e)));
    assert_eq!(lines(&topology.validate(&subjects())), Vec::<String>::new());

    let topics: Vec<&str> = topology.topics.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        topics,
        [
            "ingest.raw",
            "events.sensor-reading",
            "events.device-status",
            "inferences",
            "actions.requested",
            "actions.results"
        ]
    );
    for topic in &topology.topics {
        assert_eq!(topic.partitions, 6, "{}", topic.name);
        assert_eq!(topic.retention.as_secs(), 24 * 3600, "{}", topic.name);
    }
    assert_eq!(
        topology.topic("ingest.raw").map(|t| &t.subject),
        Some(&None)
    );

    // Every kind once, named after itself.
    let kinds: Vec<Kind> = topology.processors.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, Kind::ALL);
    for p in &topology.processors {
        assert_eq!(p.name, p.kind.as_str());
        assert_eq!(p.config.kind(), p.kind);
    }

    let names = |ps: Vec<&sluice_topology::Processor>| -> Vec<String> {
        ps.into_iter().map(|p| p.name.clone()).collect()
    };
    assert_eq!(
        names(topology.producers_of("ingest.raw")),
        ["mqtt-bridge", "http-ingest"]
    );
    assert_eq!(
        names(topology.consumers_of("events.sensor-reading")),
        ["projector", "inferencer"]
    );
    assert_eq!(
        names(topology.consumers_of("events.device-status")),
        ["projector", "action-router"]
    );
    assert!(topology.consumers_of("actions.requested").len() == 1);

    let Some(KindConfig::ActionRouter(router)) =
        topology.processor("action-router").map(|p| &p.config)
    else {
        panic!("no action-router config");
    };
    let rule_ids: Vec<&str> = router.rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(rule_ids, ["anomaly-alert", "device-offline"]);
}

#[test]
fn default_topology_rules_type_check_against_the_schemas() {
    let topology = load(Path::new(DEFAULT)).expect("default loads");
    let schemas = schemas();
    assert_eq!(schemas.keys().cloned().collect::<BTreeSet<_>>(), subjects());
    assert_eq!(
        lines(&topology.validate_with_schemas(&schemas)),
        Vec::<String>::new()
    );
}

#[test]
fn three_mistakes_are_reported_at_once_with_locations() {
    let issues = load(Path::new(THREE_MISTAKES)).expect_err("the fixture has mistakes");
    assert_eq!(
        lines(&issues),
        [
            "topics[2] (alerts): no processor writes to this topic (add it to a processor's \
             outputs, or set `external: true` if something outside this topology produces it)",
            "processors[3] (projector).config: unknown field \"retension\" (did you mean \
             \"retention\"? known: rollups, retention)",
            "processors[3] (projector).inputs[1]: unknown topic \"inference\" (known: \
             ingest.raw, events.sensor-reading, alerts)",
        ]
    );
}

#[test]
fn fixing_the_three_mistakes_leaves_none() {
    let text = std::fs::read_to_string(THREE_MISTAKES).expect("fixture");
    let fixed = text
        .replace(
            "subject: action.requested",
            "subject: action.requested\n    external: true",
        )
        .replace(", inference]", "]")
        .replace("retension:", "retention:");
    assert_eq!(validate(&fixed), Vec::<String>::new());
}

#[test]
fn load_reads_a_file_and_reports_a_missing_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("small.yaml");
    std::fs::write(&path, SMALL).expect("write");
    let topology = load(&path).expect("loads");
    assert_eq!(topology.name, "small");

    let missing = dir.path().join("missing.yaml");
    let issues = load(&missing).expect_err("no such file");
    assert_eq!(issues.len(), 1);
    assert_eq!(issues[0].location, missing.display().to_string());
    assert!(
        issues[0]
            .message
            .starts_with("cannot read the topology file")
    );
}

#[test]
fn duplicate_names() {
    let text =
        format!("{SMALL}  - name: inferencer\n    kind: projector\n    inputs: [inferences]\n")
            .replace(
                "topics:\n",
                "topics:\n  - name: inferences\n    subject: inference.result\n",
            );
    assert_eq!(
        validate(&text),
        [
            "topics[2] (inferences).name: duplicate topic name \"inferences\" (already defined \
             at topics[0])",
            "processors[2] (inferencer).name: duplicate processor name \"inferencer\" (already \
             defined at processors[1])",
        ]
    );
}

#[test]
fn unknown_subject_suggests_the_close_one() {
    let text = SMALL.replace("subject: inference.result", "subject: inference.results");
    assert_eq!(
        validate(&text),
        [
            "topics[1] (inferences).subject: unknown subject \"inference.results\" (did you mean \
          \"inference.result\"? known: action.requested, action.result, device.status, \
          inference.result, sensor.reading); a subject needs schemas/<subject>/<version>.avsc"
        ]
    );
}

#[test]
fn unknown_kind_lists_the_known_kinds() {
    let text = SMALL.replace("kind: inferencer", "kind: inferrer");
    let issues = lines(&parse(&text).expect_err("unknown kind"));
    assert_eq!(
        issues,
        [
            "processors[1] (inferencer).kind: unknown kind \"inferrer\" (known: mqtt-bridge, \
          http-ingest, ingest-validator, outbox-relay, projector, inferencer, action-router, \
          executor)"
        ]
    );
}

#[test]
fn yaml_syntax_error_has_line_and_column() {
    let text = SMALL.replace(
        "inputs: [events.sensor-reading]",
        "inputs: [events.sensor-reading",
    );
    let issues = parse(&text).expect_err("bad yaml");
    assert_eq!(issues.len(), 1, "{:#?}", lines(&issues));
    let issue = &issues[0];
    // The unclosed flow sequence is noticed at the next mapping key.
    assert_eq!(issue.location, "line 15 column 12", "{issue}");
    assert!(
        issue
            .message
            .contains("while parsing a flow sequence at line 14 column 13"),
        "{issue}"
    );
}

#[test]
fn unknown_top_level_key() {
    let text = SMALL.replace("processors:", "procesors:");
    let issues = lines(&parse(&text).expect_err("unknown key"));
    assert_eq!(
        issues,
        [
            "top level: unknown field \"procesors\" (did you mean \"processors\"? known: name, \
          description, topics, processors)"
        ]
    );
}

#[test]
fn rule_endpoint_must_be_defined_by_an_executor() {
    let text = "\
name: actions
topics:
  - { name: inferences, subject: inference.result, external: true }
  - { name: actions.requested, subject: action.requested }
  - { name: actions.results, subject: action.result }
processors:
  - name: router
    kind: action-router
    inputs: [inferences]
    outputs: { requested: actions.requested }
    config:
      rules:
        - { id: r1, match: inference.result, when: score > 0.8, action: { endpoint: ops-webhok } }
        - { id: r2, match: inference.result, when: score > 0.9, action: { endpoint: ops-webhook } }
  - name: executor
    kind: executor
    inputs: [actions.requested]
    outputs: { results: actions.results }
    config:
      endpoints:
        - { name: ops-webhook, url: https://hooks.example.com/sluice, secret_env: OPS_SECRET }
";
    assert_eq!(
        validate(text),
        [
            "processors[0] (router).config.rules[0] (r1).action.endpoint: endpoint \"ops-webhok\" \
          is not defined by any executor (did you mean \"ops-webhook\"? known: ops-webhook)"
        ]
    );

    // Without an executor in the topology there is nothing to check against.
    let cut = text.find("  - name: executor").expect("executor");
    let without = text[..cut].replace(
        "{ name: actions.results, subject: action.result }",
        "{ name: actions.results, subject: action.result, external: true }",
    );
    assert_eq!(validate(&without), Vec::<String>::new());
}

#[test]
fn every_structural_mistake_at_once() {
    let text = "\
name: many
extra: 1
topics:
  - name: a
    partitions: six
    subjct: sensor.reading
  - partitions: 3
  - name: b
    retention: forever
processors:
  - name: p
    kind: projector
    inputs: [a]
    replica: 2
    config:
      rollups: [1m, soon]
      retention: 7d
      colour: blue
  - name: r
    kind: action-router
    inputs: [a]
    outputs: { requested: b }
    config:
      rules:
        - { id: x, match: sensor.reading, when: 'v > 1', action: { endpoint: e, extra: 1 } }
        - { id: y, match: sensor.reading, action: { endpoint: e } }
        - { id: z, match: sensor.reading, when: 'v > 1', action: { endpoint: e } }
";
    let issues = lines(&parse(text).expect_err("many mistakes"));
    assert_eq!(
        issues,
        [
            "top level: unknown field \"extra\" (known: name, description, topics, processors)",
            "topics[0] (a): unknown field \"subjct\" (did you mean \"subject\"? known: name, \
             partitions, retention, key, subject, external, description)",
            "topics[0] (a).partitions: invalid type: string \"six\", expected u32",
            "topics[1]: missing field \"name\"",
            "topics[2] (b).retention: invalid value: string \"forever\", expected a duration",
            "processors[0] (p): unknown field \"replica\" (did you mean \"replicas\"? known: \
             name, kind, inputs, outputs, dlq, replicas, config)",
            "processors[0] (p).config: unknown field \"colour\" (known: rollups, retention)",
            "processors[0] (p).config.rollups[1]: invalid value: string \"soon\", expected a \
             duration",
            "processors[1] (r).config.rules[0] (x).action: unknown field \"extra\", expected \
             \"endpoint\" or \"template\"",
            "processors[1] (r).config.rules[1] (y): missing field \"when\"",
        ]
    );
}

#[test]
fn partitions_must_be_at_least_one() {
    let text = SMALL.replace(
        "    subject: inference.result",
        "    subject: inference.result\n    partitions: 0",
    );
    assert_eq!(
        validate(&text),
        ["topics[1] (inferences).partitions: must be at least 1"]
    );
}

#[test]
fn ports_must_fit_their_kind() {
    let text = "\
name: ports
topics:
  - { name: ingest.raw }
  - { name: events.sensor-reading, subject: sensor.reading }
processors:
  - name: bridge
    kind: mqtt-bridge
    outputs: { out: ingest.raw }
  - name: relay
    kind: outbox-relay
    inputs: [ingest.raw]
    outputs: { device.status: events.sensor-reading, sensor.reading: ingest.raw }
";
    assert_eq!(
        validate(text),
        [
            "processors[0] (bridge).outputs: a mqtt-bridge needs the output port \"raw\" (e.g. \
             `raw: ingest.raw`)",
            "processors[0] (bridge).outputs.out: unknown port \"out\" for a mqtt-bridge (its \
             only port is \"raw\")",
            "processors[1] (relay).inputs: an outbox-relay reads from the outbox, not from \
             topics, so it has no inputs",
            "processors[1] (relay).outputs.device.status: routes \"device.status\" events to \
             topic \"events.sensor-reading\", but it carries subject \"sensor.reading\"; the \
             topic's subject must be \"device.status\"",
            "processors[1] (relay).outputs.sensor.reading: routes \"sensor.reading\" events to \
             topic \"ingest.raw\", but it has no subject (raw bytes); the topic's subject must \
             be \"sensor.reading\"",
        ]
    );
}

#[test]
fn a_topic_nobody_consumes_is_fine_but_external_topics_need_no_producer() {
    let text = SMALL.replace(
        "  - name: inferences\n",
        "  - name: commands\n    subject: action.requested\n    external: true\n  - name: inferences\n",
    );
    assert_eq!(validate(&text), Vec::<String>::new());
}

#[test]
fn inferencer_model_checks() {
    let text = "\
name: cfg
topics:
  - { name: events.sensor-reading, subject: sensor.reading, external: true }
  - { name: inferences, subject: inference.result }
processors:
  - name: inferencer
    kind: inferencer
    inputs: [events.sensor-reading]
    outputs: { inferences: inferences }
    config:
      models:
        sensor.reading: { path: models/reading-iforest, version: latest, threshold: 0.5 }
        device.status: { path: ' ' , version: '' }
      reload_interval: 0s
";
    assert_eq!(
        validate(text),
        [
            "processors[0] (inferencer).config.models.device.status: no input of this \
             inferencer carries \"device.status\" events (known: sensor.reading)",
            "processors[0] (inferencer).config.models.device.status.path: must not be empty; \
             leave the model out to use the statistical fallback",
            "processors[0] (inferencer).config.models.device.status.version: must be a version \
             folder name or `latest`",
            "processors[0] (inferencer).config.reload_interval: must be longer than 0",
        ]
    );
}

#[test]
fn router_and_executor_config_checks() {
    let text = "\
name: cfg
topics:
  - { name: inferences, subject: inference.result, external: true }
  - { name: actions.requested, subject: action.requested }
  - { name: actions.results, subject: action.result }
processors:
  - name: router
    kind: action-router
    inputs: [inferences]
    outputs: { requested: actions.requested }
    config:
      rules:
        - id: a
          match: inference.result
          when: score > 0.8
          action: { endpoint: hook }
          rate_limit: lots
          # Destructive without allow_destructive is valid: the router denies it.
          destructive: true
        - { id: a, match: device.status, when: ' ', action: { endpoint: hook } }
  - name: executor
    kind: executor
    inputs: [actions.requested]
    outputs: { results: actions.results }
    config:
      endpoints:
        - { name: hook, url: http://127.0.0.1:9000/x, secret_env: whsec_abc123 }
";
    assert_eq!(
        validate(text),
        [
            "processors[0] (router).config.rules[0] (a).rate_limit: \"lots\" is not \
             <count>/<s|m|h> (e.g. \"10/m\")",
            "processors[0] (router).config.rules[1] (a).id: duplicate rule id \"a\" (already \
             used by rules[0])",
            "processors[0] (router).config.rules[1] (a).when: must not be empty (e.g. `score > \
             0.8`)",
            "processors[0] (router).config.rules[1] (a).match: no input of this router carries \
             \"device.status\" events (known: inference.result)",
            "processors[1] (executor).config.endpoints[0] (hook).url: host \"127.0.0.1\" is a \
             loopback or private address, which is refused unless `allow_private: true`",
            "processors[1] (executor).config.endpoints[0] (hook).secret_env: this looks like \
             the secret itself; put the secret in an environment variable and name that \
             variable here (e.g. SLUICE_OPS_WEBHOOK_SECRET)",
        ]
    );
}

/// A router reading inferences and device statuses, with `RULES` for rules.
const ROUTER: &str = "\
name: rules
topics:
  - { name: inferences, subject: inference.result, external: true }
  - { name: statuses, subject: device.status, external: true }
  - { name: actions.requested, subject: action.requested, external: true }
processors:
  - name: router
    kind: action-router
    inputs: [inferences, statuses]
    outputs: { requested: actions.requested }
    config:
      rules:
RULES";

fn router_with(rules: &[(&str, &str)]) -> String {
    let rules: String = rules
        .iter()
        .enumerate()
        .map(|(k, (match_type, when))| {
            format!(
                "        - {{ id: r{k}, match: {match_type}, when: '{when}', action: {{ endpoint: hook }} }}\n"
            )
        })
        .collect();
    ROUTER.replace("RULES", &rules)
}

#[test]
fn rule_predicates_are_parsed_and_type_checked() {
    let text = router_with(&[
        ("inference.result", "label == \"anomaly\" and score > 0.8"),
        ("inference.result", "score > 0.8 and"),
        ("inference.result", "score > \"high\""),
        ("inference.result", "scroe > 0.8"),
        ("device.status", "status == \"offline\""),
        ("device.status", "battery_pct < 10 or state =< \"offline\""),
        (
            "inference.result",
            "features[\"vibration_mm_s.z\"] > 5 and site in [\"p1\", 2]",
        ),
        ("inference.result", "score > 1 and 2"),
    ]);
    let topology = parse(&text).unwrap_or_else(|e| panic!("{:#?}", lines(&e)));
    let at = "processors[0] (router).config.rules";
    assert_eq!(
        lines(&topology.validate_with_schemas(&schemas())),
        [
            format!("{at}[1] (r1).when: expected an operand after \"and\" at column 16"),
            format!(
                "{at}[2] (r2).when: cannot compare score (a number) with \"high\" (a string) \
                 at column 7"
            ),
            format!(
                "{at}[3] (r3).when: unknown field \"scroe\"; did you mean \"score\"? at column 1"
            ),
            format!(
                "{at}[4] (r4).when: unknown field \"status\"; did you mean \"state\"? at column 1"
            ),
            format!(
                "{at}[5] (r5).when: unknown operator \"=<\"; did you mean \"<=\"? at column 27"
            ),
            format!(
                "{at}[6] (r6).when: site is a string, but the list holds 2 (a number) at \
                 column 53"
            ),
            format!(
                "{at}[7] (r7).when: \"and\" needs true or false, but 2 is a number at column 15"
            ),
        ]
    );

    // Without schemas, fields may be anything: only what the text alone shows is reported.
    assert_eq!(
        validate(&text),
        [
            format!("{at}[1] (r1).when: expected an operand after \"and\" at column 16"),
            format!(
                "{at}[5] (r5).when: unknown operator \"=<\"; did you mean \"<=\"? at column 27"
            ),
            format!(
                "{at}[6] (r6).when: the list mixes types: 2 is a number where the first item \
                 is a string at column 53"
            ),
            format!(
                "{at}[7] (r7).when: \"and\" needs true or false, but 2 is a number at column 15"
            ),
        ]
    );

    // A rule for an event type without a schema is parsed but its fields are not checked.
    let mut partial = schemas();
    partial.remove("device.status");
    let issues = lines(&topology.validate_with_schemas(&partial));
    assert!(issues.iter().all(|i| !i.contains("(r4)")), "{issues:#?}");
}

#[test]
fn rule_syntax_errors_are_reported_with_structural_mistakes() {
    let text = router_with(&[("inference.result", "(score > 0.8")]).replace(
        "    kind: action-router",
        "    kind: action-router\n    replica: 2",
    );
    assert_eq!(
        lines(&parse(&text).expect_err("structural mistake")),
        [
            "processors[0] (router): unknown field \"replica\" (did you mean \"replicas\"? \
             known: name, kind, inputs, outputs, dlq, replicas, config)",
            "processors[0] (router).config.rules[0] (r0).when: expected \")\" to close the \
             \"(\" at column 1, found the end of the rule at column 13",
        ]
    );
}

#[test]
fn structural_and_cross_reference_mistakes_together() {
    // An unknown kind hides that processor's config, but its ports still count: the topic it
    // writes is not reported as unproduced.
    let text = SMALL.replace("kind: outbox-relay", "kind: outbox-relayer");
    let issues = lines(&parse(&text).expect_err("unknown kind"));
    assert_eq!(issues.len(), 1, "{issues:#?}");
    assert!(issues[0].starts_with("processors[0] (relay).kind: unknown kind \"outbox-relayer\" (did you mean \"outbox-relay\"?"));

    // A misspelt `outputs` makes every topic's producer unknown, so "no producer" is not
    // claimed for topics that may well have one.
    let text = SMALL.replace(
        "    outputs:\n      sensor.reading",
        "    output:\n      sensor.reading",
    );
    let issues = lines(&parse(&text).expect_err("unknown field"));
    assert_eq!(issues.len(), 1, "{issues:#?}");
    assert!(
        issues[0].starts_with(
            "processors[0] (relay): unknown field \"output\" (did you mean \"outputs\"?"
        )
    );
}

#[test]
fn serialized_topology_parses_back_the_same() {
    let topology = load(Path::new(DEFAULT)).expect("default loads");
    let yaml = serde_yaml_ng::to_string(&topology).expect("serializes");
    let again: Topology = parse(&yaml).unwrap_or_else(|e| panic!("{:#?}\n{yaml}", lines(&e)));
    assert_eq!(again, topology);
}

#[test]
fn edge_config_checks() {
    let text = "\
name: edge
topics:
  - { name: ingest.raw }
processors:
  - name: bridge
    kind: mqtt-bridge
    outputs: { raw: ingest.raw }
    config:
      broker: mqtt://127.0.0.1:1883
      password_env: MQTT_PASSWORD
      tls_ca: /etc/ca.pem
      max_batch: 0
  - name: http
    kind: http-ingest
    outputs: { raw: ingest.raw }
    config:
      max_event_bytes: 0
      persist_timeout: 0s
";
    assert_eq!(
        validate(text),
        [
            "processors[0] (bridge).config.max_batch: must be at least 1",
            "processors[0] (bridge).config.password_env: a password needs a username; set \
             username too",
            "processors[0] (bridge).config.broker: TLS files are set but the broker URL is not \
             mqtts://",
            "processors[1] (http).config.max_event_bytes: must be at least 1",
            "processors[1] (http).config.persist_timeout: must be longer than 0",
        ]
    );
}
