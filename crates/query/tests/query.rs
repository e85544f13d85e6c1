//! The SQL endpoint as clients see it: HTTP and the Postgres wire protocol (`psql` and sqlx as
//! the clients), hot tables that follow the events stream and agree with the store, answers
//! that do not depend on time zones, and a corpus of hostile statements.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use sluice_core::{Event, EventType, Source};
use sluice_log::{EmbeddedLog, EmbeddedOptions, Log, Producer, Record, TopicSpec};
use sluice_query::follow::FollowStats;
use sluice_query::{Limits, Settings};
use sluice_schemas::{EventCodec, Registry, SchemaDir};
use sluice_store::testing::{TestDatabase, on_each_backend, until};
use sluice_store::{ProjectionBatch, Role, Store, StoreOptions};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);
const READINGS: &str = "events.sensor-reading";
const STATUS: &str = "events.device-status";

struct Rig {
    _dir: tempfile::TempDir,
    log: EmbeddedLog,
    store: Store,
    codec: Arc<EventCodec<Arc<Registry>>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    projector: Arc<sluice_projector::Stats>,
    query: Arc<FollowStats>,
    http: Option<SocketAddr>,
    pg: Option<SocketAddr>,
    key: String,
    client: reqwest::Client,
}

async fn rig(url: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedOptions::default()).unwrap();
    for topic in [READINGS, STATUS] {
        log.create_topic(&TopicSpec::new(topic, 3)).await.unwrap();
    }
    let store = Store::connect(url, StoreOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    let registry = Arc::new(Registry::in_memory());
    let schemas = SchemaDir::load(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../schemas"
    )))
    .unwrap();
    registry.register_dir(&schemas).unwrap();
    let (_, key) = store
        .create_api_key(Role::Viewer, Some("test"))
        .await
        .unwrap();
    let mut rig = Rig {
        _dir: dir,
        log,
        store,
        codec: Arc::new(EventCodec::new(registry)),
        stop: CancellationToken::new(),
        tasks: Vec::new(),
        projector: Arc::default(),
        query: Arc::default(),
        http: None,
        pg: None,
        key,
        client: reqwest::Client::new(),
    };
    rig.start_projector();
    rig
}

fn reading(device: &str, at: DateTime<Utc>, temperature: f64) -> Event {
    Event::new(
        EventType::new(EventType::SENSOR_READING).unwrap(),
        device,
        at,
        json!({"temperature_c": temperature, "vibration_mm_s": temperature / 10.0}),
        Source::Mqtt,
    )
    .unwrap()
}

fn status(device: &str, at: DateTime<Utc>, state: &str) -> Event {
    Event::new(
        EventType::new(EventType::DEVICE_STATUS).unwrap(),
        device,
        at,
        json!({"state": state, "reason": "test"}),
        Source::Mqtt,
    )
    .unwrap()
}

impl Rig {
    fn start_projector(&mut self) {
        let settings = sluice_projector::Settings::new("projector", &[READINGS, STATUS]);
        let (log, store, codec, stats, stop) = (
            self.log.clone(),
            self.store.clone(),
            self.codec.clone(),
            self.projector.clone(),
            self.stop.clone(),
        );
        self.tasks.push(tokio::spawn(async move {
            sluice_projector::run(&settings, &log, &store, &codec, &stats, stop)
                .await
                .unwrap();
        }));
    }

    async fn start_query(&mut self, limits: Limits) {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pg = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.http = Some(http.local_addr().unwrap());
        self.pg = Some(pg.local_addr().unwrap());
        let mut settings = Settings::new("projector", &[READINGS.into(), STATUS.into()]);
        settings.limits = limits;
        // Keep everything the tests write, whatever its device time.
        settings.hot_window = Duration::from_secs(30 * 24 * 3600);
        settings.version_poll = Duration::from_millis(100);
        let (log, store, codec, stats, stop) = (
            self.log.clone(),
            self.store.clone(),
            self.codec.clone(),
            self.query.clone(),
            self.stop.clone(),
        );
        self.tasks.push(tokio::spawn(async move {
            sluice_query::serve(
                &settings,
                &log,
                store,
                codec,
                Some(http),
                Some(pg),
                &stats,
                stop,
            )
            .await
            .unwrap();
        }));
    }

