//! Every version of every schema in the repo's `schemas/` carries any valid event through the
//! wire format unchanged: envelope → Avro → Confluent frame → Avro → envelope. The encoder
//! writes Avro directly; what it writes reads back as the same Avro value as apache-avro's own
//! writer gives.

use std::path::PathBuf;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use chrono::DateTime;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value as Json};
use sluice_core::{Event, EventType, Metadata, Source, TraceContext};
use sluice_schemas::codec::event_to_avro;
use sluice_schemas::{EventCodec, Registry, SchemaDir, wire};
use uuid::Uuid;

fn repo_schemas() -> SchemaDir {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas"));
    SchemaDir::load(&root).unwrap_or_else(|p| panic!("repo schemas do not load: {p:?}"))
}

/// Values of the JSON shape `schema` describes (payloads as devices send them).
fn json_for(schema: &Schema) -> BoxedStrategy<Json> {
    match schema {
        Schema::Null => Just(Json::Null).boxed(),
        Schema::Boolean => any::<bool>().prop_map(Json::from).boxed(),
        Schema::Int => any::<i32>().prop_map(Json::from).boxed(),
        Schema::Long => any::<i64>().prop_map(Json::from).boxed(),
        Schema::Double => any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Json::from)
            .boxed(),
        Schema::String => "\\PC{0,24}".prop_map(Json::from).boxed(),
        Schema::Uuid(_) => any::<u128>()
            .prop_map(|u| Json::from(Uuid::from_u128(u).to_string()))
            .boxed(),
        Schema::Enum(e) => proptest::sample::select(e.symbols.clone())
            .prop_map(Json::from)
            .boxed(),
        Schema::Map(m) => proptest::collection::btree_map("[a-z_]{1,12}", json_for(&m.types), 0..4)
            .prop_map(|m| Json::Object(m.into_iter().collect()))
            .boxed(),
        Schema::Array(a) => proptest::collection::vec(json_for(&a.items), 0..4)
            .prop_map(Json::Array)
            .boxed(),
        Schema::Union(u) => {
            let branches: Vec<_> = u.variants().iter().map(json_for).collect();
            proptest::strategy::Union::new(branches).boxed()
        }
        Schema::Record(r) => {
            let fields: Vec<_> = r
                .fields
                .iter()
                .map(|f| (Just(f.name.clone()), json_for(&f.schema)))
                .collect();
            fields
                .prop_map(|pairs| Json::Object(pairs.into_iter().collect::<Map<_, _>>()))
                .boxed()
        }
        other => panic!("no generator for {other:?}: extend the test with the new type"),
    }
}

fn payload_schema(event_schema: &Schema) -> Schema {
    let Schema::Record(r) = event_schema else {
        panic!("event schema is not a record")
    };
    r.fields
        .iter()
        .find(|f| f.name == "payload")
        .map(|f| f.schema.clone())
        .expect("payload field")
}

fn event_for(subject: &str, payload: BoxedStrategy<Json>) -> impl Strategy<Value = Event> {
    let subject = subject.to_owned();
    let source = prop_oneof![
        Just(Source::Mqtt),
        Just(Source::Http),
        Just(Source::Simulator),
        Just(Source::Replay),
        "[a-z-]{1,16}".prop_map(Source::Processor),
    ];
    let micros = -62_135_596_800_000_000i64..253_402_300_799_000_000;
    (
        any::<u128>(),
        "[a-zA-Z0-9:_-]{1,64}",
        micros.clone(),
        micros,
        payload,
        source,
        proptest::option::of((
            "[0-9a-f]{31}[1-9a-f]",
            proptest::option::of("[a-z]{1,8}=[a-z0-9]{1,8}"),
        )),
        proptest::option::of(1u32..1000),
        proptest::option::of(any::<u128>()),
    )
        .prop_map(
            move |(id, aggregate, occurred, ingested, payload, source, trace, version, cause)| {
                Event {
                    event_id: Uuid::from_u128(id),
                    event_type: EventType::new(subject.clone()).unwrap(),
                    aggregate_id: aggregate,
                    occurred_at: DateTime::from_timestamp_micros(occurred).unwrap(),
                    ingested_at: DateTime::from_timestamp_micros(ingested).unwrap(),
                    payload,
                    metadata: Metadata {
                        source,
                        trace: trace.map(|(t, state)| {
                            TraceContext::new(format!("00-{t}-00f067aa0ba902b7-01"), state).unwrap()
                        }),
                        schema_version: version,
                        causation_id: cause.map(Uuid::from_u128),
                        replay: None,
                    },
                }
            },
        )
}

