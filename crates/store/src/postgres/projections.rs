//! The projector's read models on PostgreSQL: one statement per table per batch, as appends.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use uuid::Uuid;

use super::{Partitioned, PgStore, UPSERT_OFFSETS};
use crate::Result;
use crate::error::db;
use crate::prepare::offset_rows;
use crate::projections::{
    Anomaly, DeviceLatest, METRICS, MetricDelta, Plan, PreparedProjection, Prior, ProjectionBatch,
    ProjectionOutcome, RebuildOutcome, RebuildStep, Resolution, Rollup, unpivot,
};

/// Rows are inserted in id order so that concurrent batches sharing ids lock them in the same
/// order (see `INSERT_IDS`). The key includes `at`, the partition key (Postgres requires it);
/// an event id has one device time, so it is still unique by (version, event_id).
const INSERT_READINGS: &str = "
INSERT INTO readings (version, event_id, device_id, at, ingested_at, seq, temperature_c,
                      humidity_pct, pressure_hpa, vibration_mm_s, battery_pct, extra)
SELECT $1, u.event_id, u.device_id, u.at, u.ingested_at, u.seq, u.t, u.h, u.p, u.v, u.b,
       u.extra::jsonb
FROM unnest($2::uuid[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::int8[],
            $7::float8[], $8::float8[], $9::float8[], $10::float8[], $11::float8[], $12::text[])
     AS u(event_id, device_id, at, ingested_at, seq, t, h, p, v, b, extra)
ORDER BY u.event_id
ON CONFLICT (version, event_id, at) DO NOTHING
RETURNING event_id";

/// Anomalies come sorted by event id (lock order, as readings); only the ids returned are new.
/// `projected_at` is the transaction's start.
const INSERT_ANOMALIES: &str = "
INSERT INTO anomalies (version, event_id, input_event_id, device_id, at, score, threshold,
                       model_name, model_version, features, site, projected_at)
SELECT $1, u.event_id, u.input_event_id, u.device_id, u.at, u.score, u.threshold,
       u.model_name, u.model_version, u.features::jsonb, u.site, now()
FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[], $6::float8[],
            $7::float8[], $8::text[], $9::text[], $10::text[], $11::text[])
     WITH ORDINALITY AS u(event_id, input_event_id, device_id, at, score, threshold, model_name,
                          model_version, features, site, ord)
ORDER BY u.ord
ON CONFLICT (version, event_id) DO NOTHING
RETURNING event_id";

/// Locks the devices' rows (in device order) so late-ness is judged against a state nobody
/// changes before we commit.
const PRIOR: &str = "
SELECT device_id, reading_at, reading_event_id, status_at, status_event_id
FROM device_latest
WHERE version = $1 AND device_id = ANY($2)
ORDER BY device_id
FOR UPDATE";

/// Reading and status fields only move forward in (device time, event id).
const UPSERT_DEVICES: &str = "
INSERT INTO device_latest AS d (version, device_id, last_seen, reading_at, reading_event_id,
                                reading, status, status_reason, status_at, status_event_id,
                                late_readings)
SELECT $1, u.device_id, u.last_seen, u.reading_at, u.reading_event_id, u.reading::jsonb,
       u.status, u.status_reason, u.status_at, u.status_event_id, u.late
FROM unnest($2::text[], $3::timestamptz[], $4::timestamptz[], $5::uuid[], $6::text[],
            $7::text[], $8::text[], $9::timestamptz[], $10::uuid[], $11::int8[])
     AS u(device_id, last_seen, reading_at, reading_event_id, reading, status, status_reason,
          status_at, status_event_id, late)
