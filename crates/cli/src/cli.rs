//! The command tree of `sluice`, as in PRODUCT.md. Commands whose component is not built yet are
//! declared with their real flags so `--help` shows the whole tool; running one says so and
//! exits 2.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Sluice: an event-sourced stream processor on Kafka for IoT fleets.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole pipeline in one process on embedded storage (log, store, MQTT broker,
    /// registry), with an optional simulated fleet.
    Dev(DevArgs),
    /// Run one processor of a topology against Kafka and PostgreSQL (or their embedded forms).
    ///
    /// Runs until SIGINT or SIGTERM, then finishes the batch in hand and exits 0. Kinds available
    /// in this build: mqtt-bridge (needs only --log), http-ingest, ingest-validator and
    /// outbox-relay. Counters are logged every 10 s.
    Run(RunArgs),
    /// Check and draw topology files.
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Work with the Avro schemas folder.
    #[command(subcommand)]
    Schemas(SchemasCommand),
    /// Serve Sluice's schema registry (the Confluent REST subset) on its own.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Drive a simulated fleet of devices against an MQTT broker or the HTTP ingest API.
    Simulate(SimulateArgs),
    /// Run a read-only SQL query against the SQL endpoint or a data directory.
    Sql(SqlArgs),
    /// Replay events from the event store into a topic, or rebuild a projection from them
    /// into a new version beside the live one; list, resume and cancel replay jobs.
    ///
    /// Replayed events carry a mark in their record headers: the action router records their
    /// actions as suppressed (unless --actions fire) and the inferencer does not score them
    /// again (unless --inference rescore). Needs --data-dir (local), or --store with an
    /// operator key.
    Replay(Box<ReplayArgs>),
    /// List, inspect, re-drive and discard dead letters.
    ///
    /// Needs --data-dir (local), or --store with an operator key; every change is audited.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Apply the store's schema migrations.
    ///
    /// Idempotent, and safe to run from several processes at once. Prints what it did; exits 1
    /// with the reason when the store cannot be reached or migrated.
    Migrate(MigrateArgs),
    /// Run a benchmark and print its figures.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the embedded log, store and registry keep their data.
    #[arg(long, env = "SLUICE__DATA_DIR", default_value = ".sluice")]
    pub data_dir: PathBuf,
    /// Start a simulated fleet of N devices.
    #[arg(long, value_name = "N")]
    pub simulate: Option<u32>,
    /// Events per second of the simulated fleet [default: one per device].
    #[arg(long, value_name = "EVENTS_PER_SEC")]
    pub rate: Option<u32>,
    /// Stop after this long (e.g. "30s"); runs until interrupted by default.
    #[arg(long = "for", value_name = "DURATION")]
    pub run_for: Option<String>,
    /// Where the MQTT broker listens [default: 127.0.0.1:1883, or a free port if busy].
    #[arg(long, env = "SLUICE__MQTT_ADDR")]
    pub mqtt_addr: Option<SocketAddr>,
    /// Where the HTTP ingest API listens [default: 127.0.0.1:8080, or a free port if busy].
    #[arg(long, env = "SLUICE__HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Where the schema registry API listens [default: 127.0.0.1:8081, or a free port if
    /// busy].
    #[arg(long, env = "SLUICE__REGISTRY_ADDR")]
    pub registry_addr: Option<SocketAddr>,
    /// Where the SQL endpoint's HTTP API listens [default: 127.0.0.1:8082, or a free port if
    /// busy].
    #[arg(long, env = "SLUICE__SQL_ADDR")]
    pub sql_addr: Option<SocketAddr>,
    /// Where the SQL endpoint's Postgres wire protocol listens [default: 127.0.0.1:5433, or a
    /// free port if busy].
    #[arg(long, env = "SLUICE__PG_ADDR")]
    pub pg_addr: Option<SocketAddr>,
    /// Where the executor delivers actions; default: a demo receiver in this process that
    /// checks the signatures and appends the deliveries to `DIR/webhooks.jsonl`.
    #[arg(long, env = "SLUICE__WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// The topology [default: topologies/default.yaml if present, else the built-in one].
    #[arg(long, env = "SLUICE__TOPOLOGY")]
    pub topology: Option<PathBuf>,
    /// The schemas folder [default: ./schemas if present, else the built-in schemas].
    #[arg(long, env = "SLUICE__SCHEMAS")]
    pub schemas: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The processor's name in the topology (e.g. ingest-validator).
    pub processor: String,
    /// The topology file.
    #[arg(long, env = "SLUICE__TOPOLOGY")]
    pub topology: PathBuf,
    /// The log: embedded://DIR (one process per folder) or kafka://host:port[,host:port].
    /// Topics missing on the embedded log are created with the topology's partitions.
    #[arg(long, env = "SLUICE__LOG")]
    pub log: Option<String>,
    /// The store: postgres://USER@HOST:PORT/DB or sqlite://PATH.
    #[arg(long, env = "SLUICE__STORE")]
    pub store: Option<String>,
    /// The schemas folder, registered in an in-process registry [default: ./schemas, else the
    /// schemas folder beside the topology's folder].
    #[arg(long, env = "SLUICE__SCHEMAS", conflicts_with = "registry")]
    pub schemas: Option<PathBuf>,
    /// A Confluent-compatible schema registry (http://host:port) to use instead of the
    /// schemas folder.
    #[arg(long, env = "SLUICE__REGISTRY", value_name = "URL")]
    pub registry: Option<String>,
    /// Apply the store's migrations before starting (as `sluice migrate` does).
    #[arg(long)]
    pub migrate: bool,
}

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Check topology files; prints every problem with its location and exits 1 if any.
    Validate {
        /// Topology files (YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The schemas folder that topic subjects must exist in, and whose latest versions
        /// rule predicates are type-checked against [default: ./schemas, else the schemas
        /// folder beside the topology's folder].
        #[arg(long, env = "SLUICE__SCHEMAS")]
        schemas: Option<PathBuf>,
    },
    /// Draw a topology as a Mermaid or Graphviz graph on stdout.
    Graph {
        /// The topology file.
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = GraphFormat::Mermaid)]
        format: GraphFormat,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GraphFormat {
    /// A Mermaid flowchart (renders on GitHub and in most Markdown viewers).
    Mermaid,
    /// Graphviz DOT (`dot -Tsvg`).
    Dot,
}