    async fn publish(&self, topic: &str, events: &[Event]) {
        let mut records = Vec::new();
        for e in events {
            let (value, _) = self.codec.encode(e).await.unwrap();
            records.push(Record {
                key: Some(e.aggregate_id.as_bytes().to_vec()),
                value,
                ..Record::default()
            });
        }
        self.log
            .producer()
            .unwrap()
            .send(topic, records)
            .await
            .unwrap();
    }

    /// POST /v1/query as JSON: status and body.
    async fn sql(&self, sql: &str) -> (u16, Value) {
        let r = self
            .client
            .post(format!("http://{}/v1/query", self.http.unwrap()))
            .bearer_auth(&self.key)
            .json(&json!({ "sql": sql }))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    /// The rows of a query that must succeed.
    async fn rows(&self, sql: &str) -> Vec<Value> {
        let (status, body) = self.sql(sql).await;
        assert_eq!(status, 200, "{sql}: {body}");
        body["rows"].as_array().unwrap().clone()
    }

    async fn count(&self, sql: &str) -> i64 {
        let rows = self.rows(sql).await;
        rows[0]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_i64()
            .unwrap()
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        self.store.close().await;
    }
}

/// Readings of `devices` over two hours with repeats, out-of-order and late ones.
fn stream(devices: usize, n: usize, base: DateTime<Utc>, salt: u64) -> Vec<Event> {
    let mut events = Vec::new();
    for i in 0..n {
        let minute = ((i as u64 * 7919 + salt) % 120) as i64;
        let at = base + TimeDelta::minutes(minute) + TimeDelta::seconds((i % 60) as i64);
        events.push(reading(
            &format!("dev-{}", i % devices),
            at,
            ((i as u64 * 31 + salt) % 400) as f64 / 10.0,
        ));
    }
    // Repeats, as a redelivery would send them.
    let repeats: Vec<Event> = events.iter().step_by(9).cloned().collect();
    events.extend(repeats);
    events
}

/// Every rollup column the hot and the store tables share, sums rounded.
fn rollup_sql(table: &str) -> String {
    let mut columns = vec!["device_id".to_owned(), "bucket".to_owned()];
    for m in sluice_query::hot::METRICS {
        for stat in ["count", "min", "max", "last", "last_at"] {
            columns.push(format!("{m}_{stat}"));
        }
        columns.push(format!("round({m}_sum, 6) AS {m}_sum"));
    }
    format!(
        "SELECT {} FROM {table} ORDER BY device_id, bucket",
        columns.join(", ")
    )
}
const LATEST_SQL: &str = "SELECT device_id, last_seen, reading_at, status, late_readings FROM {t} \
     ORDER BY device_id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_tables_follow_the_stream_and_agree_with_the_store() {
    on_each_backend(|url| async move {
        let mut rig = rig(&url).await;
        let base = Utc::now() - TimeDelta::hours(3);
        // Before the service starts: in the store only, loaded from its snapshot.
        let first = stream(5, 300, base, 1);
        rig.publish(READINGS, &first).await;
        rig.publish(STATUS, &[status("dev-1", base, "online")])
            .await;
        let store = rig.store.clone();
        until("the first readings projected", DEADLINE, async || {
            store.readings_count(1).await.unwrap() == 300
        })
        .await;
        rig.start_query(Limits::default()).await;
        assert_eq!(rig.count("SELECT count(*) FROM readings").await, 300);

        // While it runs: new readings, repeats of old ones, late ones, a newer status.
        let mut second = stream(7, 400, base, 2);
        second.extend(first.iter().take(50).cloned());
        rig.publish(READINGS, &second).await;
        rig.publish(
            STATUS,
            &[status("dev-1", base + TimeDelta::hours(1), "offline")],
        )
        .await;
        until("the store has every reading", DEADLINE, async || {
            store.readings_count(1).await.unwrap() == 700
        })
        .await;
        until("the hot tables have every reading", DEADLINE, async || {
            rig.count("SELECT count(*) FROM readings").await == 700
        })
        .await;
        until("the hot status is the newest", DEADLINE, async || {
            rig.rows("SELECT status FROM device_latest WHERE device_id = 'dev-1'")
                .await
                .first()
                .is_some_and(|r| r["status"] == "offline")
        })
        .await;
        assert_eq!(
            rig.count("SELECT count(*) FROM store.readings").await,
            700,
            "the store side, read through the endpoint"
        );
        // The hot hourly rollups and latest state equal the store's own.
        let hot = rig.rows(&rollup_sql("readings_1h")).await;
        let cold = rig.rows(&rollup_sql("store.readings_1h")).await;
        assert!(!hot.is_empty());
        assert_eq!(hot, cold);
        // Minute rollups (read from the store) add up to the hourly ones.
        let minutes = rig
            .count("SELECT sum(temperature_c_count) FROM readings_1m")
            .await;
        assert_eq!(minutes, 700);
        let hot = rig.rows(&LATEST_SQL.replace("{t}", "device_latest")).await;
        let cold = rig
            .rows(&LATEST_SQL.replace("{t}", "store.device_latest"))
            .await;
        assert_eq!(hot, cold);
        assert!(
            hot.iter().any(|r| r["late_readings"].as_i64() > Some(0)),
            "the stream had late readings: {hot:?}"
        );
        rig.stop().await;
    })
    .await;
}

