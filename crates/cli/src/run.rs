//! `sluice run <processor>`: one processor of a topology, on the log and store given, until
//! SIGINT or SIGTERM. The processors' own crates do the work; this wires them from the
//! topology (config, input, routes), makes missing topics on the embedded log, logs a start
//! line and counters every 10 s, and shuts down cleanly.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use sluice_log::{EmbeddedLog, KafkaLog, Log, TopicSpec};
use sluice_schemas::{AnySchemas, EventCodec, HttpRegistry, Registry, SchemaSource};
use sluice_store::{Store, StoreOptions};
use sluice_topology::{Kind, KindConfig, Processor, Topology};
use tokio_util::sync::CancellationToken;

use crate::cli::RunArgs;
use crate::commands::{load_schemas, redact, runtime, schemas_for, usage_error};

/// Partitions of a topic the topology does not declare.
const DEFAULT_PARTITIONS: u32 = 6;
/// How often the counters are logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

pub fn run(args: &RunArgs) -> Result<ExitCode> {
    let topology = load_topology(&args.topology)?;
    // The SQL endpoint is not a processor of the topology: it serves what the projector wrote.
    if args.processor == "query" && topology.processor("query").is_none() {
        return crate::query::run_query(args, &topology);
    }
    let Some(processor) = topology.processor(&args.processor) else {
        let names: Vec<&str> = topology
            .processors
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        bail!(
            "no processor {:?} in {}; its processors are: {}",
            args.processor,
            args.topology.display(),
            names.join(", ")
        );
    };
    match processor.kind {
        Kind::IngestValidator
        | Kind::OutboxRelay
        | Kind::MqttBridge
        | Kind::HttpIngest
        | Kind::Projector
        | Kind::Inferencer
        | Kind::Executor
        | Kind::ActionRouter => {}
    }
    // The bridge only moves bytes from the broker to the log; everything else has a store.
    let needs_store = processor.kind != Kind::MqttBridge;
    let store_url = args.store.as_deref();
    let log_url = match args.log.as_deref() {
        Some(url) if store_url.is_some() || !needs_store => url,
        _ if needs_store => {
            return usage_error(&format!(
                "sluice run {} needs --log URL and --store URL (or SLUICE__LOG and SLUICE__STORE)",
                processor.name
            ));
        }
        _ => {
            return usage_error(&format!(
                "sluice run {} needs --log URL (or SLUICE__LOG)",
                processor.name
            ));
        }
    };
    runtime()?.block_on(async {
        let store = match store_url.filter(|_| needs_store) {
            Some(url) => {
                let opts = StoreOptions {
                    migrate_on_connect: args.migrate,
                    ..StoreOptions::default()
                };
                Some(
                    Store::connect(url, opts)
                        .await
                        .with_context(|| format!("cannot open the store {}", redact(url)))?,
                )
            }
            None => None,
        };
        let wiring = Wiring {
            topology: &topology,
            processor,
            args,
            log_url,
            store_url: store_url.unwrap_or(""),
        };
        let result = if log_url.starts_with("embedded://") {
            wiring
                .on(EmbeddedLog::from_url(log_url)?, store.as_ref(), true)
                .await
        } else if log_url.starts_with("kafka://") {
            wiring
                .on(KafkaLog::from_url(log_url)?, store.as_ref(), false)
                .await
        } else {
            Err(anyhow!(
                "invalid log URL {log_url:?}: expected embedded://DIR or kafka://host:port \
                 (kafka-mock:// lives inside one process and is for `sluice bench` only)"
            ))
        };
        if let Some(store) = store {
            store.close().await;
        }
        result.map(|()| ExitCode::SUCCESS)
    })
}

pub(crate) fn load_topology(path: &Path) -> Result<Topology> {
    sluice_topology::load(path).map_err(|issues| {
        let lines: Vec<String> = issues.iter().map(ToString::to_string).collect();
        anyhow!(
            "{} has {} problem(s); `sluice topology validate` shows them:\n  {}",
            path.display(),
            issues.len(),
            lines.join("\n  ")
        )
    })
}

/// One processor of a topology and where it runs.
struct Wiring<'a> {
    topology: &'a Topology,
    processor: &'a Processor,
    args: &'a RunArgs,
    log_url: &'a str,
    store_url: &'a str,
}

