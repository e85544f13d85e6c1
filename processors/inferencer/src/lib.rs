//! The inferencer: scores each reading with an ONNX model running in-process, and emits an
//! `inference.result` (score, label, model name and version, feature values) per reading.
//!
//! Features are per device and rolling ([`features`]); the state lives in memory and is
//! rebuilt from the device's recent readings in the store when a device is first seen (after
//! a restart, say). A poll's readings are scored in one model call (the runtime's
//! micro-batch: up to `max_batch` readings, waiting at most `max_wait`).
//!
//! Models are configured per event type and read from a folder of versions; a new version is
//! loaded while running and named in every result. With no model, or when ONNX Runtime cannot
//! be loaded, a per-device EWMA z-score scores instead and every result says
//! `model_name = "ewma-zscore"`. A reading that cannot be scored is rejected to the DLQ and
//! the partition moves on. Result ids derive from the input id and the model version, so a
//! redelivered reading yields the same result id.

pub mod features;
pub mod model;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sluice_core::{Event, EventType, Source};
use sluice_runtime::{Outputs, ProcessError, Processor};
use sluice_store::{Column, ColumnType, Filter, Op, Select, Store};
use tokio_util::sync::CancellationToken;

pub use features::{DeviceState, FeatureParams};
pub use model::{ModelError, OnnxModel};
pub use sluice_topology::{InferencerConfig, ModelConfig};

/// The processor's name in topologies and metrics.
pub const NAME: &str = "inferencer";

/// The output port.
pub const PORT: &str = "inferences";

/// The model name of the statistical fallback's results.
pub const FALLBACK_MODEL: &str = "ewma-zscore";

/// The fallback's version: bump it when its scoring changes.
pub const FALLBACK_VERSION: &str = "1";

/// How the inferencer runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The instance name (logs).
    pub name: String,
    /// Models, thresholds, batching.
    pub config: InferencerConfig,
    /// The readings projection version device history is read from.
    pub history_version: i32,
    /// How far back a device's history is read when it is first seen.
    pub history: Duration,
    /// ONNX Runtime's library; default: `ORT_DYLIB_PATH`, else the cache folder
    /// `scripts/fetch-onnxruntime` fills ([`model::runtime_library`]).
    pub ort_library: Option<PathBuf>,
}

impl Settings {
    /// Settings for an instance called `name`.
    pub fn new(name: &str, config: InferencerConfig) -> Settings {
        Settings {
            name: name.to_owned(),
            config,
            history_version: 1,
            history: Duration::from_secs(600),
            ort_library: None,
        }
    }
}

/// What the inferencer has done, for progress lines and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Readings scored by an ONNX model.
    pub model_scored: AtomicU64,
    /// Readings scored by the statistical fallback.
    pub fallback_scored: AtomicU64,
    /// Results labelled anomaly.
    pub anomalies: AtomicU64,
    /// Readings rejected (no features, or the model failed on them).
    pub rejected: AtomicU64,
    /// Model versions loaded (the first load included).
    pub loads: AtomicU64,
    /// Devices whose state was rebuilt from the store.
    pub warmed: AtomicU64,
    /// Replayed readings passed over (the replay did not ask to re-score).
    pub replays_skipped: AtomicU64,
}

/// One configured model: what to load and what is loaded.
#[derive(Debug)]
struct Slot {
    event_type: String,
    config: ModelConfig,
    /// Payload field per metric, in [`features::METRICS`] order.
    fields: [String; features::METRICS.len()],
    current: RwLock<Option<Arc<OnnxModel>>>,
    /// The last loading problem logged, so each is logged once.
    last_problem: Mutex<Option<String>>,
}

/// A device's feature state, under the model's parameters and the fallback's.
#[derive(Debug, Default)]
struct DeviceStates {
    model: DeviceState,
    fallback: DeviceState,
}

/// The inferencer processor.
#[derive(Debug)]
pub struct Inferencer {
    settings: Settings,
    slots: BTreeMap<String, Slot>,
    fallback: FeatureParams,
    /// Feature parameters of the loaded models (they share the device states).
    model_params: RwLock<FeatureParams>,
    devices: moka::sync::Cache<String, Arc<Mutex<DeviceStates>>>,
    store: Option<Store>,
    stats: Arc<Stats>,
}

