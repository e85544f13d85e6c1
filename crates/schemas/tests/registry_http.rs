//! Sluice's registry over HTTP, spoken to by clients Sluice did not write:
//! `schema_registry_converter` (the Rust Kafka ecosystem's Confluent client) and plain HTTP.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::{SrSettings, post_schema};
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use serde_json::{Value as Json, json};
use sluice_core::{Event, EventType, Source};
use sluice_schemas::codec::{avro_to_event, event_to_avro};
use sluice_schemas::{EventCodec, HttpRegistry, Registry, SchemaDir, SchemaSource, wire};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

struct Server {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(registry: Arc<Registry>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(sluice_schemas::http::serve(registry, listener, async {
            let _ = stopped.await;
        }));
        Self {
            url,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

fn repo_schemas() -> SchemaDir {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas"));
    SchemaDir::load(&root).unwrap()
}

fn seeded(dir: &Path) -> Arc<Registry> {
    let registry = Registry::open(dir).unwrap();
    registry.register_dir(&repo_schemas()).unwrap();
    Arc::new(registry)
}

fn status_event() -> Event {
    let mut e = Event::new(
        EventType::new("device.status").unwrap(),
        "dev-42",
        chrono::Utc::now(),
        json!({"state": "degraded", "reason": "low battery", "battery_pct": 7.5, "rssi_dbm": -81, "firmware": null}),
        Source::Mqtt,
    )
    .unwrap();
    e.metadata.schema_version = Some(1);
    e
}

fn fields(value: Value) -> Vec<(String, Value)> {
    match value {
        Value::Record(f) => f,
        other => panic!("not a record: {other:?}"),
    }
}

#[tokio::test]
async fn schema_registry_converter_encodes_and_decodes_against_sluice() {
    let data = tempfile::tempdir().unwrap();
    let registry = seeded(data.path());
    let server = Server::start(registry.clone()).await;
    let settings = SrSettings::new(server.url.clone());
    let event = status_event();
    let schema = repo_schemas().subject("device.status").unwrap().versions[0]
        .schema
        .clone();

    // The converter encodes with the latest version it fetches from Sluice...
    let encoder = AvroEncoder::new(settings.clone());
    let owned = fields(event_to_avro(&event, &schema).unwrap());
    let values: Vec<(&str, Value)> = owned.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let bytes = encoder
        .encode(
            values,
            SubjectNameStrategy::RecordNameStrategy("device.status".into()),
        )
        .await
        .unwrap();
    let expected_id = registry
        .version("device.status", sluice_schemas::VersionRef::Latest)
        .unwrap()
        .id;
    assert_eq!(wire::unframe(&bytes).unwrap().0, expected_id);

    // ...and Sluice's codec, reading schemas over HTTP, decodes it.
    let codec = EventCodec::new(HttpRegistry::new(&server.url).unwrap());
    assert_eq!(codec.decode(&bytes).await.unwrap(), event);

    // The other way: Sluice encodes, the converter decodes.
    let (ours, version) = codec.encode(&event).await.unwrap();
    assert_eq!(version, 1);
    let decoded = AvroDecoder::new(settings)
        .decode(Some(&ours))
        .await
        .unwrap();
    assert_eq!(avro_to_event(decoded.value).unwrap(), event);

    server.stop().await;
}

#[tokio::test]
async fn an_incompatible_registration_gets_409_from_the_converter() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(seeded(data.path())).await;
    let settings = SrSettings::new(server.url.clone());

    // device.status v2 that adds a required field without a default breaks BACKWARD.
    let v2 = |site: Json| {
        let mut schema: Json = serde_json::from_str(
            &repo_schemas().subject("device.status").unwrap().versions[0].text,
        )
        .unwrap();
        let payload = schema["fields"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|f| f["name"] == "payload")
            .unwrap();
        payload["type"]["fields"].as_array_mut().unwrap().push(site);
        SuppliedSchema::new(None, SchemaType::Avro, schema.to_string())
    };
    let err = post_schema(
        &settings,
        "device.status".into(),
        v2(json!({"name": "site", "type": "string"})),
    )
    .await
    .unwrap_err();
    assert!(err.error.contains("409"), "{err:?}");
    let cause = err.cause.unwrap_or_default();
    assert!(
        cause.contains("site"),
        "the reason names the field: {cause}"
    );

    // With a default it is accepted as version 2 under a new id.
    let registered = post_schema(
        &settings,
        "device.status".into(),
        v2(json!({"name": "site", "type": ["null", "string"], "default": null})),
    )
    .await
    .unwrap();
    let client = HttpRegistry::new(&server.url).unwrap();
    let latest = client.latest("device.status").await.unwrap();
    assert_eq!((latest.version, latest.id), (2, registered.id));
    server.stop().await;
}

#[tokio::test]
async fn ids_survive_a_restart_and_are_never_reused() {
    let data = tempfile::tempdir().unwrap();
    let registry = seeded(data.path());
    let before: Vec<_> = registry
        .subjects()
        .iter()
        .map(|s| {
            registry
                .version(s, sluice_schemas::VersionRef::Latest)
                .unwrap()
        })
        .collect();
    let event = status_event();
    let bytes = EventCodec::new(registry.clone())
        .encode(&event)
        .await
        .unwrap()
        .0;
    drop(registry);

    let reopened = Arc::new(Registry::open(data.path()).unwrap());
    let after: Vec<_> = reopened
        .subjects()
        .iter()
        .map(|s| {
            reopened
                .version(s, sluice_schemas::VersionRef::Latest)
                .unwrap()
        })
        .collect();
    assert_eq!(before, after);
    // Seeding again finds every version instead of adding it.
    assert_eq!(reopened.register_dir(&repo_schemas()).unwrap(), 0);
    // Bytes written before the restart decode after it, over HTTP.
    let server = Server::start(reopened.clone()).await;
    let decoded = AvroDecoder::new(SrSettings::new(server.url.clone()))
        .decode(Some(&bytes))
        .await
        .unwrap();
    assert_eq!(avro_to_event(decoded.value).unwrap(), event);
    // A new schema gets an id above every earlier one.
    let max = after.iter().map(|v| v.id).max().unwrap();
    let new = reopened
        .register("other.thing", r#"{"type":"record","name":"T","fields":[]}"#)
        .unwrap();
    assert!(new.id > max);
    server.stop().await;
}

#[tokio::test]
async fn errors_have_the_confluent_shape() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(seeded(data.path())).await;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{}{path}", server.url)).send();
    let post = |path: &str, body: Json| {
        http.post(format!("{}{path}", server.url))
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .body(body.to_string())
            .send()
    };
    let answer = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        (status, r.json::<Json>().await.unwrap())
    };

    let (s, b) = answer(get("/subjects/nope/versions/latest").await.unwrap()).await;
    assert_eq!((s, b["error_code"].as_u64()), (404, Some(40401)), "{b}");
    let (s, b) = answer(get("/subjects/device.status/versions/9").await.unwrap()).await;
    assert_eq!((s, b["error_code"].as_u64()), (404, Some(40402)), "{b}");
    let (s, b) = answer(get("/schemas/ids/999").await.unwrap()).await;
    assert_eq!((s, b["error_code"].as_u64()), (404, Some(40403)), "{b}");
    let (s, b) = answer(get("/subjects/device.status/versions/zero").await.unwrap()).await;
    assert_eq!((s, b["error_code"].as_u64()), (422, Some(42202)), "{b}");
    let (s, b) = answer(
        post(
            "/subjects/x.y/versions",
            json!({"schema": "{\"type\": \"recrd\"}"}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!((s, b["error_code"].as_u64()), (422, Some(42201)), "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("invalid schema"),
        "{b}"
    );

    let (s, b) = answer(get("/subjects").await.unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(b.as_array().unwrap().len(), 5, "{b}");
    let (_, b) = answer(get("/subjects/sensor.reading/versions").await.unwrap()).await;
    assert_eq!(b, json!([1, 2]));

    // Lookup of a registered schema, and the compatibility check.
    let text = repo_schemas().subject("sensor.reading").unwrap().versions[0]
        .text
        .clone();
    let (s, b) = answer(
        post("/subjects/sensor.reading", json!({"schema": text}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, b["version"].as_u64()), (200, Some(1)), "{b}");
    let (s, b) = answer(
        post(
            "/compatibility/subjects/sensor.reading/versions/latest",
            json!({"schema": r#"{"type":"record","name":"io.sluice.events.SensorReading","fields":[{"name":"x","type":"int"}]}"#}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!((s, b["is_compatible"].as_bool()), (200, Some(false)), "{b}");

    // Per-subject compatibility.
    let r = http
        .put(format!("{}/config/sensor.reading", server.url))
        .header("content-type", "application/json")
        .body(r#"{"compatibility":"FULL_TRANSITIVE"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (_, b) = answer(get("/config/sensor.reading").await.unwrap()).await;
    assert_eq!(b["compatibilityLevel"], "FULL_TRANSITIVE");
    let (_, b) = answer(get("/config").await.unwrap()).await;
    assert_eq!(b["compatibilityLevel"], "BACKWARD");
    server.stop().await;
}
