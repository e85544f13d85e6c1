//! `sluice simulate`: a simulated fleet (`sluice_simulator`) against an MQTT broker or the HTTP
//! ingest API until `--for` has passed or SIGINT/SIGTERM, with progress on stderr every 5 s
//! and the report on stdout. Exits 1 with the reason when nothing could be delivered or the
//! target refused us.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sluice_simulator::{Counters, FleetConfig, Report, Target};
use tokio_util::sync::CancellationToken;

use crate::cli::SimulateArgs;
use crate::commands::{redact, runtime, usage_error};

const PROGRESS_EVERY: Duration = Duration::from_secs(5);

pub fn simulate(args: &SimulateArgs) -> Result<ExitCode> {
    let target = match (&args.mqtt, &args.http) {
        (Some(url), _) => Target::Mqtt { url: url.clone() },
        (None, Some(url)) => {
            let Some(key) = args.key.clone() else {
                return usage_error("--http needs an API key: --key KEY or SLUICE__API_KEY");
            };
            if args.batch == 0 {
                return usage_error("--batch must be at least 1");
            }
            Target::Http {
                url: url.clone(),
                key,
                batch: args.batch,
            }
        }
        (None, None) => return usage_error("give --mqtt URL or --http URL"),
    };
    let shown = match &target {
        Target::Mqtt { url } | Target::Http { url, .. } => redact(url),
    };
    let run_for = match args.run_for.as_deref() {
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) => Some(d),
            Err(e) => return usage_error(&format!("--for {text:?}: {e}")),
        },
        None => None,
    };
    // Random unless given; printed so that a run can be repeated.
    let seed = args
        .seed
        .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let config = FleetConfig {
        devices: args.devices,
        rate: args.rate,
        anomaly_rate: args.anomaly_rate,
        malformed_rate: args.malformed_rate,
        duplicate_rate: args.duplicate_rate,
        seed,
        ..FleetConfig::default()
    };
    if let Err(e) = config.validate() {
        return usage_error(&e.to_string().replace('\n', "; "));
    }
    eprintln!(
        "simulating {} devices at {} events/s to {shown}{} (seed {seed}); Ctrl-C stops",
        config.devices,
        config.rate,
        run_for.map_or(String::new(), |d| format!(
            " for {}",
            humantime::format_duration(d)
        )),
    );

    let counters = Arc::new(Counters::default());
    let report = runtime()?.block_on(async {
        let stop = CancellationToken::new();
        sluice_runtime::cancel_on_signals(stop.clone()).context("cannot listen for signals")?;
        let done = CancellationToken::new();
        let progress = tokio::spawn(progress(counters.clone(), done.clone()));
        let report = sluice_simulator::run(
            &config,
            &target,
            args.truth.as_deref(),
            counters.clone(),
            stop,
            run_for,
        )
        .await;
        done.cancel();
        let _ = progress.await;
        report
    })?;

    if args.json {
        #[derive(Serialize)]
        struct Out<'a> {
            seed: u64,
            #[serde(flatten)]
            report: &'a Report,
        }
        let out = Out {
            seed,
            report: &report,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_report(&report, seed, args.truth.as_deref());
    }
    if let Some(reason) = &report.stopped_early {
        bail!("{reason}");
    }
    if report.sent > 0 && report.acknowledged == 0 {
        let cause = report
            .last_error
            .as_deref()
            .map_or(String::new(), |e| format!(": {e}"));
        bail!(
            "nothing was delivered to {shown} ({} sent, {} rejected, {} failed){cause}",
            report.sent,
            report.rejected,
            report.failed
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A line on stderr every [`PROGRESS_EVERY`] until `done`.
async fn progress(counters: Arc<Counters>, done: CancellationToken) {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut every = tokio::time::interval(PROGRESS_EVERY);
    every.tick().await; // the first tick is immediate
    let (mut last_sent, mut last_at) = (0, Instant::now());
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = done.cancelled() => return,
        }
        let sent = get(&counters.sent);
        let rate = (sent - last_sent) as f64 / last_at.elapsed().as_secs_f64();
        (last_sent, last_at) = (sent, Instant::now());
        eprintln!(
            "  sent {sent} ({rate:.0}/s)  acknowledged {}  rejected {}  failed {}",
            get(&counters.acknowledged),
            get(&counters.rejected),
            get(&counters.failed),
        );
    }
}

fn print_report(r: &Report, seed: u64, truth: Option<&Path>) {
    let truth = truth.map_or(String::new(), |p| {
        format!("  (ground truth in {})", p.display())
    });
    println!(
        "sent            {:>10}  ({:.0} events/s)",
        r.sent, r.sent_per_sec
    );
    println!("acknowledged    {:>10}", r.acknowledged);
    println!("rejected        {:>10}", r.rejected);
    println!("failed          {:>10}", r.failed);
    println!("duplicates      {:>10}", r.duplicates_sent);
    println!("malformed       {:>10}", r.malformed_sent);
    println!("anomalies       {:>10}{truth}", r.anomalies);
    println!("status changes  {:>10}", r.status_sent);
    println!("late readings   {:>10}", r.late_sent);
    println!("elapsed         {:>10.1} s", r.elapsed.as_secs_f64());
    println!("seed            {seed:>10}");
    if let Some(e) = &r.last_error {
        println!("last error      {e}");
    }
}
