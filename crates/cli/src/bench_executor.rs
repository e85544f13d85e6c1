//! `sluice bench executor`: signed deliveries per second to a local receiver through the
//! executor's delivery core, against plain unsigned POSTs to the same receiver in the same run
//! (the baseline), and what a delivery short-circuited by an open breaker costs.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde::Serialize;
use sluice_executor::{Breaker, Deliverer, Destinations, ResolvedEndpoint, Status};
use sluice_topology::Endpoint;

use crate::cli::BenchExecutorArgs;
use crate::commands::runtime;

/// A throwaway signing secret for the bench's receiver.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What `sluice bench executor` prints.
#[derive(Debug, Serialize)]
pub struct ExecutorReport {
    /// Deliveries made per side.
    pub deliveries: u64,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Body size, bytes.
    pub body_bytes: usize,
    /// Signed, policy-checked deliveries per second (the executor's delivery core).
    pub delivered_per_s: f64,
    /// Plain unsigned POSTs per second with a bare HTTP client (the baseline).
    pub baseline_per_s: f64,
    /// delivered_per_s / baseline_per_s.
    pub ratio: f64,
    /// Median latency of a signed delivery, ms.
    pub p50_ms: f64,
    /// ms.
    pub p99_ms: f64,
    /// What one delivery to an endpoint whose breaker is open costs, µs.
    pub short_circuit_us: f64,
    /// Signed deliveries per second to the receiver while as many go to a dead endpoint.
    pub with_dead_endpoint_per_s: f64,
    /// 1 - with_dead_endpoint_per_s / delivered_per_s: the share of throughput a dead
    /// endpoint costs the healthy one.
    pub dead_endpoint_cost: f64,
}

