//! The hot read models, held as Arrow: recent readings, their 1-hour rollups, and each
//! device's latest state. Loaded from one store snapshot at start, then kept current from the
//! events stream (see `follow`). Readings are kept by device time within the hot window;
//! repeats of an event id are ignored, so a redelivered event never counts twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray,
    TimestampMicrosecondArray, TimestampMicrosecondBuilder,
};
use datafusion::arrow::compute::{concat_batches, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use sluice_store::{Reading, StatusChange};
use uuid::Uuid;

/// The rolled-up metrics, in column order.
pub const METRICS: [&str; 5] = [
    "temperature_c",
    "humidity_pct",
    "pressure_hpa",
    "vibration_mm_s",
    "battery_pct",
];

const HOUR_US: i64 = 3_600_000_000;
const MINUTE_US: i64 = 60_000_000;
/// Batches smaller than this are merged, so scans see few, large batches.
const SMALL_BATCH: usize = 16_384;
/// How stale a materialized rollup or latest-state table may be while updates arrive.
const REMATERIALIZE_EVERY: Duration = Duration::from_millis(500);

pub(crate) fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// `readings`: one row per reading.
pub fn readings_schema() -> SchemaRef {
    let mut fields = vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("device_id", DataType::Utf8, false),
        Field::new("at", ts_type(), false),
        Field::new("ingested_at", ts_type(), false),
        Field::new("seq", DataType::Int64, true),
    ];
    fields.extend(
        METRICS
            .iter()
            .map(|m| Field::new(*m, DataType::Float64, true)),
    );
    Arc::new(Schema::new(fields))
}

/// Per metric, the rollup columns after its name, as the store names them (`avg` is ours).
pub const ROLLUP_STATS: [&str; 7] = ["count", "min", "max", "sum", "avg", "last", "last_at"];

/// `readings_1h`: one row per device and hour, with `<metric>_<stat>` columns per metric as
/// in the store (a metric without values in the bucket: count and sum 0, the rest NULL).
pub fn rollup_schema() -> SchemaRef {
    let mut fields = vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("bucket", ts_type(), false),
    ];
    for m in METRICS {
        for stat in ROLLUP_STATS {
            let ty = match stat {
                "count" => DataType::Int64,
                "last_at" => ts_type(),
                _ => DataType::Float64,
            };
            let nullable = !matches!(stat, "count" | "sum");
            fields.push(Field::new(format!("{m}_{stat}"), ty, nullable));
        }
    }
    Arc::new(Schema::new(fields))
}

/// `device_latest`: one row per device.
pub fn latest_schema() -> SchemaRef {
    let mut fields = vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("last_seen", ts_type(), false),
        Field::new("reading_at", ts_type(), true),
    ];
    fields.extend(
        METRICS
            .iter()
            .map(|m| Field::new(*m, DataType::Float64, true)),
    );
    fields.extend([
        Field::new("status", DataType::Utf8, true),
        Field::new("status_reason", DataType::Utf8, true),
        Field::new("status_at", ts_type(), true),
        Field::new("late_readings", DataType::Int64, false),
    ]);
    Arc::new(Schema::new(fields))
}

/// One reading as the hot tables hold it.
#[derive(Debug, Clone, PartialEq)]
pub struct HotReading {
    /// Event id.
    pub event_id: Uuid,
    /// Device.
    pub device_id: String,
    /// Device time, µs.
    pub at: i64,
    /// Ingestion time, µs.
    pub ingested_at: i64,
    /// Device sequence number.
    pub seq: Option<i64>,
    /// Values of [`METRICS`], in order.
    pub metrics: [Option<f64>; 5],
}

impl HotReading {
    /// From the projector's form of a reading.
    pub fn from_reading(r: &Reading) -> HotReading {
        HotReading {
            event_id: r.event_id,
            device_id: r.device_id.clone(),
            at: r.at.timestamp_micros(),
            ingested_at: r.ingested_at.timestamp_micros(),
            seq: r.seq,
            metrics: [
                r.temperature_c,
                r.humidity_pct,
                r.pressure_hpa,
                r.vibration_mm_s,
                r.battery_pct,
            ],
        }
    }
}

