//! `sluice bench query`: loads readings into a scratch projection version through the
//! projector's write path, serves them from the SQL endpoint over HTTP, and times a fixed set
//! of queries there and, in the same run, the same SQL directly on PostgreSQL.
//!
//! The scratch version and the viewer key it makes are removed at the end; the live read
//! models are untouched.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, DurationRound, SecondsFormat, TimeDelta, Utc};
use serde::Serialize;
use sluice_query::{Engine, Hot, Limits};
use sluice_store::{ProjectionBatch, Reading, Role, Store, StoreOptions};
use uuid::Uuid;

use crate::cli::BenchQueryArgs;
use crate::commands::{redact, runtime};

/// Figures of one query.
#[derive(Debug, Serialize)]
pub struct QueryFigures {
    /// What it asks.
    pub name: &'static str,
    /// The SQL sent to the endpoint.
    pub sql: String,
    /// Rows in the answer (the same on both sides, or the run fails).
    pub rows: usize,
    /// Through `POST /v1/query` (Arrow IPC answer), ms.
    pub sluice_p50_ms: f64,
    /// ms.
    pub sluice_p99_ms: f64,
    /// The same SQL on the store's tables in PostgreSQL, ms.
    pub postgres_p50_ms: Option<f64>,
    /// ms.
    pub postgres_p99_ms: Option<f64>,
    /// PostgreSQL p50 / Sluice p50.
    pub speedup: Option<f64>,
}

/// What `sluice bench query` prints.
#[derive(Debug, Serialize)]
pub struct QueryReport {
    /// The store (password redacted).
    pub store: String,
    /// The scratch projection version (dropped at the end).
    pub version: i32,
    /// Readings loaded.
    pub readings: u64,
    /// Devices.
    pub devices: u64,
    /// Readings per second loaded through `Store::project` (rollups and latest state).
    pub load_per_s: f64,
    /// Seconds to load the hot tables from the store.
    pub hot_load_s: f64,
    /// Timed runs per query and side.
    pub runs: usize,
    /// Per query.
    pub queries: Vec<QueryFigures>,
}

fn percentile(times: &mut [Duration], p: f64) -> f64 {
    times.sort();
    let i = ((times.len() as f64 - 1.0) * p).round() as usize;
    times[i].as_secs_f64() * 1000.0
}

