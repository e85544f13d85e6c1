//! The projector's read models: what goes in ([`ProjectionBatch`]), what comes out, and the
//! backend-independent part of [`Store::project`](crate::Store::project): deduplication,
//! late-ness, and rollup and latest-state deltas aggregated per key before any statement runs.
//! Anomalies ([`Anomaly`]) are stored as they come, once per event id.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::ConsumerOffset;
use crate::prepare::{micros, trunc};
use crate::{Error, Result};

/// The read models a projection version has rows in.
pub(crate) const VERSIONED_TABLES: [&str; 5] = [
    "readings",
    "readings_1m",
    "readings_1h",
    "device_latest",
    "anomalies",
];

/// One sensor reading to project.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The event id: a reading is stored once per projection version.
    pub event_id: Uuid,
    /// The device.
    pub device_id: String,
    /// Device time (the event's `occurred_at`); buckets and "newest" are by this time.
    pub at: DateTime<Utc>,
    /// When the platform received it.
    pub ingested_at: DateTime<Utc>,
    /// The device's sequence number, when it sends one.
    pub seq: Option<i64>,
    /// Temperature, °C.
    pub temperature_c: Option<f64>,
    /// Relative humidity, %.
    pub humidity_pct: Option<f64>,
    /// Pressure, hPa.
    pub pressure_hpa: Option<f64>,
    /// Vibration, mm/s.
    pub vibration_mm_s: Option<f64>,
    /// Battery, %.
    pub battery_pct: Option<f64>,
    /// Other numeric metrics (stored, not rolled up).
    pub extra: BTreeMap<String, f64>,
    /// The event payload; kept as the device's latest reading.
    pub payload: serde_json::Value,
}

/// The rolled-up metrics, in the column order of the wide rollup tables (each has
/// `<metric>_count`, `_min`, `_max`, `_sum`, `_last`, `_last_at` and `_last_event_id`).
pub(crate) const METRICS: [&str; 5] = [
    "temperature_c",
    "humidity_pct",
    "pressure_hpa",
    "vibration_mm_s",
    "battery_pct",
];

/// Indexes into [`METRICS`] in name (byte) order: the order rollups are listed in.
const METRICS_BY_NAME: [usize; 5] = [4, 1, 2, 0, 3];

impl Reading {
    /// The rolled-up metrics' values, in [`METRICS`] order.
    fn metric_values(&self) -> [Option<f64>; 5] {
        [
            self.temperature_c,
            self.humidity_pct,
            self.pressure_hpa,
            self.vibration_mm_s,
            self.battery_pct,
        ]
    }

    /// The rolled-up metrics that this reading carries, by name.
    pub fn metrics(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        METRICS
            .into_iter()
            .zip(self.metric_values())
            .filter_map(|(name, v)| v.map(|v| (name, v)))
    }
}

/// A device status event to project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    /// The event id.
    pub event_id: Uuid,
    /// The device.
    pub device_id: String,
    /// Device time.
    pub at: DateTime<Utc>,
    /// The new state (`online`, `offline`, ...).
    pub state: String,
    /// Why, when the device says.
    pub reason: Option<String>,
}

/// An inference result labelled `anomaly` (an `inference.result` event), to store in the
/// `anomalies` table. Results labelled `normal` are not stored: every reading is scored, and
/// keeping them all would double the readings.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    /// The inference event's id (derived from the scored reading and the model): an anomaly is
    /// stored once per projection version.
    pub event_id: Uuid,
    /// The scored event (a reading).
    pub input_event_id: Uuid,
    /// The device (the inference event's aggregate id).
    pub device_id: String,
    /// The scored reading's device time (the inference event's `occurred_at`); retention and
    /// the table's time indexes go by it.
    pub at: DateTime<Utc>,
    /// The anomaly score; higher is more anomalous.
    pub score: f64,
    /// The score at or above which the model labels a reading an anomaly.
    pub threshold: f64,
    /// The model that scored it.
    pub model_name: String,
    /// Its version.
    pub model_version: String,
    /// The feature values the model saw, by name (stored as a JSON object).
    pub features: BTreeMap<String, f64>,
    /// The device's site, when the inferencer knows it.
    pub site: Option<String>,
}