impl Wiring<'_> {
    async fn on<L: Log>(&self, log: L, store: Option<&Store>, create_topics: bool) -> Result<()> {
        let p = self.processor;
        let topics: Vec<&str> = match p.kind {
            Kind::IngestValidator | Kind::Projector => {
                p.inputs.iter().map(String::as_str).collect()
            }
            Kind::Inferencer | Kind::Executor | Kind::ActionRouter => p
                .inputs
                .iter()
                .chain(p.outputs.values())
                .map(String::as_str)
                .collect(),
            _ => p.outputs.values().map(String::as_str).collect(),
        };
        ensure_topics(&log, self.topology, &topics, create_topics).await?;
        // Registered before the start line: once it is out, SIGTERM means a clean stop.
        let token = CancellationToken::new();
        sluice_runtime::cancel_on_signals(token.clone()).context("cannot handle SIGINT/SIGTERM")?;
        match (p.kind, store) {
            (Kind::MqttBridge, _) => self.bridge(&log, token).await,
            (Kind::IngestValidator, Some(store)) => {
                self.validator(&log, store, self.schemas()?, token).await
            }
            (Kind::HttpIngest, Some(store)) => self.http(&log, store, self.schemas()?, token).await,
            (Kind::Projector, Some(store)) => {
                self.projector(&log, store, self.schemas()?, token).await
            }
            (Kind::Inferencer, Some(store)) => {
                self.inferencer(&log, store, self.schemas()?, token).await
            }
            (Kind::Executor, Some(store)) => {
                self.executor(&log, store, self.schemas()?, token).await
            }
            (Kind::ActionRouter, Some(store)) => {
                self.router(&log, store, self.schemas()?, token).await
            }
            (_, Some(store)) => self.relay(&log, store, token).await,
            (_, None) => bail!("{} needs a store", p.name),
        }
    }

    /// The registry given with --registry, else the schemas folder in a registry of its own.
    fn schemas(&self) -> Result<AnySchemas> {
        schemas_of(self.args)
    }

    async fn bridge<L: Log>(&self, log: &L, token: CancellationToken) -> Result<()> {
        use sluice_mqtt_bridge::Stats;
        let p = self.processor;
        let mut settings = bridge_settings(p)?;
        if let Ok(id) = std::env::var("SLUICE__MQTT_CLIENT_ID") {
            settings.config.client_id = Some(id);
        }
        if let Ok(url) = std::env::var("SLUICE__MQTT_BROKER") {
            settings.config.broker = url;
        }
        if let Some(var) = &settings.config.password_env {
            let password = std::env::var(var).with_context(|| {
                format!(
                    "{} reads the broker password from ${var}, which is not set",
                    p.name
                )
            })?;
            settings.password = Some(password);
        }
        let stats = Arc::new(Stats::default());
        tracing::info!(
            processor = %p.name,
            kind = %p.kind,
            broker = %settings.config.broker,
            topics = ?settings.config.topics,
            client_id = %settings.client_id(),
            output = %settings.output,
            log = %self.log_url,
            "started"
        );
        let progress = {
            let stats = stats.clone();
            let name = p.name.clone();
            let mut previous = 0;
            every(PROGRESS_EVERY, move || {
                let acked = stats.acknowledged.load(Ordering::Relaxed);
                tracing::info!(
                    processor = %name,
                    received = stats.received.load(Ordering::Relaxed),
                    acknowledged = acked,
                    acknowledged_per_s = rate(&mut previous, acked),
                    connections = stats.connections.load(Ordering::Relaxed),
                    connection_errors = stats.connection_errors.load(Ordering::Relaxed),
                    write_retries = stats.write_retries.load(Ordering::Relaxed),
                    "progress"
                );
            })
        };
        let result = sluice_mqtt_bridge::run(&settings, log, &stats, token)
            .await
            .map_err(anyhow::Error::from);
        progress.abort();
        tracing::info!(
            processor = %p.name,
            acknowledged = stats.acknowledged.load(Ordering::Relaxed),
            ok = result.is_ok(),
            "stopped"
        );
        result
    }

    async fn http<L: Log>(
        &self,
        log: &L,
        store: &Store,
        schemas: AnySchemas,
        token: CancellationToken,
    ) -> Result<()> {
        use sluice_http_ingest::{Ingest, Stats};
        let p = self.processor;
        let mut settings = http_settings(p)?;
        if let Ok(addr) = std::env::var("SLUICE__HTTP_ADDR") {
            settings.config.listen = addr;
        }
        let addr = settings.config.listen.clone();
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let producer = log.producer()?;
        let ingest = Ingest::new(
            settings,
            producer,
            store.clone(),
            Arc::new(EventCodec::new(schemas)),
            stats.clone(),
        );
        // The address goes to stdout so scripts (and tests) can pick up an ephemeral port.
        println!("http-ingest listening on http://{local}");
        tracing::info!(
            processor = %p.name,
            kind = %p.kind,
            %local,
            log = %self.log_url,
            store = %redact(self.store_url),
            "started"
        );
        let progress = {
            let stats = stats.clone();
            let name = p.name.clone();
            let mut previous = 0;
            every(PROGRESS_EVERY, move || {
                let accepted = stats.accepted.load(Ordering::Relaxed);
                tracing::info!(
                    processor = %name,
                    requests = stats.requests.load(Ordering::Relaxed),
                    accepted,
                    accepted_per_s = rate(&mut previous, accepted),
                    rejected = stats.rejected.load(Ordering::Relaxed),
                    unauthorized = stats.unauthorized.load(Ordering::Relaxed),
                    rate_limited = stats.rate_limited.load(Ordering::Relaxed),
                    unavailable = stats.unavailable.load(Ordering::Relaxed),
                    "progress"
                );
            })
        };
        let result = sluice_http_ingest::serve(&ingest, listener, token)
            .await
            .context("the HTTP server failed");
        progress.abort();
        tracing::info!(
            processor = %p.name,
            accepted = stats.accepted.load(Ordering::Relaxed),
            ok = result.is_ok(),
            "stopped"
        );
        result
    }

    async fn validator<L: Log, S: SchemaSource + 'static>(
        &self,
        log: &L,
        store: &Store,
        schemas: S,
        token: CancellationToken,
    ) -> Result<()> {
        use sluice_ingest_validator::Stats;
        let p = self.processor;
        let settings = validator_settings(p, self.topology)?;
        let input = &settings.input;
        let codec = EventCodec::new(schemas);
        let stats = Arc::new(Stats::default());
        tracing::info!(
            processor = %p.name,
            kind = %p.kind,
            input = %input,
            routes = ?settings.routes,
            log = %self.log_url,
            store = %redact(self.store_url),
            "started"
        );
        let progress = {
            let stats = stats.clone();
            let name = p.name.clone();
            let mut previous = 0;
            every(PROGRESS_EVERY, move || {
                let appended = stats.appended.load(Ordering::Relaxed);
                tracing::info!(
                    processor = %name,
                    appended,
                    appended_per_s = rate(&mut previous, appended),
                    duplicates = stats.duplicates.load(Ordering::Relaxed),
                    rejected = stats.rejected.load(Ordering::Relaxed),
                    skipped = stats.skipped.load(Ordering::Relaxed),
                    retried = stats.retried.load(Ordering::Relaxed),
                    batches = stats.batches.load(Ordering::Relaxed),
                    "progress"
                );
            })
        };
        let result = sluice_ingest_validator::run(&settings, log, store, &codec, &stats, token)
            .await
            .map_err(anyhow::Error::from);
        progress.abort();
        tracing::info!(
            processor = %p.name,
            appended = stats.appended.load(Ordering::Relaxed),
            duplicates = stats.duplicates.load(Ordering::Relaxed),
            rejected = stats.rejected.load(Ordering::Relaxed),
            ok = result.is_ok(),
            "stopped"
        );
        result
    }

    async fn projector<L: Log>(
        &self,
        log: &L,
        store: &Store,
        schemas: AnySchemas,
        token: CancellationToken,
    ) -> Result<()> {
        use sluice_projector::Stats;
        let p = self.processor;
        let settings = projector_settings(p);
        let codec = EventCodec::new(schemas);
        let stats = Arc::new(Stats::default());
        tracing::info!(
            processor = %p.name,
            kind = %p.kind,
            inputs = ?p.inputs,
            version = settings.version,
            log = %self.log_url,
            store = %redact(self.store_url),
            "started"
        );
        let progress = {
            let stats = stats.clone();
            let name = p.name.clone();
            let mut previous = 0;
            every(PROGRESS_EVERY, move || {
                let readings = stats.readings.load(Ordering::Relaxed);
                tracing::info!(
                    processor = %name,
                    readings,
                    readings_per_s = rate(&mut previous, readings),
                    duplicates = stats.duplicates.load(Ordering::Relaxed),
                    late = stats.late.load(Ordering::Relaxed),
                    statuses = stats.statuses.load(Ordering::Relaxed),
                    rejected = stats.rejected.load(Ordering::Relaxed),
                    skipped = stats.skipped.load(Ordering::Relaxed),
                    "progress"
                );
            })
        };
        let result = sluice_projector::run(&settings, log, store, &codec, &stats, token)
            .await
            .map_err(anyhow::Error::from);
        progress.abort();
        tracing::info!(
            processor = %p.name,
            readings = stats.readings.load(Ordering::Relaxed),
            ok = result.is_ok(),
            "stopped"
        );
        result
    }

    async fn inferencer<L: Log>(
        &self,
        log: &L,
        store: &Store,
        schemas: AnySchemas,
        token: CancellationToken,
    ) -> Result<()> {
        let p = self.processor;
        let settings = inferencer_settings(p);
        let config = inferencer_runtime(p, &settings);
        let inferencer =
            Arc::new(sluice_inferencer::Inferencer::start(settings, Some(store.clone())).await);
        let codec = EventCodec::new(schemas);
        let stats = inferencer.stats();
        let models = model_lines(self.topology, p, &inferencer);
        tracing::info!(
            processor = %p.name,
            kind = %p.kind,
            inputs = ?p.inputs,
            models = ?models,
            log = %self.log_url,
            store = %redact(self.store_url),
            "started"
        );
        let watch = tokio::spawn(inferencer.clone().watch(token.clone()));
        let progress = {
            let stats = stats.clone();
            let name = p.name.clone();
            let mut previous = 0;
            every(PROGRESS_EVERY, move || {
                let model = stats.model_scored.load(Ordering::Relaxed);
                let fallback = stats.fallback_scored.load(Ordering::Relaxed);
                tracing::info!(
                    processor = %name,
                    scored = model + fallback,
                    scored_per_s = rate(&mut previous, model + fallback),
                    by_model = model,
                    by_fallback = fallback,
                    anomalies = stats.anomalies.load(Ordering::Relaxed),
                    rejected = stats.rejected.load(Ordering::Relaxed),
                    "progress"
                );
            })
        };
        let result = sluice_runtime::run(
            &*inferencer,
            &config,
            log,
            &codec,
            store,
            &sluice_runtime::NoMetrics,
            token,
        )
        .await
        .map_err(anyhow::Error::from);
        progress.abort();
        watch.abort();
        tracing::info!(
            processor = %p.name,
            scored = stats.model_scored.load(Ordering::Relaxed) + stats.fallback_scored.load(Ordering::Relaxed),
            anomalies = stats.anomalies.load(Ordering::Relaxed),
            ok = result.is_ok(),
            "stopped"
        );
        result
    }

    async fn router<L: Log>(
        &self,
        log: &L,
        store: &Store,
        schemas: AnySchemas,
        token: CancellationToken,
    ) -> Result<()> {
        let p = self.processor;
        let (router, config) = router_of(p)?;
        let router = Arc::new(router);
        let stats = router.stats();
        let codec = EventCodec::new(schemas);
        tracing::info!(
            processor = %p.name,
            kind = %p.kind,
            inputs = ?p.inputs,
            rules = router.rules(),
            log = %self.log_url,
            store = %redact(self.store_url),
            "started"
        );
        let progress = {
            let stats = stats.clone();
            let name = p.name.clone();
            every(PROGRESS_EVERY, move || {
                tracing::info!(
                    processor = %name,
                    requested = stats.requested.load(Ordering::Relaxed),
                    denied = stats.denied.load(Ordering::Relaxed),
                    suppressed = stats.suppressed.load(Ordering::Relaxed),
                    deduplicated = stats.deduplicated.load(Ordering::Relaxed),
                    rate_limited = stats.rate_limited.load(Ordering::Relaxed),
                    eval_errors = stats.eval_errors.load(Ordering::Relaxed),
                    "progress"
                );
            })
        };
        let result = sluice_runtime::run(
            &*router,
            &config,
            log,
            &codec,
            store,
            &sluice_runtime::NoMetrics,
            token,
        )
        .await
        .map_err(anyhow::Error::from);
        progress.abort();
        tracing::info!(
            processor = %p.name,
            requested = stats.requested.load(Ordering::Relaxed),
            ok = result.is_ok(),
            "stopped"
        );
        result
    }

    async fn executor<L: Log>(
        &self,
        log: &L,
        store: &Store,
        schemas: AnySchemas,
        token: CancellationToken,
    ) -> Result<()> {
        let p = self.processor;
        let settings = executor_settings(p)?;
        let outbound = executor_outbound(&settings.config)?;
        let codec = EventCodec::new(schemas);
        let stats = Arc::new(sluice_executor::Stats::default());
        let endpoints: Vec<&str> = settings
            .config
            .endpoints
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        tracing::info!(
            processor = %p.name,
            kind = %p.kind,
            input = %settings.input,
            endpoints = ?endpoints,
            log = %self.log_url,
            store = %redact(self.store_url),
            "started"
        );
        let progress = {
            let stats = stats.clone();
            let name = p.name.clone();
            let mut previous = 0;
            every(PROGRESS_EVERY, move || {
                let delivered = stats.delivered.load(Ordering::Relaxed);
                tracing::info!(
                    processor = %name,
                    delivered,
                    delivered_per_s = rate(&mut previous, delivered),
                    enqueued = stats.enqueued.load(Ordering::Relaxed),
                    duplicates = stats.duplicates.load(Ordering::Relaxed),
                    retried = stats.retried.load(Ordering::Relaxed),
                    short_circuited = stats.short_circuited.load(Ordering::Relaxed),
                    dead = stats.dead.load(Ordering::Relaxed),
                    denied = stats.denied.load(Ordering::Relaxed),
                    "progress"
                );
            })
        };
        let result =
            sluice_executor::run::run(&settings, log, store, &codec, outbound, &stats, token)
                .await
                .map_err(anyhow::Error::from);
        progress.abort();
        tracing::info!(
            processor = %p.name,
            delivered = stats.delivered.load(Ordering::Relaxed),
            ok = result.is_ok(),
            "stopped"
        );
        result
    }

    async fn relay<L: Log>(&self, log: &L, store: &Store, token: CancellationToken) -> Result<()> {
        use sluice_outbox_relay::Stats;
        let p = self.processor;
        let settings = relay_settings(p);
        let stats = Arc::new(Stats::default());
        tracing::info!(
            processor = %p.name,
            kind = %p.kind,
            outputs = ?p.outputs,
            log = %self.log_url,
            store = %redact(self.store_url),
            "started (run one outbox-relay per store)"
        );
        let progress = {
            let stats = stats.clone();
            let name = p.name.clone();
            let mut previous = 0;
            every(PROGRESS_EVERY, move || {
                let published = stats.published.load(Ordering::Relaxed);
                tracing::info!(
                    processor = %name,
                    published,
                    published_per_s = rate(&mut previous, published),
                    failed = stats.failed.load(Ordering::Relaxed),
                    passes = stats.passes.load(Ordering::Relaxed),
                    "progress"
                );
            })
        };
        let result = sluice_outbox_relay::run(&settings, log, store, &stats, token)
            .await
            .map_err(anyhow::Error::from);
        progress.abort();
        tracing::info!(
            processor = %p.name,
            published = stats.published.load(Ordering::Relaxed),
            failed = stats.failed.load(Ordering::Relaxed),
            ok = result.is_ok(),
            "stopped"
        );
        result
    }
}