/// One device's latest state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latest {
    /// Greatest device time seen, µs.
    pub last_seen: i64,
    /// Newest reading: (time µs, event id) and its values.
    pub reading: Option<(i64, Uuid, [Option<f64>; 5])>,
    /// Newest status: (time µs, event id), state, reason.
    pub status: Option<(i64, Uuid, String, Option<String>)>,
    /// Late readings counted.
    pub late_readings: i64,
}

#[derive(Debug, Clone, Copy)]
struct Agg {
    count: i64,
    min: f64,
    max: f64,
    sum: f64,
    last: f64,
    last_key: (i64, Uuid),
}

impl Agg {
    fn new(v: f64, key: (i64, Uuid)) -> Agg {
        Agg {
            count: 1,
            min: v,
            max: v,
            sum: v,
            last: v,
            last_key: key,
        }
    }

    fn add(&mut self, v: f64, key: (i64, Uuid)) {
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
        if key > self.last_key {
            self.last = v;
            self.last_key = key;
        }
    }
}

#[derive(Debug, Default)]
struct Cached {
    batch: Option<RecordBatch>,
    dirty: bool,
    built: Option<Instant>,
}

impl Cached {
    fn get(&mut self, build: impl FnOnce() -> RecordBatch) -> RecordBatch {
        let fresh_enough = self
            .built
            .is_some_and(|t| t.elapsed() < REMATERIALIZE_EVERY);
        match &self.batch {
            Some(b) if !self.dirty || fresh_enough => b.clone(),
            _ => {
                let b = build();
                self.batch = Some(b.clone());
                self.dirty = false;
                self.built = Some(Instant::now());
                b
            }
        }
    }
}

#[derive(Debug)]
struct State {
    ids: HashSet<Uuid>,
    batches: Vec<RecordBatch>,
    /// (device, hour bucket µs) → aggregate per metric.
    hourly: HashMap<(Arc<str>, i64), [Option<Agg>; 5]>,
    latest: HashMap<Arc<str>, Latest>,
    devices: HashSet<Arc<str>>,
    rollup_cache: Cached,
    latest_cache: Cached,
    cutoff: i64,
}

/// The hot tables. Cheap to share; readers take snapshots (cloned `Arc`s of Arrow arrays).
#[derive(Debug)]
pub struct Hot {
    window: Duration,
    state: RwLock<State>,
}

impl Hot {
    /// Empty hot tables keeping readings newer than `window` (by device time).
    pub fn new(window: Duration) -> Hot {
        Hot {
            window,
            state: RwLock::new(State {
                ids: HashSet::new(),
                batches: Vec::new(),
                hourly: HashMap::new(),
                latest: HashMap::new(),
                devices: HashSet::new(),
                rollup_cache: Cached::default(),
                latest_cache: Cached::default(),
                cutoff: i64::MIN,
            }),
        }
    }

    /// The oldest device time kept, as of `now`: the start of the hour `window` ago, so
    /// that every hourly bucket held is complete.
    pub fn cutoff(&self, now: DateTime<Utc>) -> i64 {
        let w = i64::try_from(self.window.as_micros()).unwrap_or(i64::MAX);
        (now.timestamp_micros().saturating_sub(w)).div_euclid(HOUR_US) * HOUR_US
    }

    /// Loads the state of the store: latest state per device, then readings (any order).
    pub fn load(
        &self,
        latest: Vec<(String, Latest)>,
        mut readings: Vec<HotReading>,
        now: DateTime<Utc>,
    ) {
        // In device-time order, so each batch covers a short span and a query bounded in time
        // skips most of them (the store returns rows in no particular order).
        readings.sort_unstable_by_key(|r| r.at);
        {
            let mut s = self.write();
            s.cutoff = self.cutoff(now);
            for (device, l) in latest {
                let device = intern(&mut s.devices, &device);
                s.latest.insert(device, l);
            }
            s.latest_cache.dirty = true;
        }
        // Store rows carry their late counts in device_latest already.
        for chunk in readings.chunks(65_536) {
            self.insert(chunk, false);
        }
    }

