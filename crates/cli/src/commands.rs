//! What each command does: call the library, print the outcome.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use sluice_schemas::{Registry, SchemaDir};

use crate::cli::{
    BenchCommand, BenchLogArgs, Cli, Command, GraphFormat, MigrateArgs, RegistryCommand,
    SchemasCommand, TopologyCommand,
};

/// Exit code of a command that is not available in this build.
const NOT_AVAILABLE: u8 = 2;

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Topology(TopologyCommand::Validate { files, schemas }) => {
            validate(&files, schemas.as_deref())
        }
        Command::Topology(TopologyCommand::Graph { file, format }) => graph(&file, format),
        Command::Schemas(SchemasCommand::Check { dir }) => schemas_check(&dir),
        Command::Registry(RegistryCommand::Serve {
            addr,
            data_dir,
            schemas,
        }) => registry_serve(addr, &data_dir, schemas.as_deref()),
        Command::Dev(args) => crate::dev::dev(&args),
        Command::Run(args) => crate::run::run(&args),
        Command::Simulate(args) => crate::simulate::simulate(&args),
        Command::Sql(args) => crate::query::sql(&args),
        Command::Replay(args) => crate::replay::replay(&args),
        Command::Dlq(cmd) => crate::dlq::dlq(&cmd),
        Command::Keys(cmd) => crate::keys::keys(&cmd),
        Command::Migrate(args) => migrate(&args),
        Command::Bench(BenchCommand::Log(args)) => bench_log(&args),
        Command::Bench(BenchCommand::Ingest(args)) => crate::bench_ingest::bench_ingest(&args),
        Command::Bench(BenchCommand::Project(args)) => crate::bench_project::bench_project(&args),
        Command::Bench(BenchCommand::Query(args)) => crate::bench_query::bench_query(&args),
        Command::Bench(BenchCommand::Replay(args)) => crate::bench_replay::bench_replay(&args),
        Command::Bench(BenchCommand::Inference(args)) => {
            crate::bench_inference::bench_inference(&args)
        }
        Command::Bench(BenchCommand::Executor(args)) => {
            crate::bench_executor::bench_executor(&args)
        }
        Command::Bench(BenchCommand::Detection(args)) => {
            crate::bench_detection::bench_detection(&args)
        }
        Command::Bench(BenchCommand::Pipeline(_)) => {
            not_available("bench pipeline", "issue 11 (the benchmark suite)")
        }
    }
}

pub(crate) fn not_available(command: &str, comes_with: &str) -> Result<ExitCode> {
    eprintln!("sluice {command} is not available in this build yet: it arrives with {comes_with}.");
    Ok(ExitCode::from(NOT_AVAILABLE))
}

/// A usage error found after parsing (a flag needed only in some cases): one line, exit 2.
pub(crate) fn usage_error(message: &str) -> Result<ExitCode> {
    eprintln!("error: {message}");
    Ok(ExitCode::from(2))
}

/// The async runtime of commands that do I/O.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `url` with its password, if any, replaced by `***`, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

fn migrate(args: &MigrateArgs) -> Result<ExitCode> {
    use sluice_store::{Store, StoreOptions};
    let url = redact(&args.store);
    runtime()?.block_on(async {
        let store = Store::connect(&args.store, StoreOptions::default())
            .await
            .with_context(|| format!("cannot open the store {url}"))?;
        // No events table yet means this run creates the schema; the store has no other way
        // to say what a migration did.
        let fresh = store.event_count().await.is_err();
        let migrated = store.migrate().await;
        store.close().await;
        migrated.with_context(|| format!("cannot migrate {url}"))?;
        let what = if fresh {
            "schema created, up to date"
        } else {
            "up to date"
        };
        println!("migrated {url}: {what}");
        Ok(ExitCode::SUCCESS)
    })
}

/// The schemas folder for a topology: the one given, else `./schemas`, else the `schemas`
/// folder beside the topology's folder (`topologies/x.yaml` → `schemas/`).
pub(crate) fn schemas_for(topology: &Path, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir.to_owned());
    }
    let beside = topology
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("schemas"));
    [Some(PathBuf::from("schemas")), beside]
        .into_iter()
        .flatten()
        .find(|p| p.is_dir())
        .with_context(|| {
            format!(
                "no schemas folder found for {} (looked in ./schemas and beside its folder); pass --schemas DIR",
                topology.display()
            )
        })
}

pub(crate) fn load_schemas(dir: &Path) -> Result<SchemaDir> {
    SchemaDir::load(dir).map_err(|problems| match &problems[..] {
        [one] => anyhow::anyhow!("{one}"),
        many => {
            let lines: Vec<String> = many.iter().map(ToString::to_string).collect();
            anyhow::anyhow!(
                "the schemas folder {} has {} problems:\n  {}",
                dir.display(),
                many.len(),
                lines.join("\n  ")
            )
        }
    })
}

/// Each subject's latest schema as JSON, for type-checking rule predicates.
fn latest_schemas(dir: &SchemaDir) -> Result<BTreeMap<String, serde_json::Value>> {
    let mut latest = BTreeMap::new();
    for subject in dir.subjects() {
        if let Some(version) = subject.versions.last() {
            let json = serde_json::from_str(&version.text)
                .with_context(|| format!("{} is not JSON", version.path.display()))?;
            latest.insert(subject.name.clone(), json);
        }
    }
    Ok(latest)
}

