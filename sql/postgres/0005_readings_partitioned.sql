-- `readings` range-partitioned by device time `at`, like `events` (by `ingested_at`): the store
-- creates the range partitions (ahead of time, and on demand), the default partition only
-- catches readings no range partition covers, and the projector's retention drops whole
-- partitions. Columns and indexes are unchanged; the primary key gains `at`, the partition key
-- (Postgres requires it), which changes nothing: an event id has one device time.
-- Existing rows are carried over into the default partition; creating a range partition moves
-- the rows it covers out of it.

ALTER TABLE readings RENAME TO readings_plain;
ALTER INDEX readings_pkey RENAME TO readings_plain_pkey;
ALTER INDEX readings_device_at_idx RENAME TO readings_plain_device_at_idx;
ALTER INDEX readings_at_idx RENAME TO readings_plain_at_idx;

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
    PRIMARY KEY (version, event_id, at)
) PARTITION BY RANGE (at);

CREATE TABLE readings_default PARTITION OF readings DEFAULT;

CREATE INDEX readings_device_at_idx ON readings (version, device_id, at);
CREATE INDEX readings_at_idx ON readings (version, at);

INSERT INTO readings SELECT * FROM readings_plain;
DROP TABLE readings_plain;