pub fn bench_query(args: &BenchQueryArgs) -> Result<ExitCode> {
    if args.rows == 0 || args.devices == 0 || args.runs == 0 {
        bail!("--rows, --devices and --runs must be at least 1");
    }
    let report = runtime()?.block_on(run(args))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "query bench on {}: {} readings from {} devices over 24 h ({} runs per query)",
        report.store, report.readings, report.devices, report.runs
    );
    println!(
        "  loaded {:.0} readings/s through the projector's writes; hot tables loaded in {:.1} s",
        report.load_per_s, report.hot_load_s
    );
    println!(
        "  {:<34} {:>6}  {:>17}  {:>17}  {:>7}",
        "query", "rows", "sluice p50/p99 ms", "postgres p50/p99", "speedup"
    );
    for q in &report.queries {
        let pg = match (q.postgres_p50_ms, q.postgres_p99_ms) {
            (Some(a), Some(b)) => format!("{a:>8.2}/{b:<8.2}"),
            _ => format!("{:>17}", "-"),
        };
        println!(
            "  {:<34} {:>6}  {:>8.2}/{:<8.2}  {pg}  {:>6}",
            q.name,
            q.rows,
            q.sluice_p50_ms,
            q.sluice_p99_ms,
            q.speedup.map_or("-".to_owned(), |s| format!("{s:.1}x"))
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(args: &BenchQueryArgs) -> Result<QueryReport> {
    let store = Store::connect(
        &args.store,
        StoreOptions {
            migrate_on_connect: true,
            ..StoreOptions::default()
        },
    )
    .await
    .with_context(|| format!("cannot open the store {}", redact(&args.store)))?;
    let version = 2_000_000 + (Utc::now().timestamp_micros() % 1_000_000) as i32;
    let result = measure(args, &store, version).await;
    let dropped = store.drop_projection_version(version).await;
    store.close().await;
    let report = result?;
    dropped.context("cannot drop the bench's projection version")?;
    Ok(report)
}

async fn measure(args: &BenchQueryArgs, store: &Store, version: i32) -> Result<QueryReport> {
    // Readings end a minute ago and span 24 hours, spread evenly over the devices.
    let end = Utc::now() - TimeDelta::minutes(1);
    let start = end - TimeDelta::hours(24);
    let step_us = 24 * 3_600_000_000 / args.rows as i64;
    eprintln!(
        "  loading {} readings (projection version {version})",
        args.rows
    );
    let loading = Instant::now();
    let mut batch = Vec::with_capacity(5000);
    for i in 0..args.rows {
        let at = start + TimeDelta::microseconds(i as i64 * step_us);
        let x = i as f64;
        batch.push(Reading {
            event_id: Uuid::new_v4(),
            device_id: format!("dev-{:05}", i % args.devices),
            at,
            ingested_at: at,
            seq: Some(i as i64),
            temperature_c: Some(20.0 + (x * 0.37).sin() * 5.0),
            humidity_pct: Some(40.0 + (i % 11) as f64),
            pressure_hpa: None,
            vibration_mm_s: Some(((i * 7919) % 1000) as f64 / 100.0),
            battery_pct: Some(100.0 - (i % 50) as f64),
            extra: Default::default(),
            payload: serde_json::Value::Null,
        });
        if batch.len() == 5000 || i + 1 == args.rows {
            store
                .project(&ProjectionBatch {
                    version,
                    readings: std::mem::take(&mut batch),
                    ..ProjectionBatch::default()
                })
                .await
                .context("cannot load readings")?;
            if (i + 1) % 100_000 == 0 {
                eprintln!("  {} loaded", i + 1);
            }
        }
    }
    let load_per_s = args.rows as f64 / loading.elapsed().as_secs_f64();

    let hot_loading = Instant::now();
    let hot = Arc::new(Hot::new(Duration::from_secs(25 * 3600)));
    sluice_query::follow::load(&hot, store, version, "sluice-bench-query", Utc::now())
        .await
        .context("cannot load the hot tables")?;
    let hot_load_s = hot_loading.elapsed().as_secs_f64();
    let engine = Arc::new(Engine::new(hot, store.clone(), version, Limits::default())?);
    let (key, token) = store
        .create_api_key(Role::Viewer, Some("sluice bench query"))
        .await?;
    let api = sluice_query::http::Api::new(engine, sluice_query::auth::Keys::new(store.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/query", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, api.router()).await });

    let device = format!("dev-{:05}", 42 % args.devices);
    let ts = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true);
    let hour_ago = ts(end - TimeDelta::hours(1));
    let day_ago = ts(start
        .duration_trunc(TimeDelta::hours(1))
        .context("cannot truncate to the hour")?);
    // (name, SQL on the endpoint, SQL on PostgreSQL)
    let queries: Vec<(&'static str, String, String)> = vec![
        (
            "latest state of one device",
            format!("SELECT * FROM device_latest WHERE device_id = '{device}'"),
            format!(
                "SELECT * FROM device_latest WHERE version = {version} AND device_id = '{device}'"
            ),
        ),
        (
            "one device, last hour",
            format!(
                "SELECT at, temperature_c, vibration_mm_s FROM readings \
                 WHERE device_id = '{device}' AND at >= TIMESTAMPTZ '{hour_ago}' ORDER BY at"
            ),
            format!(
                "SELECT at, temperature_c, vibration_mm_s FROM readings WHERE version = {version} \
                 AND device_id = '{device}' AND at >= TIMESTAMPTZ '{hour_ago}' ORDER BY at"
            ),
        ),
        (
            "per-device avg/max, last hour",
            format!(
                "SELECT device_id, avg(temperature_c), max(vibration_mm_s) FROM readings \
                 WHERE at >= TIMESTAMPTZ '{hour_ago}' GROUP BY device_id"
            ),
            format!(
                "SELECT device_id, avg(temperature_c), max(vibration_mm_s) FROM readings \
                 WHERE version = {version} AND at >= TIMESTAMPTZ '{hour_ago}' GROUP BY device_id"
            ),
        ),
        (
            "per-device hourly rollup, one day",
            format!(
                "SELECT device_id, bucket, temperature_c_avg, temperature_c_max FROM readings_1h \
                 WHERE bucket >= TIMESTAMPTZ '{day_ago}' ORDER BY device_id, bucket"
            ),
            format!(
                "SELECT device_id, bucket, \
                 temperature_c_sum / NULLIF(temperature_c_count, 0) AS temperature_c_avg, \
                 temperature_c_max FROM readings_1h WHERE version = {version} \
                 AND bucket >= TIMESTAMPTZ '{day_ago}' ORDER BY device_id, bucket"
            ),
        ),
        (
            "top 10 devices by max vibration",
            "SELECT device_id, max(vibration_mm_s) AS m FROM readings \
             GROUP BY device_id ORDER BY m DESC, device_id LIMIT 10"
                .to_owned(),
            format!(
                "SELECT device_id, max(vibration_mm_s) AS m FROM readings WHERE version = {version} \
                 GROUP BY device_id ORDER BY m DESC, device_id LIMIT 10"
            ),
        ),
    ];
    let client = reqwest::Client::new();
    let postgres = args.store.starts_with("postgres");
    let mut figures = Vec::new();
    for (name, sql, pg_sql) in queries {
        let mut times = Vec::with_capacity(args.runs);
        let mut rows = 0;
        for i in 0..args.runs + 3 {
            let started = Instant::now();
            let response = client
                .post(&url)
                .bearer_auth(&token)
                .header("accept", sluice_query::http::ARROW_STREAM)
                .json(&serde_json::json!({ "sql": sql }))
                .send()
                .await?;
            let status = response.status();
            let rows_header = response
                .headers()
                .get("sluice-rows")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let body = response.bytes().await?;
            if !status.is_success() {
                bail!(
                    "{name}: the endpoint answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            if i >= 3 {
                times.push(started.elapsed());
            }
            rows = rows_header.unwrap_or(0);
        }
        let (pg_p50, pg_p99) = if postgres {
            let (pg_rows, mut pg_times) =
                sluice_store::bench::time_query(&args.store, &pg_sql, 3, args.runs).await?;
            if pg_rows != rows {
                bail!("{name}: the endpoint answered {rows} rows, PostgreSQL {pg_rows}");
            }
            (
                Some(percentile(&mut pg_times, 0.5)),
                Some(percentile(&mut pg_times, 0.99)),
            )
        } else {
            (None, None)
        };
        let p50 = percentile(&mut times, 0.5);
        eprintln!("  {name}: {rows} rows, p50 {p50:.2} ms");
        figures.push(QueryFigures {
            name,
            sql,
            rows,
            sluice_p50_ms: p50,
            sluice_p99_ms: percentile(&mut times, 0.99),
            postgres_p50_ms: pg_p50,
            postgres_p99_ms: pg_p99,
            speedup: pg_p50.map(|pg| pg / p50),
        });
    }
    server.abort();
    store.revoke_api_key(&key.id).await?;
    Ok(QueryReport {
        store: redact(&args.store),
        version,
        readings: args.rows,
        devices: args.devices,
        load_per_s,
        hot_load_s,
        runs: args.runs,
        queries: figures,
    })
}