fn validate(files: &[PathBuf], schemas: Option<&Path>) -> Result<ExitCode> {
    let mut total = 0;
    for file in files {
        let latest = latest_schemas(&load_schemas(&schemas_for(file, schemas)?)?)?;
        let issues = match sluice_topology::load(file) {
            Ok(topology) => {
                let issues = topology.validate_with_schemas(&latest);
                if issues.is_empty() {
                    println!(
                        "{}: ok ({} topics, {} processors)",
                        file.display(),
                        topology.topics.len(),
                        topology.processors.len()
                    );
                }
                issues
            }
            Err(issues) => issues,
        };
        for issue in &issues {
            println!("{}: {issue}", file.display());
        }
        total += issues.len();
    }
    if total == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let noun = if total == 1 { "problem" } else { "problems" };
    eprintln!("{total} {noun} found");
    Ok(ExitCode::FAILURE)
}

fn graph(file: &Path, format: GraphFormat) -> Result<ExitCode> {
    let topology = match sluice_topology::load(file) {
        Ok(t) => t,
        Err(issues) => {
            for issue in &issues {
                eprintln!("{}: {issue}", file.display());
            }
            bail!(
                "{} cannot be drawn until the problems above are fixed",
                file.display()
            );
        }
    };
    let text = match format {
        GraphFormat::Mermaid => topology.to_mermaid(),
        GraphFormat::Dot => topology.to_dot(),
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

fn schemas_check(dir: &Path) -> Result<ExitCode> {
    let folder = load_schemas(dir)?;
    let problems = folder.check();
    if problems.is_empty() {
        let versions: usize = folder.subjects().iter().map(|s| s.versions.len()).sum();
        println!(
            "{}: ok ({} subjects, {versions} versions, every version compatible with its predecessors)",
            dir.display(),
            folder.subjects().len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    for p in &problems {
        println!("{p}");
    }
    eprintln!("{} incompatible schema version(s)", problems.len());
    Ok(ExitCode::FAILURE)
}

fn registry_serve(
    addr: std::net::SocketAddr,
    data_dir: &Path,
    schemas: Option<&Path>,
) -> Result<ExitCode> {
    let dir = data_dir.join("registry");
    let registry = Registry::open(&dir)
        .with_context(|| format!("cannot open the registry in {}", dir.display()))?;
    if let Some(schemas) = schemas {
        let added = registry
            .register_dir(&load_schemas(schemas)?)
            .with_context(|| format!("cannot register the schemas of {}", schemas.display()))?;
        tracing::info!(added, schemas = %schemas.display(), "schemas registered");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        // The address goes to stdout so scripts (and tests) can pick up an ephemeral port.
        println!("registry listening on http://{local}");
        tracing::info!(%local, data = %dir.display(), "registry serving");
        sluice_schemas::http::serve(
            Arc::new(registry),
            listener,
            sluice_runtime::shutdown_signal(),
        )
        .await
        .context("registry server failed")?;
        tracing::info!("registry stopped");
        Ok(ExitCode::SUCCESS)
    })
}

fn bench_log(args: &BenchLogArgs) -> Result<ExitCode> {
    use sluice_log::bench::{self, BenchOptions};
    let opts = BenchOptions {
        messages: args.messages,
        size: args.size,
        batch: args.batch,
        partitions: args.partitions,
        rate: args.rate,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let progress = |done: u64| eprintln!("  consumed {done}/{}", args.messages);
    let report = runtime.block_on(async {
        if let Some(dir) = args.log.strip_prefix("embedded://") {
            let log = sluice_log::EmbeddedLog::from_url(&args.log)?;
            bench::run(&log, &opts, Some(Path::new(dir)), progress).await
        } else if args.log == "kafka-mock://" {
            // An in-process mock cluster (a real Kafka-protocol broker) for this run only; it
            // has no CreateTopics, so the bench topic is made on the cluster directly.
            let cluster = sluice_log::kafka::mock_cluster(1)?;
            let log = sluice_log::KafkaLog::on_mock(&cluster);
            bench::run_on_topic(&log, &opts, None, progress, |topic, partitions| {
                cluster
                    .create_topic(topic, partitions as i32, 1)
                    .map_err(|e| sluice_log::Error::Fatal(format!("mock cluster: {e}")))
            })
            .await
        } else if args.log.starts_with("kafka://") {
            let log = sluice_log::KafkaLog::from_url(&args.log)?;
            bench::run(&log, &opts, None, progress).await
        } else {
            Err(sluice_log::Error::InvalidUrl {
                url: args.log.clone(),
                reason: "expected embedded://DIR, kafka://host:port or kafka-mock://".into(),
            })
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "log bench on {}: {} messages of {} B, batches of {}{}",
        args.log,
        report.messages,
        report.size,
        report.batch,
        report
            .rate
            .map_or(String::new(), |r| format!(", paced at {r} msgs/s"))
    );
    let baseline = match (report.baseline_fsync_msgs_per_s, report.produce_vs_baseline) {
        (Some(b), Some(ratio)) => {
            format!("  (raw write+fsync of the same batches: {b:.0} msgs/s; ratio {ratio:.2})")
        }
        _ => String::new(),
    };
    println!(
        "  produce  {:>10.0} msgs/s{baseline}",
        report.produce_msgs_per_s
    );
    println!(
        "  consume  {:>10.0} msgs/s  (committing after every poll)",
        report.consume_msgs_per_s
    );
    println!(
        "  latency  p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (produce call to consume)",
        report.latency_ms.p50, report.latency_ms.p99, report.latency_ms.max
    );
    Ok(ExitCode::SUCCESS)
}