/// Everything one input batch of the projector writes, in one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProjectionBatch {
    /// The projection version written (a rebuild writes a new one beside the live one).
    pub version: i32,
    /// Readings, in any order; repeats of a stored event id are ignored.
    pub readings: Vec<Reading>,
    /// Status events, in any order; only the newest per device is kept.
    pub statuses: Vec<StatusChange>,
    /// Anomalies, in any order; repeats of a stored event id are ignored.
    pub anomalies: Vec<Anomaly>,
    /// Input offsets to commit with the writes (as in [`AppendBatch`](crate::AppendBatch)).
    pub offsets: Vec<ConsumerOffset>,
}

/// One step of a set-based rebuild ([`Store::rebuild_step`](crate::Store::rebuild_step)): the
/// event store's readings and status events at positions `after < position <= upto`, of the
/// devices in lane `lane` of `lanes`, projected into `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildStep {
    /// The projection version built.
    pub version: i32,
    /// Positions after this one...
    pub after: i64,
    /// ...up to and including this one.
    pub upto: i64,
    /// This step's share of the devices: lanes run at once, a device always in the same one.
    pub lane: u32,
    /// How many lanes there are (at least 1).
    pub lanes: u32,
}

/// What one [`RebuildStep`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildOutcome {
    /// Readings and status events of the step's positions and lane.
    pub events: u64,
    /// Readings newly stored in the version (repeats of a stored event id are not).
    pub readings: u64,
    /// Status events newer than the device's status before the step.
    pub statuses: u64,
    /// Events the projector cannot project (a payload that is not an object, a metric that is
    /// not a number, a status without a state): skipped, as the live projector dead-letters
    /// them.
    pub unprojectable: u64,
}

impl std::ops::AddAssign for RebuildOutcome {
    fn add_assign(&mut self, o: Self) {
        self.events += o.events;
        self.readings += o.readings;
        self.statuses += o.statuses;
        self.unprojectable += o.unprojectable;
    }
}

/// What [`Store::project`](crate::Store::project) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProjectionOutcome {
    /// Readings newly stored (only these count in rollups).
    pub readings: u64,
    /// Readings ignored because their event id was already stored in this version (or
    /// appeared earlier in the batch). `readings + duplicates` = readings sent.
    pub duplicates: u64,
    /// New readings whose 1-minute bucket is before the bucket of the device's newest
    /// reading as stored before this batch.
    pub late: u64,
    /// Distinct status events newer, by (time, event id), than the device's status before
    /// this batch; older and repeated ones are ignored.
    pub statuses: u64,
    /// Anomalies newly stored; repeats of an event id already stored in this version (or
    /// earlier in the batch) are not counted.
    pub anomalies: u64,
}

/// Rollup width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolution {
    /// 1-minute buckets (`readings_1m`).
    Minute,
    /// 1-hour buckets (`readings_1h`).
    Hour,
}

impl Resolution {
    pub(crate) const ALL: [Resolution; 2] = [Resolution::Minute, Resolution::Hour];

    /// The table holding this resolution (a fixed name: safe to format into SQL).
    pub(crate) fn table(self) -> &'static str {
        match self {
            Resolution::Minute => "readings_1m",
            Resolution::Hour => "readings_1h",
        }
    }

    /// Bucket width in microseconds.
    pub(crate) fn width_us(self) -> i64 {
        match self {
            Resolution::Minute => 60_000_000,
            Resolution::Hour => 3_600_000_000,
        }
    }

    /// The start of the bucket holding `us` (floor, also before the epoch).
    pub(crate) fn bucket_us(self, us: i64) -> i64 {
        us.div_euclid(self.width_us()) * self.width_us()
    }
}