/// Counts of the hot readings, the store's readings and the store's minute rollups, in one
/// query: one version's answer has all three equal.
const VERSION_SQL: &str = "SELECT h.n AS hot, s.n AS stored, m.n AS minutes \
     FROM (SELECT count(*) AS n FROM readings) h, \
     (SELECT count(*) AS n FROM store.readings) s, \
     (SELECT sum(temperature_c_count) AS n FROM readings_1m) m";

/// The rows of [`VERSION_SQL`] for a version of `n` readings.
fn counts(n: i64) -> Vec<Value> {
    vec![json!({"hot": n, "stored": n, "minutes": n})]
}

/// A rebuild fills version 2 beside the live version 1, then switches. While it builds, every
/// answer is of version 1. After the switch every answer is of version 2: over HTTP, over the
/// Postgres protocol, and from a statement prepared before the switch. No answer mixes the two,
/// and the new hot tables follow the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_switch_to_a_rebuilt_version_atomically() {
    on_each_backend(|url| async move {
        let mut rig = rig(&url).await;
        let base = Utc::now() - TimeDelta::hours(3);
        let first = stream(4, 120, base, 5);
        rig.publish(READINGS, &first).await;
        let store = rig.store.clone();
        until("version 1 projected", DEADLINE, async || {
            store.readings_count(1).await.unwrap() == 120
        })
        .await;
        rig.start_query(Limits::default()).await;
        let one = counts(120);
        assert_eq!(rig.rows(VERSION_SQL).await, one);
        assert_eq!(rig.query.version.load(Ordering::Relaxed), 1);

        // Over the Postgres protocol: a statement sqlx prepares once and keeps, and a simple
        // query.
        let pg = format!(
            "postgres://analyst:{}@{}/sluice?sslmode=disable",
            rig.key,
            rig.pg.unwrap()
        );
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&pg)
            .await
            .unwrap();
        async fn prepared(conn: &mut sqlx::PgConnection) -> i64 {
            sqlx::query_scalar("SELECT count(*) FROM readings WHERE device_id <> $1")
                .bind("none")
                .fetch_one(conn)
                .await
                .unwrap()
        }
        async fn simple(conn: &mut sqlx::PgConnection) -> i64 {
            let row = sqlx::raw_sql("SELECT count(*) AS n FROM store.readings")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            sqlx::Row::get(&row, "n")
        }
        assert_eq!(prepared(&mut conn).await, 120);
        assert_eq!(simple(&mut conn).await, 120);

        // The rebuild: version 2 holds the same readings and 60 more.
        let version = store
            .begin_projection_version("projector", 1, "rebuild-test")
            .await
            .unwrap();
        assert_eq!(version, 2);
        let readings = first
            .iter()
            .chain(&stream(4, 60, base, 6))
            .map(|e| match sluice_projector::project(e) {
                Ok(sluice_projector::Projected::Reading(r)) => *r,
                other => panic!("not a reading: {other:?}"),
            })
            .collect();
        store
            .project(&ProjectionBatch {
                version,
                readings,
                ..ProjectionBatch::default()
            })
            .await
            .unwrap();
        assert_eq!(store.readings_count(2).await.unwrap(), 180);
        let checks = rig.query.version_checks.load(Ordering::Relaxed);
        until("two checks of the live version", DEADLINE, async || {
            rig.query.version_checks.load(Ordering::Relaxed) >= checks + 2
        })
        .await;
        assert_eq!(rig.rows(VERSION_SQL).await, one, "version 1 while 2 builds");
        assert_eq!(prepared(&mut conn).await, 120);
        assert_eq!(rig.query.version.load(Ordering::Relaxed), 1);

        // The switch: answers move from version 1 to 2, each whole.
        let retired = store
            .switch_projection_version("projector", version, "test")
            .await
            .unwrap();
        assert_eq!(retired, 1);
        let two = counts(180);
        until("answers of version 2", DEADLINE, async || {
            let rows = rig.rows(VERSION_SQL).await;
            assert!(
                rows == one || rows == two,
                "an answer mixing versions: {rows:?}"
            );
            rows == two
        })
        .await;
        assert_eq!(rig.query.version.load(Ordering::Relaxed), 2);
        assert_eq!(rig.query.loaded.load(Ordering::Relaxed), 180);
        for _ in 0..5 {
            assert_eq!(rig.rows(VERSION_SQL).await, two, "no way back");
        }
        assert_eq!(prepared(&mut conn).await, 180, "prepared before the switch");
        assert_eq!(simple(&mut conn).await, 180);

        // The new hot tables follow the stream, and only their follower applies it.
        let applied = rig.query.applied.load(Ordering::Relaxed);
        let later = stream(2, 10, base, 7);
        rig.publish(READINGS, &later).await;
        until("the new readings in the hot tables", DEADLINE, async || {
            rig.count("SELECT count(*) FROM readings").await == 190
        })
        .await;
        assert_eq!(
            rig.query.applied.load(Ordering::Relaxed) - applied,
            later.len() as u64,
            "the old follower stopped"
        );
        let _ = sqlx::Connection::close(conn).await;
        rig.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_answers_json_csv_and_arrow_and_says_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    let mut rig = rig(&url).await;
    rig.publish(
        READINGS,
        &stream(3, 30, Utc::now() - TimeDelta::hours(2), 3),
    )
    .await;
    let store = rig.store.clone();
    until("projected", DEADLINE, async || {
        store.readings_count(1).await.unwrap() == 30
    })
    .await;
    rig.start_query(Limits {
        max_rows: 10,
        ..Limits::default()
    })
    .await;
    let endpoint = format!("http://{}/v1/query", rig.http.unwrap());
    let body = json!({"sql": "SELECT device_id, count(*) AS n FROM readings GROUP BY device_id ORDER BY device_id"});

    let (status, json_body) = rig
        .sql("SELECT device_id, count(*) AS n FROM readings GROUP BY device_id ORDER BY device_id")
        .await;
    assert_eq!(status, 200);
    assert_eq!(json_body["row_count"], 3);
    assert_eq!(json_body["columns"][0]["name"], "device_id");
    assert_eq!(json_body["rows"][0], json!({"device_id": "dev-0", "n": 10}));

    let csv = rig
        .client
        .post(&endpoint)
        .bearer_auth(&rig.key)
        .header("accept", "text/csv")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert_eq!(
        csv.text().await.unwrap(),
        "device_id,n\ndev-0,10\ndev-1,10\ndev-2,10\n"
    );

    let arrow = rig
        .client
        .post(&endpoint)
        .bearer_auth(&rig.key)
        .header("accept", sluice_query::http::ARROW_STREAM)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(arrow.status(), 200);
    let bytes = arrow.bytes().await.unwrap();
    let reader =
        datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 3);

    // The row limit cuts and says so.
    let (status, cut) = rig.sql("SELECT * FROM readings").await;
    assert_eq!(status, 200);
    assert_eq!(
        (cut["row_count"].as_u64(), cut["truncated"].as_bool()),
        (Some(10), Some(true))
    );

    // Errors: where in the SQL, which key, which role.
    let (status, err) = rig.sql("SELECT device_id,\n  FROM FROM readings").await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["kind"], "invalid");
    assert_eq!(err["error"]["line"], 2, "{err}");
    let (status, err) = rig.sql("SELECT nope FROM readings").await;
    assert_eq!(status, 400);
    assert!(
        err["error"]["message"].as_str().unwrap().contains("nope"),
        "{err}"
    );
    let anonymous = rig.client.post(&endpoint).json(&body).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let (_, device_key) = rig.store.create_api_key(Role::Device, None).await.unwrap();
    let device = rig
        .client
        .post(&endpoint)
        .bearer_auth(&device_key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(device.status(), 403);
    rig.stop().await;
}

