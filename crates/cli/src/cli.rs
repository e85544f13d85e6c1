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
    /// Replay events from the event store into a topic or a new projection version.
    Replay(PendingArgs),
    /// List, inspect, re-drive and discard dead letters.
    Dlq(PendingArgs),
    /// Create, list and revoke API keys.
    Keys(PendingArgs),
    /// Apply the store's schema migrations.
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
    /// Events per second of the simulated fleet.
    #[arg(long, value_name = "EVENTS_PER_SEC")]
    pub rate: Option<u32>,
    /// Stop after this long (e.g. "30s"); runs until interrupted by default.
    #[arg(long = "for", value_name = "DURATION")]
    pub run_for: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The processor's name in the topology.
    pub processor: String,
    /// The topology file.
    #[arg(long, env = "SLUICE__TOPOLOGY")]
    pub topology: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Check topology files; prints every problem with its location and exits 1 if any.
    Validate {
        /// Topology files (YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The schemas folder that topic subjects must exist in [default: ./schemas, else the
        /// schemas folder beside the topology's folder].
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
    /// Events per second across the fleet.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// MQTT broker to publish to (mqtt://host:port).
    #[arg(long, conflicts_with = "http")]
    pub mqtt: Option<String>,
    /// HTTP ingest API to post to (http://host:port).
    #[arg(long)]
    pub http: Option<String>,
    /// Stop after this long (e.g. "2m").
    #[arg(long = "for", value_name = "DURATION")]
    pub run_for: Option<String>,
}

#[derive(Debug, Args)]
pub struct SqlArgs {
    /// The query.
    pub query: String,
    /// The SQL endpoint (http://host:port).
    #[arg(long, conflicts_with = "data_dir")]
    pub endpoint: Option<String>,
    /// Query a `sluice dev` data directory directly.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, default_value = "table")]
    pub format: String,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The store (postgres://… or sqlite://DIR/sluice.db).
    #[arg(long, env = "SLUICE__STORE")]
    pub store: String,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Produce messages while a consumer group reads them back with commits; print produce and
    /// consume throughput and produce-to-consume latency.
    Log(BenchLogArgs),
    /// The whole default topology on pre-generated input.
    Pipeline(PendingArgs),
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

/// Arguments of a command whose component is not built yet; accepted as given so the command
/// can say so instead of failing on a flag.
#[derive(Debug, Args)]
pub struct PendingArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}