ON CONFLICT (version, device_id) DO UPDATE SET
    last_seen = GREATEST(d.last_seen, excluded.last_seen),
    reading_at = CASE WHEN newer_reading THEN excluded.reading_at ELSE d.reading_at END,
    reading_event_id = CASE WHEN newer_reading THEN excluded.reading_event_id
                            ELSE d.reading_event_id END,
    reading = CASE WHEN newer_reading THEN excluded.reading ELSE d.reading END,
    status = CASE WHEN newer_status THEN excluded.status ELSE d.status END,
    status_reason = CASE WHEN newer_status THEN excluded.status_reason
                         ELSE d.status_reason END,
    status_at = CASE WHEN newer_status THEN excluded.status_at ELSE d.status_at END,
    status_event_id = CASE WHEN newer_status THEN excluded.status_event_id
                           ELSE d.status_event_id END,
    late_readings = d.late_readings + excluded.late_readings";

const NEWER_READING: &str = "(excluded.reading_at IS NOT NULL AND (d.reading_at IS NULL OR \
     (excluded.reading_at, excluded.reading_event_id) > (d.reading_at, d.reading_event_id)))";
const NEWER_STATUS: &str = "(excluded.status_at IS NOT NULL AND (d.status_at IS NULL OR \
     (excluded.status_at, excluded.status_event_id) > (d.status_at, d.status_event_id)))";

/// Per metric: count and sum add up, min and max widen (`LEAST` and `GREATEST` skip NULLs),
/// and `last` moves only forward in (device time, event id).
fn upsert_rollups(table: &str) -> String {
    let mut cols = vec!["device_id".to_owned(), "bucket".to_owned()];
    let mut types = vec!["text[]", "timestamptz[]"];
    let mut set = Vec::new();
    for m in METRICS {
        for (suffix, ty) in METRIC_COLUMNS {
            cols.push(format!("{m}_{suffix}"));
            types.push(ty);
        }
        let newer = format!(
            "(excluded.{m}_last_at IS NOT NULL AND (r.{m}_last_at IS NULL OR \
             (excluded.{m}_last_at, excluded.{m}_last_event_id) > (r.{m}_last_at, r.{m}_last_event_id)))"
        );
        set.push(format!("{m}_count = r.{m}_count + excluded.{m}_count"));
        set.push(format!("{m}_min = LEAST(r.{m}_min, excluded.{m}_min)"));
        set.push(format!("{m}_max = GREATEST(r.{m}_max, excluded.{m}_max)"));
        set.push(format!("{m}_sum = r.{m}_sum + excluded.{m}_sum"));
        for c in ["last", "last_at", "last_event_id"] {
            set.push(format!(
                "{m}_{c} = CASE WHEN {newer} THEN excluded.{m}_{c} ELSE r.{m}_{c} END"
            ));
        }
    }
    let args: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, ty)| format!("${}::{ty}", i + 2))
        .collect();
    format!(
        "INSERT INTO {table} AS r (version, {cols})
SELECT $1, u.* FROM unnest({args}) AS u({cols})
ON CONFLICT (version, device_id, bucket) DO UPDATE SET {set}",
        cols = cols.join(", "),
        args = args.join(", "),
        set = set.join(",\n    "),
    )
}

/// A metric's columns in the wide rollup tables, after its name, with their array types.
const METRIC_COLUMNS: [(&str, &str); 7] = [
    ("count", "int8[]"),
    ("min", "float8[]"),
    ("max", "float8[]"),
    ("sum", "float8[]"),
    ("last", "float8[]"),
    ("last_at", "timestamptz[]"),
    ("last_event_id", "uuid[]"),
];

static UPSERT_1M: LazyLock<String> = LazyLock::new(|| upsert_rollups("readings_1m"));
static UPSERT_1H: LazyLock<String> = LazyLock::new(|| upsert_rollups("readings_1h"));

fn select_rollups(table: &str) -> String {
    let cols: Vec<String> = METRICS
        .iter()
        .flat_map(|m| ["count", "min", "max", "sum", "last", "last_at"].map(|c| format!("{m}_{c}")))
        .collect();
    format!(
        r#"SELECT device_id, bucket, {} FROM {table}
           WHERE version = $1 AND ($2::text IS NULL OR device_id = $2)
           ORDER BY device_id COLLATE "C", bucket"#,
        cols.join(", ")
    )
}

