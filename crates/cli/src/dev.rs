//! `sluice dev`: the whole pipeline in one process on embedded storage. The embedded log, the
//! SQLite store and the schema registry live in the data directory; an MQTT broker, the HTTP
//! ingest API and the registry API listen on local ports, printed at start with commands to try.
//! Every processor built so far runs, wired from the topology as `sluice run` wires it. Ctrl-C
//! stops the edge first, lets the validator and the relay catch up (bounded), then stops them;
//! a restart on the same directory continues where it stopped.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use sluice_log::{EmbeddedLog, EmbeddedOptions, Log, TopicSpec};
use sluice_mqtt_bridge::EmbeddedBroker;
use sluice_schemas::{AnySchemas, EventCodec, Registry};
use sluice_store::{Role, Store, StoreOptions};
use sluice_topology::{KindConfig, Topology};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::DevArgs;
use crate::commands::load_schemas;

/// The topology `sluice dev` runs when none is given and `topologies/default.yaml` is absent.
const BUILTIN_TOPOLOGY: &str = include_str!("../../../topologies/default.yaml");
/// The schemas it registers when no schemas folder is found, so it runs from any folder.
const BUILTIN_SCHEMAS: &[(&str, &str)] = &[
    (
        "action.requested/1.avsc",
        include_str!("../../../schemas/action.requested/1.avsc"),
    ),
    (
        "action.requested/2.avsc",
        include_str!("../../../schemas/action.requested/2.avsc"),
    ),
    (
        "action.result/1.avsc",
        include_str!("../../../schemas/action.result/1.avsc"),
    ),
    (
        "device.status/1.avsc",
        include_str!("../../../schemas/device.status/1.avsc"),
    ),
    (
        "inference.result/1.avsc",
        include_str!("../../../schemas/inference.result/1.avsc"),
    ),
    (
        "sensor.reading/1.avsc",
        include_str!("../../../schemas/sensor.reading/1.avsc"),
    ),
    (
        "sensor.reading/2.avsc",
        include_str!("../../../schemas/sensor.reading/2.avsc"),
    ),
];
/// Where each listener goes when its flag is not given; a busy default falls back to a free
/// port (a given address that is busy is an error).
const DEFAULT_MQTT: &str = "127.0.0.1:1883";
const DEFAULT_HTTP: &str = "127.0.0.1:8080";
const DEFAULT_REGISTRY: &str = "127.0.0.1:8081";
const DEFAULT_SQL: &str = crate::query::DEFAULT_HTTP;
const DEFAULT_PG: &str = crate::query::DEFAULT_PG;
/// How long a stop waits for the validator, the relay and the projector to take in what the
/// edge wrote.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long a stop keeps taking messages from the embedded broker while they keep coming.
const BROKER_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

pub fn dev(args: &DevArgs) -> Result<ExitCode> {
    let run_for = args
        .run_for
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()
        .context("--for must be a duration such as 30s or 5m")?;
    crate::commands::runtime()?.block_on(async { Dev::start(args).await?.run(run_for).await })
}

/// What runs, and the handles to stop it.
struct Dev {
    data_dir: PathBuf,
    log: EmbeddedLog,
    store: Store,
    topology: Topology,
    schemas: Arc<Registry>,
    broker: EmbeddedBroker,
    http: Option<tokio::net::TcpListener>,
    registry: Option<tokio::net::TcpListener>,
    sql: Option<tokio::net::TcpListener>,
    pg: Option<tokio::net::TcpListener>,
    key_file: PathBuf,
    sql_key_file: PathBuf,
    simulate: Option<(u32, u32)>,
    webhook_url: Option<String>,
}

/// Counters the progress line and the drain read.
#[derive(Default)]
struct Counters {
    bridge: Arc<sluice_mqtt_bridge::Stats>,
    http: Arc<sluice_http_ingest::Stats>,
    validator: Arc<sluice_ingest_validator::Stats>,
    relay: Arc<sluice_outbox_relay::Stats>,
    projector: Arc<sluice_projector::Stats>,
    query: Arc<sluice_query::follow::FollowStats>,
    /// Whether a projector runs (the drain waits for it only then).
    projecting: bool,
    inferencer: Option<Arc<sluice_inferencer::Stats>>,
    router: Option<Arc<sluice_action_router::Stats>>,
    executor: Option<Arc<sluice_executor::Stats>>,
    simulator: Arc<sluice_simulator::Counters>,
}

