//! `sluice bench detection`: the simulator's ground truth against the anomalies projection,
//! as precision and recall per model.

use std::collections::{BTreeMap, HashSet};
use std::io::BufRead;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use sluice_store::{Store, StoreOptions};
use uuid::Uuid;

use crate::cli::BenchDetectionArgs;
use crate::commands::{redact, runtime};

/// Figures of one model.
#[derive(Debug, Serialize)]
pub struct ModelFigures {
    /// Model name.
    pub model: String,
    /// Versions seen in its results.
    pub versions: Vec<String>,
    /// Readings it labelled anomaly within the truth's span.
    pub flagged: usize,
    /// Flagged readings the truth lists.
    pub hits: usize,
    /// hits / flagged.
    pub precision: f64,
    /// hits / anomalous readings in the truth.
    pub recall: f64,
    /// Harmonic mean of the two.
    pub f1: f64,
}

/// What `sluice bench detection` prints.
#[derive(Debug, Serialize)]
pub struct DetectionReport {
    /// Anomalous readings in the truth file.
    pub truth: usize,
    /// First and last device time in the truth file.
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Per model found in the projection.
    pub models: Vec<ModelFigures>,
}

#[derive(Deserialize)]
struct TruthLine {
    event_id: Uuid,
    occurred_at: DateTime<Utc>,
}

pub fn bench_detection(args: &BenchDetectionArgs) -> Result<ExitCode> {
    let file = std::fs::File::open(&args.truth)
        .with_context(|| format!("cannot open the truth file {}", args.truth.display()))?;
    let mut truth = HashSet::new();
    let (mut from, mut to) = (DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC);
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", args.truth.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let t: TruthLine = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {} is not a ground-truth line of `sluice simulate --truth`",
                args.truth.display(),
                n + 1
            )
        })?;
        from = from.min(t.occurred_at);
        to = to.max(t.occurred_at);
        truth.insert(t.event_id);
    }
    if truth.is_empty() {
        bail!(
            "{} lists no anomalies; simulate with --anomaly-rate above 0",
            args.truth.display()
        );
    }
    let margin = TimeDelta::minutes(1);
    let anomalies = runtime()?.block_on(async {
        let store = Store::connect(&args.store, StoreOptions::default())
            .await
            .with_context(|| format!("cannot open the store {}", redact(&args.store)))?;
        let rows = store.anomalies(args.projection_version, None).await;
        store.close().await;
        rows.context("cannot read the anomalies projection")
    })?;
    let mut by_model: BTreeMap<String, (HashSet<String>, HashSet<Uuid>)> = BTreeMap::new();
    for a in anomalies {
        if a.at < from - margin || a.at > to + margin {
            continue;
        }
        let entry = by_model.entry(a.model_name).or_default();
        entry.0.insert(a.model_version);
        entry.1.insert(a.input_event_id);
    }
    let models = by_model
        .into_iter()
        .map(|(model, (versions, flagged))| {
            let hits = flagged.intersection(&truth).count();
            let precision = ratio(hits, flagged.len());
            let recall = ratio(hits, truth.len());
            let f1 = if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            };
            let mut versions: Vec<String> = versions.into_iter().collect();
            versions.sort();
            ModelFigures {
                model,
                versions,
                flagged: flagged.len(),
                hits,
                precision,
                recall,
                f1,
            }
        })
        .collect();
    let report = DetectionReport {
        truth: truth.len(),
        from,
        to,
        models,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "truth       {} anomalous readings, device time {} to {}",
        report.truth, report.from, report.to
    );
    if report.models.is_empty() {
        println!(
            "no anomalies projected in that span: is the inferencer running, and the projector?"
        );
    }
    println!("model              versions   flagged      hits  precision  recall     f1");
    for m in &report.models {
        println!(
            "{:<18} {:<9} {:>8} {:>9} {:>10.3} {:>7.3} {:>6.3}",
            m.model,
            m.versions.join(","),
            m.flagged,
            m.hits,
            m.precision,
            m.recall,
            m.f1
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}
