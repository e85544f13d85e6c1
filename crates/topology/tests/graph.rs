//! Rendering the default topology as Mermaid and DOT.

use std::collections::BTreeSet;
use std::path::Path;

use sluice_topology::{Topology, load};

const DEFAULT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../topologies/default.yaml");

fn default_topology() -> Topology {
    load(Path::new(DEFAULT)).unwrap_or_else(|e| panic!("default.yaml does not load: {e:?}"))
}

fn is_identifier(id: &str) -> bool {
    let mut chars = id.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[test]
fn mermaid_shows_every_node_and_the_pipeline_edges() {
    let t = default_topology();
    let m = t.to_mermaid();
    let lines: Vec<&str> = m.lines().map(str::trim).collect();
    assert_eq!(lines[0], "flowchart LR");

    for topic in &t.topics {
        let id = format!("t_{}", topic.name.replace(['.', '-'], "_"));
        assert!(
            lines.contains(&format!("{id}([\"{}\"])", topic.name).as_str()),
            "no node for topic {}:\n{m}",
            topic.name
        );
    }
    for p in &t.processors {
        let id = format!("p_{}", p.name.replace(['.', '-'], "_"));
        assert!(
            lines.contains(&format!("{id}[\"{}\"]", p.name).as_str()),
            "no node for processor {}:\n{m}",
            p.name
        );
    }
    for node in [
        "x_mqtt_broker{{\"MQTT broker\"}}",
        "x_http_clients{{\"HTTP clients\"}}",
        "x_event_store[(\"event store + outbox\")]",
        "x_projections[(\"projections\")]",
        "x_webhooks{{\"webhooks\"}}",
        "x_dlq[(\"DLQ table\")]",
    ] {
        assert!(lines.contains(&node), "missing {node}:\n{m}");
    }

    for edge in [
        "x_mqtt_broker --> p_mqtt_bridge",
        "x_http_clients --> p_http_ingest",
        "p_mqtt_bridge -->|\"raw\"| t_ingest_raw",
        "p_http_ingest -->|\"raw\"| t_ingest_raw",
        "t_ingest_raw --> p_ingest_validator",
        "p_ingest_validator --> x_event_store",
        "x_event_store --> p_outbox_relay",
        "p_outbox_relay -->|\"sensor.reading\"| t_events_sensor_reading",
        "p_outbox_relay -->|\"device.status\"| t_events_device_status",
        "t_events_sensor_reading --> p_inferencer",
        // The port has the topic's name, so no label.
        "p_inferencer --> t_inferences",
        "t_inferences --> p_action_router",
        "p_action_router -->|\"requested\"| t_actions_requested",
        "t_actions_requested --> p_executor",
        "p_executor --> x_webhooks",
        "p_executor -->|\"results\"| t_actions_results",
        "t_actions_results --> p_projector",
        "p_projector --> x_projections",
        "p_ingest_validator -.-> x_dlq",
        "p_executor -.-> x_dlq",
    ] {
        assert!(lines.contains(&edge), "missing edge {edge}:\n{m}");
    }
    // http-ingest answers rejects to the client, so it has no DLQ edge.
    assert!(!m.contains("p_http_ingest -.-> x_dlq"), "{m}");
}

#[test]
fn dot_shows_every_node_and_is_balanced() {
    let t = default_topology();
    let d = t.to_dot();
    assert!(d.starts_with("digraph \"default\" {\n"), "{d}");
    assert!(d.ends_with("}\n"), "{d}");

    // Balanced braces and brackets, and an even number of unescaped quotes.
    let mut depth = 0i32;
    let mut brackets = 0i32;
    let mut quotes = 0;
    let mut escaped = false;
    let mut in_string = false;
    for c in d.chars() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    in_string = false;
                    quotes += 1;
                }
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                quotes += 1;
            }
            '{' => depth += 1,
            '}' => depth -= 1,
            '[' => brackets += 1,
            ']' => brackets -= 1,
            _ => {}
        }
        assert!(depth >= 0 && brackets >= 0, "closes before it opens:\n{d}");
    }
    assert_eq!((depth, brackets, quotes % 2), (0, 0, 0), "{d}");

    // Every statement line ends with `;`, every node is declared once with a valid id, and
    // every edge joins declared nodes.
    let body: Vec<&str> = d
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| *l != "}")
        .collect();
    let mut declared = BTreeSet::new();
    let mut edges = Vec::new();
    for line in &body {
        assert!(line.ends_with(';'), "unterminated: {line}");
        if let Some((from, rest)) = line.split_once(" -> ") {
            let to = rest.split([' ', ';']).next().unwrap_or_default();
            edges.push((from.to_owned(), to.to_owned()));
        } else if let Some((id, _)) = line.split_once(" [label=") {
            assert!(is_identifier(id), "bad id {id}");
            assert!(declared.insert(id.to_owned()), "declared twice: {id}");
        }
    }
    for (from, to) in &edges {
        assert!(
            declared.contains(from) && declared.contains(to),
            "{from} -> {to}"
        );
    }

    for topic in &t.topics {
        assert!(
            d.contains(&format!("[label=\"{}\", shape=cds];", topic.name)),
            "no node for topic {}:\n{d}",
            topic.name
        );
    }
    for p in &t.processors {
        assert!(
            d.contains(&format!("[label=\"{}\", shape=box];", p.name)),
            "no node for processor {}:\n{d}",
            p.name
        );
    }
    for edge in [
        "x_mqtt_broker -> p_mqtt_bridge;",
        "p_mqtt_bridge -> t_ingest_raw [label=\"raw\"];",
        "t_ingest_raw -> p_ingest_validator;",
        "p_ingest_validator -> x_event_store;",
        "x_event_store -> p_outbox_relay;",
        "p_outbox_relay -> t_events_sensor_reading [label=\"sensor.reading\"];",
        "p_inferencer -> t_inferences;",
        "p_executor -> x_webhooks;",
        "p_projector -> x_projections;",
        "p_ingest_validator -> x_dlq [style=dotted];",
    ] {
        assert!(body.contains(&edge), "missing edge {edge}:\n{d}");
    }
}

#[test]
fn output_is_deterministic() {
    let a = default_topology();
    let b = default_topology();
    assert_eq!(a.to_mermaid(), b.to_mermaid());
    assert_eq!(a.to_dot(), b.to_dot());
}

#[test]
fn undeclared_topics_still_render() {
    let t = sluice_topology::parse(
        "name: partial\nprocessors:\n  - {name: p, kind: projector, inputs: [ghost.topic]}\n",
    )
    .expect("structurally fine");
    assert!(t.to_mermaid().contains("t_ghost_topic --> p_p"));
    assert!(t.to_dot().contains("t_ghost_topic -> p_p;"));
}