/// How one reading is to be scored.
enum Plan {
    Model(usize, Arc<OnnxModel>),
    Fallback([f64; features::WIDTH]),
    Skip,
    Reject(String),
}

impl Inferencer {
    /// An inferencer with its models loaded (or their problems logged). `store` is where
    /// device history is read from; without it, devices start cold.
    pub async fn start(settings: Settings, store: Option<Store>) -> Inferencer {
        let slots = settings
            .config
            .models
            .iter()
            .map(|(event_type, config)| {
                let fields = std::array::from_fn(|i| {
                    let metric = features::METRICS[i];
                    config
                        .features
                        .get(metric)
                        .cloned()
                        .unwrap_or_else(|| metric.to_owned())
                });
                let slot = Slot {
                    event_type: event_type.clone(),
                    config: config.clone(),
                    fields,
                    current: RwLock::new(None),
                    last_problem: Mutex::new(None),
                };
                (event_type.clone(), slot)
            })
            .collect();
        let c = &settings.config;
        let inferencer = Inferencer {
            fallback: FeatureParams::fallback(c.window, c.fallback_z_threshold),
            model_params: RwLock::new(FeatureParams::shipped()),
            slots,
            devices: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_idle(Duration::from_secs(24 * 3600))
                .build(),
            store,
            stats: Arc::new(Stats::default()),
            settings,
        };
        inferencer.reload().await;
        if inferencer.slots.is_empty() {
            tracing::info!(processor = %inferencer.settings.name, "no model configured; scoring readings with the {FALLBACK_MODEL} fallback");
        }
        inferencer
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The model and version scoring `event_type` now, if an ONNX model is loaded.
    pub fn model_of(&self, event_type: &str) -> Option<(String, String)> {
        let slot = self.slots.get(event_type)?;
        let current = slot.current.read().unwrap_or_else(|e| e.into_inner());
        current
            .as_ref()
            .map(|m| (m.metadata.name.clone(), m.metadata.version.clone()))
    }

    /// Loads each model's version to run if it is not the one loaded (a new `latest`, or a
    /// version rewritten in place). A problem keeps the loaded version, or the fallback.
    pub async fn reload(&self) {
        for slot in self.slots.values() {
            let path = PathBuf::from(&slot.config.path);
            let version = slot.config.version.clone();
            let library = self.settings.ort_library.clone();
            let loaded = {
                let current = slot.current.read().unwrap_or_else(|e| e.into_inner());
                current.as_ref().map(|m| (m.dir.clone(), m.modified))
            };
            let outcome = tokio::task::spawn_blocking(move || {
                let dir = model::resolve(&path, &version)?;
                let modified = std::fs::metadata(dir.join("model.onnx"))
                    .and_then(|m| m.modified())
                    .ok();
                if loaded.as_ref() == Some(&(dir.clone(), modified)) {
                    return Ok(None);
                }
                OnnxModel::load(&dir, library.as_deref()).map(Some)
            })
            .await
            .unwrap_or_else(|e| Err(ModelError::Invalid(format!("model loading panicked: {e}"))));
            match outcome {
                Ok(None) => {}
                Ok(Some(model)) => self.install(slot, model),
                Err(e) => self.problem(slot, &e),
            }
        }
    }

    fn install(&self, slot: &Slot, model: OnnxModel) {
        let meta = &model.metadata;
        {
            let mut params = self.model_params.write().unwrap_or_else(|e| e.into_inner());
            if *params != meta.feature_params {
                // Other parameters mean other baselines: start them again from history.
                *params = meta.feature_params.clone();
                self.devices.invalidate_all();
            }
        }
        let mut current = slot.current.write().unwrap_or_else(|e| e.into_inner());
        let was = current.as_ref().map(|m| m.metadata.version.clone());
        tracing::info!(
            processor = %self.settings.name,
            event_type = %slot.event_type,
            model = %meta.name,
            version = %meta.version,
            previous = was.as_deref().unwrap_or("none"),
            threshold = slot.config.threshold.unwrap_or(meta.threshold),
            "model loaded from {}",
            model.dir.display()
        );
        *current = Some(Arc::new(model));
        *slot.last_problem.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.stats.loads.fetch_add(1, Ordering::Relaxed);
    }

    fn problem(&self, slot: &Slot, e: &ModelError) {
        let text = e.to_string();
        let mut last = slot.last_problem.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() == Some(text.as_str()) {
            return;
        }
        let keeps = slot
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| format!("{} version {}", m.metadata.name, m.metadata.version));
        match keeps {
            Some(model) => {
                tracing::warn!(processor = %self.settings.name, event_type = %slot.event_type, error = %text, "model not reloaded; still scoring with {model}")
            }
            None => {
                tracing::error!(processor = %self.settings.name, event_type = %slot.event_type, error = %text, "model not loaded; scoring with the {FALLBACK_MODEL} fallback until it is")
            }
        }
        *last = Some(text);
    }