impl Counters {
    /// Messages the edge wrote to the raw topic in this run.
    fn written(&self) -> u64 {
        self.bridge.acknowledged.load(Ordering::Relaxed)
            + self.http.accepted.load(Ordering::Relaxed)
    }

    /// Raw messages the validator took in (appended, duplicate or dead-lettered).
    /// Whether the projector has taken in everything the relay published in this run.
    fn projected_all(&self) -> bool {
        let p = &self.projector;
        let seen = [
            &p.readings,
            &p.duplicates,
            &p.statuses,
            &p.ignored,
            &p.rejected,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum::<u64>();
        !self.projecting || seen >= self.relay.published.load(Ordering::Relaxed)
    }

    fn validated(&self) -> u64 {
        let v = &self.validator;
        v.appended.load(Ordering::Relaxed)
            + v.duplicates.load(Ordering::Relaxed)
            + v.rejected.load(Ordering::Relaxed)
    }
}

impl Dev {
    async fn start(args: &DevArgs) -> Result<Dev> {
        let data_dir = args.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
        let topology = dev_topology(args.topology.as_deref())?;
        let schemas_dir = match &args.schemas {
            Some(dir) => dir.clone(),
            None if Path::new("schemas").is_dir() => PathBuf::from("schemas"),
            None => builtin_schemas(&data_dir)?,
        };
        let registry_dir = data_dir.join("registry");
        let schemas =
            Arc::new(Registry::open(&registry_dir).with_context(|| {
                format!("cannot open the registry in {}", registry_dir.display())
            })?);
        schemas
            .register_dir(&load_schemas(&schemas_dir)?)
            .with_context(|| format!("cannot register the schemas of {}", schemas_dir.display()))?;
        let log_dir = data_dir.join("log");
        let log = EmbeddedLog::open(&log_dir, EmbeddedOptions::default())
            .with_context(|| format!("cannot open the log in {}", log_dir.display()))?;
        for topic in &topology.topics {
            match log.partitions(&topic.name).await {
                Ok(_) => {}
                Err(sluice_log::Error::UnknownTopic(_)) => {
                    let spec = TopicSpec {
                        retention: Some(topic.retention),
                        ..TopicSpec::new(&topic.name, topic.partitions)
                    };
                    log.create_topic(&spec)
                        .await
                        .with_context(|| format!("cannot create topic {}", topic.name))?;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot open topic {}", topic.name));
                }
            }
        }
        let store_url = format!("sqlite://{}", data_dir.join("sluice.db").display());
        let store = Store::connect(
            &store_url,
            StoreOptions {
                migrate_on_connect: true,
                ..StoreOptions::default()
            },
        )
        .await
        .with_context(|| format!("cannot open the store {store_url}"))?;
        let key_file = data_dir.join("dev-api-key");
        ensure_dev_key(&store, &key_file, Role::Device).await?;
        let sql_key_file = data_dir.join("dev-sql-key");
        ensure_dev_key(&store, &sql_key_file, Role::Viewer).await?;
        let broker = EmbeddedBroker::start(broker_addr(args.mqtt_addr))
            .context("cannot start the embedded MQTT broker")?;
        let http = listen(args.http_addr, DEFAULT_HTTP, "HTTP ingest").await?;
        let registry = listen(args.registry_addr, DEFAULT_REGISTRY, "registry").await?;
        let sql = listen(args.sql_addr, DEFAULT_SQL, "SQL over HTTP").await?;
        let pg = listen(args.pg_addr, DEFAULT_PG, "SQL over the Postgres protocol").await?;
        let simulate = args
            .simulate
            .map(|devices| (devices, args.rate.unwrap_or(devices.max(1))));
        Ok(Dev {
            data_dir,
            log,
            store,
            topology,
            schemas,
            broker,
            http: Some(http),
            registry: Some(registry),
            sql: Some(sql),
            pg: Some(pg),
            key_file,
            sql_key_file,
            simulate,
            webhook_url: args.webhook_url.clone(),
        })
    }

