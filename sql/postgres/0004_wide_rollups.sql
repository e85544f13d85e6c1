-- Wide rollups: one row per (version, device, bucket) with every metric's columns, instead of
-- one row per metric: a fifth of the rows to upsert per reading. Per metric <m>: `<m>_count` and
-- `<m>_sum` (0 when the bucket has no value of it), `<m>_min`, `<m>_max`, `<m>_last` (the value
-- with the greatest (device time, event id)), `<m>_last_at` and `<m>_last_event_id` (kept only
-- to break ties the same way on every update), NULL when the bucket has no value of it.
-- avg = sum / count. The rows of the old tables are carried over, pivoted.
-- fillfactor: rollup rows are updated in place many times; room on the page lets Postgres
-- write the new version there (HOT) without touching the index.

ALTER TABLE readings_1m RENAME TO readings_1m_narrow;
ALTER INDEX readings_1m_pkey RENAME TO readings_1m_narrow_pkey;
ALTER TABLE readings_1h RENAME TO readings_1h_narrow;
ALTER INDEX readings_1h_pkey RENAME TO readings_1h_narrow_pkey;

CREATE TABLE readings_1m (
    version integer NOT NULL,
    device_id text NOT NULL,
    bucket timestamptz NOT NULL,
    temperature_c_count bigint NOT NULL DEFAULT 0,
    temperature_c_min double precision,
    temperature_c_max double precision,
    temperature_c_sum double precision NOT NULL DEFAULT 0,
    temperature_c_last double precision,
    temperature_c_last_at timestamptz,
    temperature_c_last_event_id uuid,
    humidity_pct_count bigint NOT NULL DEFAULT 0,
    humidity_pct_min double precision,
    humidity_pct_max double precision,
    humidity_pct_sum double precision NOT NULL DEFAULT 0,
    humidity_pct_last double precision,
    humidity_pct_last_at timestamptz,
    humidity_pct_last_event_id uuid,
    pressure_hpa_count bigint NOT NULL DEFAULT 0,
    pressure_hpa_min double precision,
    pressure_hpa_max double precision,
    pressure_hpa_sum double precision NOT NULL DEFAULT 0,
    pressure_hpa_last double precision,
    pressure_hpa_last_at timestamptz,
    pressure_hpa_last_event_id uuid,
    vibration_mm_s_count bigint NOT NULL DEFAULT 0,
    vibration_mm_s_min double precision,
    vibration_mm_s_max double precision,
    vibration_mm_s_sum double precision NOT NULL DEFAULT 0,
    vibration_mm_s_last double precision,
    vibration_mm_s_last_at timestamptz,
    vibration_mm_s_last_event_id uuid,
    battery_pct_count bigint NOT NULL DEFAULT 0,
    battery_pct_min double precision,
    battery_pct_max double precision,
    battery_pct_sum double precision NOT NULL DEFAULT 0,
    battery_pct_last double precision,
    battery_pct_last_at timestamptz,
    battery_pct_last_event_id uuid,
    PRIMARY KEY (version, device_id, bucket)
) WITH (fillfactor = 70);

CREATE TABLE readings_1h (LIKE readings_1m INCLUDING ALL) WITH (fillfactor = 70);

INSERT INTO readings_1m (version, device_id, bucket,
    temperature_c_count, temperature_c_min, temperature_c_max, temperature_c_sum, temperature_c_last, temperature_c_last_at, temperature_c_last_event_id, humidity_pct_count, humidity_pct_min, humidity_pct_max, humidity_pct_sum, humidity_pct_last, humidity_pct_last_at, humidity_pct_last_event_id, pressure_hpa_count, pressure_hpa_min, pressure_hpa_max, pressure_hpa_sum, pressure_hpa_last, pressure_hpa_last_at, pressure_hpa_last_event_id, vibration_mm_s_count, vibration_mm_s_min, vibration_mm_s_max, vibration_mm_s_sum, vibration_mm_s_last, vibration_mm_s_last_at, vibration_mm_s_last_event_id, battery_pct_count, battery_pct_min, battery_pct_max, battery_pct_sum, battery_pct_last, battery_pct_last_at, battery_pct_last_event_id)
SELECT version, device_id, bucket,
       coalesce(sum(count) FILTER (WHERE metric = 'temperature_c'), 0),
       min(min) FILTER (WHERE metric = 'temperature_c'),
       max(max) FILTER (WHERE metric = 'temperature_c'),
       coalesce(sum(sum) FILTER (WHERE metric = 'temperature_c'), 0),
       min(last) FILTER (WHERE metric = 'temperature_c'),
       min(last_at) FILTER (WHERE metric = 'temperature_c'),
       min(last_event_id::text) FILTER (WHERE metric = 'temperature_c')::uuid,
       coalesce(sum(count) FILTER (WHERE metric = 'humidity_pct'), 0),
       min(min) FILTER (WHERE metric = 'humidity_pct'),
       max(max) FILTER (WHERE metric = 'humidity_pct'),
       coalesce(sum(sum) FILTER (WHERE metric = 'humidity_pct'), 0),
       min(last) FILTER (WHERE metric = 'humidity_pct'),
       min(last_at) FILTER (WHERE metric = 'humidity_pct'),
       min(last_event_id::text) FILTER (WHERE metric = 'humidity_pct')::uuid,
       coalesce(sum(count) FILTER (WHERE metric = 'pressure_hpa'), 0),
       min(min) FILTER (WHERE metric = 'pressure_hpa'),
       max(max) FILTER (WHERE metric = 'pressure_hpa'),
       coalesce(sum(sum) FILTER (WHERE metric = 'pressure_hpa'), 0),
       min(last) FILTER (WHERE metric = 'pressure_hpa'),
       min(last_at) FILTER (WHERE metric = 'pressure_hpa'),
       min(last_event_id::text) FILTER (WHERE metric = 'pressure_hpa')::uuid,
       coalesce(sum(count) FILTER (WHERE metric = 'vibration_mm_s'), 0),
       min(min) FILTER (WHERE metric = 'vibration_mm_s'),
       max(max) FILTER (WHERE metric = 'vibration_mm_s'),
       coalesce(sum(sum) FILTER (WHERE metric = 'vibration_mm_s'), 0),
       min(last) FILTER (WHERE metric = 'vibration_mm_s'),
       min(last_at) FILTER (WHERE metric = 'vibration_mm_s'),
       min(last_event_id::text) FILTER (WHERE metric = 'vibration_mm_s')::uuid,
       coalesce(sum(count) FILTER (WHERE metric = 'battery_pct'), 0),
       min(min) FILTER (WHERE metric = 'battery_pct'),
       max(max) FILTER (WHERE metric = 'battery_pct'),
       coalesce(sum(sum) FILTER (WHERE metric = 'battery_pct'), 0),
       min(last) FILTER (WHERE metric = 'battery_pct'),
       min(last_at) FILTER (WHERE metric = 'battery_pct'),
       min(last_event_id::text) FILTER (WHERE metric = 'battery_pct')::uuid