    /// Checks the model folders every `reload_interval` until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        if self.slots.is_empty() {
            return;
        }
        let every = self.settings.config.reload_interval;
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => self.reload().await,
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// The device's states, rebuilt from its recent readings when it is not in memory.
    async fn device(&self, event: &Event) -> Arc<Mutex<DeviceStates>> {
        if let Some(states) = self.devices.get(&event.aggregate_id) {
            return states;
        }
        let mut states = DeviceStates::default();
        if let Some(history) = self.history(&event.aggregate_id, event.occurred_at).await {
            let params = self
                .model_params
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for values in &history {
                states.model.observe(values, &params);
                states.fallback.observe(values, &self.fallback);
            }
            self.stats.warmed.fetch_add(1, Ordering::Relaxed);
        }
        let states = Arc::new(Mutex::new(states));
        self.devices
            .insert(event.aggregate_id.clone(), states.clone());
        states
    }

    /// The device's readings in the store from `history` before `before`, oldest first. Only
    /// the readings table's own metric columns can be read back; a mapping to other fields,
    /// or a store that does not answer, starts the device cold.
    async fn history(&self, device: &str, before: DateTime<Utc>) -> Option<Vec<features::Values>> {
        const COLUMNS: [&str; 5] = [
            "temperature_c",
            "humidity_pct",
            "pressure_hpa",
            "vibration_mm_s",
            "battery_pct",
        ];
        let store = self.store.as_ref()?;
        let fields = self.fields(EventType::SENSOR_READING);
        if !fields.iter().all(|f| COLUMNS.contains(&f.as_str())) {
            return None;
        }
        let from = before - chrono::Duration::from_std(self.settings.history).ok()?;
        let mut columns = vec![("at".to_owned(), ColumnType::Timestamp)];
        columns.extend(fields.iter().map(|f| (f.clone(), ColumnType::Float)));
        let filter = |column: &str, op, value| Filter {
            column: column.into(),
            op,
            value,
        };
        let select = Select {
            table: "readings".into(),
            columns,
            filters: vec![
                filter(
                    "version",
                    Op::Eq,
                    sluice_store::Value::Int(self.settings.history_version.into()),
                ),
                filter(
                    "device_id",
                    Op::Eq,
                    sluice_store::Value::Text(device.into()),
                ),
                filter("at", Op::GtEq, sluice_store::Value::Timestamp(from)),
                filter("at", Op::Lt, sluice_store::Value::Timestamp(before)),
            ],
            limit: Some(10_000),
        };
        let cols = match store.select(&select).await {
            Ok(cols) => cols,
            Err(e) => {
                tracing::warn!(processor = %self.settings.name, device, error = %e, "cannot read the device's history; its features start cold");
                return None;
            }
        };
        let mut cols = cols.into_iter();
        let Some(Column::Timestamp(at)) = cols.next() else {
            return None;
        };
        let metrics: Vec<Vec<Option<f64>>> = cols
            .map(|c| match c {
                Column::Float(v) => v,
                _ => Vec::new(),
            })
            .collect();
        let mut rows: Vec<(i64, features::Values)> = at
            .iter()
            .enumerate()
            .map(|(r, t)| {
                let values = std::array::from_fn(|m| metrics[m].get(r).copied().flatten());
                (t.unwrap_or_default(), values)
            })
            .collect();
        rows.sort_by_key(|(t, _)| *t);
        Some(rows.into_iter().map(|(_, v)| v).collect())
    }

    /// The payload field of each metric for `event_type`: its model's mapping, else the
    /// metrics' own names.
    fn fields(&self, event_type: &str) -> &[String; features::METRICS.len()] {
        static OWN: std::sync::OnceLock<[String; features::METRICS.len()]> =
            std::sync::OnceLock::new();
        match self.slots.get(event_type) {
            Some(slot) => &slot.fields,
            None => OWN.get_or_init(|| features::METRICS.map(str::to_owned)),
        }
    }

    /// Decides how `event` is scored and moves its device's state on.
    async fn plan(&self, event: &Event, rows: &mut Vec<f32>) -> Plan {
        // Old readings replayed through a device's state would also disturb its baseline.
        if event.metadata.replay.as_ref().is_some_and(|r| !r.rescore) {
            self.stats.replays_skipped.fetch_add(1, Ordering::Relaxed);
            return Plan::Skip;
        }
        let event_type = event.event_type.as_str();
        let slot = self.slots.get(event_type);
        if slot.is_none() && event_type != EventType::SENSOR_READING {
            return Plan::Skip;
        }
        let fields = self.fields(event_type);
        let values: features::Values = std::array::from_fn(|i| metric(&event.payload, &fields[i]));
        if values.iter().all(|v| v.is_none_or(|x| !x.is_finite())) {
            return Plan::Reject(format!(
                "the {event_type} has none of {} as a finite number",
                fields.join(", ")
            ));
        }
        let model = slot.and_then(|s| s.current.read().unwrap_or_else(|e| e.into_inner()).clone());
        let states = self.device(event).await;
        let mut states = states.lock().unwrap_or_else(|e| e.into_inner());
        let params = self
            .model_params
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let model_row = states.model.observe(&values, &params);
        let fallback_row = states.fallback.observe(&values, &self.fallback);
        match model {
            Some(m) => {
                let at = rows.len() / features::WIDTH;
                rows.extend(model_row.iter().map(|&x| x as f32));
                Plan::Model(at, m)
            }
            None => Plan::Fallback(fallback_row),
        }
    }

    /// Scores `events` in order: one model call per model for the whole batch.
    pub async fn score(&self, events: &[Event]) -> Vec<Result<Outputs, ProcessError>> {
        let mut rows = Vec::with_capacity(events.len() * features::WIDTH);
        let mut plans = Vec::with_capacity(events.len());
        for event in events {
            plans.push(self.plan(event, &mut rows).await);
        }
        // Every planned row goes to the model it was planned for (a reload between two
        // readings of one batch is possible, so group by model).
        let mut by_model: HashMap<usize, (Arc<OnnxModel>, Vec<usize>)> = HashMap::new();
        for (i, plan) in plans.iter().enumerate() {
            if let Plan::Model(_, m) = plan {
                by_model
                    .entry(Arc::as_ptr(m) as usize)
                    .or_insert_with(|| (m.clone(), Vec::new()))
                    .1
                    .push(i);
            }
        }
        let mut scores: HashMap<usize, Result<f32, String>> = HashMap::new();
        for (model, members) in by_model.into_values() {
            let row = |i: usize| match &plans[i] {
                Plan::Model(at, _) => &rows[at * features::WIDTH..(at + 1) * features::WIDTH],
                _ => &[],
            };
            // One model for the whole batch (the usual case) scores `rows` as they are.
            let batch: std::borrow::Cow<'_, [f32]> =
                if members.len() * features::WIDTH == rows.len() {
                    std::borrow::Cow::Borrowed(&rows)
                } else {
                    members.iter().flat_map(|&i| row(i).to_vec()).collect()
                };
            match model.score(&batch) {
                Ok(s) => scores.extend(members.iter().zip(s).map(|(&i, s)| (i, Ok(s)))),
                // Find the rows the model fails on; the others are scored alone.
                Err(_) => {
                    for &i in &members {
                        let one = model.score(row(i)).map(|s| s[0]).map_err(|e| e.to_string());
                        scores.insert(i, one);
                    }
                }
            }
        }
        events
            .iter()
            .zip(plans)
            .enumerate()
            .map(|(i, (event, plan))| match plan {
                Plan::Skip => Ok(Outputs::default()),
                Plan::Reject(detail) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    Err(ProcessError::Rejected {
                        reason: "features",
                        detail,
                    })
                }
                Plan::Fallback(row) => {
                    self.stats.fallback_scored.fetch_add(1, Ordering::Relaxed);
                    let threshold = self.settings.config.fallback_z_threshold;
                    Ok(self.result(
                        event,
                        FALLBACK_MODEL,
                        FALLBACK_VERSION,
                        features::max_z(&row),
                        threshold,
                        &row.map(|x| x as f32),
                    ))
                }
                Plan::Model(at, model) => {
                    let score = scores
                        .remove(&i)
                        .unwrap_or_else(|| Err("not scored".into()))
                        .and_then(|s| {
                            if s.is_finite() {
                                Ok(s)
                            } else {
                                Err(format!("the model returned {s}"))
                            }
                        });
                    match score {
                        Ok(score) => {
                            self.stats.model_scored.fetch_add(1, Ordering::Relaxed);
                            let threshold = self
                                .slots
                                .get(event.event_type.as_str())
                                .and_then(|s| s.config.threshold)
                                .unwrap_or(model.metadata.threshold);
                            let row = &rows[at * features::WIDTH..(at + 1) * features::WIDTH];
                            Ok(self.result(
                                event,
                                &model.metadata.name,
                                &model.metadata.version,
                                f64::from(score),
                                threshold,
                                row,
                            ))
                        }
                        Err(detail) => {
                            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                            Err(ProcessError::Rejected {
                                reason: "scoring",
                                detail: format!(
                                    "{} version {}: {detail}",
                                    model.metadata.name, model.metadata.version
                                ),
                            })
                        }
                    }
                }
            })
            .collect()
    }

    fn result(
        &self,
        event: &Event,
        model: &str,
        version: &str,
        score: f64,
        threshold: f64,
        row: &[f32],
    ) -> Outputs {
        let anomaly = score >= threshold;
        if anomaly {
            self.stats.anomalies.fetch_add(1, Ordering::Relaxed);
        }
        let features: serde_json::Map<String, Value> = features::names()
            .iter()
            .zip(row)
            .map(|(name, &x)| (name.clone(), json!(f64::from(x))))
            .collect();
        let payload = json!({
            "input_event_id": event.event_id.to_string(),
            "model_name": model,
            "model_version": version,
            "score": score,
            "label": if anomaly { "anomaly" } else { "normal" },
            "threshold": threshold,
            "features": features,
            "site": event.payload.get("site").and_then(Value::as_str),
        });
        let result = event.derive(
            &format!("inference/{model}@{version}"),
            EventType::new(EventType::INFERENCE_RESULT).expect("a valid event type"),
            payload,
            Source::Processor(self.settings.name.clone()),
            Utc::now(),
        );
        let mut out = Outputs::default();
        out.emit(PORT, result);
        out
    }
}

/// A metric of a payload: a top-level field, or `extra.<name>` in the `extra` map.
fn metric(payload: &Value, field: &str) -> Option<f64> {
    match field.strip_prefix("extra.") {
        Some(name) => payload.get("extra")?.get(name)?.as_f64(),
        None => payload.get(field)?.as_f64(),
    }
}

impl Processor for Inferencer {
    const NAME: &'static str = NAME;
    const BATCHES: bool = true;

    async fn process(&self, event: Event, out: &mut Outputs) -> Result<(), ProcessError> {
        let mut results = self.score(std::slice::from_ref(&event)).await;
        match results.pop() {
            Some(Ok(o)) => {
                for (port, e) in o.events() {
                    out.emit(port, e.clone());
                }
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Ok(()),
        }
    }

    async fn process_batch(&self, events: &[Event]) -> Vec<Result<Outputs, ProcessError>> {
        self.score(events).await
    }
}
