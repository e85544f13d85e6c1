//! A simulated IoT fleet for trying and load-testing Sluice: N devices report readings with
//! daily cycles and noise, change status, and now and then send late, duplicated or malformed
//! messages and readings with injected anomalies whose ground truth goes to a file. It
//! publishes to the edge as a real fleet would, over MQTT (QoS 1) or the HTTP ingest API, at a
//! set rate, and reports what was sent, acknowledged, rejected and lost.
//!
//! It is a client of the edge and nothing more: it never reaches into the log or the store,
//! and a network fault is counted and retried, never a panic. [`Fleet`] is the generator on its
//! own (no I/O, seeded), for tests.

mod encode;
mod fleet;
mod http;
mod mqtt;
mod pace;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use encode::{mqtt_topic, write_http, write_mqtt};
pub use fleet::{
    Anomaly, AnomalyKind, Body, DeviceState, Fleet, Malformation, Metric, Reading, SimEvent,
    SimKind, Status,
};

/// How long, once sending stops, to wait for acknowledgements still outstanding.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A run that has had nothing acknowledged and could not reach its target for this long stops.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(10);

/// The simulated fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// Number of devices (`dev-00001` …).
    pub devices: u32,
    /// Events per second across the fleet.
    pub rate: u32,
    /// Share of readings that carry an injected anomaly (0 to 1).
    pub anomaly_rate: f64,
    /// Share of messages sent malformed (0 to 1).
    pub malformed_rate: f64,
    /// Share of messages sent twice (0 to 1).
    pub duplicate_rate: f64,
    /// Seed of all the fleet's randomness.
    pub seed: u64,
    /// Share of events that are status changes (0 to 1).
    pub status_rate: f64,
    /// Share of readings held back and sent 5 s to 5 min late, after younger ones (0 to 0.9).
    pub late_rate: f64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            devices: 100,
            rate: 100,
            anomaly_rate: 0.001,
            malformed_rate: 0.0005,
            duplicate_rate: 0.001,
            seed: 0,
            status_rate: 0.01,
            late_rate: 0.001,
        }
    }
}

impl FleetConfig {
    /// Every problem at once, one per line.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.devices == 0 {
            problems.push("devices must be at least 1".to_owned());
        }
        if self.rate == 0 {
            problems.push("rate must be at least 1 event per second".to_owned());
        }
        for (name, value, max) in [
            ("anomaly_rate", self.anomaly_rate, 1.0),
            ("malformed_rate", self.malformed_rate, 1.0),
            ("duplicate_rate", self.duplicate_rate, 1.0),
            ("status_rate", self.status_rate, 1.0),
            // Some readings must go out on time, or nothing would be sent for minutes.
            ("late_rate", self.late_rate, 0.9),
        ] {
            if !(0.0..=max).contains(&value) {
                problems.push(format!("{name} must be between 0 and {max}, got {value}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{}", problems.join("\n"))
        }
    }
}

/// Where the fleet publishes.
#[derive(Debug, Clone)]
pub enum Target {
    /// An MQTT broker, `mqtt://[user:pass@]host[:port]`, with QoS 1.
    Mqtt { url: String },
    /// The HTTP ingest API (`http://host:port`): `POST <url>/v1/events`, `batch` events a request.
    Http {
        url: String,
        key: String,
        batch: usize,
    },
}

/// Running totals, updated while the fleet runs so a caller can show progress.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages handed to the transport, duplicate copies included.
    pub sent: AtomicU64,
    /// Messages the target acknowledged (MQTT PUBACK; HTTP accepted).
    pub acknowledged: AtomicU64,
    /// Messages the target refused (HTTP 400 and other client errors).
    pub rejected: AtomicU64,
    /// Messages lost: not acknowledged before a connection dropped, retries gave up, or the
    /// run ended.
    pub failed: AtomicU64,
    /// Second copies sent.
    pub duplicates_sent: AtomicU64,
    /// Malformed events sent (not counting their duplicate copies).
    pub malformed_sent: AtomicU64,
    /// Anomalous readings sent (one ground-truth line each).
    pub anomalies: AtomicU64,
    /// Status events sent.
    pub status_sent: AtomicU64,
    /// Late readings sent.
    pub late_sent: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Sent messages with no outcome yet.
    fn outstanding(&self) -> u64 {
        let resolved =
            Self::get(&self.acknowledged) + Self::get(&self.rejected) + Self::get(&self.failed);
        Self::get(&self.sent).saturating_sub(resolved)
    }
}

/// The outcome of a run. At the end `sent = acknowledged + rejected + failed`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub sent: u64,
    pub acknowledged: u64,
    pub rejected: u64,
    pub failed: u64,
    pub duplicates_sent: u64,
    pub malformed_sent: u64,
    pub anomalies: u64,
    pub status_sent: u64,
    pub late_sent: u64,
    /// From start to the end of the drain.
    #[serde(rename = "elapsed_s", serialize_with = "seconds")]
    pub elapsed: Duration,
    /// Messages sent per second while sending (below the configured rate when the target could
    /// not keep up).
    pub sent_per_sec: f64,
    /// Why the run stopped before it was asked to (a refused key, an unreachable target).
    pub stopped_early: Option<String>,
    /// The last transport error seen, if any.
    pub last_error: Option<String>,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Runs the fleet against `target` until `stop` is cancelled or `run_for` has passed, then
