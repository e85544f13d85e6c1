-- The projector's read models. Every table carries `version`, so a rebuild can write a new
-- version beside the live one and the old one is dropped by version afterwards.
-- Times are INTEGER microseconds since the Unix epoch (UTC), as in 0001_store.sql; ids are
-- TEXT UUIDs (hyphenated, lowercase), which order like Postgres's uuid. JSON is TEXT.

-- Latest state per device. Reading and status fields move only forward in (time, event id),
-- so out-of-order and repeated events cannot roll them back.
CREATE TABLE device_latest (
    version          INTEGER NOT NULL,
    device_id        TEXT    NOT NULL,
    last_seen        INTEGER NOT NULL,
    reading_at       INTEGER,
    reading_event_id TEXT,
    reading          TEXT,
    status           TEXT,
    status_reason    TEXT,
    status_at        INTEGER,
    status_event_id  TEXT,
    late_readings    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (version, device_id)
);

-- The reading time series. A plain table (not time-partitioned like Postgres's `events`).
CREATE TABLE readings (
    version        INTEGER NOT NULL,
    event_id       TEXT    NOT NULL,
    device_id      TEXT    NOT NULL,
    at             INTEGER NOT NULL,
    ingested_at    INTEGER NOT NULL,
    seq            INTEGER,
    temperature_c  REAL,
    humidity_pct   REAL,
    pressure_hpa   REAL,
    vibration_mm_s REAL,
    battery_pct    REAL,
    extra          TEXT    NOT NULL DEFAULT '{}',
    PRIMARY KEY (version, event_id)
);

CREATE INDEX readings_device_at_idx ON readings (version, device_id, at);
CREATE INDEX readings_at_idx ON readings (version, at);

-- Rollups, one row per metric per device per bucket (bucket = start), kept incrementally.
-- avg = sum / count. `last` is the value with the greatest (device time, event id);
-- `last_event_id` is kept only to break ties the same way on every update.
CREATE TABLE readings_1m (
    version       INTEGER NOT NULL,
    device_id     TEXT    NOT NULL,
    bucket        INTEGER NOT NULL,
    metric        TEXT    NOT NULL,
    count         INTEGER NOT NULL,
    min           REAL    NOT NULL,
    max           REAL    NOT NULL,
    sum           REAL    NOT NULL,
    last          REAL    NOT NULL,
    last_at       INTEGER NOT NULL,
    last_event_id TEXT    NOT NULL,
    PRIMARY KEY (version, device_id, bucket, metric)
);

CREATE TABLE readings_1h (
    version       INTEGER NOT NULL,
    device_id     TEXT    NOT NULL,
    bucket        INTEGER NOT NULL,
    metric        TEXT    NOT NULL,
    count         INTEGER NOT NULL,
    min           REAL    NOT NULL,
    max           REAL    NOT NULL,
    sum           REAL    NOT NULL,
    last          REAL    NOT NULL,
    last_at       INTEGER NOT NULL,
    last_event_id TEXT    NOT NULL,
    PRIMARY KEY (version, device_id, bucket, metric)
);