    async fn run(mut self, run_for: Option<Duration>) -> Result<ExitCode> {
        // Stages of a stop: the simulator, then the edge once the broker has handed over what
        // it acknowledged to devices, then the validator and the relay once they have taken in
        // what the edge wrote.
        let stop = CancellationToken::new();
        let simulator = CancellationToken::new();
        let edge = CancellationToken::new();
        let core = CancellationToken::new();
        sluice_runtime::cancel_on_signals(stop.clone()).context("cannot handle SIGINT/SIGTERM")?;
        let (sim_tx, _) = mpsc::unbounded_channel();
        let mut sim_tasks = Tasks::new(&sim_tx);
        let mut counters = Counters::default();
        let (ended_tx, mut ended) = mpsc::unbounded_channel();
        let mut edge_tasks = Tasks::new(&ended_tx);
        let mut core_tasks = Tasks::new(&ended_tx);
        let mut models = Vec::new();
        let mut webhooks: Option<String> = None;
        let mut http_listener = self.http.take();
        let registry_listener = self.registry.take().expect("taken once");
        let http_addr = http_listener.as_ref().expect("taken once").local_addr()?;
        let registry_addr = registry_listener.local_addr()?;
        let (mut sql_listener, mut pg_listener) = (self.sql.take(), self.pg.take());
        let sql_addrs = match (&sql_listener, &pg_listener) {
            (Some(s), Some(p)) => Some((s.local_addr()?, p.local_addr()?)),
            _ => None,
        };
        let codec = Arc::new(EventCodec::new(AnySchemas::Local(self.schemas.clone())));

        let (schemas, listener, token) = (self.schemas.clone(), registry_listener, core.clone());
        core_tasks.spawn("registry", async move {
            sluice_schemas::http::serve(schemas, listener, async move { token.cancelled().await })
                .await
                .context("the registry server failed")
        });
        for p in &self.topology.processors {
            let name = &p.name;
            let skip = |e: anyhow::Error| {
                tracing::warn!(processor = %name, error = %format!("{e:#}"), "not started");
            };
            match &p.config {
                KindConfig::MqttBridge(_) => {
                    let mut settings = match crate::run::bridge_settings(p) {
                        Ok(s) => s,
                        Err(e) => {
                            skip(e);
                            continue;
                        }
                    };
                    settings.config.broker = self.broker.url();
                    // The embedded broker has no users, no TLS and one bridge.
                    settings.config.username = None;
                    settings.config.tls_ca = None;
                    settings.config.tls_client_pkcs12 = None;
                    settings.config.shared_group = None;
                    let (log, stats, token) =
                        (self.log.clone(), counters.bridge.clone(), edge.clone());
                    edge_tasks.spawn(name, async move {
                        sluice_mqtt_bridge::run(&settings, &log, &stats, token)
                            .await
                            .map_err(Into::into)
                    });
                }
                KindConfig::HttpIngest(_) => {
                    let Some(listener) = http_listener.take() else {
                        tracing::warn!(processor = %p.name, "one http-ingest per `sluice dev`; this one does not run");
                        continue;
                    };
                    let mut settings = match crate::run::http_settings(p) {
                        Ok(s) => s,
                        Err(e) => {
                            skip(e);
                            continue;
                        }
                    };
                    settings.config.listen = http_addr.to_string();
                    let ingest = sluice_http_ingest::Ingest::new(
                        settings,
                        self.log.producer()?,
                        self.store.clone(),
                        codec.clone(),
                        counters.http.clone(),
                    );
                    let token = edge.clone();
                    edge_tasks.spawn(name, async move {
                        sluice_http_ingest::serve(&ingest, listener, token)
                            .await
                            .context("the HTTP ingest server failed")
                    });
                }
                KindConfig::IngestValidator(_) => {
                    let settings = match crate::run::validator_settings(p, &self.topology) {
                        Ok(s) => s,
                        Err(e) => {
                            skip(e);
                            continue;
                        }
                    };
                    let (log, store, codec, stats, token) = (
                        self.log.clone(),
                        self.store.clone(),
                        codec.clone(),
                        counters.validator.clone(),
                        core.clone(),
                    );
                    core_tasks.spawn(name, async move {
                        sluice_ingest_validator::run(&settings, &log, &store, &codec, &stats, token)
                            .await
                            .map_err(Into::into)
                    });
                }
                KindConfig::OutboxRelay(_) => {
                    let settings = crate::run::relay_settings(p);
                    let (log, store, stats, token) = (
                        self.log.clone(),
                        self.store.clone(),
                        counters.relay.clone(),
                        core.clone(),
                    );
                    core_tasks.spawn(name, async move {
                        sluice_outbox_relay::run(&settings, &log, &store, &stats, token)
                            .await
                            .map_err(Into::into)
                    });
                }
                KindConfig::Projector(_) => {
                    counters.projecting = true;
                    let query_codec = codec.clone();
                    let settings = crate::run::projector_settings(p);
                    let (log, store, codec, stats, token) = (
                        self.log.clone(),
                        self.store.clone(),
                        codec.clone(),
                        counters.projector.clone(),
                        core.clone(),
                    );
                    core_tasks.spawn(name, async move {
                        sluice_projector::run(&settings, &log, &store, &codec, &stats, token)
                            .await
                            .map_err(Into::into)
                    });
                    // The SQL endpoint serves what this projector writes.
                    if let (Some(http), Some(pg)) = (sql_listener.take(), pg_listener.take()) {
                        let settings = sluice_query::Settings::new(&p.name, &p.inputs);
                        let (log, store, codec, stats, token) = (
                            self.log.clone(),
                            self.store.clone(),
                            query_codec,
                            counters.query.clone(),
                            core.clone(),
                        );
                        core_tasks.spawn("query", async move {
                            sluice_query::serve(
                                &settings,
                                &log,
                                store,
                                codec,
                                Some(http),
                                Some(pg),
                                &stats,
                                token,
                            )
                            .await
                            .map_err(Into::into)
                        });
                    }
                }
                KindConfig::Inferencer(_) => {
                    let settings = crate::run::inferencer_settings(p);
                    let config = crate::run::inferencer_runtime(p, &settings);
                    let inferencer = Arc::new(
                        sluice_inferencer::Inferencer::start(settings, Some(self.store.clone()))
                            .await,
                    );
                    models.extend(crate::run::model_lines(&self.topology, p, &inferencer));
                    counters.inferencer = Some(inferencer.stats());
                    let (log, store, codec, token) = (
                        self.log.clone(),
                        self.store.clone(),
                        codec.clone(),
                        core.clone(),
                    );
                    core_tasks.spawn(name, async move {
                        let watch = tokio::spawn(inferencer.clone().watch(token.clone()));
                        let result = sluice_runtime::run(
                            &*inferencer,
                            &config,
                            &log,
                            &*codec,
                            &store,
                            &sluice_runtime::NoMetrics,
                            token,
                        )
                        .await;
                        watch.abort();
                        result.map_err(Into::into)
                    });
                }
                KindConfig::ActionRouter(_) => {
                    let (router, config) = match crate::run::router_of(p) {
                        Ok(r) => r,
                        Err(e) => {
                            skip(e);
                            continue;
                        }
                    };
                    let router = Arc::new(router);
                    counters.router = Some(router.stats());
                    let (log, store, codec, token) = (
                        self.log.clone(),
                        self.store.clone(),
                        codec.clone(),
                        core.clone(),
                    );
                    core_tasks.spawn(name, async move {
                        sluice_runtime::run(
                            &*router,
                            &config,
                            &log,
                            &*codec,
                            &store,
                            &sluice_runtime::NoMetrics,
                            token,
                        )
                        .await
                        .map_err(Into::into)
                    });
                }
                KindConfig::Executor(_) => {
                    let (settings, outbound, target) = match self.executor(p, core.clone()).await {
                        Ok(e) => e,
                        Err(e) => {
                            skip(e);
                            continue;
                        }
                    };
                    webhooks = Some(target);
                    let stats = Arc::new(sluice_executor::Stats::default());
                    counters.executor = Some(stats.clone());
                    let (log, store, codec, token) = (
                        self.log.clone(),
                        self.store.clone(),
                        codec.clone(),
                        core.clone(),
                    );
                    core_tasks.spawn(name, async move {
                        sluice_executor::run::run(
                            &settings, &log, &store, &*codec, outbound, &stats, token,
                        )
                        .await
                        .map_err(Into::into)
                    });
                }
            }
        }
        let running: Vec<&str> = edge_tasks
            .names()
            .chain(core_tasks.names())
            .filter(|n| *n != "registry")
            .collect();
        // Shown only when a projector runs, since the endpoint serves what it writes.
        let sql_addrs = sql_addrs.filter(|_| sql_listener.is_none());
        self.banner(
            http_addr,
            registry_addr,
            sql_addrs,
            &running,
            webhooks.as_deref(),
            &models,
        );

        let counters = Arc::new(counters);
        if let Some((devices, rate)) = self.simulate {
            let config = sluice_simulator::FleetConfig {
                devices,
                rate,
                ..sluice_simulator::FleetConfig::default()
            };
            let target = sluice_simulator::Target::Mqtt {
                url: self.broker.url(),
            };
            let (counters, token) = (counters.simulator.clone(), simulator.clone());
            sim_tasks.spawn("simulator", async move {
                let report =
                    sluice_simulator::run(&config, &target, None, counters, token.clone(), None)
                        .await?;
                // The fleet ends on its own only when it gave up on the broker.
                match report.stopped_early {
                    Some(why) if !token.is_cancelled() => {
                        Err(anyhow!("the simulator gave up: {why}"))
                    }
                    _ => Ok(()),
                }
            });
        }
        let progress = spawn_progress(counters.clone(), self.store.clone());
        let started = Instant::now();
        let mut failure: Option<anyhow::Error> = None;
        // Runs until Ctrl-C, --for, or a task that ends on its own (which is a failure).
        let deadline = async {
            match run_for {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => {}
            () = core.cancelled() => {}
            () = deadline => {}
            Some((name, error)) = ended.recv() => {
                failure = Some(match error {
                    Some(e) => anyhow!("{name} failed: {e}"),
                    None => anyhow!("{name} stopped on its own"),
                });
            }
        }
        eprintln!("sluice dev: stopping (ran {:.0?})", started.elapsed());
        simulator.cancel();
        if let Err(e) = sim_tasks.join().await {
            failure.get_or_insert(e);
        }
        broker_drain(&counters.bridge).await;
        edge.cancel();
        if let Err(e) = edge_tasks.join().await {
            failure.get_or_insert(e);
        }
        // What the edge wrote is on the log either way; draining here only saves a restart
        // from finding it.
        let drained = drain(&counters, &self.store).await;
        core.cancel();
        if let Err(e) = core_tasks.join().await {
            failure.get_or_insert(e);
        }
        progress.abort();
        let events = self.store.event_count().await.unwrap_or_default();
        let dead = self
            .store
            .dlq_counts()
            .await
            .map(|c| c.iter().map(|c| c.count).sum::<u64>())
            .unwrap_or_default();
        self.store.close().await;
        println!(
            "sluice dev stopped: {} written by the edge this run, {} events in the store, {} dead letters{}",
            counters.written(),
            events,
            dead,
            if drained {
                ""
            } else {
                " (the validator had not caught up; a restart will)"
            }
        );
        match failure {
            Some(e) => Err(e),
            None => Ok(ExitCode::SUCCESS),
        }
    }

    /// The executor of `p` for `sluice dev`: every endpoint delivers to `--webhook-url`, else
    /// to the demo receiver; a secret comes from its variable when set, else the dev secret
    /// (which the demo receiver checks). Loopback is allowed. Also the banner's line.
    async fn executor(
        &self,
        p: &sluice_topology::Processor,
        token: CancellationToken,
    ) -> Result<(sluice_executor::Settings, sluice_executor::Outbound, String)> {
        let mut settings = crate::run::executor_settings(p)?;
        let secret = crate::dev_webhooks::dev_secret(&self.data_dir)?;
        let (url, line) = match &self.webhook_url {
            Some(url) => (url.clone(), format!("{url} (--webhook-url)")),
            None => {
                let demo = crate::dev_webhooks::start(&self.data_dir, &secret, token).await?;
                let line = format!(
                    "{} (demo receiver: signed deliveries in {})",
                    demo.url,
                    demo.log.display()
                );
                (demo.url, line)
            }
        };
        let config = &mut settings.config;
        config.allow_private = true;
        for endpoint in &mut config.endpoints {
            endpoint.url = url.clone();
        }
        let outbound = crate::run::executor_outbound_with(config, |endpoint, breaker| {
            sluice_executor::ResolvedEndpoint::from_vars(endpoint, breaker, |var| {
                std::env::var(var).ok().or_else(|| Some(secret.clone()))
            })
        })?;
        Ok((settings, outbound, line))
    }

    fn banner(
        &self,
        http: SocketAddr,
        registry: SocketAddr,
        sql: Option<(SocketAddr, SocketAddr)>,
        running: &[&str],
        webhooks: Option<&str>,
        models: &[String],
    ) {
        let dir = self.data_dir.display();
        let mqtt = self.broker.addr();
        println!("sluice dev: the whole pipeline in one process, data in {dir}");
        println!("  mqtt      mqtt://{mqtt}");
        println!("  http      http://{http}/v1/events");
        println!("  registry  http://{registry}");
        if let Some((sql, pg)) = sql {
            println!("  sql       http://{sql}/v1/query");
            println!("  postgres  postgres://{pg}");
        }
        println!(
            "  store     sqlite://{}",
            self.data_dir.join("sluice.db").display()
        );
        println!(
            "  log       embedded://{}",
            self.data_dir.join("log").display()
        );
        println!("  api-key   {} (role device)", self.key_file.display());
        println!("  sql-key   {} (role viewer)", self.sql_key_file.display());
        println!("  running   {}", running.join(", "));
        for line in models {
            println!("  model     {line}");
        }
        if let Some(line) = webhooks {
            println!("  webhooks  {line}");
        }
        if let Some((devices, rate)) = self.simulate {
            println!("  simulate  {devices} devices, {rate} events/s over MQTT");
        }
        println!("try:");
        println!(
            "  mosquitto_pub -h {} -p {} -q 1 -t devices/dev-1/telemetry -m '{{\"temperature_c\": 21.5}}'",
            mqtt.ip(),
            mqtt.port()
        );
        println!(
            "  curl -H \"Authorization: Bearer $(cat {})\" -H 'content-type: application/json' \\\n       -d '{{\"event_type\": \"sensor.reading\", \"aggregate_id\": \"dev-1\", \"occurred_at\": \"{}\", \"payload\": {{\"temperature_c\": 21.5}}}}' http://{http}/v1/events",
            self.key_file.display(),
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
        );
        if let Some((sql, pg)) = sql {
            println!(
                "  psql \"postgres://sluice:$(cat {})@{pg}/sluice\" -c 'SELECT device_id, last_seen, temperature_c FROM device_latest LIMIT 5'",
                self.sql_key_file.display()
            );
            println!(
                "  sluice sql --endpoint http://{sql} --key \"$(cat {})\" 'SELECT count(*) FROM readings'",
                self.sql_key_file.display()
            );
        }
        println!("Ctrl-C stops it; running it again on {dir} continues where it stopped.");
    }
}

/// Tasks of one stage; each reports its end on `ended` so the first to end on its own is seen.
struct Tasks {
    handles: Vec<(String, JoinHandle<Result<()>>)>,
    ended: mpsc::UnboundedSender<(String, Option<String>)>,
}

impl Tasks {
    fn new(ended: &mpsc::UnboundedSender<(String, Option<String>)>) -> Tasks {
        Tasks {
            handles: Vec::new(),
            ended: ended.clone(),
        }
    }

