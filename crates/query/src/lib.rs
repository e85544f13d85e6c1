//! The SQL endpoint: a DataFusion session over Sluice's read models and store, answering
//! over HTTP (`POST /v1/query`, JSON, CSV or Arrow IPC) and the Postgres wire protocol.
//!
//! Hot read models (recent readings, hourly rollups, latest state per device) are Arrow
//! batches in memory ([`Hot`]), loaded from one store snapshot at start and kept current from
//! the events stream ([`follow`]). Colder tables (the event store, the DLQ, minute rollups, the
//! full readings history) are read from the store with filters pushed down. Both are of the
//! projection version the store says is live; when a rebuild makes another one live, the
//! service loads it beside the one it serves and then answers from it ([`Served`]).
//!
//! This crate must never run anything but a query: statements are checked before planning
//! ([`guard`]) and plans again after; and every query runs with a time limit, a memory limit
//! and a row limit of its own.

pub mod auth;
pub mod follow;
pub mod guard;
pub mod hot;
pub mod http;
pub mod pg;
mod tables;

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::MemorySchemaProvider;
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParserBuilder, Statement as DfStatement};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use serde::Deserialize;
use sluice_store::{ColumnType, Filter, Op, Store, Value};

pub use hot::Hot;

use guard::Verdict;
use tables::{ColdTable, HotKind, HotTable};

/// Bounds on every query.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most rows in a result; more are cut and the result says it was truncated.
    pub max_rows: usize,
    /// Longest a query may run.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Most memory a query's operators may hold (joins, aggregates, sorts); no spilling.
    pub memory_bytes: usize,
    /// Most rows one query may read from one store table.
    pub max_store_rows: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_rows: 100_000,
            timeout: Duration::from_secs(30),
            memory_bytes: 512 << 20,
            max_store_rows: 2_000_000,
        }
    }
}

/// Why a query was not answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Not a query: the endpoint is read-only.
    #[error("{0}")]
    ReadOnly(String),
    /// Bad SQL, an unknown table or column, or an error while evaluating.
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
        /// Line and column (1-based) in the SQL, where known.
        position: Option<(u64, u64)>,
    },
    /// Stopped by a limit (time, memory, rows read from the store).
    #[error("{0}")]
    Limit(String),
    /// The store is unreachable; retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure.
    #[error("{0}")]
    Internal(String),
}

impl QueryError {
    /// A short name of the kind, for JSON answers and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            QueryError::ReadOnly(_) => "read_only",
            QueryError::Invalid { .. } => "invalid",
            QueryError::Limit(_) => "limit",
            QueryError::Unavailable(_) => "unavailable",
            QueryError::Internal(_) => "internal",
        }
    }

    pub(crate) fn from_df(e: DataFusionError) -> QueryError {
        let position = e
            .diagnostic()
            .and_then(|d| d.span)
            .map(|s| (s.start.line, s.start.column))
            .or_else(|| position_in(&e.to_string()));
        match e.find_root() {
            DataFusionError::ResourcesExhausted(m) => {
                return QueryError::Limit(format!("query stopped by a limit: {m}"));
            }
            DataFusionError::External(inner) => {
                if let Some(s) = inner.downcast_ref::<sluice_store::Error>() {
                    return if s.is_transient() {
                        QueryError::Unavailable(format!("the store is unavailable: {s}"))
                    } else {
                        QueryError::Internal(s.to_string())
                    };
                }
            }
            DataFusionError::Internal(m) => return QueryError::Internal(m.clone()),
            DataFusionError::SQL(e, _) => {
                use datafusion::sql::sqlparser::parser::ParserError;
                let message = match e.as_ref() {
                    ParserError::TokenizerError(m) | ParserError::ParserError(m) => {
                        format!("syntax error: {m}")
                    }
                    ParserError::RecursionLimitExceeded => {
                        "the query nests too deeply (recursion limit exceeded)".to_owned()
                    }
                };
                return QueryError::Invalid { message, position };
            }
            _ => {}
        }
        QueryError::Invalid {
            message: e.strip_backtrace(),
            position,
        }
    }
}

