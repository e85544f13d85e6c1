-- Operator commands: dead letters keep what a re-drive needs (the record's key and headers) and
-- why they were discarded; every operator change is audited; replays are jobs; projections
-- have versions, one of them live. Timestamps are INTEGER microseconds, as in 0001_store.sql.

ALTER TABLE dlq ADD COLUMN raw_key BLOB;
-- The record's headers as a JSON array of [key, value] (values as UTF-8 text).
ALTER TABLE dlq ADD COLUMN headers TEXT NOT NULL DEFAULT '[]';
ALTER TABLE dlq ADD COLUMN reason TEXT;

CREATE TABLE audit_log (
    audit_id INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,
    who      TEXT    NOT NULL,
    action   TEXT    NOT NULL,
    target   TEXT    NOT NULL,
    detail   TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_target_idx ON audit_log (target, audit_id);

CREATE TABLE replay_jobs (
    job_id       TEXT    PRIMARY KEY NOT NULL,
    created_by   TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    selection    TEXT    NOT NULL,
    target       TEXT    NOT NULL,
    state        TEXT    NOT NULL
                 CHECK (state IN ('running', 'cancelling', 'done', 'failed', 'cancelled')),
    total        INTEGER NOT NULL DEFAULT 0,
    done         INTEGER NOT NULL DEFAULT 0,
    cursor       INTEGER NOT NULL DEFAULT 0,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    finished_at  INTEGER,
    error        TEXT
);

CREATE TABLE projection_versions (
    projection TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    state      TEXT    NOT NULL CHECK (state IN ('live', 'building', 'retired')),
    job_id     TEXT,
    changed_at INTEGER NOT NULL,
    PRIMARY KEY (projection, version)
);
CREATE UNIQUE INDEX projection_versions_live_idx ON projection_versions (projection)
    WHERE state = 'live';
CREATE UNIQUE INDEX projection_versions_building_idx ON projection_versions (projection)
    WHERE state = 'building';
