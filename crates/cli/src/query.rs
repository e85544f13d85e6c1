//! The SQL endpoint from the command line: `sluice run query` serves it, `sluice sql` asks it
//! (or reads a `sluice dev` data directory directly).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches_with_schema;
use sluice_log::{EmbeddedLog, KafkaLog, Log};
use sluice_query::{Engine, Hot, Output, Settings};
use sluice_schemas::EventCodec;
use sluice_store::{Store, StoreOptions};
use sluice_topology::{Kind, Topology};
use tokio_util::sync::CancellationToken;

use crate::cli::{RunArgs, SqlArgs};
use crate::commands::{redact, runtime, usage_error};

/// Where `sluice run query` listens unless told otherwise.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8082";
/// Where the Postgres wire protocol listens unless told otherwise.
pub const DEFAULT_PG: &str = "127.0.0.1:5433";

/// The query service's settings from the topology: it follows the projector's inputs and
/// reads the projector's offsets.
pub(crate) fn query_settings(topology: &Topology) -> Result<Settings> {
    let projector = topology
        .processors
        .iter()
        .find(|p| p.kind == Kind::Projector)
        .ok_or_else(|| anyhow!("the topology has no projector, so there is nothing to query"))?;
    Ok(Settings::new(&projector.name, &projector.inputs))
}

/// `sluice run query`.
pub fn run_query(args: &RunArgs, topology: &Topology) -> Result<ExitCode> {
    let (Some(log_url), Some(store_url)) = (args.log.as_deref(), args.store.as_deref()) else {
        return usage_error(
            "sluice run query needs --log URL and --store URL (or SLUICE__LOG and SLUICE__STORE)",
        );
    };
    let settings = query_settings(topology)?;
    let http_addr = std::env::var("SLUICE__QUERY_HTTP_ADDR").unwrap_or(DEFAULT_HTTP.to_owned());
    let pg_addr = std::env::var("SLUICE__QUERY_PG_ADDR").unwrap_or(DEFAULT_PG.to_owned());
    let wiring = crate::run::schemas_of(args)?;
    runtime()?.block_on(async {
        let store = Store::connect(
            store_url,
            StoreOptions {
                migrate_on_connect: args.migrate,
                ..StoreOptions::default()
            },
        )
        .await
        .with_context(|| format!("cannot open the store {}", redact(store_url)))?;
        let http = tokio::net::TcpListener::bind(&http_addr)
            .await
            .with_context(|| format!("cannot listen on {http_addr}"))?;
        let pg = tokio::net::TcpListener::bind(&pg_addr)
            .await
            .with_context(|| format!("cannot listen on {pg_addr}"))?;
        let token = CancellationToken::new();
        sluice_runtime::cancel_on_signals(token.clone())
            .context("cannot handle SIGINT/SIGTERM")?;
        println!(
            "query listening on http://{}/v1/query and postgres://{}",
            http.local_addr()?,
            pg.local_addr()?
        );
        tracing::info!(processor = "query", inputs = ?settings.inputs, store = %redact(store_url), "started");
        let codec = Arc::new(EventCodec::new(wiring));
        let stats = sluice_query::follow::FollowStats::default();
        let inputs: Vec<&str> = settings.inputs.iter().map(String::as_str).collect();
        let result = if log_url.starts_with("embedded://") {
            let log = EmbeddedLog::from_url(log_url)?;
            crate::run::ensure_topics(&log, topology, &inputs, true).await?;
            serve(&settings, &log, &store, codec, http, pg, &stats, token).await
        } else if log_url.starts_with("kafka://") {
            let log = KafkaLog::from_url(log_url)?;
            crate::run::ensure_topics(&log, topology, &inputs, false).await?;
            serve(&settings, &log, &store, codec, http, pg, &stats, token).await
        } else {
            Err(anyhow!("invalid log URL {log_url:?}: expected embedded://DIR or kafka://host:port"))
        };
        store.close().await;
        tracing::info!(processor = "query", ok = result.is_ok(), "stopped");
        result.map(|()| ExitCode::SUCCESS)
    })
}