/// The one output of an edge processor: the raw topic.
fn raw_output(p: &Processor) -> Result<&str> {
    p.outputs
        .get("raw")
        .or_else(|| p.outputs.values().next())
        .map(String::as_str)
        .with_context(|| format!("{} has no output topic in the topology", p.name))
}

// Each processor's settings from its topology entry: `sluice run` and `sluice dev` both start
// from these, then apply their own overrides.

pub(crate) fn bridge_settings(p: &Processor) -> Result<sluice_mqtt_bridge::Settings> {
    let mut settings = sluice_mqtt_bridge::Settings::new(&p.name, raw_output(p)?);
    if let KindConfig::MqttBridge(config) = &p.config {
        settings.config = config.clone();
    }
    Ok(settings)
}

pub(crate) fn http_settings(p: &Processor) -> Result<sluice_http_ingest::Settings> {
    let mut settings = sluice_http_ingest::Settings::new(&p.name, raw_output(p)?);
    if let KindConfig::HttpIngest(config) = &p.config {
        settings.config = config.clone();
    }
    Ok(settings)
}

pub(crate) fn validator_settings(
    p: &Processor,
    topology: &Topology,
) -> Result<sluice_ingest_validator::Settings> {
    let input = match p.inputs.as_slice() {
        [one] => one,
        other => bail!(
            "ingest-validator {} reads exactly one input topic; the topology gives it {}",
            p.name,
            other.len()
        ),
    };
    let mut settings = sluice_ingest_validator::Settings::new(&p.name, input);
    settings.routes = routes(topology);
    if let KindConfig::IngestValidator(config) = &p.config {
        settings.config = config.clone();
    }
    Ok(settings)
}