#[derive(Debug, Subcommand)]
pub enum SchemasCommand {
    /// Check that every version of every subject is compatible with its predecessors under the
    /// subject's rule; exits 1 naming each violation.
    Check {
        /// The schemas folder (`<subject>/<version>.avsc`).
        #[arg(long, env = "SLUICE__SCHEMAS", default_value = "schemas")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Serve the registry until interrupted (SIGINT or SIGTERM).
    Serve {
        /// Address to listen on.
        #[arg(long, env = "SLUICE__REGISTRY_ADDR", default_value = "127.0.0.1:8081")]
        addr: SocketAddr,
        /// Where the registry keeps its ids and versions (`<DIR>/registry/registry.json`).
        #[arg(long, env = "SLUICE__DATA_DIR", default_value = ".sluice")]
        data_dir: PathBuf,
        /// Register every version of this schemas folder at start (versions already
        /// registered are kept as they are).
        #[arg(long, value_name = "DIR")]
        schemas: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Number of devices.
    #[arg(long, default_value_t = 100)]
    pub devices: u32,
    /// Events per second across the fleet (readings and status changes together).
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// MQTT broker to publish to with QoS 1 (mqtt://host:port).
    #[arg(long, conflicts_with = "http", required_unless_present = "http")]
    pub mqtt: Option<String>,
    /// HTTP ingest API to post batches to (http://host:port).
    #[arg(long)]
    pub http: Option<String>,
    /// API key for the HTTP ingest API (role device or admin).
    #[arg(long, env = "SLUICE__API_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Events per HTTP request.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Stop after this long (e.g. "2m"); runs until interrupted by default.
    #[arg(long = "for", value_name = "DURATION")]
    pub run_for: Option<String>,
    /// Share of readings that carry an injected anomaly (0 to 1).
    #[arg(long, default_value_t = 0.001)]
    pub anomaly_rate: f64,
    /// Seed of the fleet's randomness; the same seed gives the same fleet and events.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write the injected anomalies (event id, device, time, kind) to this file as JSON lines.
    #[arg(long, value_name = "FILE")]
    pub truth: Option<PathBuf>,
    /// Share of messages sent malformed, to exercise the dead-letter path (0 to 1).
    #[arg(long, default_value_t = 0.0005)]
    pub malformed_rate: f64,
    /// Share of messages sent twice (as a QoS 1 redelivery or a client retry would) (0 to 1).
    #[arg(long, default_value_t = 0.001)]
    pub duplicate_rate: f64,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key and print it once; only its salted hash is stored.
    Create {
        /// What the key may do: device (ingest), viewer (query), operator (also replay and
        /// dead letters), admin (also keys).
        #[arg(long, value_enum)]
        role: KeyRole,
        /// A name to recognise the key by in `sluice keys list`.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        store: KeysStore,
    },
    /// List the keys (never their secrets).
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: KeysStore,
    },
    /// Revoke a key by its id; requests with it are refused from then on.
    Revoke {
        /// The key's id, as `sluice keys list` shows it.
        id: String,
        #[command(flatten)]
        store: KeysStore,
    },
}

#[derive(Debug, Args)]
pub struct KeysStore {
    /// The store: postgres://USER@HOST:PORT/DB or sqlite://PATH [default: the `sluice dev`
    /// store, sqlite://.sluice/sluice.db].
    #[arg(long, env = "SLUICE__STORE")]
    pub store: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyRole {
    Device,
    Viewer,
    Operator,
    Admin,
}

#[derive(Debug, Args)]
pub struct SqlArgs {
    /// The query.
    pub query: String,
    /// A running SQL endpoint (http://host:port, e.g. the `sql` address `sluice dev` prints).
    #[arg(long, conflicts_with = "data_dir")]
    pub endpoint: Option<String>,
    /// The API key for --endpoint (role viewer or above).
    #[arg(long, env = "SLUICE__API_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Read a `sluice dev` data directory's store directly, without a running process
    /// [default: .sluice].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Output format: table, json or csv.
    #[arg(long, default_value = "table")]
    pub format: String,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The store: postgres://USER@HOST:PORT/DB or sqlite://PATH (the file and its folder are
    /// created when missing).
    #[arg(long, env = "SLUICE__STORE")]
    pub store: String,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Produce messages while a consumer group reads them back with commits; print produce and
    /// consume throughput and produce-to-consume latency.
    Log(BenchLogArgs),
    /// Push raw JSON readings through the ingest-validator and the outbox-relay in one process;
    /// print append and relay throughput, relay lag, and a raw COPY baseline (PostgreSQL).
    ///
    /// Produces N raw sensor.reading events (JSON, distinct event ids, keyed by device) to a raw
    /// topic of its own while an ingest-validator appends them to the store and an outbox-relay
    /// publishes them to an events topic of its own, which a consumer group reads back.
    /// Measured from the first produce: events/s appended (the store has all N), events/s
    /// relayed (the relay published all N and all N were read back), and the relay lag (time
    /// read back minus ingested_at). On PostgreSQL it then COPYs the same rows into scratch
    /// tables like the store's (dropped afterwards) for a baseline; SQLite has none.
    ///
    /// The store is migrated first, and the bench's events stay in it (they are real events).
    /// Its relay drains the whole outbox, so it refuses a store whose outbox is not empty: do
    /// not point it at a store another relay serves.
    Ingest(BenchIngestArgs),
    /// Push Avro readings through the projector in this process and print readings projected
    /// per second (rollups and latest state included), the projection lag when paced, and a
    /// raw COPY baseline of the same rows (PostgreSQL).
    ///
    /// Uses a scratch embedded log, a consumer group and a projection version of its own, and
    /// drops that version afterwards: the live read models are untouched.
    Project(BenchProjectArgs),
    /// Time a fixed set of queries through the SQL endpoint (HTTP, Arrow answers) and, in the
    /// same run, the same SQL directly on PostgreSQL; print p50/p99 per query and the ratio.
    ///
    /// Loads N readings (over --devices devices and the last 24 hours) into a projection
    /// version of its own through the projector's writes (rollups and latest state included),
    /// loads the hot tables from it, and drops that version at the end.
    Query(BenchQueryArgs),
    /// Score simulated readings with the ONNX model on one thread: rows/s at batch sizes 1,
    /// 64 and 1024, and the latency micro-batching adds per reading at a steady rate.
    ///
    /// The baseline, in the same run, is the statistical fallback on the same readings. Needs
    /// ONNX Runtime (scripts/fetch-onnxruntime) and the model (models/).
    Inference(BenchInferenceArgs),
    /// Compare the simulator's ground truth (`sluice simulate --truth FILE`) with the
    /// anomalies projection: precision and recall per model.
    ///
    /// A flagged reading is one in the anomalies table, device time within the truth file's
    /// span (a minute either side); a hit is one the truth file lists.
    Detection(BenchDetectionArgs),
    /// Signed webhook deliveries per second to a local receiver through the executor's
    /// delivery core, against plain POSTs to the same receiver in the same run, and what a
    /// delivery short-circuited by an open breaker costs.
    Executor(BenchExecutorArgs),
    /// The operator jobs of `sluice replay` on PostgreSQL: events/s replayed to a topic beside
    /// the log's own produce rate, and events/s rebuilt into a new projection version beside a
    /// raw COPY of the same events.
    ///
    /// Works in a scratch database it creates on the server of --store and drops at the end
    /// (the store itself is not written to): seeds N readings by COPY, replays them to a
    /// scratch embedded log, rebuilds the projector's read models from them, and checks the
    /// rebuilt rollups against a GROUP BY of the readings.
    Replay(BenchReplayArgs),
    /// The whole default topology on pre-generated input.
    Pipeline(PendingArgs),
}

#[derive(Debug, Args)]
pub struct BenchExecutorArgs {
    /// Deliveries per side (signed, then plain).
    #[arg(long, default_value_t = 50_000)]
    pub deliveries: u64,
    /// Deliveries in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 512)]
    pub body_bytes: usize,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchInferenceArgs {
    /// The model's folder (its highest version is used).
    #[arg(long, default_value = "models/reading-iforest")]
    pub model: PathBuf,
    /// Simulated readings to score.
    #[arg(long, default_value_t = 200_000)]
    pub rows: usize,
    /// Readings per second offered in the latency run.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Most readings per model call in the latency run (the inferencer's `max_batch`).
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchDetectionArgs {
    /// The ground-truth file `sluice simulate --truth` wrote (JSON lines).
    #[arg(long)]
    pub truth: PathBuf,
    /// The store the projector writes: postgres://USER@HOST:PORT/DB or sqlite://PATH.
    #[arg(long, env = "SLUICE__STORE")]
    pub store: String,
    /// The projection version to read.
    #[arg(long, default_value_t = 1)]
    pub projection_version: i32,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchQueryArgs {
    /// The store: postgres://USER@HOST:PORT/DB (or sqlite://PATH, without the Postgres side).
    #[arg(long, env = "SLUICE__STORE")]
    pub store: String,
    /// Readings to load.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Distinct devices.
    #[arg(long, default_value_t = 1_000)]
    pub devices: u64,
    /// Timed runs per query and side (after 3 unmeasured).
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchReplayArgs {
    /// A PostgreSQL server, as a store URL (postgres://USER@HOST:PORT/DB); the bench works in
    /// a scratch database beside DB.
    #[arg(long, env = "SLUICE__STORE")]
    pub store: String,
    /// Readings in the event store.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Distinct devices.
    #[arg(long, default_value_t = 1_000)]
    pub devices: u64,
    /// The schemas folder.
    #[arg(long, env = "SLUICE__SCHEMAS", default_value = "schemas")]
    pub schemas: PathBuf,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchProjectArgs {
    /// The store: postgres://USER@HOST:PORT/DB or sqlite://PATH (migrated first).
    #[arg(long, env = "SLUICE__STORE")]
    pub store: String,
    /// Readings to push through.
    #[arg(long, default_value_t = 200_000)]
    pub readings: u64,
    /// Distinct devices.
    #[arg(long, default_value_t = 1_000)]
    pub devices: u64,
    /// Records per produce call.
    #[arg(long, default_value_t = 1_000)]
    pub batch: usize,
    /// Produce at this many readings per second (for the lag at a given load); unpaced when
    /// absent.
    #[arg(long)]
    pub rate: Option<u64>,
    /// The schemas folder.
    #[arg(long, env = "SLUICE__SCHEMAS", default_value = "schemas")]
    pub schemas: PathBuf,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchLogArgs {
    /// The log: embedded://DIR, kafka://host:port[,host:port], or kafka-mock:// (an in-process
    /// mock Kafka cluster started for the run).
    #[arg(long, env = "SLUICE__LOG")]
    pub log: String,
    /// Messages to produce and consume.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Bytes per message.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Records per produce call.
    #[arg(long, default_value_t = 1_000)]
    pub batch: usize,
    /// Partitions of the bench topic.
    #[arg(long, default_value_t = 6)]
    pub partitions: u32,
    /// Produce at this many messages per second (for latency at a given load); unpaced when
    /// absent.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchIngestArgs {
    /// The store: postgres://USER@HOST:PORT/DB or sqlite://PATH.
    #[arg(long, env = "SLUICE__STORE")]
    pub store: String,
    /// The log: embedded://DIR, kafka://host:port[,host:port], or kafka-mock:// (an in-process
    /// mock Kafka cluster started for the run).
    #[arg(long, env = "SLUICE__LOG")]
    pub log: String,
    /// Events to push through.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Raw records per produce call.
    #[arg(long, default_value_t = 1_000)]
    pub batch: usize,
    /// Distinct devices (message keys and aggregate ids).
    #[arg(long, default_value_t = 1_000)]
    pub devices: u64,
    /// Produce at this many events per second (for the relay lag at a given load); unpaced
    /// when absent.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Partitions of the bench's raw and events topics.
    #[arg(long, default_value_t = 6)]
    pub partitions: u32,
    /// Most events per store transaction (validator) and per publish pass (relay).
    #[arg(long, default_value_t = 500)]
    pub append_batch: usize,
    /// The schemas folder.
    #[arg(long, env = "SLUICE__SCHEMAS", default_value = "schemas")]
    pub schemas: PathBuf,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of a command whose component is not built yet; accepted as given so the command
/// can say so instead of failing on a flag.
#[derive(Debug, Args)]
pub struct PendingArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

/// Where an operator command works, and as whom.
#[derive(Debug, Clone, Args)]
pub struct OpsTarget {
    /// A `sluice dev` data directory, used directly: file access is the permission
    /// [default: .sluice, unless --store is given]. Commands that publish need `sluice dev`
    /// stopped (it holds the embedded log).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The store: postgres://USER@HOST:PORT/DB or sqlite://PATH; needs --key.
    #[arg(long, env = "SLUICE__STORE")]
    pub store: Option<String>,
    /// The log, for commands that publish: kafka://host:port or embedded://DIR.
    #[arg(long, env = "SLUICE__LOG")]
    pub log: Option<String>,
    /// An API key with role operator or admin; required with --store.
    #[arg(long, env = "SLUICE__API_KEY", hide_env_values = true)]
    pub key: Option<String>,
}

/// Which dead letters: by processor, error class and failure time.
#[derive(Debug, Clone, Args)]
pub struct DlqSelect {
    /// Only this processor's.
    #[arg(long)]
    pub processor: Option<String>,
    /// Only this error class (e.g. schema, too_large, decode).
    #[arg(long)]
    pub error_class: Option<String>,
    /// Failed at or after: RFC 3339, or a duration ago ("2h").
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Failed before: RFC 3339, or a duration ago.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        select: DlqSelect,
        /// Only this status: pending, replayed or discarded.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: OpsTarget,
    },
    /// Show one dead letter: raw bytes as hex and text, decoded payload, provenance, error,
    /// attempts and history.
    Show {
        /// The dead letter's id.
        id: i64,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: OpsTarget,
    },
    /// Re-publish pending dead letters, raw, to the topic they were consumed from, and mark
    /// them replayed. Give ids, or filters for every pending one they match.
    Replay {
        /// Dead letter ids.
        ids: Vec<i64>,
        #[command(flatten)]
        select: DlqSelect,
        /// Say what would be re-published, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        target: OpsTarget,
    },
    /// Mark pending dead letters discarded, with a reason. Give ids, or filters.
    Discard {
        /// Dead letter ids.
        ids: Vec<i64>,
        #[command(flatten)]
        select: DlqSelect,
        /// Why (kept with each entry and in the audit log).
        #[arg(long)]
        reason: String,
        /// Say what would be discarded, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        target: OpsTarget,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ReplayArgs {
    #[command(subcommand)]
    pub command: Option<ReplayCommand>,
    #[command(flatten)]
    pub start: ReplayStart,
}

#[derive(Debug, Args)]
pub struct ReplayStart {
    /// Events ingested at or after: RFC 3339, or a duration ago ("2h") [default: the oldest].
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// Events ingested before: RFC 3339, or a duration ago [default: now].
    #[arg(long, value_name = "TIME")]
    pub to: Option<String>,
    /// Only events of this type (repeat for more).
    #[arg(long = "type", value_name = "EVENT_TYPE")]
    pub types: Vec<String>,
    /// Only events of this aggregate (device id; repeat for more).
    #[arg(long = "aggregate", value_name = "ID")]
    pub aggregates: Vec<String>,
    /// Re-publish the events to this topic, in order per aggregate.
    #[arg(long, value_name = "TOPIC", required_unless_present = "rebuild")]
    pub to_topic: Option<String>,
    /// Rebuild this projection (the projector's name) into a new version, then switch
    /// readers to it and drop the old one.
    #[arg(long, value_name = "PROJECTION", conflicts_with = "to_topic")]
    pub rebuild: Option<String>,
    /// At most this many events per second [default: as fast as possible].
    #[arg(long, value_name = "N")]
    pub rate: Option<u32>,
    /// What the action router does with replayed events: suppress (record, never deliver)
    /// or fire (request as usual; the executor's dedup still stops repeats).
    #[arg(long, value_enum, default_value_t = ReplayActions::Suppress)]
    pub actions: ReplayActions,
    /// Whether the inferencer scores replayed readings again.
    #[arg(long, value_enum, default_value_t = ReplayInference::Skip)]
    pub inference: ReplayInference,
    /// Say what would be replayed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub wiring: ReplayWiring,
    #[command(flatten)]
    pub target: OpsTarget,
}

/// Where replay finds the projector and the schemas.
#[derive(Debug, Clone, Args)]
pub struct ReplayWiring {
    /// The topology [default: topologies/default.yaml if present, else the built-in one].
    #[arg(long, env = "SLUICE__TOPOLOGY")]
    pub topology: Option<PathBuf>,
    /// The schemas folder, registered in an in-process registry to encode replayed events, as
    /// `sluice run` does [default: the data directory's registry, else ./schemas].
    #[arg(long, env = "SLUICE__SCHEMAS", conflicts_with = "registry")]
    pub schemas: Option<PathBuf>,
    /// A Confluent-compatible schema registry to encode replayed events with.
    #[arg(long, env = "SLUICE__REGISTRY")]
    pub registry: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayActions {
    Suppress,
    Fire,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayInference {
    Skip,
    Rescore,
}

#[derive(Debug, Subcommand)]
pub enum ReplayCommand {
    /// List replay jobs, newest first.
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: OpsTarget,
    },
    /// Resume a failed or crashed job where it stopped. A job still marked running is taken
    /// over once its worker has been silent for 30 s, or at once with --force.
    Resume {
        /// The job id.
        id: String,
        /// Take the job over now: its worker is known to be dead.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wiring: ReplayWiring,
        #[command(flatten)]
        target: OpsTarget,
    },
    /// Stop a job: a running one stops at its next page.
    Cancel {
        /// The job id.
        id: String,
        #[command(flatten)]
        target: OpsTarget,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_command_is_well_formed() {
        // clap checks names, flags and defaults of every subcommand only when one is built.
        super::Cli::command().debug_assert();
    }
}
