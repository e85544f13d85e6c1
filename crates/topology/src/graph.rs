//! Drawing a topology as Mermaid or Graphviz.
//!
//! Both formats render one [`Graph`], so they always show the same nodes and edges. Besides
//! topics and processors it shows what lies outside the log (the MQTT broker, HTTP clients,
//! the event store and outbox, projections, webhooks, the DLQ table) so that the picture
//! reads like the pipeline in PRODUCT.md. Everything is emitted in file order, so the output
//! is stable and diffs well.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::{Kind, Topology};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Topic,
    Processor,
    /// Something Sluice stores data in.
    Store,
    /// Something outside Sluice that talks to it.
    Outside,
}

/// The nodes that are not topics or processors, in the order they are drawn.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fixed {
    Mqtt,
    Http,
    Store,
    Projections,
    Webhooks,
    Dlq,
}

impl Fixed {
    const ALL: [Fixed; 6] = [
        Fixed::Mqtt,
        Fixed::Http,
        Fixed::Store,
        Fixed::Projections,
        Fixed::Webhooks,
        Fixed::Dlq,
    ];

    fn id(self) -> &'static str {
        match self {
            Fixed::Mqtt => "x_mqtt_broker",
            Fixed::Http => "x_http_clients",
            Fixed::Store => "x_event_store",
            Fixed::Projections => "x_projections",
            Fixed::Webhooks => "x_webhooks",
            Fixed::Dlq => "x_dlq",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Fixed::Mqtt => "MQTT broker",
            Fixed::Http => "HTTP clients",
            Fixed::Store => "event store + outbox",
            Fixed::Projections => "projections",
            Fixed::Webhooks => "webhooks",
            Fixed::Dlq => "DLQ table",
        }
    }

    fn shape(self) -> Shape {
        match self {
            Fixed::Mqtt | Fixed::Http | Fixed::Webhooks => Shape::Outside,
            Fixed::Store | Fixed::Projections | Fixed::Dlq => Shape::Store,
        }
    }
}

struct Node {
    id: String,
    label: String,
    shape: Shape,
}

struct Edge {
    from: String,
    to: String,
    label: Option<String>,
    dotted: bool,
}

impl Edge {
    fn plain(from: String, to: String, dotted: bool) -> Edge {
        Edge {
            from,
            to,
            label: None,
            dotted,
        }
    }
}

struct Graph {
    nodes: Vec<Node>,
    edges: Vec<Edge>,
}

/// `prefix` + the name with everything but ASCII letters, digits and `_` replaced by `_`,
/// made unique among `used` (so `a.b` and `a-b` stay two nodes).
fn node_id(prefix: &str, name: &str, used: &mut BTreeSet<String>) -> String {
    let base: String = std::iter::once(prefix.to_owned())
        .chain(name.chars().map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c.to_string()
            } else {
                "_".to_owned()
            }
        }))
        .collect();
    let mut id = base.clone();
    let mut n = 2;
    while used.contains(&id) {
        id = format!("{base}_{n}");
        n += 1;
    }
    used.insert(id.clone());
    id
}

impl Graph {
    fn of(t: &Topology) -> Graph {
        // Fixed ids start with `x_`; reserving them keeps topic and processor ids apart.
        let mut used: BTreeSet<String> = Fixed::ALL.iter().map(|f| f.id().to_owned()).collect();

        // Declared topics in file order, then any that are only referenced, sorted.
        let mut topic_names: Vec<&str> = Vec::new();
        for topic in &t.topics {
            if !topic_names.contains(&topic.name.as_str()) {
                topic_names.push(&topic.name);
            }
        }
        let referenced: BTreeSet<&str> = t
            .processors
            .iter()
            .flat_map(|p| p.inputs.iter().chain(p.outputs.values()))
            .map(String::as_str)
            .filter(|n| !topic_names.contains(n))
            .collect();
        topic_names.extend(referenced);
        let topic_ids: BTreeMap<&str, String> = topic_names
            .iter()
            .map(|n| (*n, node_id("t_", n, &mut used)))
            .collect();
        let proc_ids: Vec<String> = t
            .processors
            .iter()
            .map(|p| node_id("p_", &p.name, &mut used))
            .collect();

        let mut edges = Vec::new();
        let mut fixed_used = BTreeSet::new();
        for (p, pid) in t.processors.iter().zip(&proc_ids) {
            let source = match p.kind {
                Kind::MqttBridge => Some(Fixed::Mqtt),
                Kind::HttpIngest => Some(Fixed::Http),
                Kind::OutboxRelay => Some(Fixed::Store),
                _ => None,
            };
            if let Some(f) = source {
                fixed_used.insert(f);
                edges.push(Edge::plain(f.id().to_owned(), pid.clone(), false));
            }
            for input in &p.inputs {
                if let Some(tid) = topic_ids.get(input.as_str()) {
                    edges.push(Edge::plain(tid.clone(), pid.clone(), false));
                }
            }
            for (port, topic) in &p.outputs {
                if let Some(tid) = topic_ids.get(topic.as_str()) {
                    edges.push(Edge {
                        from: pid.clone(),
                        to: tid.clone(),
                        label: (port != topic).then(|| port.clone()),
                        dotted: false,
                    });
                }
            }
            let sink = match p.kind {
                Kind::IngestValidator => Some(Fixed::Store),
                Kind::Projector => Some(Fixed::Projections),
                Kind::Executor => Some(Fixed::Webhooks),
                _ => None,
            };
            if let Some(f) = sink {
                fixed_used.insert(f);
                edges.push(Edge::plain(pid.clone(), f.id().to_owned(), false));
            }
            if p.dlq {
                fixed_used.insert(Fixed::Dlq);
                edges.push(Edge::plain(pid.clone(), Fixed::Dlq.id().to_owned(), true));
            }
        }

        let mut nodes: Vec<Node> = Vec::new();
        for f in Fixed::ALL.iter().filter(|f| fixed_used.contains(f)) {
            nodes.push(Node {
                id: f.id().to_owned(),
                label: f.label().to_owned(),
                shape: f.shape(),
            });
        }
        for name in &topic_names {
            if let Some(id) = topic_ids.get(name) {
                nodes.push(Node {
                    id: id.clone(),
                    label: (*name).to_owned(),
                    shape: Shape::Topic,
                });
            }
        }
        for (p, id) in t.processors.iter().zip(proc_ids) {
            let label = if p.name == p.kind.as_str() {
                p.name.clone()
            } else {
                format!("{} ({})", p.name, p.kind)
            };
            nodes.push(Node {
                id,
                label,
                shape: Shape::Processor,
            });
        }
        Graph { nodes, edges }
    }
}

