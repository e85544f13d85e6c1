//! The projector's read models on SQLite: multi-row statements inside one `BEGIN IMMEDIATE`
//! transaction per batch, as appends.

use std::collections::{HashMap, HashSet};

use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;
use uuid::fmt::Hyphenated;

use super::{MAX_ROWS_PER_INSERT, SqliteStore, multi_row, parse_json};
use crate::Result;
use crate::error::db;
use crate::prepare::{chunk_sizes, from_micros, micros, offset_rows};
use crate::projections::{
    Anomaly, DeviceLatest, METRICS, MetricDelta, PreparedProjection, Prior, ProjectionBatch,
    ProjectionOutcome, Resolution, Rollup, unpivot,
};

const NEWER_READING: &str = "(excluded.reading_at IS NOT NULL AND (d.reading_at IS NULL OR \
     (excluded.reading_at, excluded.reading_event_id) > (d.reading_at, d.reading_event_id)))";
const NEWER_STATUS: &str = "(excluded.status_at IS NOT NULL AND (d.status_at IS NULL OR \
     (excluded.status_at, excluded.status_event_id) > (d.status_at, d.status_event_id)))";
fn upsert_devices_tail() -> String {
    format!(
        " ON CONFLICT (version, device_id) DO UPDATE SET
            last_seen = max(d.last_seen, excluded.last_seen),
            reading_at = CASE WHEN {r} THEN excluded.reading_at ELSE d.reading_at END,
            reading_event_id = CASE WHEN {r} THEN excluded.reading_event_id
                                    ELSE d.reading_event_id END,
            reading = CASE WHEN {r} THEN excluded.reading ELSE d.reading END,
            status = CASE WHEN {s} THEN excluded.status ELSE d.status END,
            status_reason = CASE WHEN {s} THEN excluded.status_reason ELSE d.status_reason END,
            status_at = CASE WHEN {s} THEN excluded.status_at ELSE d.status_at END,
            status_event_id = CASE WHEN {s} THEN excluded.status_event_id
                                   ELSE d.status_event_id END,
            late_readings = d.late_readings + excluded.late_readings",
        r = NEWER_READING,
        s = NEWER_STATUS,
    )
}

/// The wide rollup columns after (version, device_id, bucket), per metric.
const METRIC_COLUMNS: [&str; 7] = [
    "count",
    "min",
    "max",
    "sum",
    "last",
    "last_at",
    "last_event_id",
];

/// Per metric: count and sum add up, min and max widen, `last` moves only forward in (device
/// time, event id). SQLite's two-argument `min`/`max` return NULL if either is NULL, hence the
/// `coalesce`s.
fn upsert_rollups_sql(table: &str, rows: usize) -> String {
    let mut cols = vec!["version".to_owned(), "device_id".into(), "bucket".into()];
    let mut set = Vec::new();
    for m in METRICS {
        cols.extend(METRIC_COLUMNS.map(|c| format!("{m}_{c}")));
        let newer = format!(
            "(excluded.{m}_last_at IS NOT NULL AND (r.{m}_last_at IS NULL OR \
             (excluded.{m}_last_at, excluded.{m}_last_event_id) > (r.{m}_last_at, r.{m}_last_event_id)))"
        );
        set.push(format!("{m}_count = r.{m}_count + excluded.{m}_count"));
        for (c, f) in [("min", "min"), ("max", "max")] {
            set.push(format!(
                "{m}_{c} = {f}(coalesce(r.{m}_{c}, excluded.{m}_{c}), \
                 coalesce(excluded.{m}_{c}, r.{m}_{c}))"
            ));
        }
        set.push(format!("{m}_sum = r.{m}_sum + excluded.{m}_sum"));
        for c in ["last", "last_at", "last_event_id"] {
            set.push(format!(
                "{m}_{c} = CASE WHEN {newer} THEN excluded.{m}_{c} ELSE r.{m}_{c} END"
            ));
        }
    }
    multi_row(
        &format!("INSERT INTO {table} AS r ({}) VALUES ", cols.join(", ")),
        cols.len(),
        rows,
        &format!(
            " ON CONFLICT (version, device_id, bucket) DO UPDATE SET {}",
            set.join(", ")
        ),
    )
}