    /// Applies what one polled batch of the events stream carried. Late-ness is judged
    /// against each device's newest reading before the batch, as the projector does.
    pub fn apply(&self, readings: &[Reading], statuses: &[StatusChange], now: DateTime<Utc>) {
        let hot: Vec<HotReading> = readings.iter().map(HotReading::from_reading).collect();
        self.evict(now);
        self.insert(&hot, true);
        if statuses.is_empty() {
            return;
        }
        let mut s = self.write();
        for st in statuses {
            let key = (st.at.timestamp_micros(), st.event_id);
            let device = intern(&mut s.devices, &st.device_id);
            let l = s.latest.entry(device).or_default();
            l.last_seen = l.last_seen.max(key.0);
            if l.status
                .as_ref()
                .is_none_or(|(at, id, ..)| key > (*at, *id))
            {
                l.status = Some((key.0, key.1, st.state.clone(), st.reason.clone()));
            }
        }
        s.latest_cache.dirty = true;
    }

    fn insert(&self, readings: &[HotReading], count_late: bool) {
        let mut s = self.write();
        let cutoff = s.cutoff;
        let mut prior: HashMap<Arc<str>, Option<i64>> = HashMap::new();
        let mut fresh = Vec::with_capacity(readings.len());
        for r in readings {
            if r.at < cutoff || !s.ids.insert(r.event_id) {
                continue;
            }
            fresh.push(r);
        }
        if fresh.is_empty() {
            return;
        }
        for r in &fresh {
            let device = intern(&mut s.devices, &r.device_id);
            let before = *prior
                .entry(device.clone())
                .or_insert_with(|| s.latest.get(&device).and_then(|l| l.reading.map(|x| x.0)));
            let key = (r.at, r.event_id);
            let bucket = r.at.div_euclid(HOUR_US) * HOUR_US;
            let aggs = s.hourly.entry((device.clone(), bucket)).or_default();
            for (agg, v) in aggs.iter_mut().zip(r.metrics) {
                if let Some(v) = v {
                    match agg {
                        Some(a) => a.add(v, key),
                        None => *agg = Some(Agg::new(v, key)),
                    }
                }
            }
            let l = s.latest.entry(device).or_default();
            l.last_seen = l.last_seen.max(r.at);
            if count_late
                && before.is_some_and(|b| r.at.div_euclid(MINUTE_US) < b.div_euclid(MINUTE_US))
            {
                l.late_readings += 1;
            }
            if l.reading
                .as_ref()
                .is_none_or(|(at, id, _)| key > (*at, *id))
            {
                l.reading = Some((r.at, r.event_id, r.metrics));
            }
        }
        let batch = readings_batch(&fresh);
        s.batches.push(batch);
        compact(&mut s.batches);
        s.rollup_cache.dirty = true;
        s.latest_cache.dirty = true;
    }

    /// Drops readings and hourly buckets older than the window.
    pub fn evict(&self, now: DateTime<Utc>) {
        let cutoff = self.cutoff(now);
        if cutoff <= self.read().cutoff {
            return;
        }
        let mut s = self.write();
        s.cutoff = cutoff;
        let mut kept = Vec::with_capacity(s.batches.len());
        for b in std::mem::take(&mut s.batches) {
            let at = b
                .column(2)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .expect("at is a timestamp column");
            let ids = b
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("event_id is a string column");
            let keep: BooleanArray = at.iter().map(|t| t.map(|t| t >= cutoff)).collect();
            for i in 0..b.num_rows() {
                if !keep.value(i)
                    && let Ok(id) = Uuid::parse_str(ids.value(i))
                {
                    s.ids.remove(&id);
                }
            }
            let b = filter_record_batch(&b, &keep).expect("filter by a mask of the same length");
            if b.num_rows() > 0 {
                kept.push(b);
            }
        }
        s.batches = kept;
        s.hourly.retain(|(_, bucket), _| *bucket >= cutoff);
        s.rollup_cache.dirty = true;
    }