pub(crate) fn relay_settings(p: &Processor) -> sluice_outbox_relay::Settings {
    let mut settings = sluice_outbox_relay::Settings::new(&p.name);
    if let KindConfig::OutboxRelay(config) = &p.config {
        settings.config = config.clone();
    }
    settings
}

pub(crate) fn projector_settings(p: &Processor) -> sluice_projector::Settings {
    let inputs: Vec<&str> = p.inputs.iter().map(String::as_str).collect();
    let mut settings = sluice_projector::Settings::new(&p.name, &inputs);
    if let KindConfig::Projector(config) = &p.config {
        settings.config = config.clone();
    }
    settings
}

pub(crate) fn inferencer_settings(p: &Processor) -> sluice_inferencer::Settings {
    let config = match &p.config {
        KindConfig::Inferencer(config) => config.clone(),
        _ => sluice_inferencer::InferencerConfig::default(),
    };
    sluice_inferencer::Settings::new(&p.name, config)
}

/// The action router of a topology processor, and its processor-loop settings.
pub(crate) fn router_of(
    p: &Processor,
) -> Result<(sluice_action_router::Router, sluice_runtime::RuntimeConfig)> {
    let config = match &p.config {
        KindConfig::ActionRouter(config) => config.clone(),
        _ => sluice_topology::ActionRouterConfig::default(),
    };
    let router = sluice_action_router::Router::new(&p.name, &config)?;
    let inputs: Vec<&str> = p.inputs.iter().map(String::as_str).collect();
    let mut runtime = sluice_runtime::RuntimeConfig::new(&p.name, &inputs);
    runtime.ports = p.outputs.clone();
    Ok((router, runtime))
}