#[allow(clippy::too_many_arguments)]
async fn serve<L: Log>(
    settings: &Settings,
    log: &L,
    store: &Store,
    codec: Arc<EventCodec<sluice_schemas::AnySchemas>>,
    http: tokio::net::TcpListener,
    pg: tokio::net::TcpListener,
    stats: &sluice_query::follow::FollowStats,
    token: CancellationToken,
) -> Result<()> {
    sluice_query::serve(
        settings,
        log,
        store.clone(),
        codec,
        Some(http),
        Some(pg),
        stats,
        token,
    )
    .await
    .map_err(Into::into)
}

/// `sluice sql`.
pub fn sql(args: &SqlArgs) -> Result<ExitCode> {
    let format = match args.format.as_str() {
        f @ ("table" | "json" | "csv") => f,
        other => {
            return usage_error(&format!(
                "unknown --format {other:?}: use table, json or csv"
            ));
        }
    };
    runtime()?.block_on(async {
        let output = match &args.endpoint {
            Some(url) => remote(url, args).await?,
            None => {
                let dir = args.data_dir.clone().unwrap_or_else(|| ".sluice".into());
                local(&dir, &args.query).await?
            }
        };
        let mut out = std::io::stdout().lock();
        match format {
            "json" => out.write_all(&sluice_query::http::json_body(&output)?)?,
            "csv" => out.write_all(&sluice_query::http::csv(&output)?)?,
            _ => {
                // The header shows even when there are no rows.
                let table =
                    pretty_format_batches_with_schema(output.schema.clone(), &output.batches)?;
                writeln!(out, "{table}")?;
                writeln!(
                    out,
                    "({} row{}{})",
                    output.rows(),
                    if output.rows() == 1 { "" } else { "s" },
                    if output.truncated {
                        ", truncated by the row limit"
                    } else {
                        ""
                    }
                )?;
            }
        }
        if format == "json" {
            writeln!(out)?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Asks a running endpoint, in Arrow.
async fn remote(url: &str, args: &SqlArgs) -> Result<Output> {
    let key = args
        .key
        .clone()
        .or_else(|| std::env::var("SLUICE__API_KEY").ok())
        .ok_or_else(|| anyhow!("--endpoint needs an API key: --key KEY or SLUICE__API_KEY"))?;
    let started = std::time::Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/query", url.trim_end_matches('/')))
        .bearer_auth(key.trim())
        .header("accept", sluice_query::http::ARROW_STREAM)
        .json(&serde_json::json!({ "sql": args.query }))
        .send()
        .await
        .with_context(|| format!("cannot reach the SQL endpoint {url}"))?;
    let status = response.status();
    let truncated = response
        .headers()
        .get("sluice-truncated")
        .is_some_and(|v| v == "true");
    let body = response.bytes().await?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                let e = v.get("error")?;
                let mut m = e.get("message")?.as_str()?.to_owned();
                if let (Some(l), Some(c)) = (e.get("line"), e.get("column")) {
                    m.push_str(&format!(" (line {l}, column {c})"));
                }
                Some(m)
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("the SQL endpoint answered {status}: {message}");
    }
    let reader = StreamReader::try_new(std::io::Cursor::new(body), None)?;
    let schema = reader.schema();
    let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>()?;
    Ok(Output {
        schema,
        batches,
        truncated,
        elapsed: started.elapsed(),
    })
}

/// Reads a `sluice dev` data directory's store directly (no process needs to run). The hot
/// tables are loaded from the store as it is; nothing follows the log.
async fn local(dir: &std::path::Path, query: &str) -> Result<Output> {
    let db = dir.join("sluice.db");
    if !db.is_file() {
        bail!(
            "no store at {}: run `sluice dev` first, or use --endpoint URL",
            db.display()
        );
    }
    let url = format!("sqlite://{}", db.display());
    let store = Store::connect(&url, StoreOptions::default())
        .await
        .with_context(|| format!("cannot open the store {url}"))?;
    let settings = Settings::new("projector", &[]);
    // The version readers see: a rebuild may have replaced the first one.
    let version = store
        .live_version(&settings.projector_group, settings.version)
        .await
        .context("cannot read the live projection version")?;
    let hot = Arc::new(Hot::new(settings.hot_window));
    sluice_query::follow::load(&hot, &store, version, "projector", chrono::Utc::now())
        .await
        .context("cannot load the read models")?;
    let engine = Engine::new(hot, store.clone(), version, settings.limits)?;
    let result = engine.query(query).await;
    store.close().await;
    result.map_err(|e| anyhow!("{e}"))
}