/// One metric of one device over one bucket. avg = `sum / count`. The tables hold one wide row
/// per device and bucket; [`Store::rollups`](crate::Store::rollups) lists each metric that has
/// values as one `Rollup`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    /// The device.
    pub device_id: String,
    /// Start of the bucket (UTC).
    pub bucket: DateTime<Utc>,
    /// Metric name (`temperature_c`, ...).
    pub metric: String,
    /// Values seen.
    pub count: i64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Sum of the values.
    pub sum: f64,
    /// The value with the greatest device time (ties: the greatest event id).
    pub last: f64,
    /// Device time of `last`.
    pub last_at: DateTime<Utc>,
}

/// The latest state of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceLatest {
    /// The device.
    pub device_id: String,
    /// Greatest device time of any reading or status seen.
    pub last_seen: DateTime<Utc>,
    /// Device time of the newest reading.
    pub reading_at: Option<DateTime<Utc>>,
    /// Payload of the newest reading.
    pub reading: Option<serde_json::Value>,
    /// Newest status.
    pub status: Option<String>,
    /// Its reason.
    pub status_reason: Option<String>,
    /// Its device time.
    pub status_at: Option<DateTime<Utc>>,
    /// Late readings counted so far (see [`ProjectionOutcome::late`]).
    pub late_readings: i64,
}

// ---- planning (crate-internal) -----------------------------------------------------------------

/// One reading of the batch, first occurrence of its id, ready to bind.
#[derive(Debug)]
pub(crate) struct ReadingRow<'a> {
    pub src: &'a Reading,
    pub at: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
    /// `extra` as JSON text.
    pub extra: String,
}

/// One anomaly of the batch, first occurrence of its id, ready to bind.
#[derive(Debug)]
pub(crate) struct AnomalyRow<'a> {
    pub src: &'a Anomaly,
    pub at: DateTime<Utc>,
    /// `features` as JSON text.
    pub features: String,
}

/// The device's state before the batch, as far as ordering decisions need it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Prior {
    pub reading: Option<(DateTime<Utc>, Uuid)>,
    pub status: Option<(DateTime<Utc>, Uuid)>,
}

/// One metric's part of a rollup delta (or of a stored wide row).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetricDelta {
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub last: f64,
    pub last_at: DateTime<Utc>,
    pub last_event_id: Uuid,
}

impl MetricDelta {
    fn new(v: f64, at: DateTime<Utc>, id: Uuid) -> Self {
        Self {
            count: 1,
            min: v,
            max: v,
            sum: v,
            last: v,
            last_at: at,
            last_event_id: id,
        }
    }

    fn add(&mut self, v: f64, at: DateTime<Utc>, id: Uuid) {
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
        if (at, id) > (self.last_at, self.last_event_id) {
            (self.last, self.last_at, self.last_event_id) = (v, at, id);
        }
    }
}

/// A rollup delta for one (device, bucket): merged into the stored wide row by the upsert.
/// `None` for a metric no new reading of the bucket carried.
#[derive(Debug, Clone)]
pub(crate) struct RollupDelta<'a> {
    pub device_id: &'a str,
    pub bucket: DateTime<Utc>,
    pub metrics: [Option<MetricDelta>; 5],
}

/// A stored wide row as per-metric [`Rollup`]s, in metric name order; metrics without values
/// are left out.
pub(crate) fn unpivot(
    device_id: &str,
    bucket: DateTime<Utc>,
    metrics: &[Option<MetricDelta>; 5],
    out: &mut Vec<Rollup>,
) {
    for i in METRICS_BY_NAME {
        if let Some(m) = metrics[i].filter(|m| m.count > 0) {
            out.push(Rollup {
                device_id: device_id.to_owned(),
                bucket,
                metric: METRICS[i].to_owned(),
                count: m.count,
                min: m.min,
                max: m.max,
                sum: m.sum,
                last: m.last,
                last_at: m.last_at,
            });
        }
    }
}