/// The executor's settings: its input (`actions.requested`) and its `results` port.
pub(crate) fn executor_settings(p: &Processor) -> Result<sluice_executor::Settings> {
    let config = match &p.config {
        KindConfig::Executor(config) => config.clone(),
        _ => sluice_topology::ExecutorConfig::default(),
    };
    let [input] = p.inputs.as_slice() else {
        bail!(
            "executor {} needs exactly one input (the actions.requested topic)",
            p.name
        );
    };
    let mut settings = sluice_executor::Settings::new(&p.name, input, config);
    settings.results = p.outputs.get("results").cloned();
    Ok(settings)
}

/// The executor's endpoints with their secrets (from the environment, never the topology),
/// the HTTP client under the destination policy, and the default rate limits.
pub(crate) fn executor_outbound(
    config: &sluice_topology::ExecutorConfig,
) -> Result<sluice_executor::Outbound> {
    executor_outbound_with(config, sluice_executor::ResolvedEndpoint::from_env)
}

/// [`executor_outbound`] with each endpoint's secret found by `resolve`.
pub(crate) fn executor_outbound_with(
    config: &sluice_topology::ExecutorConfig,
    resolve: impl Fn(
        sluice_topology::Endpoint,
        sluice_executor::Breaker,
    ) -> sluice_executor::Result<sluice_executor::ResolvedEndpoint>,
) -> Result<sluice_executor::Outbound> {
    let destinations = sluice_executor::Destinations::from_config(config).map_err(|bad| {
        let bad: Vec<String> = bad.iter().map(ToString::to_string).collect();
        anyhow!("executor allow_hosts: {}", bad.join("; "))
    })?;
    let endpoints = sluice_executor::resolve_endpoints_with(config, &destinations, resolve)?;
    Ok(sluice_executor::Outbound {
        deliverer: sluice_executor::Deliverer::new(destinations)?,
        endpoints,
        limits: sluice_executor::Limits::from_config(config),
    })
}