/// `COLLATE "C"`: byte order, the same as SQLite and Rust whatever the database's locale.
const ROLLUP_ORDER: &str = r#"ORDER BY device_id COLLATE "C", bucket, metric COLLATE "C""#;

/// The rollups from the readings. `date_bin` from the epoch does not depend on the session
/// time zone (`date_trunc` on timestamptz does).
fn rollups_from_scratch_sql(width: &str) -> String {
    format!(
        "
WITH m AS (
    SELECT r.device_id, date_bin('{width}', r.at, timestamptz 'epoch') AS bucket, v.metric,
           v.value, r.at, r.event_id
    FROM readings r
    CROSS JOIN LATERAL (VALUES ('temperature_c', r.temperature_c),
                               ('humidity_pct', r.humidity_pct),
                               ('pressure_hpa', r.pressure_hpa),
                               ('vibration_mm_s', r.vibration_mm_s),
                               ('battery_pct', r.battery_pct)) AS v(metric, value)
    WHERE r.version = $1 AND v.value IS NOT NULL
), ranked AS (
    SELECT m.*, row_number() OVER (PARTITION BY device_id, bucket, metric
                                   ORDER BY at DESC, event_id DESC) AS rn
    FROM m
)
SELECT device_id, bucket, metric, count(*) AS count, min(value) AS min, max(value) AS max,
       sum(value) AS sum, max(value) FILTER (WHERE rn = 1) AS last,
       max(at) AS last_at
FROM ranked
GROUP BY device_id, bucket, metric
{ROLLUP_ORDER}"
    )
}

