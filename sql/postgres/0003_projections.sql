-- The projector's read models. Every table carries `version`, so a rebuild can write a new
-- version beside the live one and the old one is dropped by version afterwards.
-- Times are device time (the reading's `at`) unless named otherwise.

-- Latest state per device. Reading and status fields move only forward in (time, event id),
-- so out-of-order and repeated events cannot roll them back.
CREATE TABLE device_latest (
    version          integer     NOT NULL,
    device_id        text        NOT NULL,
    last_seen        timestamptz NOT NULL,
    reading_at       timestamptz,
    reading_event_id uuid,
    reading          jsonb,
    status           text,
    status_reason    text,
    status_at        timestamptz,
    status_event_id  uuid,
    late_readings    bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (version, device_id)
);

-- The reading time series. A plain table for now (not time-partitioned like `events`):
-- retention and partitioning come when its size asks for them.
CREATE TABLE readings (
    version        integer          NOT NULL,
    event_id       uuid             NOT NULL,
    device_id      text             NOT NULL,
    at             timestamptz      NOT NULL,
    ingested_at    timestamptz      NOT NULL,
    seq            bigint,
    temperature_c  double precision,
    humidity_pct   double precision,
    pressure_hpa   double precision,
    vibration_mm_s double precision,
    battery_pct    double precision,
    extra          jsonb            NOT NULL DEFAULT '{}',
    PRIMARY KEY (version, event_id)
);

CREATE INDEX readings_device_at_idx ON readings (version, device_id, at);
CREATE INDEX readings_at_idx ON readings (version, at);

-- Rollups, one row per metric per device per bucket (bucket = start, UTC), kept incrementally.
-- avg = sum / count. `last` is the value with the greatest (device time, event id);
-- `last_event_id` is kept only to break ties the same way on every update.
CREATE TABLE readings_1m (
    version       integer          NOT NULL,
    device_id     text             NOT NULL,
    bucket        timestamptz      NOT NULL,
    metric        text             NOT NULL,
    count         bigint           NOT NULL,
    min           double precision NOT NULL,
    max           double precision NOT NULL,
    sum           double precision NOT NULL,
    last          double precision NOT NULL,
    last_at       timestamptz      NOT NULL,
    last_event_id uuid             NOT NULL,
    PRIMARY KEY (version, device_id, bucket, metric)
);

CREATE TABLE readings_1h (LIKE readings_1m INCLUDING ALL);