#[test]
fn every_schema_version_round_trips_events_through_the_wire_format() {
    let dir = repo_schemas();
    let registry = Registry::in_memory();
    let mut checked = 0;
    for subject in dir.subjects() {
        for version in &subject.versions {
            // Register each version under its own subject so its id is known; the codec then
            // decodes by the id in the frame, as a consumer would.
            let key = format!("{}-v{}", subject.name, version.version);
            let id = registry.register(&key, &version.text).unwrap().id;
            let codec = EventCodec::new(&registry);
            let strategy = event_for(&subject.name, json_for(&payload_schema(&version.schema)));
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let mut runner = TestRunner::new(Config {
                cases: 128,
                ..Config::default()
            });
            runner
                .run(&strategy, |event| {
                    let body = sluice_schemas::encode_body(&event, &version.schema)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let framed = wire::frame(id, &body);
                    let decoded = rt
                        .block_on(codec.decode(&framed))
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(&decoded, &event, "{} v{}", subject.name, version.version);
                    let generic = GenericDatumWriter::builder(&version.schema)
                        .build()
                        .and_then(|w| {
                            w.write_value_to_vec(
                                event_to_avro(&event, &version.schema).expect("converts"),
                            )
                        })
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let read = |mut bytes: &[u8]| {
                        GenericDatumReader::builder(&version.schema)
                            .build()
                            .and_then(|r| r.read_value(&mut bytes))
                            .map_err(|e| TestCaseError::fail(e.to_string()))
                    };
                    prop_assert_eq!(read(&body)?, read(&generic)?);
                    Ok(())
                })
                .unwrap_or_else(|e| panic!("{} v{}: {e}", subject.name, version.version));
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} schema versions were checked");
}

#[test]
fn a_payload_that_breaks_its_schema_is_refused_with_the_path() {
    let dir = repo_schemas();
    let schema = &dir.subject("sensor.reading").unwrap().versions[0].schema;
    let mut event = Event::new(
        EventType::new("sensor.reading").unwrap(),
        "dev-1",
        chrono::Utc::now(),
        serde_json::json!({"temperature_c": "hot"}),
        Source::Http,
    )
    .unwrap();
    let err = sluice_schemas::encode_body(&event, schema)
        .unwrap_err()
        .to_string();
    assert!(err.contains("$.payload.temperature_c"), "{err}");

    event.payload = serde_json::json!({"temperature_c": 20.0, "colour": "red"});
    let err = sluice_schemas::encode_body(&event, schema)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("$.payload.colour") && err.contains("unknown field"),
        "{err}"
    );

    event.payload = serde_json::json!({"extra": {"rpm": "fast"}});
    let err = sluice_schemas::encode_body(&event, schema)
        .unwrap_err()
        .to_string();
    assert!(err.contains("$.payload.extra.rpm"), "{err}");
}

#[test]
fn missing_optional_fields_take_their_defaults() {
    let dir = repo_schemas();
    let schema = &dir.subject("sensor.reading").unwrap().versions[0].schema;
    let event = Event::new(
        EventType::new("sensor.reading").unwrap(),
        "dev-1",
        chrono::Utc::now(),
        serde_json::json!({"temperature_c": 20.5}),
        Source::Mqtt,
    )
    .unwrap();
    let body = sluice_schemas::encode_body(&event, schema).unwrap();
    let decoded = sluice_schemas::decode_body(&body, schema).unwrap();
    assert_eq!(decoded.payload["temperature_c"], 20.5);
    assert_eq!(decoded.payload["humidity_pct"], Json::Null);
    assert_eq!(decoded.payload["extra"], serde_json::json!({}));
}

#[test]
fn a_required_field_missing_is_refused() {
    let dir = repo_schemas();
    let schema = &dir.subject("device.status").unwrap().versions[0].schema;
    let event = Event::new(
        EventType::new("device.status").unwrap(),
        "dev-1",
        chrono::Utc::now(),
        serde_json::json!({"battery_pct": 50.0}),
        Source::Mqtt,
    )
    .unwrap();
    let err = sluice_schemas::encode_body(&event, schema)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("$.payload.state") && err.contains("required"),
        "{err}"
    );
}

#[test]
fn bytes_that_are_not_framed_are_refused() {
    let registry = Registry::in_memory();
    let codec = EventCodec::new(&registry);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let err = rt
        .block_on(codec.decode(b"{\"a\":1}"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("magic byte"), "{err}");
    let err = rt
        .block_on(codec.decode(&wire::frame(77, &[1, 2])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("schema 77 not found"), "{err}");
}