/// The batch's contribution to one device's latest state.
#[derive(Debug, Clone)]
pub(crate) struct DeviceDelta<'a> {
    pub device_id: &'a str,
    pub last_seen: DateTime<Utc>,
    /// Newest new reading: time, id, payload JSON text.
    pub reading: Option<(DateTime<Utc>, Uuid, String)>,
    /// Newest new reading's payload, encoded once the batch is planned.
    newest: Option<(DateTime<Utc>, Uuid, &'a serde_json::Value)>,
    /// Newest status event.
    pub status: Option<(DateTime<Utc>, &'a StatusChange)>,
    pub late: i64,
}

/// Deltas to upsert, sorted by key (so concurrent writers lock rows in the same order).
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    pub rollups: [Vec<RollupDelta<'a>>; 2],
    pub devices: Vec<DeviceDelta<'a>>,
    pub outcome: ProjectionOutcome,
}

/// A projection batch, validated, with repeats of an id within the batch removed.
#[derive(Debug)]
pub(crate) struct PreparedProjection<'a> {
    pub batch: &'a ProjectionBatch,
    pub readings: Vec<ReadingRow<'a>>,
    /// Sorted by event id (so concurrent writers lock rows in the same order).
    pub anomalies: Vec<AnomalyRow<'a>>,
}

const OP: &str = "project";

impl<'a> PreparedProjection<'a> {
    pub fn new(batch: &'a ProjectionBatch) -> Result<Self> {
        let mut seen = HashSet::with_capacity(batch.readings.len());
        let mut readings = Vec::with_capacity(batch.readings.len());
        for r in &batch.readings {
            let finite =
                r.metrics().all(|(_, v)| v.is_finite()) && r.extra.values().all(|v| v.is_finite());
            if !finite {
                // SQLite cannot store NaN, and no rollup of one means anything.
                return Err(Error::InvalidArgument {
                    op: OP,
                    reason: format!(
                        "reading {} has a metric that is not a finite number",
                        r.event_id
                    ),
                });
            }
            if !seen.insert(r.event_id) {
                continue;
            }
            readings.push(ReadingRow {
                src: r,
                at: trunc(r.at),
                ingested_at: trunc(r.ingested_at),
                extra: json_text(&r.extra)?,
            });
        }
        let mut seen = HashSet::with_capacity(batch.anomalies.len());
        let mut anomalies = Vec::with_capacity(batch.anomalies.len());
        for a in &batch.anomalies {
            let finite = a.score.is_finite()
                && a.threshold.is_finite()
                && a.features.values().all(|v| v.is_finite());
            if !finite {
                // SQLite cannot store NaN, and JSON has no text for it.
                return Err(Error::InvalidArgument {
                    op: OP,
                    reason: format!(
                        "anomaly {} has a score, threshold or feature that is not a finite number",
                        a.event_id
                    ),
                });
            }
            if !seen.insert(a.event_id) {
                continue;
            }
            anomalies.push(AnomalyRow {
                src: a,
                at: trunc(a.at),
                features: json_text(&a.features)?,
            });
        }
        anomalies.sort_unstable_by_key(|a| a.src.event_id);
        Ok(Self {
            batch,
            readings,
            anomalies,
        })
    }

    /// Devices whose prior state the plan needs, sorted.
    pub fn devices(&self) -> Vec<&'a str> {
        let mut d: Vec<&str> = self
            .readings
            .iter()
            .map(|r| r.src.device_id.as_str())
            .chain(self.batch.statuses.iter().map(|s| s.device_id.as_str()))
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    /// The deltas, given which readings the database stored as new and the devices' state
    /// before the batch.
    ///
    /// Late-ness: per device, a new reading is late when its 1-minute bucket is before the
    /// bucket of the device's newest reading stored before this batch. Readings of the same
    /// batch are taken in device-time order, so they are never late relative to each other:
    /// the answer does not depend on the order within a batch.
    pub fn plan(&self, new: &HashSet<Uuid>, prior: &HashMap<String, Prior>) -> Result<Plan<'a>> {
        let fresh: Vec<&ReadingRow<'a>> = self
            .readings
            .iter()
            .filter(|r| new.contains(&r.src.event_id))
            .collect();
        let none = Prior::default();
        let mut outcome = ProjectionOutcome {
            readings: fresh.len() as u64,
            duplicates: (self.batch.readings.len() - fresh.len()) as u64,
            ..ProjectionOutcome::default()
        };