/// waits up to [`DRAIN_TIMEOUT`] for outstanding acknowledgements and reports. Anomalies are
/// written to `truth` as JSON lines `{event_id, device, occurred_at, metric, kind, value}` as
/// they are sent. `counters` should be fresh: the report is read from them. Errors only for a
/// bad config, target URL or truth file; transport trouble is in the report.
pub async fn run(
    config: &FleetConfig,
    target: &Target,
    truth: Option<&Path>,
    counters: Arc<Counters>,
    stop: CancellationToken,
    run_for: Option<Duration>,
) -> Result<Report> {
    config.validate()?;
    let target_name = match target {
        Target::Mqtt { url } => mqtt::BrokerUrl::parse(url)?.shown(),
        Target::Http { url, .. } => http::endpoint(url)?,
    };
    let truth = truth.map(TruthFile::create).transpose()?;
    let started = Instant::now();
    // Cancelled by the caller, the timer, or a condition that makes going on pointless.
    let sending = stop.child_token();
    let timer = run_for.map(|d| {
        let sending = sending.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(d) => sending.cancel(),
                () = sending.cancelled() => {}
            }
        })
    });
    let health = Arc::new(Health::new(started));
    let watchdog = tokio::spawn(watch(
        health.clone(),
        counters.clone(),
        sending.clone(),
        target_name,
    ));
    let ctx = Ctx {
        emitter: Emitter {
            fleet: Fleet::new(config.clone()),
            truth,
            counters: counters.clone(),
        },
        rate: config.rate,
        health,
        sending: sending.clone(),
        counters: counters.clone(),
    };
    let result = match target {
        Target::Mqtt { url } => mqtt::run(ctx, url).await,
        Target::Http { url, key, batch } => http::run(ctx, url, key, *batch).await,
    };
    sending.cancel();
    if let Some(timer) = timer {
        let _ = timer.await;
    }
    let _ = watchdog.await;
    let outcome = result?;
    if let Some(truth) = outcome.truth
        && let Err(e) = truth.finish()
    {
        tracing::warn!("cannot write the ground-truth file: {e:#}");
    }
    // Whatever is still unanswered now is lost.
    Counters::add(&counters.failed, counters.outstanding());
    let get = |c: &AtomicU64| Counters::get(c);
    let sent = get(&counters.sent);
    Ok(Report {
        sent,
        acknowledged: get(&counters.acknowledged),
        rejected: get(&counters.rejected),
        failed: get(&counters.failed),
        duplicates_sent: get(&counters.duplicates_sent),
        malformed_sent: get(&counters.malformed_sent),
        anomalies: get(&counters.anomalies),
        status_sent: get(&counters.status_sent),
        late_sent: get(&counters.late_sent),
        elapsed: started.elapsed(),
        sent_per_sec: sent as f64 / outcome.sending_time.as_secs_f64().max(1e-3),
        stopped_early: outcome.stopped_early,
        last_error: outcome.health.last_error(),
    })
}

/// What a transport hands back to `run`.
struct Outcome {
    truth: Option<TruthFile>,
    sending_time: Duration,
    stopped_early: Option<String>,
    health: Arc<Health>,
}

/// What both transports need.
struct Ctx {
    emitter: Emitter,
    rate: u32,
    health: Arc<Health>,
    sending: CancellationToken,
    counters: Arc<Counters>,
}

impl Ctx {
    /// Why sending stopped on its own, if it did.
    fn stopped_early(&self) -> Option<String> {
        self.health.fatal()
    }

    fn finish(self, sending_time: Duration) -> Outcome {
        Outcome {
            truth: self.emitter.truth,
            sending_time,
            stopped_early: self.health.fatal(),
            health: self.health,
        }
    }
}

/// Stops sending when going on is pointless: the target refused us (set by the transport), or
/// nothing was ever delivered and the target has been unreachable for [`GIVE_UP_AFTER`]. Apart
/// from the senders, which may be blocked on a full queue.
async fn watch(
    health: Arc<Health>,
    counters: Arc<Counters>,
    sending: CancellationToken,
    target: String,
) {
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = sending.cancelled() => return,
        }
        let delivered =
            Counters::get(&counters.acknowledged) + Counters::get(&counters.rejected) > 0;
        if let Some(failing_for) = health.failing_for()
            && !delivered
            && failing_for >= GIVE_UP_AFTER
        {
            let error = health
                .last_error()
                .unwrap_or_else(|| "no answer".to_owned());
            health.set_fatal(format!(
                "nothing delivered to {target} in {}s: {error}",
                failing_for.as_secs()
            ));
        }
        if health.fatal().is_some() {
            sending.cancel();
            return;
        }
    }
}

/// Draws events from the fleet and accounts for the ones sent.
struct Emitter {
    fleet: Fleet,
    truth: Option<TruthFile>,
    counters: Arc<Counters>,
}