pub fn bench_executor(args: &BenchExecutorArgs) -> Result<ExitCode> {
    if args.deliveries == 0 || args.concurrency == 0 {
        bail!("--deliveries and --concurrency must be at least 1");
    }
    runtime()?.block_on(async {
        let (url, received) = receiver().await?;
        let body = vec![b'x'; args.body_bytes.saturating_sub(2)];
        let body = [b"\"".as_slice(), &body, b"\""].concat();
        let deliverer = Deliverer::new(Destinations::new(&[], true).map_err(|e| {
            anyhow::anyhow!("{e:?}")
        })?)?;
        let target = ResolvedEndpoint::from_vars(
            endpoint_at("bench", &url),
            Breaker::new(5, Duration::from_secs(300)),
            |_| Some(SECRET.to_owned()),
        )?;
        eprintln!("bench executor: {} signed deliveries to {url}", args.deliveries);
        // Warm the connection pool.
        run_signed(&deliverer, &target, &body, 200, args.concurrency).await?;
        let started = Instant::now();
        let mut latencies =
            run_signed(&deliverer, &target, &body, args.deliveries, args.concurrency).await?;
        let delivered_per_s = args.deliveries as f64 / started.elapsed().as_secs_f64();

        eprintln!("bench executor: the same count of plain POSTs");
        let client = reqwest::Client::new();
        let started = Instant::now();
        let failures = futures::stream::iter(0..args.deliveries)
            .map(|_| {
                let (client, url, body) = (&client, &url, &body);
                async move {
                    client
                        .post(url.as_str())
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                }
            })
            .buffer_unordered(args.concurrency)
            .filter(|ok| std::future::ready(!*ok))
            .count()
            .await;
        if failures > 0 {
            bail!("{failures} baseline POSTs failed");
        }
        let baseline_per_s = args.deliveries as f64 / started.elapsed().as_secs_f64();

        // A dead endpoint: one failure opens its breaker, the rest are short-circuited.
        let dead = ResolvedEndpoint::from_vars(
            endpoint_at("dead", &dead_url()),
            Breaker::new(1, Duration::from_secs(300)),
            |_| Some(SECRET.to_owned()),
        )?;
        deliverer.attempt(&dead, "first", &body).await;
        let n = 10_000u32;
        let started = Instant::now();
        for i in 0..n {
            let a = deliverer.attempt(&dead, &i.to_string(), &body).await;
            if !matches!(a.status, Status::ShortCircuited { .. }) {
                bail!("the dead endpoint's breaker did not open: {:?}", a.status);
            }
        }
        let short_circuit_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(n);

        // The healthy endpoint again, with a dead one taking the same number of deliveries
        // beside it (they fail, open its breaker, then short-circuit).
        let dead_too = ResolvedEndpoint::from_vars(
            endpoint_at("dead-too", &dead_url()),
            Breaker::new(5, Duration::from_secs(300)),
            |_| Some(SECRET.to_owned()),
        )?;
        let started = Instant::now();
        let (healthy, _) = tokio::join!(
            run_signed(&deliverer, &target, &body, args.deliveries, args.concurrency),
            futures::stream::iter(0..args.deliveries)
                .map(|i| {
                    let (deliverer, dead, body) = (&deliverer, &dead_too, &body);
                    async move { deliverer.attempt(dead, &format!("dead_{i}"), body).await }
                })
                .buffer_unordered(args.concurrency)
                .count()
        );
        healthy?;
        let with_dead_endpoint_per_s = args.deliveries as f64 / started.elapsed().as_secs_f64();

        latencies.sort();
        let pct = |p: f64| {
            latencies[((latencies.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0
        };
        let report = ExecutorReport {
            deliveries: args.deliveries,
            concurrency: args.concurrency,
            body_bytes: body.len(),
            delivered_per_s,
            baseline_per_s,
            ratio: delivered_per_s / baseline_per_s,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            short_circuit_us,
            with_dead_endpoint_per_s,
            dead_endpoint_cost: 1.0 - with_dead_endpoint_per_s / delivered_per_s,
        };
        eprintln!(
            "bench executor: the receiver got {} requests",
            received.load(Ordering::Relaxed)
        );
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!(
                "signed      {:.0} deliveries/s (p50 {:.2} ms, p99 {:.2} ms), {} in flight, {} B bodies",
                report.delivered_per_s, report.p50_ms, report.p99_ms, report.concurrency, report.body_bytes
            );
            println!(
                "baseline    {:.0} plain POSTs/s; signed / plain = {:.2}",
                report.baseline_per_s, report.ratio
            );
            println!(
                "short-circuited delivery to a dead endpoint: {:.2} µs",
                report.short_circuit_us
            );
            println!(
                "with a dead endpoint beside it: {:.0} deliveries/s ({:+.1} % of the healthy rate)",
                report.with_dead_endpoint_per_s,
                -100.0 * report.dead_endpoint_cost
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn run_signed(
    deliverer: &Deliverer,
    endpoint: &ResolvedEndpoint,
    body: &[u8],
    n: u64,
    concurrency: usize,
) -> Result<Vec<Duration>> {
    let results: Vec<(bool, Duration)> = futures::stream::iter(0..n)
        .map(|i| async move {
            let a = deliverer.attempt(endpoint, &format!("msg_{i}"), body).await;
            (a.status == Status::Delivered, a.latency)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let failed = results.iter().filter(|(ok, _)| !ok).count();
    if failed > 0 {
        bail!("{failed} of {n} signed deliveries failed");
    }
    Ok(results.into_iter().map(|(_, l)| l).collect())
}

fn endpoint_at(name: &str, url: &str) -> Endpoint {
    Endpoint {
        name: name.to_owned(),
        url: url.to_owned(),
        secret_env: "SLUICE_BENCH_SECRET".into(),
        timeout: Duration::from_secs(10),
    }
}

/// A receiver on 127.0.0.1 answering 204 to every POST, counting them.
async fn receiver() -> Result<(String, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the bench receiver")?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    let seen = count.clone();
    let app = axum::Router::new().fallback(move || {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::Relaxed);
            axum::http::StatusCode::NO_CONTENT
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}/hook"), count))
}

/// A port nothing listens on.
fn dead_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(9);
    format!("http://127.0.0.1:{port}/hook")
}