fn select_rollups(table: &str) -> String {
    let cols: Vec<String> = METRICS
        .iter()
        .flat_map(|m| ["count", "min", "max", "sum", "last", "last_at"].map(|c| format!("{m}_{c}")))
        .collect();
    format!(
        "SELECT device_id, bucket, {} FROM {table}
         WHERE version = ?1 AND (?2 IS NULL OR device_id = ?2)
         ORDER BY device_id, bucket",
        cols.join(", ")
    )
}

/// The rollups from the readings; `?2` is the bucket width in microseconds (the modulo is
/// written to floor also before the epoch).
const ROLLUPS_FROM_SCRATCH: &str = "
WITH m AS (
    SELECT r.device_id, r.at - ((r.at % ?2) + ?2) % ?2 AS bucket, v.metric,
           CASE v.metric WHEN 'temperature_c' THEN r.temperature_c
                         WHEN 'humidity_pct' THEN r.humidity_pct
                         WHEN 'pressure_hpa' THEN r.pressure_hpa
                         WHEN 'vibration_mm_s' THEN r.vibration_mm_s
                         WHEN 'battery_pct' THEN r.battery_pct END AS value,
           r.at, r.event_id
    FROM readings r
    CROSS JOIN (SELECT 'temperature_c' AS metric UNION ALL SELECT 'humidity_pct'
                UNION ALL SELECT 'pressure_hpa' UNION ALL SELECT 'vibration_mm_s'
                UNION ALL SELECT 'battery_pct') v
    WHERE r.version = ?1
), ranked AS (
    SELECT m.*, row_number() OVER (PARTITION BY device_id, bucket, metric
                                   ORDER BY at DESC, event_id DESC) AS rn
    FROM m WHERE value IS NOT NULL
)
SELECT device_id, bucket, metric, count(*) AS count, min(value) AS min, max(value) AS max,
       sum(value) AS sum, max(CASE WHEN rn = 1 THEN value END) AS last, max(at) AS last_at
FROM ranked
GROUP BY device_id, bucket, metric
ORDER BY device_id, bucket, metric";