impl Emitter {
    fn next(&mut self) -> SimEvent {
        self.fleet.next_event(chrono::Utc::now())
    }

    /// Counts `event` as sent (its copies are counted by the transport) and writes its ground
    /// truth; called once the transport has it, so the truth lists only events that went out.
    fn sent(&mut self, event: &SimEvent) {
        let c = &self.counters;
        if event.malformed.is_some() {
            Counters::add(&c.malformed_sent, 1);
        }
        if event.kind() == SimKind::Status {
            Counters::add(&c.status_sent, 1);
        }
        if event.late {
            Counters::add(&c.late_sent, 1);
        }
        if let Some(anomaly) = &event.anomaly {
            Counters::add(&c.anomalies, 1);
            if let Some(truth) = &mut self.truth {
                truth.write(event, anomaly);
            }
        }
    }
}

/// The ground-truth file, flushed at least every second so a reader can follow it.
struct TruthFile {
    path: PathBuf,
    out: BufWriter<File>,
    line: Vec<u8>,
    flushed: Instant,
    error: Option<std::io::Error>,
}

impl TruthFile {
    fn create(path: &Path) -> Result<TruthFile> {
        let file = File::create(path)
            .with_context(|| format!("cannot create the ground-truth file {}", path.display()))?;
        Ok(TruthFile {
            path: path.to_owned(),
            out: BufWriter::new(file),
            line: Vec::with_capacity(256),
            flushed: Instant::now(),
            error: None,
        })
    }

    fn write(&mut self, event: &SimEvent, anomaly: &Anomaly) {
        if self.error.is_some() {
            return;
        }
        self.line.clear();
        encode::write_truth(event, anomaly, &mut self.line);
        let mut result = self.out.write_all(&self.line);
        if result.is_ok() && self.flushed.elapsed() >= Duration::from_secs(1) {
            self.flushed = Instant::now();
            result = self.out.flush();
        }
        if let Err(e) = result {
            tracing::warn!(
                "cannot write the ground-truth file {}: {e}; no more lines go to it",
                self.path.display()
            );
            self.error = Some(e);
        }
    }

    fn finish(mut self) -> Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e).with_context(|| format!("writing {}", self.path.display()));
        }
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Whether the target is reachable, shared by the tasks that talk to it.
#[derive(Debug)]
struct Health {
    state: Mutex<HealthState>,
}

#[derive(Debug)]
struct HealthState {
    /// Since when every attempt has failed; `None` while the target answers.
    failing_since: Option<Instant>,
    last_error: Option<String>,
    fatal: Option<String>,
}

impl Health {
    /// Starts out failing: a target is reachable once it has answered.
    fn new(started: Instant) -> Health {
        Health {
            state: Mutex::new(HealthState {
                failing_since: Some(started),
                last_error: None,
                fatal: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // The state stays consistent whatever a panicking holder did; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ok(&self) {
        self.lock().failing_since = None;
    }

    /// The target answered, but with an error (it is reachable, so this never gives up a run).
    fn note(&self, error: String) {
        let mut s = self.lock();
        s.failing_since = None;
        s.last_error = Some(error);
    }

    /// The target could not be reached.
    fn failure(&self, error: String) {
        let mut s = self.lock();
        s.failing_since.get_or_insert_with(Instant::now);
        s.last_error = Some(error);
    }

    /// Sending must stop, for `reason`.
    fn set_fatal(&self, reason: String) {
        self.lock().fatal.get_or_insert(reason);
    }

    fn fatal(&self) -> Option<String> {
        self.lock().fatal.clone()
    }

    fn failing_for(&self) -> Option<Duration> {
        self.lock().failing_since.map(|t| t.elapsed())
    }

    fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }
}

/// What a URL starts with, for messages that must not show a password.
pub(crate) fn scheme(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, _)) => format!("{scheme}://…"),
        None => "a URL without a scheme".to_owned(),
    }
}

/// The wait before retry `attempt` (0-based): 100 ms doubling to 5 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_lists_every_problem() {
        let config = FleetConfig {
            devices: 0,
            rate: 0,
            anomaly_rate: 1.5,
            late_rate: 0.95,
            ..FleetConfig::default()
        };
        let message = config.validate().unwrap_err().to_string();
        for part in ["devices", "rate must", "anomaly_rate", "late_rate"] {
            assert!(message.contains(part), "{message}");
        }
        assert_eq!(message.lines().count(), 4, "{message}");
        FleetConfig::default().validate().unwrap();
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let waits: Vec<u64> = (0..9).map(|a| backoff(a).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[test]
    fn the_report_serializes_elapsed_as_seconds() {
        let report = Report {
            sent: 3,
            acknowledged: 2,
            rejected: 1,
            failed: 0,
            duplicates_sent: 0,
            malformed_sent: 1,
            anomalies: 0,
            status_sent: 0,
            late_sent: 0,
            elapsed: Duration::from_millis(1500),
            sent_per_sec: 2.0,
            stopped_early: None,
            last_error: None,
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["elapsed_s"], 1.5);
        assert_eq!(json["acknowledged"], 2);
    }
}