/// What scores each input of inferencer `p`, a line per event type: the model and version,
/// or the fallback.
pub(crate) fn model_lines(
    topology: &Topology,
    p: &Processor,
    inferencer: &sluice_inferencer::Inferencer,
) -> Vec<String> {
    p.inputs
        .iter()
        .filter_map(|t| topology.topic(t).and_then(|t| t.subject.as_deref()))
        .map(|subject| match inferencer.model_of(subject) {
            Some((name, version)) => format!("{subject}: {name} version {version}"),
            None => format!(
                "{subject}: {} fallback (the log says why no model)",
                sluice_inferencer::FALLBACK_MODEL
            ),
        })
        .collect()
}

/// The processor loop's settings for an inferencer: its inputs and outputs, and the model's
/// micro-batch (a poll is scored in one call).
pub(crate) fn inferencer_runtime(
    p: &Processor,
    settings: &sluice_inferencer::Settings,
) -> sluice_runtime::RuntimeConfig {
    let inputs: Vec<&str> = p.inputs.iter().map(String::as_str).collect();
    let mut config = sluice_runtime::RuntimeConfig::new(&p.name, &inputs);
    config.ports = p.outputs.clone();
    config.max_batch = settings.config.max_batch;
    config.max_wait = settings.config.max_wait;
    config
}