/// Every operator's output passes through a cooperative step that yields to the scheduler
/// once its task has used its budget. DataFusion adds these only above leaves, so an operator
/// that makes many batches from one input batch (a cross join) never yields, and a query
/// stopped by its time limit would keep its thread busy; with this it ends at its next batch.
fn interruptible(
    plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    use datafusion::physical_plan::coop::CooperativeExec;
    plan.transform_up(|node| {
        if node.name() == "CooperativeExec" {
            return Ok(Transformed::no(node));
        }
        Ok(Transformed::yes(Arc::new(CooperativeExec::new(node))
            as Arc<dyn datafusion::physical_plan::ExecutionPlan>))
    })
    .map(|t| t.data)
}

/// `... at Line: 3, Column: 14` in sqlparser's messages.
fn position_in(message: &str) -> Option<(u64, u64)> {
    let at = message.rfind("Line: ")?;
    let rest = &message[at + 6..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((line.trim().parse().ok()?, column.parse().ok()?))
}

/// A query's answer.
#[derive(Debug, Clone)]
pub struct Output {
    /// Column names and types.
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// True when rows beyond [`Limits::max_rows`] were cut.
    pub truncated: bool,
    /// Time spent planning and running.
    pub elapsed: Duration,
}

impl Output {
    /// Rows returned.
    pub fn rows(&self) -> usize {
        hot::rows(&self.batches)
    }
}

/// The tables and how queries run. Cheap to share across connections.
pub struct Engine {
    ctx: SessionContext,
    version: i32,
    limits: Limits,
    exec: Executor,
}

/// Queries run on threads of their own, so a heavy one cannot starve the listeners, and its
/// time limit fires on time.
struct Executor(Option<tokio::runtime::Runtime>);

impl Executor {
    fn new() -> std::io::Result<Executor> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("sluice-sql")
            .enable_time()
            .build()?;
        Ok(Executor(Some(runtime)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("the runtime lives as long as the engine")
            .handle()
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // Dropping a runtime may happen inside another one: do not block there.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("version", &self.version)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The projection version served while the store records none live (before any rebuild).
pub const LIVE_VERSION: i32 = 1;

/// A session with the endpoint's settings and a memory pool of `limits.memory_bytes`, and no
/// tables yet.
pub(crate) fn session(limits: &Limits) -> Result<SessionContext, QueryError> {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_target_partitions(2)
        .with_default_catalog_and_schema("datafusion", "public");
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(limits.memory_bytes, 1.0)
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()
        .map_err(QueryError::from_df)?;
    Ok(SessionContext::new_with_config_rt(config, runtime))
}

fn columns(spec: &[(&'static str, ColumnType)]) -> Vec<(String, ColumnType)> {
    spec.iter().map(|(c, t)| ((*c).to_owned(), *t)).collect()
}

/// The store's wide rollup rows: per metric count, min, max, sum, last and its time.
fn rollup_columns() -> Vec<(String, ColumnType)> {
    let mut columns = vec![
        ("device_id".to_owned(), ColumnType::Text),
        ("bucket".to_owned(), ColumnType::Timestamp),
    ];
    for m in hot::METRICS {
        for (stat, ty) in [
            ("count", ColumnType::Int),
            ("min", ColumnType::Float),
            ("max", ColumnType::Float),
            ("sum", ColumnType::Float),
            ("last", ColumnType::Float),
            ("last_at", ColumnType::Timestamp),
        ] {
            columns.push((format!("{m}_{stat}"), ty));
        }
    }
    columns
}

const READINGS_COLUMNS: [(&str, ColumnType); 10] = [
    ("event_id", ColumnType::Uuid),
    ("device_id", ColumnType::Text),
    ("at", ColumnType::Timestamp),
    ("ingested_at", ColumnType::Timestamp),
    ("seq", ColumnType::Int),
    ("temperature_c", ColumnType::Float),
    ("humidity_pct", ColumnType::Float),
    ("pressure_hpa", ColumnType::Float),
    ("vibration_mm_s", ColumnType::Float),
    ("battery_pct", ColumnType::Float),
];

const EVENTS_COLUMNS: [(&str, ColumnType); 9] = [
    ("position", ColumnType::Int),
    ("event_id", ColumnType::Uuid),
    ("event_type", ColumnType::Text),
    ("aggregate_id", ColumnType::Text),
    ("occurred_at", ColumnType::Timestamp),
    ("ingested_at", ColumnType::Timestamp),
    ("payload", ColumnType::Json),
    ("metadata", ColumnType::Json),
    ("schema_version", ColumnType::Int),
];

const DLQ_COLUMNS: [(&str, ColumnType); 17] = [
    ("dlq_id", ColumnType::Int),
    ("processor", ColumnType::Text),
    ("event_id", ColumnType::Uuid),
    ("source_topic", ColumnType::Text),
    ("source_partition", ColumnType::Int),
    ("source_offset", ColumnType::Int),
    ("schema_id", ColumnType::Int),
    ("raw", ColumnType::Bytes),
    ("decoded", ColumnType::Json),
    ("error_class", ColumnType::Text),
    ("error_message", ColumnType::Text),
    ("failed_at", ColumnType::Timestamp),
    ("attempts", ColumnType::Int),
    ("status", ColumnType::Text),
    ("status_changed_by", ColumnType::Text),
    ("status_changed_at", ColumnType::Timestamp),
    ("reason", ColumnType::Text),
];

const LATEST_COLUMNS: [(&str, ColumnType); 8] = [
    ("device_id", ColumnType::Text),
    ("last_seen", ColumnType::Timestamp),
    ("reading_at", ColumnType::Timestamp),
    ("reading", ColumnType::Json),
    ("status", ColumnType::Text),
    ("status_reason", ColumnType::Text),
    ("status_at", ColumnType::Timestamp),
    ("late_readings", ColumnType::Int),
];

const ANOMALY_COLUMNS: [(&str, ColumnType); 11] = [
    ("event_id", ColumnType::Uuid),
    ("input_event_id", ColumnType::Uuid),
    ("device_id", ColumnType::Text),
    ("at", ColumnType::Timestamp),
    ("score", ColumnType::Float),
    ("threshold", ColumnType::Float),
    ("model_name", ColumnType::Text),
    ("model_version", ColumnType::Text),
    ("features", ColumnType::Json),
    ("site", ColumnType::Text),
    ("projected_at", ColumnType::Timestamp),
];

/// The executor's actions (`destructive` is left out: the typed reads have no boolean).
const ACTION_COLUMNS: [(&str, ColumnType); 18] = [
    ("action_id", ColumnType::Uuid),
    ("input_event_id", ColumnType::Uuid),
    ("rule_id", ColumnType::Text),
    ("rule_version", ColumnType::Int),
    ("endpoint", ColumnType::Text),
    ("device_id", ColumnType::Text),
    ("body", ColumnType::Text),
    ("requested_at", ColumnType::Timestamp),
    ("source_topic", ColumnType::Text),
    ("source_partition", ColumnType::Int),
    ("source_offset", ColumnType::Int),
    ("status", ColumnType::Text),
    ("attempts", ColumnType::Int),
    ("next_attempt_at", ColumnType::Timestamp),
    ("last_error", ColumnType::Text),
    ("last_http_status", ColumnType::Int),
    ("updated_at", ColumnType::Timestamp),
    ("delivered_at", ColumnType::Timestamp),
];

/// The action ledger: one row per attempt or decision.
const LEDGER_COLUMNS: [(&str, ColumnType); 10] = [
    ("id", ColumnType::Int),
    ("action_id", ColumnType::Uuid),
    ("request_id", ColumnType::Uuid),
    ("endpoint", ColumnType::Text),
    ("attempt", ColumnType::Int),
    ("outcome", ColumnType::Text),
    ("http_status", ColumnType::Int),
    ("latency_ms", ColumnType::Int),
    ("error", ColumnType::Text),
    ("at", ColumnType::Timestamp),
];

impl Engine {
    /// An engine over `hot` and the store: `public` holds the hot tables (`readings`,
    /// `readings_1h`, `device_latest`) and the store's `events`, `dlq`, `readings_1m`,
    /// `anomalies`, and the executor's `actions` and `action_ledger`;
    /// schema `store` holds the store's own read models of `version` (the full `readings`
    /// history, `readings_1h`, `device_latest`). Made inside a Tokio runtime, which the store
    /// reads run on.
    pub fn new(
        hot: Arc<Hot>,
        store: Store,
        version: i32,
        limits: Limits,
    ) -> Result<Engine, QueryError> {
        let ctx = session(&limits)?;
        let partitions = 2;
        let reg = |name: &str, table: Arc<dyn datafusion::datasource::TableProvider>| {
            ctx.register_table(name, table)
                .map(|_| ())
                .map_err(QueryError::from_df)
        };
        reg(
            "readings",
            Arc::new(HotTable::new(hot.clone(), HotKind::Readings, partitions)),
        )?;
        reg(
            "readings_1h",
            Arc::new(HotTable::new(hot.clone(), HotKind::Rollups, partitions)),
        )?;
        reg(
            "device_latest",
            Arc::new(HotTable::new(hot, HotKind::Latest, partitions)),
        )?;
        let live = vec![Filter {
            column: "version".into(),
            op: Op::Eq,
            value: Value::Int(i64::from(version)),
        }];
        let max = limits.max_store_rows;
        let io = tokio::runtime::Handle::try_current().map_err(|e| {
            QueryError::Internal(format!("an engine is made inside a Tokio runtime: {e}"))
        })?;
        let cold = |table, spec: Vec<(String, ColumnType)>, fixed: &Vec<Filter>| {
            Arc::new(ColdTable::new(
                store.clone(),
                io.clone(),
                table,
                spec,
                fixed.clone(),
                max,
            ))
        };
        reg("events", cold("events", columns(&EVENTS_COLUMNS), &vec![]))?;
        reg("dlq", cold("dlq", columns(&DLQ_COLUMNS), &vec![]))?;
        reg("readings_1m", cold("readings_1m", rollup_columns(), &live))?;
        let anomalies = columns(&ANOMALY_COLUMNS);
        reg("anomalies", cold("anomalies", anomalies.clone(), &live))?;
        reg(
            "actions",
            cold("actions", columns(&ACTION_COLUMNS), &vec![]),
        )?;
        reg(
            "action_ledger",
            cold("action_ledger", columns(&LEDGER_COLUMNS), &vec![]),
        )?;
        let store_schema = Arc::new(MemorySchemaProvider::new());
        ctx.catalog("datafusion")
            .ok_or_else(|| QueryError::Internal("no default catalog".into()))?
            .register_schema("store", store_schema)
            .map_err(QueryError::from_df)?;
        let readings = columns(&READINGS_COLUMNS);
        reg("store.readings", cold("readings", readings, &live))?;
        reg(
            "store.readings_1m",
            cold("readings_1m", rollup_columns(), &live),
        )?;
        reg(
            "store.readings_1h",
            cold("readings_1h", rollup_columns(), &live),
        )?;
        let latest = columns(&LATEST_COLUMNS);
        reg("store.device_latest", cold("device_latest", latest, &live))?;
        reg("store.anomalies", cold("anomalies", anomalies, &live))?;
        datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog(
            &ctx,
            "datafusion",
            datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
        )
        .map_err(|e| QueryError::from_df(*e))?;
        let exec = Executor::new()
            .map_err(|e| QueryError::Internal(format!("cannot start the query threads: {e}")))?;
        Ok(Engine {
            ctx,
            version,
            limits,
            exec,
        })
    }

    /// The projection version the store tables of schema `store` (and the hot tables loaded
    /// with this engine) are of.
    pub fn version(&self) -> i32 {
        self.version
    }

    /// The limits every query runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The session (for the Postgres wire protocol's catalog and planning).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Parses, checks and runs one SQL query.
    pub async fn query(&self, sql: &str) -> Result<Output, QueryError> {
        let started = Instant::now();
        let dialect = PostgreSqlDialect {};
        let mut statements = DFParserBuilder::new(sql)
            .with_dialect(&dialect)
            .build()
            .and_then(|mut p| p.parse_statements())
            .map_err(QueryError::from_df)?;
        let statement = match (statements.pop_front(), statements.is_empty()) {
            (Some(s), true) => s,
            (None, _) => {
                return Err(QueryError::Invalid {
                    message: "no SQL statement given".into(),
                    position: None,
                });
            }
            (Some(_), false) => {
                return Err(QueryError::Invalid {
                    message: "one statement per request".into(),
                    position: None,
                });
            }
        };
        match guard::check_df(&statement) {
            Verdict::Query => {}
            Verdict::Session => {
                return Err(QueryError::ReadOnly(
                    "session statements (SET, SHOW, BEGIN, ...) are for Postgres clients; \
                     send a query"
                        .into(),
                ));
            }
            Verdict::Refused(why) => return Err(QueryError::ReadOnly(why)),
        }
        let plan = self.plan(statement).await?;
        self.run(plan, started).await
    }

    /// The plan of a checked statement.
    pub(crate) async fn plan(&self, statement: DfStatement) -> Result<LogicalPlan, QueryError> {
        let state = self.ctx.state();
        let plan = state
            .statement_to_plan(statement)
            .await
            .map_err(QueryError::from_df)?;
        Self::verify(&plan)?;
        Ok(plan)
    }

    /// The second line of defence: whatever the statement looked like, the plan must be a
    /// query.
    pub(crate) fn verify(plan: &LogicalPlan) -> Result<(), QueryError> {
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(plan)
            .map_err(|e| {
                QueryError::ReadOnly(format!(
                    "the SQL endpoint is read-only: {}",
                    e.strip_backtrace()
                ))
            })
    }

    /// Runs a verified plan under the limits: its own memory pool (no spilling to disk), the
    /// time limit, and one row more than the row limit to tell whether it was cut.
    pub(crate) async fn run(
        &self,
        plan: LogicalPlan,
        started: Instant,
    ) -> Result<Output, QueryError> {
        let limits = &self.limits;
        let plan = LogicalPlanBuilder::from(plan)
            .limit(0, Some(limits.max_rows + 1))
            .and_then(LogicalPlanBuilder::build)
            .map_err(QueryError::from_df)?;
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(limits.memory_bytes, 1.0)
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()
            .map_err(QueryError::from_df)?;
        let state = SessionStateBuilder::new_from_existing(self.ctx.state())
            .with_runtime_env(runtime)
            .build();
        let timeout = limits.timeout;
        let work = self.exec.handle().spawn(async move {
            let physical = interruptible(state.create_physical_plan(&plan).await?)?;
            let schema = physical.schema();
            let batches = datafusion::physical_plan::collect(physical, state.task_ctx()).await?;
            Ok::<_, DataFusionError>((schema, batches))
        });
        let abort = work.abort_handle();
        let (schema, mut batches) = match tokio::time::timeout(timeout, work).await {
            Ok(Ok(result)) => result.map_err(QueryError::from_df)?,
            Ok(Err(e)) => return Err(QueryError::Internal(format!("query task failed: {e}"))),
            Err(_) => {
                abort.abort();
                return Err(QueryError::Limit(format!(
                    "query stopped by the time limit of {}",
                    humantime::format_duration(timeout)
                )));
            }
        };
        let mut truncated = false;
        let mut left = limits.max_rows;
        for b in &mut batches {
            if b.num_rows() > left {
                *b = b.slice(0, left);
                truncated = true;
            }
            left -= b.num_rows();
        }
        batches.retain(|b| b.num_rows() > 0);
        Ok(Output {
            schema,
            batches,
            truncated,
            elapsed: started.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_read_from_parser_messages() {
        assert_eq!(
            position_in(
                "sql parser error: Expected: an expression, found: FROM at Line: 2, Column: 8"
            ),
            Some((2, 8))
        );
        assert_eq!(position_in("no position here"), None);
    }
}

/// The engine that answers queries now. The query service replaces it whole when the live
/// projection version changes; a query takes the engine once and keeps it to its end, so it
/// reads one version, never a mix of two.
#[derive(Debug, Clone)]
pub struct Served(Arc<RwLock<Arc<Engine>>>);

impl Served {
    /// Serves `engine` until it is replaced.
    pub fn new(engine: Arc<Engine>) -> Served {
        Served(Arc::new(RwLock::new(engine)))
    }

    /// The engine to answer the next query with.
    pub fn engine(&self) -> Arc<Engine> {
        // Nothing can panic while the lock is held, so even a poisoned one holds an engine.
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The projection version served.
    pub fn version(&self) -> i32 {
        self.engine().version()
    }

    /// Answers later queries from `engine`; queries already running finish on the old one,
    /// which is returned so that it is dropped outside the lock.
    fn replace(&self, engine: Arc<Engine>) -> Arc<Engine> {
        let mut served = self.0.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *served, engine)
    }
}

impl From<Arc<Engine>> for Served {
    fn from(engine: Arc<Engine>) -> Served {
        Served::new(engine)
    }
}

/// What the query service reads and how it answers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The events topics the hot tables follow (the projector's inputs).
    pub inputs: Vec<String>,
    /// The projector's consumer group: its store offsets say what a snapshot reflects. It is
    /// also the projection's name, whose live version is served.
    pub projector_group: String,
    /// The projection version served while the store records none live (before any rebuild).
    pub version: i32,
    /// How often the store is asked which projection version is live. A switch made by a
    /// rebuild is served within about this, plus the time to load the new version.
    pub version_poll: Duration,
    /// How far back (device time) readings are held in memory.
    pub hot_window: Duration,
    /// Bounds on every query.
    pub limits: Limits,
}

impl Settings {
    /// Defaults for a projector `group` reading `inputs`.
    pub fn new(projector_group: &str, inputs: &[String]) -> Settings {
        Settings {
            inputs: inputs.to_vec(),
            projector_group: projector_group.to_owned(),
            version: LIVE_VERSION,
            version_poll: Duration::from_secs(1),
            hot_window: Duration::from_secs(24 * 3600),
            limits: Limits::default(),
        }
    }
}

/// Why the query service stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be read at start.
    #[error("query service: loading the hot tables: {0}")]
    Load(#[from] sluice_store::Error),
    /// The engine could not be built.
    #[error("query service: {0}")]
    Engine(#[from] QueryError),
    /// The events stream failed for good.
    #[error("query service: following the events: {0}")]
    Log(#[from] sluice_log::Error),
    /// A listener failed.
    #[error("query service: serving: {0}")]
    Io(#[from] std::io::Error),
}

/// One projection version, loaded: its hot tables, the offsets they reflect, and an engine
/// over them.
struct Loaded {
    engine: Arc<Engine>,
    hot: Arc<Hot>,
    floors: follow::Floors,
}

async fn load(settings: &Settings, store: &Store, version: i32) -> Result<Loaded, ServeError> {
    let hot = Arc::new(Hot::new(settings.hot_window));
    let floors = follow::load(
        &hot,
        store,
        version,
        &settings.projector_group,
        chrono::Utc::now(),
    )
    .await?;
    let engine = Arc::new(Engine::new(
        hot.clone(),
        store.clone(),
        version,
        settings.limits.clone(),
    )?);
    Ok(Loaded {
        engine,
        hot,
        floors,
    })
}

/// Runs the query service until `shutdown`: loads the hot tables of the live projection
/// version, answers on the given listeners (HTTP and the Postgres wire protocol), follows the
/// events meanwhile, and moves to another version when a rebuild makes it live.
#[allow(clippy::too_many_arguments)]
pub async fn serve<L: sluice_log::Log, S: sluice_schemas::SchemaSource + 'static>(
    settings: &Settings,
    log: &L,
    store: Store,
    codec: Arc<sluice_schemas::EventCodec<S>>,
    http: Option<tokio::net::TcpListener>,
    pg: Option<tokio::net::TcpListener>,
    stats: &follow::FollowStats,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), ServeError> {
    let version = store
        .live_version(&settings.projector_group, settings.version)
        .await?;
    let Loaded {
        engine,
        hot,
        floors,
    } = load(settings, &store, version).await?;
    stats.loaded.store(hot.len() as u64, Ordering::Relaxed);
    stats.version.store(version, Ordering::Relaxed);
    tracing::info!(
        version,
        readings = hot.len(),
        "query service: hot tables loaded"
    );
    let served = Served::new(engine);
    let keys = auth::Keys::new(store.clone());
    let mut servers = tokio::task::JoinSet::new();
    if let Some(listener) = http {
        let router = http::Api::new(served.clone(), keys.clone()).router();
        let stop = shutdown.clone();
        servers.spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
    }
    if let Some(listener) = pg {
        servers.spawn(pg::serve(served.clone(), keys, listener, shutdown.clone()));
    }
    let first = (hot, floors);
    let followed = follow_live(
        settings, log, &store, &codec, &served, first, stats, &shutdown,
    )
    .await;
    shutdown.cancel();
    while let Some(joined) = servers.join_next().await {
        if let Ok(Err(e)) = joined {
            tracing::warn!(error = %e, "query service: a listener failed");
        }
    }
    followed?;
    Ok(())
}

/// Follows the events into the served hot tables and asks the store every
/// `settings.version_poll` which version is live. When another one is, loads it beside the
/// served one (which keeps answering), follows it, answers from it, then stops following the
/// old one. A version that fails to load is tried again at the next poll.
#[allow(clippy::too_many_arguments)]
async fn follow_live<L: sluice_log::Log, S: sluice_schemas::SchemaSource + 'static>(
    settings: &Settings,
    log: &L,
    store: &Store,
    codec: &sluice_schemas::EventCodec<S>,
    served: &Served,
    (hot, floors): (Arc<Hot>, follow::Floors),
    stats: &follow::FollowStats,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<(), sluice_log::Error> {
    let start = move |hot: Arc<Hot>, floors: follow::Floors| {
        let stop = shutdown.child_token();
        let token = stop.clone();
        let follower = Box::pin(async move {
            follow::follow(log, &settings.inputs, codec, &hot, &floors, stats, token).await
        });
        (stop, follower)
    };
    let (mut stop, mut following) = start(hot, floors);
    // `interval` refuses a zero period.
    let mut poll = tokio::time::interval(settings.version_poll.max(Duration::from_millis(10)));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is now, and the live version was just read.
    poll.tick().await;
    // One check at a time, on a task of its own so that a slow store or a long load does not
    // hold the follower up; dropping the set on return aborts it.
    let mut checks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            followed = &mut following => return followed,
            _ = poll.tick(), if checks.is_empty() => {
                let (settings, store) = (settings.clone(), store.clone());
                let from = served.version();
                checks.spawn(async move {
                    let group = &settings.projector_group;
                    let live = store.live_version(group, settings.version).await?;
                    if live == from {
                        return Ok(None);
                    }
                    tracing::info!(from, to = live, "query service: another version is live");
                    load(&settings, &store, live).await.map(Some)
                });
            }
            Some(checked) = checks.join_next(), if !checks.is_empty() => {
                stats.version_checks.fetch_add(1, Ordering::Relaxed);
                let next: Loaded = match checked {
                    Ok(Ok(Some(next))) => next,
                    Ok(Ok(None)) => continue,
                    Ok(Err(e)) => {
                        tracing::warn!(
                            error = %e,
                            version = served.version(),
                            "query service: cannot read or load the live projection version; \
                             serving the same one, trying again at the next poll"
                        );
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "query service: the version check panicked");
                        continue;
                    }
                };
                let from = served.version();
                let (to, readings) = (next.engine.version(), next.hot.len());
                // The new follower starts at its snapshot's offsets, so the new hot tables
                // catch up with whatever was written during the load: answers may trail by
                // that much right after the swap, but nothing is missed.
                let (next_stop, next_following) = start(next.hot, next.floors);
                // The stats first: whoever sees an answer of the new version sees them too.
                stats.loaded.store(readings as u64, Ordering::Relaxed);
                stats.version.store(to, Ordering::Relaxed);
                served.replace(next.engine);
                stop.cancel();
                if let Err(e) = std::mem::replace(&mut following, next_following).await {
                    tracing::warn!(
                        error = %e,
                        version = from,
                        "query service: the follower of the retired version failed"
                    );
                }
                stop = next_stop;
                tracing::info!(
                    from,
                    to,
                    readings,
                    "query service: now serving projection version {to}"
                );
            }
        }
    }
}