impl PgStore {
    pub async fn project(&self, batch: &ProjectionBatch) -> Result<ProjectionOutcome> {
        const OP: &str = "project";
        let p = PreparedProjection::new(batch)?;
        let version = batch.version;
        self.ensure_partitions(Partitioned::Readings, p.readings.iter().map(|r| r.at))
            .await;
        let mut tx = self.pool.begin().await.map_err(db(OP))?;

        let mut new: HashSet<Uuid> = HashSet::new();
        if !p.readings.is_empty() {
            let r = &p.readings;
            let ids: Vec<Uuid> = sqlx::query_scalar(INSERT_READINGS)
                .bind(version)
                .bind(r.iter().map(|x| x.src.event_id).collect::<Vec<_>>())
                .bind(
                    r.iter()
                        .map(|x| x.src.device_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(r.iter().map(|x| x.at).collect::<Vec<_>>())
                .bind(r.iter().map(|x| x.ingested_at).collect::<Vec<_>>())
                .bind(r.iter().map(|x| x.src.seq).collect::<Vec<_>>())
                .bind(r.iter().map(|x| x.src.temperature_c).collect::<Vec<_>>())
                .bind(r.iter().map(|x| x.src.humidity_pct).collect::<Vec<_>>())
                .bind(r.iter().map(|x| x.src.pressure_hpa).collect::<Vec<_>>())
                .bind(r.iter().map(|x| x.src.vibration_mm_s).collect::<Vec<_>>())
                .bind(r.iter().map(|x| x.src.battery_pct).collect::<Vec<_>>())
                .bind(r.iter().map(|x| x.extra.as_str()).collect::<Vec<_>>())
                .fetch_all(&mut *tx)
                .await
                .map_err(db(OP))?;
            new.extend(ids);
        }

        let prior = prior_states(&mut tx, version, &p.devices()).await?;
        let plan = p.plan(&new, &prior)?;

        write_plan(&mut tx, version, &plan).await?;
        let mut outcome = plan.outcome;
        if !p.anomalies.is_empty() {
            let a = &p.anomalies;
            let ids: Vec<Uuid> = sqlx::query_scalar(INSERT_ANOMALIES)
                .bind(version)
                .bind(a.iter().map(|x| x.src.event_id).collect::<Vec<_>>())
                .bind(a.iter().map(|x| x.src.input_event_id).collect::<Vec<_>>())
                .bind(
                    a.iter()
                        .map(|x| x.src.device_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(a.iter().map(|x| x.at).collect::<Vec<_>>())
                .bind(a.iter().map(|x| x.src.score).collect::<Vec<_>>())
                .bind(a.iter().map(|x| x.src.threshold).collect::<Vec<_>>())
                .bind(
                    a.iter()
                        .map(|x| x.src.model_name.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    a.iter()
                        .map(|x| x.src.model_version.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(a.iter().map(|x| x.features.as_str()).collect::<Vec<_>>())
                .bind(a.iter().map(|x| x.src.site.as_deref()).collect::<Vec<_>>())
                .fetch_all(&mut *tx)
                .await
                .map_err(db(OP))?;
            outcome.anomalies = ids.len() as u64;
        }

        let o = offset_rows(&batch.offsets);
        if !o.is_empty() {
            sqlx::query(UPSERT_OFFSETS)
                .bind(o.iter().map(|x| x.0).collect::<Vec<_>>())
                .bind(o.iter().map(|x| x.1).collect::<Vec<_>>())
                .bind(o.iter().map(|x| x.2).collect::<Vec<_>>())
                .bind(o.iter().map(|x| x.3).collect::<Vec<_>>())
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
             FROM device_latest WHERE version = $1 AND device_id = $2",
        )
        .bind(version)
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        let Some(row) = row else { return Ok(None) };
        let reading: Option<Json<serde_json::Value>> = row.try_get("reading").map_err(db(OP))?;
        Ok(Some(DeviceLatest {
            device_id: row.try_get("device_id").map_err(db(OP))?,
            last_seen: row.try_get("last_seen").map_err(db(OP))?,
            reading_at: row.try_get("reading_at").map_err(db(OP))?,
            reading: reading.map(|Json(v)| v),
            status: row.try_get("status").map_err(db(OP))?,
            status_reason: row.try_get("status_reason").map_err(db(OP))?,
            status_at: row.try_get("status_at").map_err(db(OP))?,
            late_readings: row.try_get("late_readings").map_err(db(OP))?,
        }))
    }

    pub async fn rollups(
        &self,
        version: i32,
        resolution: Resolution,
        device_id: Option<&str>,
    ) -> Result<Vec<Rollup>> {
        let sql = select_rollups(resolution.table());
        let rows = sqlx::query(&sql)
            .bind(version)
            .bind(device_id)
            .fetch_all(&self.pool)
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
        let width = match resolution {
            Resolution::Minute => "1 minute",
            Resolution::Hour => "1 hour",
        };
        let rows = sqlx::query(&rollups_from_scratch_sql(width))
            .bind(version)
            .fetch_all(&self.pool)
            .await
            .map_err(db("rollups_from_scratch"))?;
        rows.iter().map(rollup_from_row).collect()
    }

    pub async fn readings_count(&self, version: i32) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM readings WHERE version = $1")
            .bind(version)
            .fetch_one(&self.pool)
            .await
            .map_err(db("readings_count"))?;
        Ok(n.unsigned_abs())
    }

    pub async fn anomalies(&self, version: i32, device_id: Option<&str>) -> Result<Vec<Anomaly>> {
        const OP: &str = "anomalies";
        let rows = sqlx::query(
            r#"SELECT event_id, input_event_id, device_id, at, score, threshold, model_name,
                      model_version, features, site
               FROM anomalies
               WHERE version = $1 AND ($2::text IS NULL OR device_id = $2)
               ORDER BY device_id COLLATE "C", at, event_id"#,
        )
        .bind(version)
        .bind(device_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db(OP))?;
        rows.iter()
            .map(|row| {
                let Json(features) = row.try_get("features").map_err(db(OP))?;
                Ok(Anomaly {
                    event_id: row.try_get("event_id").map_err(db(OP))?,
                    input_event_id: row.try_get("input_event_id").map_err(db(OP))?,
                    device_id: row.try_get("device_id").map_err(db(OP))?,
                    at: row.try_get("at").map_err(db(OP))?,
                    score: row.try_get("score").map_err(db(OP))?,
                    threshold: row.try_get("threshold").map_err(db(OP))?,
                    model_name: row.try_get("model_name").map_err(db(OP))?,
                    model_version: row.try_get("model_version").map_err(db(OP))?,
                    features,
                    site: row.try_get("site").map_err(db(OP))?,
                })
            })
            .collect()
    }

    pub async fn drop_projection_version(&self, version: i32) -> Result<u64> {
        const OP: &str = "drop_projection_version";
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        let mut n = 0;
        for table in crate::projections::VERSIONED_TABLES {
            n += sqlx::query(&format!("DELETE FROM {table} WHERE version = $1"))
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

fn rollup_from_row(row: &PgRow) -> Result<Rollup> {
    const OP: &str = "read rollups";
    Ok(Rollup {
        device_id: row.try_get("device_id").map_err(db(OP))?,
        bucket: row.try_get("bucket").map_err(db(OP))?,
        metric: row.try_get("metric").map_err(db(OP))?,
        count: row.try_get("count").map_err(db(OP))?,
        min: row.try_get("min").map_err(db(OP))?,
        max: row.try_get("max").map_err(db(OP))?,
        sum: row.try_get("sum").map_err(db(OP))?,
        last: row.try_get("last").map_err(db(OP))?,
        last_at: row.try_get("last_at").map_err(db(OP))?,
    })
}

fn wide_rollups_from_row(row: &PgRow, out: &mut Vec<Rollup>) -> Result<()> {
    const OP: &str = "read rollups";
    let get_f = |c: String| row.try_get::<Option<f64>, _>(c.as_str()).map_err(db(OP));
    let mut metrics = [None; 5];
    for (i, m) in METRICS.iter().enumerate() {
        let count: i64 = row.try_get(format!("{m}_count").as_str()).map_err(db(OP))?;
        let last_at: Option<DateTime<Utc>> = row
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
            last_at,
            last_event_id: Uuid::nil(),
        });
    }
    let device_id: String = row.try_get("device_id").map_err(db(OP))?;
    unpivot(
        &device_id,
        row.try_get("bucket").map_err(db(OP))?,
        &metrics,
        out,
    );
    Ok(())
}

/// The devices' state before a batch, their rows locked until the transaction ends.
async fn prior_states(
    conn: &mut PgConnection,
    version: i32,
    devices: &[&str],
) -> Result<HashMap<String, Prior>> {
    const OP: &str = "project";
    let mut prior: HashMap<String, Prior> = HashMap::new();
    if !devices.is_empty() {
        let rows = sqlx::query(PRIOR)
            .bind(version)
            .bind(devices)
            .fetch_all(&mut *conn)
            .await
            .map_err(db(OP))?;
        for row in rows {
            let at: Option<DateTime<Utc>> = row.try_get("reading_at").map_err(db(OP))?;
            let id: Option<Uuid> = row.try_get("reading_event_id").map_err(db(OP))?;
            let s_at: Option<DateTime<Utc>> = row.try_get("status_at").map_err(db(OP))?;
            let s_id: Option<Uuid> = row.try_get("status_event_id").map_err(db(OP))?;
            prior.insert(
                row.try_get("device_id").map_err(db(OP))?,
                Prior {
                    reading: at.zip(id),
                    status: s_at.zip(s_id),
                },
            );
        }
    }
    Ok(prior)
}

/// The plan's rollup and latest-state deltas, merged into the stored rows.
async fn write_plan(conn: &mut PgConnection, version: i32, plan: &Plan<'_>) -> Result<()> {
    const OP: &str = "project";
    for (sql, rows) in [&*UPSERT_1M, &*UPSERT_1H].into_iter().zip(&plan.rollups) {
        if rows.is_empty() {
            continue;
        }
        let mut q = sqlx::query(sql)
            .bind(version)
            .bind(rows.iter().map(|x| x.device_id).collect::<Vec<_>>())
            .bind(rows.iter().map(|x| x.bucket).collect::<Vec<_>>());
        for i in 0..METRICS.len() {
            let m = |x: &crate::projections::RollupDelta<'_>| x.metrics[i];
            q = q
                .bind(
                    rows.iter()
                        .map(|x| m(x).map_or(0, |m| m.count))
                        .collect::<Vec<_>>(),
                )
                .bind(rows.iter().map(|x| m(x).map(|m| m.min)).collect::<Vec<_>>())
                .bind(rows.iter().map(|x| m(x).map(|m| m.max)).collect::<Vec<_>>())
                .bind(
                    rows.iter()
                        .map(|x| m(x).map_or(0.0, |m| m.sum))
                        .collect::<Vec<_>>(),
                )
                .bind(
                    rows.iter()
                        .map(|x| m(x).map(|m| m.last))
                        .collect::<Vec<_>>(),
                )
                .bind(
                    rows.iter()
                        .map(|x| m(x).map(|m| m.last_at))
                        .collect::<Vec<_>>(),
                )
                .bind(
                    rows.iter()
                        .map(|x| m(x).map(|m| m.last_event_id))
                        .collect::<Vec<_>>(),
                );
        }
        q.execute(&mut *conn).await.map_err(db(OP))?;
    }

    if !plan.devices.is_empty() {
        let d = &plan.devices;
        let sql = UPSERT_DEVICES
            .replace("newer_reading", NEWER_READING)
            .replace("newer_status", NEWER_STATUS);
        sqlx::query(&sql)
            .bind(version)
            .bind(d.iter().map(|x| x.device_id).collect::<Vec<_>>())
            .bind(d.iter().map(|x| x.last_seen).collect::<Vec<_>>())
            .bind(
                d.iter()
                    .map(|x| x.reading.as_ref().map(|r| r.0))
                    .collect::<Vec<_>>(),
            )
            .bind(
                d.iter()
                    .map(|x| x.reading.as_ref().map(|r| r.1))
                    .collect::<Vec<_>>(),
            )
            .bind(
                d.iter()
                    .map(|x| x.reading.as_ref().map(|r| r.2.as_str()))
                    .collect::<Vec<_>>(),
            )
            .bind(
                d.iter()
                    .map(|x| x.status.map(|s| s.1.state.as_str()))
                    .collect::<Vec<_>>(),
            )
            .bind(
                d.iter()
                    .map(|x| x.status.and_then(|s| s.1.reason.as_deref()))
                    .collect::<Vec<_>>(),
            )
            .bind(d.iter().map(|x| x.status.map(|s| s.0)).collect::<Vec<_>>())
            .bind(
                d.iter()
                    .map(|x| x.status.map(|s| s.1.event_id))
                    .collect::<Vec<_>>(),
            )
            .bind(d.iter().map(|x| x.late).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await
            .map_err(db(OP))?;
    }

    Ok(())
}

// ---- set-based rebuild ----------------------------------------------------------------------
//
// The SQL below is the projector's mapping of an event to a reading or a status
// (`sluice_projector::project`), in SQL; `processors/projector/tests/rebuild.rs` holds the two
// equal.

/// A reading the projector can project: an object payload whose rolled-up metrics are numbers
/// or null.
static READING_OK: LazyLock<String> = LazyLock::new(|| {
    let mut ok = vec!["jsonb_typeof(e.payload) = 'object'".to_owned()];
    for m in METRICS {
        ok.push(format!(
            "coalesce(jsonb_typeof(e.payload->'{m}'), 'null') IN ('null', 'number')"
        ));
    }
    format!("({})", ok.join(" AND "))
});

const STATUS_OK: &str = "coalesce(jsonb_typeof(e.payload->'state') = 'string', false)";

/// The step's events of `types`: positions `$1 < position <= $2`, lane `$3` of `$4`. `OFFSET 0`
/// keeps the lane test ahead of the payload tests, which then see only the lane's events.
fn step_events(types: &str) -> String {
    format!(
        "(SELECT * FROM events e
          WHERE e.position > $1 AND e.position <= $2 AND e.event_type IN ({types})
            AND (hashtext(e.aggregate_id) & 2147483647) % $4 = $3
          OFFSET 0) AS e"
    )
}

/// Its events, the unprojectable among them, and the device-time range of its readings (for
/// the partitions they go to).
static STEP_COUNTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT count(*) AS events,
                count(*) FILTER (WHERE NOT CASE WHEN e.event_type = 'sensor.reading'
                                                THEN {ok} ELSE {STATUS_OK} END) AS unprojectable,
                min(e.occurred_at) FILTER (WHERE e.event_type = 'sensor.reading') AS lo,
                max(e.occurred_at) FILTER (WHERE e.event_type = 'sensor.reading') AS hi
         FROM {events}",
        ok = *READING_OK,
        events = step_events("'sensor.reading', 'device.status'")
    )
});

/// The step's readings, inserted in event-id order (the lock order of `INSERT_READINGS`, so a
/// projector writing the same version meanwhile cannot deadlock with it); returns the new ones.
static STEP_READINGS: LazyLock<String> = LazyLock::new(|| {
    let metrics: Vec<String> = METRICS
        .iter()
        .map(|m| format!("(e.payload->>'{m}')::float8"))
        .collect();
    format!(
        "INSERT INTO readings (version, event_id, device_id, at, ingested_at, seq, {cols}, extra)
         SELECT $5, e.event_id, e.aggregate_id, e.occurred_at, e.ingested_at,
                CASE WHEN jsonb_typeof(e.payload->'seq') = 'number'
                          AND e.payload->>'seq' ~ '^-?[0-9]{{1,18}}$'
                     THEN (e.payload->>'seq')::int8 END,
                {metrics},
                CASE WHEN jsonb_typeof(e.payload->'extra') = 'object' THEN
                    (SELECT coalesce(jsonb_object_agg(x.key, x.value), '{{}}'::jsonb)
                     FROM jsonb_each(e.payload->'extra') AS x
                     WHERE jsonb_typeof(x.value) = 'number')
                ELSE '{{}}'::jsonb END
         FROM {events}
         WHERE {ok}
         ORDER BY e.event_id
         ON CONFLICT (version, event_id, at) DO NOTHING
         RETURNING event_id, device_id, at, {cols}",
        cols = METRICS.join(", "),
        metrics = metrics.join(", "),
        ok = *READING_OK,
        events = step_events("'sensor.reading'")
    )
});

static STEP_STATUSES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT e.event_id, e.aggregate_id, e.occurred_at, e.payload->>'state' AS state,
                CASE WHEN jsonb_typeof(e.payload->'reason') = 'string'
                     THEN e.payload->>'reason' END AS reason
         FROM {events}
         WHERE {STATUS_OK}",
        events = step_events("'device.status'")
    )
});

/// Payloads by event id among the step's positions (the events table is indexed by position;
/// a join through `event_ids` is planned as a scan of every event).
const PAYLOADS: &str = "
SELECT e.event_id, e.payload::text FROM events e
WHERE e.position > $1 AND e.position <= $2 AND e.event_id = ANY($3)";

impl PgStore {
    pub async fn rebuild_step(&self, step: &RebuildStep) -> Result<RebuildOutcome> {
        const OP: &str = "rebuild_step";
        if step.lanes == 0 || step.lane >= step.lanes {
            return Err(crate::Error::InvalidArgument {
                op: OP,
                reason: format!("lane {} of {} does not exist", step.lane, step.lanes),
            });
        }
        let (lane, lanes) = (i32::try_from(step.lane), i32::try_from(step.lanes));
        let (Ok(lane), Ok(lanes)) = (lane, lanes) else {
            return Err(crate::Error::InvalidArgument {
                op: OP,
                reason: "too many lanes".to_owned(),
            });
        };
        let bind = |sql: &'static str| {
            sqlx::query(sql)
                .bind(step.after)
                .bind(step.upto)
                .bind(lane)
                .bind(lanes)
        };
        let counts = bind(STEP_COUNTS.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(db(OP))?;
        let events: i64 = counts.try_get("events").map_err(db(OP))?;
        let unprojectable: i64 = counts.try_get("unprojectable").map_err(db(OP))?;
        let lo: Option<DateTime<Utc>> = counts.try_get("lo").map_err(db(OP))?;
        let hi: Option<DateTime<Utc>> = counts.try_get("hi").map_err(db(OP))?;
        if let (Some(lo), Some(hi)) = (lo, hi) {
            self.ensure_partitions(Partitioned::Readings, self.intervals_between(lo, hi))
                .await;
        }

        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        // The step's readings are sorted by event id: in memory, not in temporary files.
        sqlx::query("SET LOCAL work_mem = '64MB'")
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        let rows = bind(STEP_READINGS.as_str())
            .bind(step.version)
            .fetch_all(&mut *tx)
            .await
            .map_err(db(OP))?;
        let mut readings = Vec::with_capacity(rows.len());
        for row in &rows {
            let at: DateTime<Utc> = row.try_get("at").map_err(db(OP))?;
            let mut values = [None; 5];
            for (v, m) in values.iter_mut().zip(METRICS) {
                *v = row.try_get(m).map_err(db(OP))?;
            }
            let [
                temperature_c,
                humidity_pct,
                pressure_hpa,
                vibration_mm_s,
                battery_pct,
            ] = values;
            readings.push(crate::Reading {
                event_id: row.try_get("event_id").map_err(db(OP))?,
                device_id: row.try_get("device_id").map_err(db(OP))?,
                at,
                ingested_at: at,
                seq: None,
                temperature_c,
                humidity_pct,
                pressure_hpa,
                vibration_mm_s,
                battery_pct,
                extra: Default::default(),
                // Only the newest per device is kept: fetched below, once planned.
                payload: serde_json::Value::Null,
            });
        }
        let rows = bind(STEP_STATUSES.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(db(OP))?;
        let mut statuses = Vec::with_capacity(rows.len());
        for row in &rows {
            statuses.push(crate::StatusChange {
                event_id: row.try_get("event_id").map_err(db(OP))?,
                device_id: row.try_get("aggregate_id").map_err(db(OP))?,
                at: row.try_get("occurred_at").map_err(db(OP))?,
                state: row.try_get("state").map_err(db(OP))?,
                reason: row.try_get("reason").map_err(db(OP))?,
            });
        }
        let batch = ProjectionBatch {
            version: step.version,
            readings,
            statuses,
            ..ProjectionBatch::default()
        };
        let p = PreparedProjection::new(&batch)?;
        // Every reading returned was inserted just now.
        let new: HashSet<Uuid> = batch.readings.iter().map(|r| r.event_id).collect();
        let prior = prior_states(&mut tx, step.version, &p.devices()).await?;
        let mut plan = p.plan(&new, &prior)?;

        let newest: Vec<Uuid> = plan
            .devices
            .iter()
            .filter_map(|d| d.reading.as_ref().map(|r| r.1))
            .collect();
        if !newest.is_empty() {
            let payloads: HashMap<Uuid, String> = sqlx::query_as(PAYLOADS)
                .bind(step.after)
                .bind(step.upto)
                .bind(&newest)
                .fetch_all(&mut *tx)
                .await
                .map_err(db(OP))?
                .into_iter()
                .collect();
            for d in &mut plan.devices {
                if let Some((_, id, payload)) = &mut d.reading {
                    *payload = payloads.get(id).cloned().ok_or_else(|| {
                        crate::Error::corrupt(OP, format!("event {id} has no payload"))
                    })?;
                }
            }
        }
        write_plan(&mut tx, step.version, &plan).await?;
        tx.commit().await.map_err(db(OP))?;
        Ok(RebuildOutcome {
            events: u64::try_from(events).unwrap_or(0),
            readings: plan.outcome.readings,
            statuses: plan.outcome.statuses,
            unprojectable: u64::try_from(unprojectable).unwrap_or(0),
        })
    }
}