impl SqliteStore {
    pub async fn project(&self, batch: &ProjectionBatch) -> Result<ProjectionOutcome> {
        const OP: &str = "project";
        let p = PreparedProjection::new(batch)?;
        let version = batch.version;
        // IMMEDIATE: see `append`. Holding the write lock, nobody changes the state we read.
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;

        let mut new: HashSet<Uuid> = HashSet::new();
        let mut start = 0;
        for size in chunk_sizes(p.readings.len(), MAX_ROWS_PER_INSERT) {
            let rows = &p.readings[start..start + size];
            start += size;
            let sql = multi_row(
                "INSERT INTO readings (version, event_id, device_id, at, ingested_at, seq, \
                 temperature_c, humidity_pct, pressure_hpa, vibration_mm_s, battery_pct, extra) \
                 VALUES ",
                12,
                size,
                " ON CONFLICT (version, event_id) DO NOTHING RETURNING event_id",
            );
            let mut q = sqlx::query_scalar::<_, Hyphenated>(&sql);
            for r in rows {
                let s = r.src;
                q = q
                    .bind(version)
                    .bind(s.event_id.hyphenated())
                    .bind(s.device_id.as_str())
                    .bind(micros(r.at))
                    .bind(micros(r.ingested_at))
                    .bind(s.seq)
                    .bind(s.temperature_c)
                    .bind(s.humidity_pct)
                    .bind(s.pressure_hpa)
                    .bind(s.vibration_mm_s)
                    .bind(s.battery_pct)
                    .bind(r.extra.as_str());
            }
            let ids = q.fetch_all(&mut *tx).await.map_err(db(OP))?;
            new.extend(ids.into_iter().map(Hyphenated::into_uuid));
        }

        let devices = p.devices();
        let mut prior: HashMap<String, Prior> = HashMap::new();
        if !devices.is_empty() {
            let rows = sqlx::query(
                "SELECT device_id, reading_at, reading_event_id, status_at, status_event_id
                 FROM device_latest
                 WHERE version = ?1 AND device_id IN (SELECT value FROM json_each(?2))",
            )
            .bind(version)
            .bind(serde_json::to_string(&devices).unwrap_or_else(|_| "[]".to_owned()))
            .fetch_all(&mut *tx)
            .await
            .map_err(db(OP))?;
            for row in rows {
                let at: Option<i64> = row.try_get("reading_at").map_err(db(OP))?;
                let id: Option<Hyphenated> = row.try_get("reading_event_id").map_err(db(OP))?;
                let s_at: Option<i64> = row.try_get("status_at").map_err(db(OP))?;
                let s_id: Option<Hyphenated> = row.try_get("status_event_id").map_err(db(OP))?;
                let pair = |at: Option<i64>, id: Option<Hyphenated>| {
                    at.zip(id)
                        .map(|(at, id)| {
                            Ok::<_, crate::Error>((from_micros(OP, at)?, id.into_uuid()))
                        })
                        .transpose()
                };
                prior.insert(
                    row.try_get("device_id").map_err(db(OP))?,
                    Prior {
                        reading: pair(at, id)?,
                        status: pair(s_at, s_id)?,
                    },
                );
            }
        }
        let plan = p.plan(&new, &prior)?;

        for (res, all) in Resolution::ALL.into_iter().zip(&plan.rollups) {
            let mut start = 0;
            for size in chunk_sizes(all.len(), MAX_ROWS_PER_INSERT) {
                let rows = &all[start..start + size];
                start += size;
                let sql = upsert_rollups_sql(res.table(), size);
                let mut q = sqlx::query(&sql);
                for x in rows {
                    q = q.bind(version).bind(x.device_id).bind(micros(x.bucket));
                    for m in x.metrics {
                        q = q
                            .bind(m.map_or(0, |m| m.count))
                            .bind(m.map(|m| m.min))
                            .bind(m.map(|m| m.max))
                            .bind(m.map_or(0.0, |m| m.sum))
                            .bind(m.map(|m| m.last))
                            .bind(m.map(|m| micros(m.last_at)))
                            .bind(m.map(|m| m.last_event_id.hyphenated()));
                    }
                }
                q.execute(&mut *tx).await.map_err(db(OP))?;
            }
        }

        let tail = upsert_devices_tail();
        let mut start = 0;
        for size in chunk_sizes(plan.devices.len(), MAX_ROWS_PER_INSERT) {
            let rows = &plan.devices[start..start + size];
            start += size;
            let sql = multi_row(
                "INSERT INTO device_latest AS d (version, device_id, last_seen, reading_at, \
                 reading_event_id, reading, status, status_reason, status_at, status_event_id, \
                 late_readings) VALUES ",
                11,
                size,
                &tail,
            );
            let mut q = sqlx::query(&sql);
            for x in rows {
                q = q
                    .bind(version)
                    .bind(x.device_id)
                    .bind(micros(x.last_seen))
                    .bind(x.reading.as_ref().map(|r| micros(r.0)))
                    .bind(x.reading.as_ref().map(|r| r.1.hyphenated()))
                    .bind(x.reading.as_ref().map(|r| r.2.as_str()))
                    .bind(x.status.map(|s| s.1.state.as_str()))
                    .bind(x.status.and_then(|s| s.1.reason.as_deref()))
                    .bind(x.status.map(|s| micros(s.0)))
                    .bind(x.status.map(|s| s.1.event_id.hyphenated()))
                    .bind(x.late);
            }
            q.execute(&mut *tx).await.map_err(db(OP))?;
        }

        let mut outcome = plan.outcome;
        let projected_at = micros(chrono::Utc::now());
        let mut start = 0;
        for size in chunk_sizes(p.anomalies.len(), MAX_ROWS_PER_INSERT) {
            let rows = &p.anomalies[start..start + size];
            start += size;
            let sql = multi_row(
                "INSERT INTO anomalies (version, event_id, input_event_id, device_id, at, score, \
                 threshold, model_name, model_version, features, site, projected_at) VALUES ",
                12,
                size,
                " ON CONFLICT (version, event_id) DO NOTHING RETURNING event_id",
            );
            let mut q = sqlx::query_scalar::<_, Hyphenated>(&sql);
            for a in rows {
                let s = a.src;
                q = q
                    .bind(version)
                    .bind(s.event_id.hyphenated())
                    .bind(s.input_event_id.hyphenated())
                    .bind(s.device_id.as_str())
                    .bind(micros(a.at))
                    .bind(s.score)
                    .bind(s.threshold)
                    .bind(s.model_name.as_str())
                    .bind(s.model_version.as_str())
                    .bind(a.features.as_str())
                    .bind(s.site.as_deref())
                    .bind(projected_at);
            }
            outcome.anomalies += q.fetch_all(&mut *tx).await.map_err(db(OP))?.len() as u64;
        }

        let updated_at = projected_at;
        for (group, topic, partition, next_offset) in offset_rows(&batch.offsets) {
            sqlx::query(
                "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (group_id, topic, partition) \
                 DO UPDATE SET next_offset = excluded.next_offset, updated_at = excluded.updated_at",
            )
            .bind(group)
            .bind(topic)
            .bind(partition)
            .bind(next_offset)
            .bind(updated_at)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        }
        tx.commit().await.map_err(db(OP))?;
        Ok(outcome)
    }