/// Text safe inside a Mermaid `"..."` label: Mermaid reads `#name;` entity codes.
fn mermaid_label(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '#' => out.push_str("#35;"),
            '"' => out.push_str("#quot;"),
            '<' => out.push_str("#lt;"),
            '>' => out.push_str("#gt;"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Text safe inside a DOT `"..."` string.
fn dot_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

pub(crate) fn mermaid(t: &Topology) -> String {
    let g = Graph::of(t);
    let mut out = String::from("flowchart LR\n");
    // `%%` comments end at the line end, so a multi-line name cannot break out of them.
    let _ = writeln!(
        out,
        "    %% topology: {}",
        t.name.replace(['\n', '\r'], " ")
    );
    for n in &g.nodes {
        let label = mermaid_label(&n.label);
        let node = match n.shape {
            Shape::Topic => format!("{}([\"{label}\"])", n.id),
            Shape::Processor => format!("{}[\"{label}\"]", n.id),
            Shape::Store => format!("{}[(\"{label}\")]", n.id),
            Shape::Outside => format!("{}{{{{\"{label}\"}}}}", n.id),
        };
        let _ = writeln!(out, "    {node}");
    }
    for e in &g.edges {
        let arrow = if e.dotted { "-.->" } else { "-->" };
        match &e.label {
            Some(label) => {
                let _ = writeln!(
                    out,
                    "    {} {arrow}|\"{}\"| {}",
                    e.from,
                    mermaid_label(label),
                    e.to
                );
            }
            None => {
                let _ = writeln!(out, "    {} {arrow} {}", e.from, e.to);
            }
        }
    }
    out
}

pub(crate) fn dot(t: &Topology) -> String {
    let g = Graph::of(t);
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", dot_string(&t.name));
    out.push_str("    rankdir=LR;\n");
    out.push_str("    node [fontname=\"Helvetica\"];\n");
    for n in &g.nodes {
        let shape = match n.shape {
            Shape::Topic => "cds",
            Shape::Processor => "box",
            Shape::Store => "cylinder",
            Shape::Outside => "hexagon",
        };
        let _ = writeln!(
            out,
            "    {} [label=\"{}\", shape={shape}];",
            n.id,
            dot_string(&n.label)
        );
    }
    for e in &g.edges {
        let mut attrs = Vec::new();
        if let Some(label) = &e.label {
            attrs.push(format!("label=\"{}\"", dot_string(label)));
        }
        if e.dotted {
            attrs.push("style=dotted".to_owned());
        }
        if attrs.is_empty() {
            let _ = writeln!(out, "    {} -> {};", e.from, e.to);
        } else {
            let _ = writeln!(out, "    {} -> {} [{}];", e.from, e.to, attrs.join(", "));
        }
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_identifiers_and_unique() {
        let mut used = BTreeSet::new();
        assert_eq!(
            node_id("t_", "events.sensor-reading", &mut used),
            "t_events_sensor_reading"
        );
        assert_eq!(
            node_id("t_", "events-sensor.reading", &mut used),
            "t_events_sensor_reading_2"
        );
        assert_eq!(node_id("t_", "ä b", &mut used), "t___b");
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(
            mermaid_label("a \"b\" <c> #1"),
            "a #quot;b#quot; #lt;c#gt; #35;1"
        );
        assert_eq!(dot_string("a \"b\" \\ c\nd"), "a \\\"b\\\" \\\\ c\\nd");
    }

    #[test]
    fn odd_names_stay_inside_their_quotes() {
        let t = crate::parse(
            "name: \"weird \\\" name\"\ntopics:\n  - {name: a, subject: s, external: true}\nprocessors:\n  - {name: \"p\\\"q\", kind: projector, inputs: [a]}\n",
        )
        .expect("parses");
        let dot = t.to_dot();
        assert!(dot.starts_with("digraph \"weird \\\" name\" {\n"), "{dot}");
        assert!(
            dot.contains("p_p_q [label=\"p\\\"q (projector)\", shape=box];"),
            "{dot}"
        );
        let mermaid = t.to_mermaid();
        assert!(
            mermaid.contains("p_p_q[\"p#quot;q (projector)\"]"),
            "{mermaid}"
        );
    }
}