/// The registry given with --registry, else the schemas folder in a registry of its own.
pub(crate) fn schemas_of(args: &RunArgs) -> Result<AnySchemas> {
    if let Some(url) = &args.registry {
        let registry = HttpRegistry::new(url)
            .with_context(|| format!("cannot use the schema registry {url}"))?;
        return Ok(AnySchemas::Remote(Arc::new(registry)));
    }
    let dir = schemas_for(&args.topology, args.schemas.as_deref())?;
    let registry = Arc::new(Registry::in_memory());
    registry
        .register_dir(&load_schemas(&dir)?)
        .with_context(|| format!("cannot register the schemas of {}", dir.display()))?;
    Ok(AnySchemas::Local(registry))
}

/// Event type → topic, from every outbox-relay's outputs: where the validator's outbox entries
/// must go for the relay to publish them where the topology says.
fn routes(topology: &Topology) -> BTreeMap<String, String> {
    topology
        .processors
        .iter()
        .filter(|p| p.kind == Kind::OutboxRelay)
        .flat_map(|p| p.outputs.clone())
        .collect()
}

/// Creates the topics missing on the log (embedded: `create`), with the topology's partitions
/// and retention; on Kafka a missing topic is only warned about (topics are provisioned there).
pub(crate) async fn ensure_topics<L: Log>(
    log: &L,
    topology: &Topology,
    names: &[&str],
    create: bool,
) -> Result<()> {
    for &name in names {
        match log.partitions(name).await {
            Ok(_) => {}
            Err(sluice_log::Error::UnknownTopic(_)) if create => {
                let declared = topology.topic(name);
                let spec = TopicSpec {
                    retention: declared.map(|t| t.retention),
                    ..TopicSpec::new(name, declared.map_or(DEFAULT_PARTITIONS, |t| t.partitions))
                };
                log.create_topic(&spec)
                    .await
                    .with_context(|| format!("cannot create topic {name}"))?;
                tracing::info!(topic = name, partitions = spec.partitions, "topic created");
            }
            Err(sluice_log::Error::UnknownTopic(_)) => {
                tracing::warn!(topic = name, "topic does not exist on the log; create it");
            }
            Err(e) => return Err(e).with_context(|| format!("cannot look up topic {name}")),
        }
    }
    Ok(())
}

/// Calls `f` every `period` (not at once), on its own task.
fn every(period: Duration, mut f: impl FnMut() + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tick.tick().await;
            f();
        }
    })
}

/// Events per second since the previous call, given the counter now.
fn rate(previous: &mut u64, now: u64) -> f64 {
    let per_s = now.saturating_sub(*previous) as f64 / PROGRESS_EVERY.as_secs_f64();
    *previous = now;
    (per_s * 10.0).round() / 10.0
}