    /// The readings held, as batches.
    pub fn readings(&self) -> Vec<RecordBatch> {
        self.read().batches.clone()
    }

    /// Readings held.
    pub fn len(&self) -> usize {
        self.read().ids.len()
    }

    /// True when no reading is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `readings_1h` as one batch.
    pub fn rollups(&self) -> RecordBatch {
        let mut s = self.write();
        let State {
            hourly,
            rollup_cache,
            ..
        } = &mut *s;
        rollup_cache.get(|| rollup_batch(hourly))
    }

    /// `device_latest` as one batch.
    pub fn latest(&self) -> RecordBatch {
        let mut s = self.write();
        let State {
            latest,
            latest_cache,
            ..
        } = &mut *s;
        latest_cache.get(|| latest_batch(latest))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn intern(devices: &mut HashSet<Arc<str>>, device: &str) -> Arc<str> {
    if let Some(d) = devices.get(device) {
        return d.clone();
    }
    let d: Arc<str> = Arc::from(device);
    devices.insert(d.clone());
    d
}

/// Merges the small batches at the end into one, so a trickle of events does not leave
/// thousands of tiny batches to scan.
fn compact(batches: &mut Vec<RecordBatch>) {
    let small = batches
        .iter()
        .rev()
        .take_while(|b| b.num_rows() < SMALL_BATCH)
        .count();
    if small < 8 {
        return;
    }
    let tail = batches.split_off(batches.len() - small);
    let merged = concat_batches(&tail[0].schema(), &tail).expect("batches of one schema");
    batches.push(merged);
}

fn ts(values: impl IntoIterator<Item = Option<i64>>) -> ArrayRef {
    let mut b = TimestampMicrosecondBuilder::new();
    for v in values {
        b.append_option(v);
    }
    Arc::new(b.finish().with_timezone("UTC"))
}

fn readings_batch(rows: &[&HotReading]) -> RecordBatch {
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.event_id.to_string()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.device_id.as_str()),
        )),
        ts(rows.iter().map(|r| Some(r.at))),
        ts(rows.iter().map(|r| Some(r.ingested_at))),
        Arc::new(rows.iter().map(|r| r.seq).collect::<Int64Array>()),
    ];
    for i in 0..METRICS.len() {
        columns.push(Arc::new(
            rows.iter().map(|r| r.metrics[i]).collect::<Float64Array>(),
        ));
    }
    RecordBatch::try_new(readings_schema(), columns).expect("columns match the schema")
}

fn rollup_batch(hourly: &HashMap<(Arc<str>, i64), [Option<Agg>; 5]>) -> RecordBatch {
    let mut keys: Vec<_> = hourly.iter().collect();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            keys.iter().map(|((d, _), _)| &**d),
        )),
        ts(keys.iter().map(|((_, b), _)| Some(*b))),
    ];
    for m in 0..METRICS.len() {
        let aggs: Vec<Option<&Agg>> = keys.iter().map(|(_, a)| a[m].as_ref()).collect();
        let floats = |f: &dyn Fn(&Agg) -> f64| -> ArrayRef {
            Arc::new(aggs.iter().map(|a| a.map(f)).collect::<Float64Array>())
        };
        columns.push(Arc::new(
            aggs.iter()
                .map(|a| Some(a.map_or(0, |a| a.count)))
                .collect::<Int64Array>(),
        ));
        columns.push(floats(&|a| a.min));
        columns.push(floats(&|a| a.max));
        columns.push(Arc::new(
            aggs.iter()
                .map(|a| Some(a.map_or(0.0, |a| a.sum)))
                .collect::<Float64Array>(),
        ));
        columns.push(floats(&|a| a.sum / a.count as f64));
        columns.push(floats(&|a| a.last));
        columns.push(ts(aggs.iter().map(|a| a.map(|a| a.last_key.0))));
    }
    RecordBatch::try_new(rollup_schema(), columns).expect("columns match the schema")
}