    pub async fn device_latest(
        &self,
        version: i32,
        device_id: &str,
    ) -> Result<Option<DeviceLatest>> {
        const OP: &str = "device_latest";
        let row = sqlx::query(
            "SELECT device_id, last_seen, reading_at, reading, status, status_reason, status_at,
                    late_readings
             FROM device_latest WHERE version = ?1 AND device_id = ?2",
        )
        .bind(version)
        .bind(device_id)
        .fetch_optional(&self.reader)
        .await
        .map_err(db(OP))?;
        let Some(row) = row else { return Ok(None) };
        let time = |col: &str| -> Result<Option<chrono::DateTime<chrono::Utc>>> {
            let us: Option<i64> = row.try_get(col).map_err(db(OP))?;
            us.map(|t| from_micros(OP, t)).transpose()
        };
        let reading: Option<String> = row.try_get("reading").map_err(db(OP))?;
        Ok(Some(DeviceLatest {
            device_id: row.try_get("device_id").map_err(db(OP))?,
            last_seen: from_micros(OP, row.try_get("last_seen").map_err(db(OP))?)?,
            reading_at: time("reading_at")?,
            reading: reading.map(|r| parse_json(OP, &r)).transpose()?,
            status: row.try_get("status").map_err(db(OP))?,
            status_reason: row.try_get("status_reason").map_err(db(OP))?,
            status_at: time("status_at")?,
            late_readings: row.try_get("late_readings").map_err(db(OP))?,
        }))
    }