/// Every statement of the corpus is refused or stopped by a limit, with a clear message, and
/// the service still answers right after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_statements_are_refused_or_stopped_and_the_service_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    let mut rig = rig(&url).await;
    rig.publish(
        READINGS,
        &stream(20, 2000, Utc::now() - TimeDelta::hours(2), 4),
    )
    .await;
    let store = rig.store.clone();
    until("projected", DEADLINE, async || {
        store.readings_count(1).await.unwrap() == 2000
    })
    .await;
    rig.start_query(Limits {
        max_rows: 1000,
        timeout: Duration::from_secs(2),
        memory_bytes: 32 << 20,
        max_store_rows: 1000,
    })
    .await;
    let victim = dir.path().join("written.csv");
    let victim = victim.display();
    let nested = format!("SELECT {}1{}", "(".repeat(300), ")".repeat(300));
    let subqueries = format!("SELECT {}1{}", "(SELECT ".repeat(120), ")".repeat(120));
    // (statement, the error kind it must get)
    let corpus: Vec<(String, &str)> = [
        ("CREATE TABLE t (a int)", "read_only"),
        ("CREATE TABLE t AS SELECT * FROM readings", "read_only"),
        ("CREATE VIEW v AS SELECT 1", "read_only"),
        ("CREATE SCHEMA s", "read_only"),
        ("CREATE TEMPORARY TABLE t (a int)", "read_only"),
        ("CREATE FUNCTION f(a INT) RETURNS INT RETURN a + 1", "read_only"),
        ("DROP TABLE readings", "read_only"),
        ("DROP SCHEMA store CASCADE", "read_only"),
        ("ALTER TABLE readings ADD COLUMN x int", "read_only"),
        ("TRUNCATE readings", "read_only"),
        ("INSERT INTO readings (device_id) VALUES ('x')", "read_only"),
        ("INSERT INTO readings SELECT * FROM readings", "read_only"),
        ("UPDATE readings SET temperature_c = 0", "read_only"),
        ("DELETE FROM readings", "read_only"),
        ("DELETE FROM store.readings", "read_only"),
        ("EXPLAIN DELETE FROM readings", "read_only"),
        ("SELECT * INTO stolen FROM readings", "read_only"),
        ("GRANT SELECT ON readings TO PUBLIC", "read_only"),
        (&format!("COPY readings TO '{victim}'"), "read_only"),
        (&format!("COPY (SELECT * FROM readings) TO '{victim}' STORED AS CSV"), "read_only"),
        ("COPY readings FROM '/etc/passwd'", "invalid"),
        ("CREATE EXTERNAL TABLE e STORED AS CSV LOCATION '/etc/passwd'", "read_only"),
        ("CREATE EXTERNAL TABLE e STORED AS PARQUET LOCATION 'https://example.com/x.parquet'", "read_only"),
        ("SET datafusion.execution.batch_size = 1", "read_only"),
        ("SET datafusion.runtime.memory_limit = '100G'", "read_only"),
        ("SET statement_timeout = 0", "read_only"),
        ("RESET datafusion.execution.batch_size", "read_only"),
        ("SELECT * FROM '/etc/passwd'", "invalid"),
        ("SELECT * FROM 'https://example.com/data.csv'", "invalid"),
        ("SELECT * FROM read_csv('/etc/passwd')", "invalid"),
        ("SELECT * FROM read_parquet('s3://bucket/x.parquet')", "invalid"),
        ("SELECT 1; DROP TABLE readings", "invalid"),
        (&nested, "invalid"),
        (&subqueries, "invalid"),
        ("SELECT sum(a.temperature_c * b.temperature_c * c.temperature_c) FROM readings a, readings b, readings c", "limit"),
        ("SELECT count(*) FROM generate_series(1, 1000000000000)", "limit"),
        (
            "SELECT a.device_id, array_agg(b.event_id) FROM readings a JOIN readings b \
             ON a.device_id <> b.device_id GROUP BY a.device_id",
            "limit",
        ),
        (
            "SELECT count(DISTINCT a.event_id || b.event_id) FROM readings a CROSS JOIN readings b",
            "limit",
        ),
        ("SELECT avg(temperature_c) FROM store.readings", "limit"),
    ]
    .iter()
    .map(|(s, k)| (s.to_string(), *k))
    .collect();
    assert!(corpus.len() >= 30);
    for (sql, kind) in &corpus {
        let started = std::time::Instant::now();
        let (status, body) = rig.sql(sql).await;
        let short: String = sql.chars().take(80).collect();
        eprintln!("{:>8.0?} {short}", started.elapsed());
        // Failure messages show the start of the answer only: a wrong one may be huge.
        let text: String = body.to_string().chars().take(400).collect();
        assert!(
            status == 400 || status == 422,
            "{short}: expected a refusal, got {status} {text}"
        );
        assert_eq!(body["error"]["kind"], *kind, "{short}: {text}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.len() > 10, "{short}: an unclear message: {text}");
        assert_eq!(
            rig.count("SELECT count(*) FROM readings").await,
            2000,
            "the service answers after {short}"
        );
    }
    assert!(
        !dir.path().join("written.csv").exists(),
        "nothing was written"
    );
    assert_eq!(rig.store.readings_count(1).await.unwrap(), 2000);
    rig.stop().await;
}