FROM readings_1m_narrow
GROUP BY version, device_id, bucket;

DROP TABLE readings_1m_narrow;

INSERT INTO readings_1h (version, device_id, bucket,
    temperature_c_count, temperature_c_min, temperature_c_max, temperature_c_sum, temperature_c_last, temperature_c_last_at, temperature_c_last_event_id, humidity_pct_count, humidity_pct_min, humidity_pct_max, humidity_pct_sum, humidity_pct_last, humidity_pct_last_at, humidity_pct_last_event_id, pressure_hpa_count, pressure_hpa_min, pressure_hpa_max, pressure_hpa_sum, pressure_hpa_last, pressure_hpa_last_at, pressure_hpa_last_event_id, vibration_mm_s_count, vibration_mm_s_min, vibration_mm_s_max, vibration_mm_s_sum, vibration_mm_s_last, vibration_mm_s_last_at, vibration_mm_s_last_event_id, battery_pct_count, battery_pct_min, battery_pct_max, battery_pct_sum, battery_pct_last, battery_pct_last_at, battery_pct_last_event_id)
SELECT version, device_id, bucket,
       coalesce(sum(count) FILTER (WHERE metric = 'temperature_c'), 0),
       min(min) FILTER (WHERE metric = 'temperature_c'),
       max(max) FILTER (WHERE metric = 'temperature_c'),
       coalesce(sum(sum) FILTER (WHERE metric = 'temperature_c'), 0),
       min(last) FILTER (WHERE metric = 'temperature_c'),
       min(last_at) FILTER (WHERE metric = 'temperature_c'),
       min(last_event_id::text) FILTER (WHERE metric = 'temperature_c')::uuid,
       coalesce(sum(count) FILTER (WHERE metric = 'humidity_pct'), 0),
       min(min) FILTER (WHERE metric = 'humidity_pct'),
       max(max) FILTER (WHERE metric = 'humidity_pct'),
       coalesce(sum(sum) FILTER (WHERE metric = 'humidity_pct'), 0),
       min(last) FILTER (WHERE metric = 'humidity_pct'),
       min(last_at) FILTER (WHERE metric = 'humidity_pct'),
       min(last_event_id::text) FILTER (WHERE metric = 'humidity_pct')::uuid,
       coalesce(sum(count) FILTER (WHERE metric = 'pressure_hpa'), 0),
       min(min) FILTER (WHERE metric = 'pressure_hpa'),
       max(max) FILTER (WHERE metric = 'pressure_hpa'),
       coalesce(sum(sum) FILTER (WHERE metric = 'pressure_hpa'), 0),
       min(last) FILTER (WHERE metric = 'pressure_hpa'),
       min(last_at) FILTER (WHERE metric = 'pressure_hpa'),
       min(last_event_id::text) FILTER (WHERE metric = 'pressure_hpa')::uuid,
       coalesce(sum(count) FILTER (WHERE metric = 'vibration_mm_s'), 0),
       min(min) FILTER (WHERE metric = 'vibration_mm_s'),
       max(max) FILTER (WHERE metric = 'vibration_mm_s'),
       coalesce(sum(sum) FILTER (WHERE metric = 'vibration_mm_s'), 0),
       min(last) FILTER (WHERE metric = 'vibration_mm_s'),
       min(last_at) FILTER (WHERE metric = 'vibration_mm_s'),
       min(last_event_id::text) FILTER (WHERE metric = 'vibration_mm_s')::uuid,
       coalesce(sum(count) FILTER (WHERE metric = 'battery_pct'), 0),
       min(min) FILTER (WHERE metric = 'battery_pct'),
       max(max) FILTER (WHERE metric = 'battery_pct'),
       coalesce(sum(sum) FILTER (WHERE metric = 'battery_pct'), 0),
       min(last) FILTER (WHERE metric = 'battery_pct'),
       min(last_at) FILTER (WHERE metric = 'battery_pct'),
       min(last_event_id::text) FILTER (WHERE metric = 'battery_pct')::uuid
FROM readings_1h_narrow
GROUP BY version, device_id, bucket;

DROP TABLE readings_1h_narrow;

-- Latest state is updated in place on every batch: the same reason as above.
ALTER TABLE device_latest SET (fillfactor = 70);