    pub async fn rollups(
        &self,
        version: i32,
        resolution: Resolution,
        device_id: Option<&str>,
    ) -> Result<Vec<Rollup>> {
        let rows = sqlx::query(&select_rollups(resolution.table()))
            .bind(version)
            .bind(device_id)
            .fetch_all(&self.reader)
            .await
            .map_err(db("rollups"))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            wide_rollups_from_row(row, &mut out)?;
        }
        Ok(out)
    }

    pub async fn rollups_from_scratch(
        &self,
        version: i32,
        resolution: Resolution,
    ) -> Result<Vec<Rollup>> {
        let rows = sqlx::query(ROLLUPS_FROM_SCRATCH)
            .bind(version)
            .bind(resolution.width_us())
            .fetch_all(&self.reader)
            .await
            .map_err(db("rollups_from_scratch"))?;
        rows.iter().map(rollup_from_row).collect()
    }

    pub async fn readings_count(&self, version: i32) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM readings WHERE version = ?1")
            .bind(version)
            .fetch_one(&self.reader)
            .await
            .map_err(db("readings_count"))?;
        Ok(n.unsigned_abs())
    }

    pub async fn anomalies(&self, version: i32, device_id: Option<&str>) -> Result<Vec<Anomaly>> {
        const OP: &str = "anomalies";
        let rows = sqlx::query(
            "SELECT event_id, input_event_id, device_id, at, score, threshold, model_name,
                    model_version, features, site
             FROM anomalies
             WHERE version = ?1 AND (?2 IS NULL OR device_id = ?2)
             ORDER BY device_id, at, event_id",
        )
        .bind(version)
        .bind(device_id)
        .fetch_all(&self.reader)
        .await
        .map_err(db(OP))?;
        rows.iter()
            .map(|row| {
                let features: String = row.try_get("features").map_err(db(OP))?;
                Ok(Anomaly {
                    event_id: row
                        .try_get::<Hyphenated, _>("event_id")
                        .map_err(db(OP))?
                        .into_uuid(),
                    input_event_id: row
                        .try_get::<Hyphenated, _>("input_event_id")
                        .map_err(db(OP))?
                        .into_uuid(),
                    device_id: row.try_get("device_id").map_err(db(OP))?,
                    at: from_micros(OP, row.try_get("at").map_err(db(OP))?)?,
                    score: row.try_get("score").map_err(db(OP))?,
                    threshold: row.try_get("threshold").map_err(db(OP))?,
                    model_name: row.try_get("model_name").map_err(db(OP))?,
                    model_version: row.try_get("model_version").map_err(db(OP))?,
                    features: parse_json(OP, &features)?,
                    site: row.try_get("site").map_err(db(OP))?,
                })
            })
            .collect()
    }

    pub async fn drop_projection_version(&self, version: i32) -> Result<u64> {
        const OP: &str = "drop_projection_version";
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;
        let mut n = 0;
        for table in crate::projections::VERSIONED_TABLES {
            n += sqlx::query(&format!("DELETE FROM {table} WHERE version = ?1"))
                .bind(version)
                .execute(&mut *tx)
                .await
                .map_err(db(OP))?
                .rows_affected();
        }
        tx.commit().await.map_err(db(OP))?;
        Ok(n)
    }
}

fn rollup_from_row(row: &SqliteRow) -> Result<Rollup> {
    const OP: &str = "read rollups";
    Ok(Rollup {
        device_id: row.try_get("device_id").map_err(db(OP))?,
        bucket: from_micros(OP, row.try_get("bucket").map_err(db(OP))?)?,
        metric: row.try_get("metric").map_err(db(OP))?,
        count: row.try_get("count").map_err(db(OP))?,
        min: row.try_get("min").map_err(db(OP))?,
        max: row.try_get("max").map_err(db(OP))?,
        sum: row.try_get("sum").map_err(db(OP))?,
        last: row.try_get("last").map_err(db(OP))?,
        last_at: from_micros(OP, row.try_get("last_at").map_err(db(OP))?)?,
    })
}

fn wide_rollups_from_row(row: &SqliteRow, out: &mut Vec<Rollup>) -> Result<()> {
    const OP: &str = "read rollups";
    let get_f = |c: String| row.try_get::<Option<f64>, _>(c.as_str()).map_err(db(OP));
    let mut metrics = [None; 5];
    for (i, m) in METRICS.iter().enumerate() {
        let count: i64 = row.try_get(format!("{m}_count").as_str()).map_err(db(OP))?;
        let last_at: Option<i64> = row
            .try_get(format!("{m}_last_at").as_str())
            .map_err(db(OP))?;
        let (Some(min), Some(max), Some(sum), Some(last), Some(last_at)) = (
            get_f(format!("{m}_min"))?,
            get_f(format!("{m}_max"))?,
            get_f(format!("{m}_sum"))?,
            get_f(format!("{m}_last"))?,
            last_at,
        ) else {
            continue;
        };
        metrics[i] = Some(MetricDelta {
            count,
            min,
            max,
            sum,
            last,
            last_at: from_micros(OP, last_at)?,
            last_event_id: Uuid::nil(),
        });
    }
    let device_id: String = row.try_get("device_id").map_err(db(OP))?;
    let bucket = from_micros(OP, row.try_get("bucket").map_err(db(OP))?)?;
    unpivot(&device_id, bucket, &metrics, out);
    Ok(())
}