fn latest_batch(latest: &HashMap<Arc<str>, Latest>) -> RecordBatch {
    let mut rows: Vec<_> = latest.iter().collect();
    rows.sort_by(|a, b| a.0.cmp(b.0));
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|(d, _)| &***d),
        )),
        ts(rows.iter().map(|(_, l)| Some(l.last_seen))),
        ts(rows.iter().map(|(_, l)| l.reading.map(|r| r.0))),
    ];
    for i in 0..METRICS.len() {
        columns.push(Arc::new(
            rows.iter()
                .map(|(_, l)| l.reading.and_then(|r| r.2[i]))
                .collect::<Float64Array>(),
        ));
    }
    columns.extend([
        Arc::new(
            rows.iter()
                .map(|(_, l)| l.status.as_ref().map(|s| s.2.as_str()))
                .collect::<StringArray>(),
        ) as ArrayRef,
        Arc::new(
            rows.iter()
                .map(|(_, l)| l.status.as_ref().and_then(|s| s.3.as_deref()))
                .collect::<StringArray>(),
        ),
        ts(rows.iter().map(|(_, l)| l.status.as_ref().map(|s| s.0))),
        Arc::new(
            rows.iter()
                .map(|(_, l)| Some(l.late_readings))
                .collect::<Int64Array>(),
        ),
    ]);
    RecordBatch::try_new(latest_schema(), columns).expect("columns match the schema")
}

/// Row count of a set of batches.
pub fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(device: &str, at_min: i64, t: f64) -> HotReading {
        HotReading {
            event_id: Uuid::new_v4(),
            device_id: device.into(),
            at: 1_800_000_000_000_000 + at_min * MINUTE_US,
            ingested_at: 1_800_000_000_000_000,
            seq: None,
            metrics: [Some(t), None, None, None, None],
        }
    }

    #[test]
    fn repeats_are_held_once_and_rollups_follow() {
        let hot = Hot::new(Duration::from_secs(365 * 24 * 3600));
        let now = DateTime::from_timestamp_micros(1_800_000_000_000_000).unwrap();
        let a = reading("d1", 1, 10.0);
        let b = reading("d1", 2, 20.0);
        hot.load(vec![], vec![a.clone(), b.clone()], now);
        hot.insert(&[a.clone(), reading("d2", 3, 5.0)], true);
        assert_eq!(hot.len(), 3);
        assert_eq!(rows(&hot.readings()), 3);
        let r = hot.rollups();
        assert_eq!(r.num_rows(), 2);
        let column = |name: &str| r.column(r.schema().index_of(name).unwrap()).clone();
        let count = column("temperature_c_count");
        let count = count.as_any().downcast_ref::<Int64Array>().unwrap();
        let sum = column("temperature_c_sum");
        let sum = sum.as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!((count.value(0), sum.value(0)), (2, 30.0));
        let humidity = column("humidity_pct_min");
        assert!(humidity.is_null(0), "no humidity values: NULL min");
        let latest = hot.latest();
        let t = latest
            .column(3)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        assert_eq!(t.value(0), 20.0);
    }

    #[test]
    fn a_reading_in_an_older_minute_counts_as_late() {
        let hot = Hot::new(Duration::from_secs(365 * 24 * 3600));
        let now = DateTime::from_timestamp_micros(1_800_000_000_000_000).unwrap();
        hot.load(vec![], vec![], now);
        hot.insert(&[reading("d1", 5, 1.0)], true);
        hot.insert(&[reading("d1", 2, 1.0), reading("d1", 5, 2.0)], true);
        let latest = hot.latest();
        let late = latest
            .column(11)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(late.value(0), 1);
    }
}