    fn spawn(&mut self, name: &str, task: impl Future<Output = Result<()>> + Send + 'static) {
        let (ended, owned) = (self.ended.clone(), name.to_owned());
        let handle = tokio::spawn(async move {
            let result = task.await;
            let _ = ended.send((owned, result.as_ref().err().map(|e| format!("{e:#}"))));
            result
        });
        self.handles.push((name.to_owned(), handle));
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.handles.iter().map(|(n, _)| n.as_str())
    }

    /// Waits for every task; the first error, if any.
    async fn join(self) -> Result<()> {
        let mut first = None;
        for (name, handle) in self.handles {
            let result = match handle.await {
                Ok(r) => r,
                Err(e) => Err(anyhow!("panicked: {e}")),
            };
            if let Err(e) = result {
                tracing::error!(task = %name, error = %format!("{e:#}"), "stopped with an error");
                first.get_or_insert(e.context(format!("{name} failed")));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Waits (bounded) until the bridge has had nothing new for a second: the embedded broker
/// holds in memory what it acknowledged to devices, and would lose it with the process.
async fn broker_drain(bridge: &sluice_mqtt_bridge::Stats) {
    let deadline = Instant::now() + BROKER_DRAIN_TIMEOUT;
    let mut last = bridge.received.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    let mut said = false;
    while Instant::now() < deadline && quiet_since.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = bridge.received.load(Ordering::Relaxed);
        if now != last {
            last = now;
            quiet_since = Instant::now();
            if !said {
                eprintln!("sluice dev: taking in what the MQTT broker still holds");
                said = true;
            }
        }
    }
    if Instant::now() >= deadline {
        tracing::warn!(
            timeout = ?BROKER_DRAIN_TIMEOUT,
            "MQTT messages kept arriving; stopping with some still in the embedded broker"
        );
    }
}

/// Waits (bounded) until the validator has taken in what the edge wrote and the outbox is
/// empty. False if the time ran out.
async fn drain(counters: &Counters, store: &Store) -> bool {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let outbox = store.outbox_depth().await.unwrap_or(u64::MAX);
        if counters.validated() >= counters.written() && outbox == 0 && counters.projected_all() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn_progress(counters: Arc<Counters>, store: Store) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let previous = AtomicU64::new(0);
        loop {
            tick.tick().await;
            let outbox = store.outbox_depth().await.unwrap_or_default();
            let appended = counters.validator.appended.load(Ordering::Relaxed);
            let per_s = (appended - previous.swap(appended, Ordering::Relaxed)) as f64
                / PROGRESS_EVERY.as_secs_f64();
            tracing::info!(
                mqtt_acknowledged = counters.bridge.acknowledged.load(Ordering::Relaxed),
                http_accepted = counters.http.accepted.load(Ordering::Relaxed),
                http_rejected = counters.http.rejected.load(Ordering::Relaxed),
                appended,
                appended_per_s = per_s.round(),
                duplicates = counters.validator.duplicates.load(Ordering::Relaxed),
                dead_lettered = counters.validator.rejected.load(Ordering::Relaxed),
                published = counters.relay.published.load(Ordering::Relaxed),
                projected = counters.projector.readings.load(Ordering::Relaxed),
                scored = counters.inferencer.as_ref().map_or(0, |s| {
                    s.model_scored.load(Ordering::Relaxed)
                        + s.fallback_scored.load(Ordering::Relaxed)
                }),
                anomalies = counters
                    .inferencer
                    .as_ref()
                    .map_or(0, |s| s.anomalies.load(Ordering::Relaxed)),
                actions = counters
                    .router
                    .as_ref()
                    .map_or(0, |s| s.requested.load(Ordering::Relaxed)),
                delivered = counters
                    .executor
                    .as_ref()
                    .map_or(0, |s| s.delivered.load(Ordering::Relaxed)),
                simulated = counters.simulator.sent.load(Ordering::Relaxed),
                outbox,
                "progress"
            );
        }
    })
}

/// The broker's address: the flag's, else the default, else (default busy) a free port. The
/// broker binds it itself, so a busy default is found by trying it here.
fn broker_addr(given: Option<SocketAddr>) -> SocketAddr {
    if let Some(addr) = given {
        return addr;
    }
    let default: SocketAddr = DEFAULT_MQTT.parse().expect("a valid default address");
    if std::net::TcpListener::bind(default).is_ok() {
        return default;
    }
    tracing::warn!(%default, "MQTT port is busy; using a free one");
    SocketAddr::new(default.ip(), 0)
}

/// A listener on the flag's address, else on the default, else (default busy) on a free port.
async fn listen(
    given: Option<SocketAddr>,
    default: &str,
    what: &str,
) -> Result<tokio::net::TcpListener> {
    let explicit = given.is_some();
    let addr = given.unwrap_or_else(|| default.parse().expect("a valid default address"));
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if !explicit => {
            tracing::warn!(%addr, error = %e, "{what} port is busy; using a free one");
            tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0))
                .await
                .with_context(|| format!("cannot listen for {what}"))
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen for {what} on {addr}")),
    }
}

/// The topology `sluice dev` runs: `path`, else topologies/default.yaml if present, else the
/// built-in one.
pub(crate) fn dev_topology(path: Option<&Path>) -> Result<sluice_topology::Topology> {
    match path {
        Some(path) => crate::run::load_topology(path),
        None if Path::new("topologies/default.yaml").is_file() => {
            crate::run::load_topology(Path::new("topologies/default.yaml"))
        }
        None => sluice_topology::parse(BUILTIN_TOPOLOGY)
            .map_err(|_| anyhow!("the built-in topology does not parse")),
    }
}

/// Writes the built-in schemas under the data directory and returns that folder.
fn builtin_schemas(data_dir: &Path) -> Result<PathBuf> {
    let dir = data_dir.join("schemas");
    for (path, text) in BUILTIN_SCHEMAS {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().expect("a subject folder"))?;
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(dir)
}

/// Makes a key `sluice dev` prints (the device key the simulator uses, the viewer key for SQL),
/// once per data directory.
/// Only its hash is in the store, so the token is kept in a file only the user can read.
async fn ensure_dev_key(store: &Store, file: &Path, role: Role) -> Result<()> {
    if file.is_file() {
        let token = std::fs::read_to_string(file)?;
        if store
            .verify_api_key(token.trim())
            .await?
            .is_some_and(|k| k.role == role)
        {
            return Ok(());
        }
    }
    let (_, token) = store.create_api_key(role, Some("sluice dev")).await?;
    write_private(file, &token).with_context(|| format!("cannot write {}", file.display()))
}

pub(crate) fn write_private(file: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(file)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_schemas_are_every_schema_of_the_repo() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        let mut files = Vec::new();
        for subject in std::fs::read_dir(&root).unwrap() {
            let subject = subject.unwrap();
            for version in std::fs::read_dir(subject.path()).unwrap() {
                let version = version.unwrap();
                let name = format!(
                    "{}/{}",
                    subject.file_name().to_string_lossy(),
                    version.file_name().to_string_lossy()
                );
                files.push((name, std::fs::read_to_string(version.path()).unwrap()));
            }
        }
        files.sort();
        let builtin: Vec<(String, String)> = BUILTIN_SCHEMAS
            .iter()
            .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
            .collect();
        assert_eq!(
            builtin.iter().map(|f| &f.0).collect::<Vec<_>>(),
            files.iter().map(|f| &f.0).collect::<Vec<_>>(),
            "sluice dev outside the repo registers these; add new schema versions to BUILTIN_SCHEMAS"
        );
        assert_eq!(builtin, files);
    }
}