        let mut devices: BTreeMap<&'a str, DeviceDelta<'a>> = BTreeMap::new();
        let mut rollups: [BTreeMap<(&'a str, i64), RollupDelta<'a>>; 2] = Default::default();
        for r in fresh {
            let device = r.src.device_id.as_str();
            let p = prior.get(device).unwrap_or(&none);
            let minute = Resolution::Minute.bucket_us(micros(r.at));
            let late = p
                .reading
                .is_some_and(|(at, _)| minute < Resolution::Minute.bucket_us(micros(at)));
            let d = devices.entry(device).or_insert_with(|| DeviceDelta {
                device_id: device,
                last_seen: r.at,
                reading: None,
                newest: None,
                status: None,
                late: 0,
            });
            d.last_seen = d.last_seen.max(r.at);
            if late {
                d.late += 1;
                outcome.late += 1;
            }
            let key = (r.at, r.src.event_id);
            if d.newest.is_none_or(|(at, id, _)| key > (at, id)) {
                d.newest = Some((r.at, r.src.event_id, &r.src.payload));
            }

            let values = r.src.metric_values();
            for (i, res) in Resolution::ALL.into_iter().enumerate() {
                let bucket_us = res.bucket_us(micros(r.at));
                let delta = rollups[i]
                    .entry((device, bucket_us))
                    .or_insert_with(|| RollupDelta {
                        device_id: device,
                        bucket: DateTime::from_timestamp_micros(bucket_us).unwrap_or(r.at),
                        metrics: [None; 5],
                    });
                for (m, v) in delta.metrics.iter_mut().zip(values) {
                    let Some(v) = v else { continue };
                    match m {
                        Some(m) => m.add(v, r.at, r.src.event_id),
                        None => *m = Some(MetricDelta::new(v, r.at, r.src.event_id)),
                    }
                }
            }
        }

        let mut counted = HashSet::new();
        for s in &self.batch.statuses {
            let device = s.device_id.as_str();
            let at = trunc(s.at);
            let key = (at, s.event_id);
            let p = prior.get(device).unwrap_or(&none);
            if p.status.is_none_or(|old| key > old) && counted.insert(s.event_id) {
                outcome.statuses += 1;
            }
            let d = devices.entry(device).or_insert_with(|| DeviceDelta {
                device_id: device,
                last_seen: at,
                reading: None,
                newest: None,
                status: None,
                late: 0,
            });
            d.last_seen = d.last_seen.max(at);
            if d.status.is_none_or(|(t, old)| key > (t, old.event_id)) {
                d.status = Some((at, s));
            }
        }

        let mut devices: Vec<DeviceDelta<'a>> = devices.into_values().collect();
        for d in &mut devices {
            // Only the newest reading's payload is stored: encode that one alone.
            if let Some((at, id, payload)) = d.newest {
                d.reading = Some((at, id, json_text(payload)?));
            }
        }
        let [m, h] = rollups;
        Ok(Plan {
            rollups: [m.into_values().collect(), h.into_values().collect()],
            devices,
            outcome,
        })
    }
}

fn json_text<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::InvalidArgument {
        op: OP,
        reason: format!("cannot encode JSON: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_floor_also_before_the_epoch() {
        assert_eq!(Resolution::Minute.bucket_us(59_999_999), 0);
        assert_eq!(Resolution::Minute.bucket_us(60_000_000), 60_000_000);
        assert_eq!(Resolution::Minute.bucket_us(-1), -60_000_000);
        assert_eq!(Resolution::Hour.bucket_us(3_600_000_001), 3_600_000_000);
    }
}