/// `psql`, a client nobody here wrote, connects with an API key as its password, lists the
/// tables with `\d` and runs queries; sqlx runs a prepared statement (the extended protocol).
/// Answers are the same whatever time zone the Postgres session or the store's server uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_sqlx_connect_and_time_zones_do_not_change_answers() {
    let db = TestDatabase::create().await;
    // The store's own sessions run in a far-off zone: filters must still compare instants.
    let mut admin = sluice_store::testing::admin().await;
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    sqlx::Executor::execute(
        &mut admin,
        format!("ALTER DATABASE {name} SET timezone = 'Pacific/Chatham'").as_str(),
    )
    .await
    .unwrap();
    let mut rig = rig(&db.url).await;
    let base: DateTime<Utc> = "2026-11-20T10:00:00Z".parse().unwrap();
    let events: Vec<Event> = (0..120)
        .map(|i| {
            reading(
                &format!("dev-{}", i % 4),
                base + TimeDelta::minutes(i),
                20.0,
            )
        })
        .collect();
    rig.publish(READINGS, &events).await;
    let store = rig.store.clone();
    until("projected", DEADLINE, async || {
        store.readings_count(1).await.unwrap() == 120
    })
    .await;
    rig.start_query(Limits::default()).await;
    let pg = rig.pg.unwrap();
    // 10:30Z onwards: 90 readings. The same instant written in another zone.
    let filter = "at >= TIMESTAMPTZ '2026-11-20T05:30:00-05:00'";
    for table in ["readings", "store.readings"] {
        assert_eq!(
            rig.count(&format!("SELECT count(*) FROM {table} WHERE {filter}"))
                .await,
            90,
            "{table}"
        );
    }

    let psql = move |args: &[&str], password: &str| {
        let out = Command::new("psql")
            .args(["-X", "-h", "127.0.0.1", "-p", &pg.port().to_string()])
            .args(["-U", "analyst", "-d", "sluice", "-v", "ON_ERROR_STOP=1"])
            .args(args)
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let key = rig.key.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        let d = psql(&["-c", "\\d"], &key);
        let q = psql(
            &[
                "-c",
                "SET TimeZone = 'America/New_York'",
                "-c",
                &format!("SELECT count(*) AS n FROM readings WHERE {filter}"),
                "-c",
                &format!("SELECT count(*) AS n FROM store.readings WHERE {filter}"),
            ],
            &key,
        );
        let denied = psql(&["-c", "DROP TABLE readings"], &key);
        let wrong = psql(&["-c", "SELECT 1"], "sk_000000000000_nope");
        (
            d.0 && q.0 && !denied.0 && !wrong.0,
            [d.1, q.1, denied.1, wrong.1].join("\n=== next psql ===\n"),
        )
    })
    .await
    .unwrap();
    assert!(ok, "psql session:\n{out}");
    let parts: Vec<&str> = out.split("\n=== next psql ===\n").collect();
    for table in ["readings", "readings_1h", "device_latest", "events", "dlq"] {
        assert!(parts[0].contains(table), "\\d lists {table}:\n{}", parts[0]);
    }
    assert_eq!(parts[1].matches("\n 90\n").count(), 2, "{:?}", parts[1]);
    assert!(parts[2].contains("read-only"), "{}", parts[2]);
    assert!(
        parts[3].contains("password authentication failed"),
        "{}",
        parts[3]
    );

    // The extended protocol: a prepared statement with a parameter.
    let url = format!("postgres://analyst:{}@{pg}/sluice?sslmode=disable", rig.key);
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM readings WHERE device_id = $1")
        .bind("dev-1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 30);
    let refused = sqlx::query("DELETE FROM readings WHERE device_id = $1")
        .bind("dev-1")
        .execute(&mut conn)
        .await;
    assert!(refused.is_err());
    let _ = sqlx::Connection::close(conn).await;
    rig.stop().await;
    db.drop_now().await;
}
